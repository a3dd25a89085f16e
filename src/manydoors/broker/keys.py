"""Redis key and topic names of the Redis backplane, and its Lua scripts (no I/O).

A channel's seq key (``md:c{name}:s``), history list (``md:c{name}:h``) and topic
(``md:c{name}``) share one hash tag, so on a cluster they live in one slot and one
script touches them all. A user's topic is ``md:u{name}``, a node's ``md:n{id}``, and
every broadcast goes to ``md:b{all}``.
"""

from __future__ import annotations

from typing import Final

SEQ_TTL: Final = 30 * 86400  # a channel's seq outlives its history by far (see docs)
BROADCAST: Final = "md:b{all}"

# KEYS: seq, history. ARGV: topic, line prefix, line suffix, size, ttl, seq ttl, push tag.
# %s: PUBLISH, or SPUBLISH on a cluster.
PUBLISH_SCRIPT: Final = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local line = ARGV[2] .. seq .. ARGV[3]
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('RPUSH', KEYS[2], line)
  redis.call('LTRIM', KEYS[2], -size, -1)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
local n = redis.call('%s', ARGV[1], ARGV[7] .. seq .. ' ' .. line)
return {seq, n}
"""
# KEYS: the channel's members hash (user -> nodes holding it). ARGV: topic, user, +1 or -1,
# the join (leave) message. A user's first node in (last node out of) the channel tells
# every node, so each subscriber hears one join and one leave however many nodes it
# spans. %s: PUBLISH, or SPUBLISH on a cluster.
MEMBERS_SCRIPT: Final = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[2]) end
if (ARGV[3] == '1' and n == 1) or (ARGV[3] == '-1' and n == 0) then
  redis.call('%s', ARGV[1], ARGV[4])
end
return n
"""
# KEYS: seq, history. ARGV: topic, size, ttl, seq ttl. A hole: a seq that names no
# message, taken by a node that delivered publishes unsequenced while it could not reach
# Redis (broker/outage.py). The list keeps an empty entry for it (HOLE), so that its
# entries still end at the seq one per seq, and the topic hears ``h<seq> `` (the space:
# a node reads every payload on a channel's topic up to its first space).
# %s: PUBLISH, or SPUBLISH on a cluster.
HOLE_SCRIPT: Final = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local size = tonumber(ARGV[2])
if size > 0 then
  redis.call('RPUSH', KEYS[2], '')
  redis.call('LTRIM', KEYS[2], -size, -1)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('%s', ARGV[1], 'h' .. seq .. ' ')
return seq
"""
HOLE: Final = b""  # a hole's entry in a history list: no event line is empty
# KEYS: seq, history. The seq and the lines it ends, read atomically.
HISTORY_SCRIPT: Final = (
    "return {redis.call('GET', KEYS[1]) or '0', redis.call('LRANGE', KEYS[2], 0, -1)}"
)


def tag(name: str) -> str:
    """A Redis hash tag for ``name``: all keys and the topic of a channel share a slot.

    A name with a brace would end the tag early (and split a channel's keys over
    slots), so such names are hex-encoded; the ``x`` keeps the two forms apart.
    """
    if "{" in name or "}" in name:
        return "x{" + name.encode().hex() + "}"
    return "{" + name + "}"


def untag(topic: bytes, start: int) -> str:
    """The name in ``topic`` from ``start`` (where its tag begins) to the end."""
    part = topic[start:]
    if part[:1] == b"x":
        return bytes.fromhex(part[2:-1].decode()).decode()
    return part[1:-1].decode()


def channel_topic(channel: str) -> str:
    """The pub/sub topic of ``channel`` (also the stem of its keys)."""
    return "md:c" + tag(channel)


def user_topic(user: str) -> str:
    """The pub/sub topic of ``user``."""
    return "md:u" + tag(user)


def node_topic(node: str) -> str:
    """The pub/sub topic of a node (answers to its presence questions)."""
    return f"md:n{{{node}}}"


def split_at_seq(line: bytes) -> tuple[bytes, bytes]:
    """An event line encoded with seq 0, cut around that 0 (the script puts the seq in)."""
    at = line.index(b'"seq":0') + 6
    return line[:at], line[at + 1 :]


def publish_args(kind: str, key: str, line: bytes) -> tuple[bytes, ...]:
    """What varies between publishes: topic (and keys), and the line around its seq.

    ``kind`` is ``c`` (to channel ``key``: the script's keys, topic, line halves),
    ``b`` (a broadcast: the same, on the broadcast topic) or ``u`` (to user ``key``:
    a plain PUBLISH of the line to the user's topic).
    """
    if kind == "u":
        return (user_topic(key).encode(), line)
    topic = channel_topic(key).encode() if kind == "c" else BROADCAST.encode()
    return (topic + b":s", topic + b":h", topic, *split_at_seq(line))


def hole_keys(kind: str, key: str) -> tuple[bytes, bytes, bytes]:
    """The seq key, history key and topic of channel ``key`` (``kind`` ``c``) or of the
    broadcasts (``b``): the hole script's keys and its first argument."""
    topic = channel_topic(key).encode() if kind == "c" else BROADCAST.encode()
    return (topic + b":s", topic + b":h", topic)


def safe_url(url: str) -> str:
    """The URL without a password, for stats and errors."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"

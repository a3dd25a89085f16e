"""The Redis backplane: several nodes sharing one Redis (or Redis Cluster) are one server.

Each node still routes between its own workers with its ``Router``, which holds this
backplane; Redis carries messages between nodes, and a node subscribes only to what
its connections need (the router tells it when that changes):

- a channel's topic while the node holds a subscriber of it,
- a user's topic while the node holds a connection of that user, so a ``send`` to a
  user reaches only the nodes where that user is (no fan-out to every node),
- the broadcast topic, and the node's own topic (answers to its presence questions).

A publish runs one Lua script: INCR the channel's seq, append the event line to the
channel's history list (trimmed to ``history_size``, EXPIRE ``history_ttl``), and
PUBLISH it, atomically, so seqs are monotonic per channel across nodes and the history
never misses a published seq. On a cluster the channel's keys and topic share a hash
tag (one slot) and the script uses SPUBLISH: sharded pub/sub (Redis 7).

When Redis goes away the node keeps serving: it reports ``degraded``, delivers what is
published on it to its own subscribers unsequenced (``seq`` 0, in no history; a hole in
the seqs afterwards tells every client that something went past it: outage.py),
reconnects with backoff and resubscribes everything. docs/scale-out.md says what an
outage loses and what history recovers.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import deque
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from msgspec import Raw
from redis.asyncio.cluster import RedisCluster

from ..node.link import Link
from ..protocol.ipc import Kind
from ..protocol.messages import broadcast_line, dm_line, join_line, msg_line
from .asks import Asks
from .backplane import Backplane, answer_recover
from .base import BrokerStats, ChannelList, HistoryPage, PresenceResult, Published, RedisStats
from .catchup import Catchup, ChannelState
from .history import History, Limits
from .keys import (
    BROADCAST,
    MEMBERS_SCRIPT,
    SEQ_TTL,
    channel_topic,
    node_topic,
    publish_args,
    safe_url,
    split_at_seq,
    tag,
    untag,
    user_topic,
)
from .outage import Outage
from .outbox import Outbox, Outgoing
from .pubsub import RespConnection, Shard

BACKOFF: Final = (0.1, 5.0)  # first and longest wait between reconnection attempts

_encode_json: Final = msgspec.json.Encoder().encode
_decode_part: Final = msgspec.json.Decoder(PresenceResult).decode
_decode_channels: Final = msgspec.json.Decoder(ChannelList).decode


# A publish waiting to be sent: kind ("c" channel, "u" user, "b" broadcast), channel or
# user, event line with seq 0, and the API's future (None for a worker's publish).


class RedisBackplane(Backplane):
    """Nodes sharing one Redis: seqs and history in Redis, a topic per channel and user."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        history_size: int = 100,
        history_ttl: float = 300.0,
        limits: Limits | None = None,
    ) -> None:
        self.url = url
        # Of the channels forwarded here; ``limits``: per-namespace sizes and TTLs.
        self.history = History(history_size, history_ttl, limits)
        self.node = secrets.token_hex(6)
        self.node_topic = node_topic(self.node).encode()
        self.cluster = False
        self.redis: Any = None  # redis.asyncio.Redis or RedisCluster
        self.shards: dict[str, Shard] = {}
        self.state: dict[str, ChannelState] = {}
        self.degraded = True  # until connected and subscribed
        self.reconnecting: asyncio.Task[None] | None = None
        self.outbox = Outbox(self, url)  # publishes to Redis, in order, pipelined
        # Subscription marks: a SYNC is answered once every subscription asked before
        # it is in effect (confirmed, and for a channel its seq read).
        self.issued = 0
        self.watermark = 0
        self.done_marks: set[int] = set()
        self.awaiting: dict[bytes, deque[int]] = {}  # topic -> marks of its SUBSCRIBEs
        self.syncs: dict[Link, deque[int]] = {}
        self.inits: list[tuple[str, int]] = []  # channels whose seq is to be read
        self.inits_ready = asyncio.Event()
        self.catchup = Catchup(self)  # recoveries and history reads through Redis
        self.asks = Asks(self)  # presence and channel lists asked of the other nodes
        self.received = 0  # messages this node received from Redis
        self.outage = Outage(self)  # publishes delivered here while Redis is away
        self.reconnects = 0
        self.last_error = ""
        # Joins and leaves to count in Redis (namespaces with join_leave), in order.
        self.members_out: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()

    # --- connection -------------------------------------------------------------------

    async def start(self) -> None:
        probe = aioredis.Redis.from_url(self.url, socket_connect_timeout=2)
        try:
            info = await probe.info("cluster")
            self.cluster = bool(info.get("cluster_enabled"))
        except Exception as exc:
            raise ConnectionError(
                f"redis broker: cannot reach {safe_url(self.url)}: {exc}"
            ) from None
        finally:
            await probe.aclose()
        opts: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 5}
        if self.cluster:
            self.redis = RedisCluster.from_url(self.url, **opts)
            await self.redis.initialize()
        else:
            self.redis = aioredis.Redis.from_url(self.url, **opts)
        self.outbox.start(self.cluster)
        self.router.spawn(self.outbox.run())
        self.router.spawn(self._initializer())
        self.router.spawn(self._member_writer())
        try:
            await asyncio.wait_for(self._recovered_at(await self._connect()), 10)
        except Exception as exc:
            url = safe_url(self.url)
            raise ConnectionError(f"redis broker: cannot subscribe on {url}: {exc}") from None

    async def close(self) -> None:
        for shard in self.shards.values():
            await shard.close()
        await self.router.cancel_tasks()  # before the client they use goes
        if self.redis is not None:
            await self.redis.aclose()

    def _make_shards(self) -> dict[str, Shard]:
        if not self.cluster:
            conn = RespConnection.from_url(self.url)
            return {"redis": Shard("redis", conn, self._on_push, self._lost)}
        shards = {}
        tls = self.url.startswith("rediss://")
        for node in self.redis.get_primaries():
            kw = node.connection_kwargs
            params = {k: kw.get(k) for k in ("host", "port", "username", "password")}
            conn = RespConnection({**params, "tls": tls})
            shards[node.name] = Shard(node.name, conn, self._on_push, self._lost, sharded=True)
        return shards

    def _shard(self, topic: bytes) -> Shard | None:
        if not self.cluster:
            return self.shards.get("redis")
        return self.shards.get(self.redis.get_node_from_key(topic).name)

    async def _connect(self) -> int:
        """Open every shard, subscribe to all the node holds (raise on failure).

        Returns the mark after which the subscriptions are in effect.
        """
        if self.cluster:
            await self.redis.initialize()
        else:  # command connections from before an outage are dead
            await self.redis.connection_pool.disconnect()
            await self.outbox.pipeline.reset()
        if self.outage.pending:  # before any message through Redis reaches our clients
            await self.outage.take_holes()
        shards = self._make_shards()
        try:
            for shard in shards.values():
                await shard.open()
            if any(shard.lost for shard in shards.values()):  # one died while others opened
                raise ConnectionError("a subscriber connection closed while connecting")
        except BaseException:
            for shard in shards.values():
                await shard.close()
            raise
        self.shards = shards
        for st in self.state.values():
            st.ready = False
        topics = [BROADCAST.encode(), self.node_topic]
        topics += [channel_topic(c).encode() for c in self.router.channels]
        topics += [user_topic(u).encode() for u in self.router.users]
        last = 0
        for topic in topics:
            last = self._subscribe(topic)
        return last

    async def _recovered_at(self, mark: int) -> None:
        while self.watermark < mark and self.shards:
            await asyncio.sleep(0.01)
        if self.shards:
            self.degraded = False
            if self.outage.pending:  # delivered here while resubscribing: its holes now
                self.router.spawn(self._take_holes())

    async def _take_holes(self) -> None:
        try:
            await self.outage.take_holes()
        except Exception as exc:
            self.lost_command(exc)  # they stay pending: taken after the reconnection

    def _lost(self, shard: Shard, exc: BaseException | None) -> None:
        if exc is not None:
            self.last_error = f"{type(exc).__name__}: {exc}"
        self.degraded = True
        for each in {shard, *self.shards.values()}:
            self.router.spawn(each.close())
        self.shards = {}
        # Nothing asked of Redis will be confirmed now: let every waiting SYNC through.
        self.awaiting.clear()
        self.inits.clear()
        self._complete(*range(self.watermark + 1, self.issued + 1))
        for channel, st in self.state.items():
            st.ready = True
            self._flush_channel(channel, st)
        self.deliver_unseen()
        if self.reconnecting is None or self.reconnecting.done():
            self.reconnecting = self.router.spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay = BACKOFF[0]
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            try:
                mark = await self._connect()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = min(delay * 2, BACKOFF[1])
                continue
            await self._recovered_at(mark)
            if not self.degraded:  # else lost again while resubscribing: try again
                self.reconnects += 1
                return

    @property
    def status(self) -> str:
        return "degraded" if self.degraded else "ok"

    # --- subscriptions ----------------------------------------------------------------

    def _subscribe(self, topic: bytes) -> int:
        self.issued += 1
        mark = self.issued
        shard = self._shard(topic) if self.shards else None
        if shard is None:
            self._complete(mark)
        else:
            self.awaiting.setdefault(topic, deque()).append(mark)
            shard.send(b"SSUBSCRIBE" if self.cluster else b"SUBSCRIBE", topic)
        return mark

    def _unsubscribe(self, topic: bytes) -> None:
        shard = self._shard(topic) if self.shards else None
        if shard is not None:
            shard.send(b"SUNSUBSCRIBE" if self.cluster else b"UNSUBSCRIBE", topic)

    def _complete(self, *marks: int) -> None:
        self.done_marks.update(marks)
        while self.watermark + 1 in self.done_marks:
            self.watermark += 1
            self.done_marks.discard(self.watermark)
        for link, needs in list(self.syncs.items()):
            while needs and needs[0] <= self.watermark:
                needs.popleft()
                link.send(Kind.SYNCED)
            if not needs:
                del self.syncs[link]

    def sync(self, link: Link) -> None:
        needs = self.syncs.get(link)
        if needs is None and self.issued <= self.watermark:
            link.send(Kind.SYNCED)
        else:
            self.syncs.setdefault(link, deque()).append(self.issued)

    def forget(self, link: Link) -> None:
        self.syncs.pop(link, None)

    def channel_added(self, channel: str) -> None:
        self.state[channel] = ChannelState(ready=not self.shards)
        self._subscribe(channel_topic(channel).encode())

    def channel_removed(self, channel: str) -> None:
        st = self.state.pop(channel, None)
        self.history.forget(channel)
        self._unsubscribe(channel_topic(channel).encode())
        if st is not None:
            for link, req, _ in st.recoveries:
                answer_recover(link, channel, req, st.last, None)

    def user_added(self, user: str) -> None:
        self._subscribe(user_topic(user).encode())

    def user_removed(self, user: str) -> None:
        self._unsubscribe(user_topic(user).encode())

    async def _initializer(self) -> None:
        """Read the seq of newly subscribed channels, many per round trip."""
        while True:
            await self.inits_ready.wait()
            self.inits_ready.clear()
            batch, self.inits = self.inits, []
            try:
                pipe = self.redis.pipeline(transaction=False)
                for channel, _ in batch:
                    pipe.get(f"md:c{tag(channel)}:s")
                values = await pipe.execute()
            except Exception as exc:
                self.lost_command(exc)
                continue
            for (channel, mark), value in zip(batch, values, strict=True):
                st = self.state.get(channel)
                if st is not None and not st.ready:
                    st.last = int(value or 0)
                    st.ready = True
                    self._flush_channel(channel, st)
                    for link, req, since in st.recoveries:
                        self.recover(link, channel, req, since)
                    st.recoveries.clear()
                self._complete(mark)

    def deliver_unseen(self) -> None:
        """Redis went away: this node's channel publishes that it took but whose push
        never came back are delivered here, in seq order, instead of lost here."""
        recent = list(self.outbox.recent)
        self.outbox.recent.clear()
        for channel, seq, line in recent:
            st = self.state.get(channel)
            if st is not None and seq > st.last:
                prefix, suffix = split_at_seq(line)
                self._forward(channel, st, seq, b"%s%d%s" % (prefix, seq, suffix))

    def _flush_channel(self, channel: str, st: ChannelState) -> None:
        buffered, st.buffer = st.buffer, []
        for seq, line, exclude in buffered:
            if line:
                self._forward(channel, st, seq, line, exclude)
            else:  # a hole
                st.skip(seq)

    # --- messages from Redis ----------------------------------------------------------

    def _on_push(self, shard: Shard, push: list[Any]) -> None:
        kind = push[0]
        if kind in (b"message", b"smessage"):
            self.received += 1
            self._on_message(push[1], push[2])
        elif kind in (b"subscribe", b"ssubscribe"):
            marks = self.awaiting.get(push[1])
            if not marks:
                return
            mark = marks.popleft()
            if not marks:
                del self.awaiting[push[1]]
            if push[1].startswith(b"md:c"):
                self.inits.append((untag(push[1], 4), mark))
                self.inits_ready.set()
            else:
                self._complete(mark)

    def _on_message(self, topic: bytes, payload: bytes) -> None:
        head = topic[:4]
        if head == b"md:u":
            if payload[:1] == b"{":
                self.router.deliver_user(untag(topic, 4), payload)
            else:
                self.to_user(untag(topic, 4), payload)
        elif head == b"md:c":
            channel = untag(topic, 4)
            space = payload.index(b" ")
            if payload[:1] == b"m":
                st = self.state.get(channel)
                if st is not None:
                    seq = int(payload[1:space])
                    if st.ready:
                        self._forward(channel, st, seq, payload[space + 1 :])
                    else:
                        st.buffer.append((seq, payload[space + 1 :], None))
            elif payload[:1] == b"x":  # x<conn> m<seq> <line>: leave that connection out
                self._excluding(channel, payload[1:space].decode(), payload[space + 1 :])
            elif payload[:1] == b"j":  # a user's first join or last leave: j <line>
                self.router.deliver_channel(channel, payload[space + 1 :])
            elif payload[:1] == b"p":  # a presence question: p<node> <token>
                self.asks.presence_asked(channel, payload)
            elif payload[:1] == b"h":  # a hole: h<seq>, a seq that names no message
                self._hole(channel, int(payload[1:space]))
        elif head == b"md:b":
            if payload[:1] == b"b":
                self.router.deliver_all(payload[payload.index(b" ") + 1 :])
            else:  # x<conn> b<seq> <line>, or l...: a question for every node
                self._on_everyone(payload)
        elif topic == self.node_topic:  # answers to this node's questions
            self.asks.answered(payload)

    def _forward(
        self, channel: str, st: ChannelState, seq: int, line: bytes, exclude: str | None = None
    ) -> None:
        if seq <= st.last:
            return  # published before this node's subscription took effect
        st.last = seq
        self.history.add(channel, seq, line, time.monotonic())
        if exclude is None:
            self.router.deliver_channel(channel, line)
        else:
            self.router.deliver(Kind.DELIVER_CHANNEL, channel, line, exclude)
        if st.waiters:
            st.reached(seq)

    def _hole(self, channel: str, seq: int) -> None:
        """A node took a hole (outage.py): nothing to deliver, nothing to keep."""
        st = self.state.get(channel)
        if st is not None:
            if st.ready:
                st.skip(seq)
            else:
                st.buffer.append((seq, b"", None))

    # --- publishing -------------------------------------------------------------------

    def worker_pub(self, channel: str, sender: str | None, data: Raw) -> None:
        self.outbox.put("c", channel, msg_line(channel, 0, sender, data))

    def worker_send(self, user: str, sender: str | None, data: Raw) -> None:
        self.outbox.put("u", user, dm_line(sender, data))

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        line = msg_line(channel, 0, sender, data)
        if exclude is not None:
            return await self._ask_excluding("c", channel, line, exclude)
        return await self.outbox.ask("c", channel, line)

    async def publish_user(
        self, user: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        line = dm_line(sender, data)
        if exclude is not None:  # a user's topic carries it in the payload: x<conn> <line>
            line = b"x%s %s" % (exclude.encode(), line)
        return await self.outbox.ask("u", user, line)

    async def broadcast(
        self, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        line = broadcast_line(0, sender, data)
        if exclude is not None:
            return await self._ask_excluding("b", "", line, exclude)
        return await self.outbox.ask("b", "", line)

    async def _ask_excluding(self, kind: str, key: str, line: bytes, exclude: str) -> Published:
        """A channel publish or a broadcast that leaves a connection out.

        The script's push tag names the connection (``x<conn> m``), so the exclusion
        travels to every node while the history keeps the plain line. Rare (the API's
        ``exclude``), so sent on its own rather than through the pipelined outbox: the
        seq still comes from the script.
        """
        if not self.degraded:
            size, ttl = self.history.limits_of(key) if kind == "c" else (0, self.history.ttl)
            tag = b"x%s %s" % (exclude.encode(), b"m" if kind == "c" else b"b")
            args = (*publish_args(kind, key, line), size, int(ttl) or 1, SEQ_TTL, tag)
            try:
                seq, nodes = await self.redis.eval(self.outbox.script, 2, *args)
            except Exception as exc:
                self.lost_command(exc)
            else:
                self.outbox.sent += 1
                return Published(seq=int(seq), nodes=int(nodes))
        # Redis is away: this node's recipients still get it, unsequenced.
        return self.outage.deliver_excluding(kind, key, line, exclude)

    def to_user(self, user: str, payload: bytes) -> int:
        """What came on a user's topic: a dm line, ``x<conn> <line>`` (a dm that leaves
        a connection out), ``d<reason>`` (disconnect) or ``u<channel>`` (unsubscribe)."""
        first = payload[:1]
        if first == b"{":
            return self.router.deliver_user(user, payload)
        if first == b"x":
            space = payload.index(b" ")
            exclude = payload[1:space].decode()
            return self.router.deliver(Kind.DELIVER_USER, user, payload[space + 1 :], exclude)
        if first == b"d":
            return self.router.tell_user(user, Kind.DISCONNECT, payload[1:])
        if first == b"u":
            return self.router.tell_user(user, Kind.UNSUBSCRIBE, payload[1:])
        return 0

    def _excluding(self, channel: str, exclude: str, rest: bytes) -> None:
        """A channel message that leaves a connection out: ``rest`` is ``m<seq> <line>``."""
        st = self.state.get(channel)
        if st is None:
            return
        space = rest.index(b" ")
        seq, line = int(rest[1:space]), rest[space + 1 :]
        if st.ready:
            self._forward(channel, st, seq, line, exclude)
        else:
            st.buffer.append((seq, line, exclude))

    def _on_everyone(self, payload: bytes) -> None:
        """What came on the broadcast topic besides a broadcast."""
        if payload[:1] == b"x":  # x<conn> b<seq> <line>: a broadcast that leaves one out
            first = payload.index(b" ")
            line = payload[payload.index(b" ", first + 1) + 1 :]
            self.router.deliver(Kind.DELIVER_ALL, "", line, payload[1:first].decode())
        elif payload[:1] == b"l":  # l<node> <token> <limit> <prefix>: list your channels
            self.asks.channels_asked(payload)

    # --- the API's commands, on the nodes that hold the user ----------------------------

    async def disconnect(self, user: str, reason: str) -> Published:
        return await self.outbox.ask("u", user, b"d" + reason.encode())

    async def unsubscribe(self, user: str, channel: str) -> Published:
        return await self.outbox.ask("u", user, b"u" + channel.encode())

    def deliver_locally(self, batch: list[Outgoing]) -> None:
        """While Redis is away: this node's recipients still get what is published here."""
        self.outage.deliver(batch)

    # --- joins and leaves across nodes ---------------------------------------------------

    def joined(self, channel: str, user: str, joined: bool) -> None:
        """Count the node in (out of) the channel's members in Redis, in order."""
        self.members_out.put_nowait((channel, user, joined))

    async def _member_writer(self) -> None:
        """One at a time, so that a user's join and leave reach Redis in their order."""
        script = MEMBERS_SCRIPT % ("spublish" if self.cluster else "publish")
        while True:
            channel, user, joined = await self.members_out.get()
            line = join_line(channel, user, joined)
            if self.degraded:  # alone meanwhile: this node's subscribers still hear it
                self.router.deliver_channel(channel, line)
                self.router.announce(channel, user, joined)
                continue
            key = f"md:c{tag(channel)}:j"
            delta = 1 if joined else -1
            try:
                nodes = await self.redis.eval(
                    script, 1, key, channel_topic(channel), user, delta, b"j " + line
                )
            except Exception as exc:
                self.lost_command(exc)
                self.router.deliver_channel(channel, line)
                continue
            if (joined and nodes == 1) or (not joined and nodes == 0):
                self.router.announce(channel, user, joined)  # once, by the node that saw it

    def lost_command(self, exc: Exception) -> None:
        """A command failed: Redis is unreachable; the shards will notice (or be told)."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.shards:
            next(iter(self.shards.values()))._lost(exc)

    # --- history and presence ---------------------------------------------------------

    def recover(self, link: Link, channel: str, req: int, since: int) -> None:
        self.catchup.recover(link, channel, req, since)

    async def presence(self, channel: str) -> PresenceResult:
        return await self.asks.presence(channel)

    async def list_channels(self, prefix: str, limit: int) -> ChannelList:
        return await self.asks.channels(prefix, limit)

    async def read_history(self, channel: str, since: int | None, limit: int) -> HistoryPage:
        return await self.catchup.read(channel, since, limit)

    def stats(self, own: BrokerStats) -> RedisStats:
        return RedisStats(
            **msgspec.structs.asdict(own),
            node=self.node,
            redis=safe_url(self.url),
            cluster=self.cluster,
            received_from_redis=self.received,
            sent_to_redis=self.outbox.sent,
            delivered_locally_while_degraded=self.outage.delivered,
            reconnects=self.reconnects,
            last_error=self.last_error,
        )

"""Per-channel history of recent messages, for ``sub`` with ``since`` (no I/O, no clock).

The local backplane keeps every channel's last ``size`` messages here. The Redis
backplane keeps the messages it forwarded for the channels its node subscribes to, so a
reconnecting client is usually answered without a Redis round trip; Redis holds the
authoritative history of every channel.

A channel's history expires ``ttl`` seconds after its last message, as in Redis
(the list's EXPIRE is refreshed by each publish). Callers pass ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

Entry = tuple[int, bytes]  # (seq, event line)
Limits = Callable[[str], tuple[int, float]]  # channel -> (size, ttl): its namespace's


class History:
    __slots__ = ("channels", "limits", "size", "ttl")

    def __init__(self, size: int, ttl: float, limits: Limits | None = None) -> None:
        self.size = size
        self.ttl = ttl
        # Per-namespace sizes and TTLs (namespaces.Namespaces.history); None: one for all.
        self.limits = limits
        # channel -> (time of the last message, its recent messages oldest first, its
        # TTL): the limits are looked up when a channel's history starts, not per message.
        self.channels: dict[str, tuple[float, deque[Entry], float]] = {}

    def limits_of(self, channel: str) -> tuple[int, float]:
        """(size, ttl) of ``channel``'s history."""
        return (self.size, self.ttl) if self.limits is None else self.limits(channel)

    def add(self, channel: str, seq: int, line: bytes, now: float) -> None:
        held = self.channels.get(channel)
        if held is not None and now - held[0] <= held[2]:
            _, entries, ttl = held
        else:  # new, or expired (as Redis's list would have): start afresh
            size, ttl = self.limits_of(channel)
            if size <= 0:
                return
            entries = deque(maxlen=size)
        entries.append((seq, line))
        self.channels[channel] = (now, entries, ttl)

    def entries(self, channel: str, now: float) -> deque[Entry] | tuple[()]:
        held = self.channels.get(channel)
        if held is None:
            return ()
        if now - held[0] > held[2]:
            del self.channels[channel]
            return ()
        return held[1]

    def forget(self, channel: str) -> None:
        self.channels.pop(channel, None)

    def sweep(self, now: float) -> int:
        """Drop every expired channel; return how many were dropped."""
        old = [ch for ch, (t, _, ttl) in self.channels.items() if now - t > ttl]
        for ch in old:
            del self.channels[ch]
        return len(old)

    def __len__(self) -> int:
        return len(self.channels)


# A recovery's ``since`` that asks for the channel's last line only (a native client's
# ``since`` is at most 2**63 - 1, so it cannot say this).
LAST: Final = 2**64 - 1


def missed(since: int, seq: int, *sources: Iterable[Entry]) -> list[bytes] | None:
    """The lines of seqs ``since+1 .. seq`` in order from any of ``sources``, or None.

    None means the history does not cover the gap (too old, expired, or a seq from
    the future: the channel's counter was reset), so the client cannot recover.
    ``since`` = LAST asks for the last line alone (a Pusher cache channel's).
    """
    if since == LAST:
        since = max(seq - 1, 0)
    if since > seq:
        return None
    found: dict[int, bytes] = {}
    for source in sources:
        for s, line in source:
            if since < s <= seq:
                found[s] = line
    if len(found) != seq - since:
        return None
    return [found[s] for s in range(since + 1, seq + 1)]

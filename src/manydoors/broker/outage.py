"""A node cut off from Redis: its publishes delivered here, unsequenced, and a hole after.

While Redis is unreachable (``RedisBackplane.degraded``) nothing can number a publish:
the channel's counter is in Redis, and other nodes may go on numbering through it (a
partition). So a channel publish made on this node meanwhile is delivered to this
node's subscribers **unsequenced**: with ``seq`` 0, which names no message (seqs start
at 1), and kept in no history. A broadcast the same (its ``seq`` 0); a user's ``dm`` has
no seq.

Afterwards every client that may have missed something must be able to tell, on every
node: this node's clients did not get what went through Redis meanwhile, nor what other
cut-off nodes delivered; the other nodes' clients did not get this node's. So the node
remembers where it delivered unsequenced, and once Redis answers again it takes a
**hole** in each of those channels (and in the broadcasts): one seq that names no
message, with an empty entry in the history list (``keys.HOLE_SCRIPT``). A subscriber
that stayed connected sees the seqs jump over it; a ``sub`` with ``since`` from before
the hole answers ``recovered: false``; ``GET /api/history`` says the same. The holes
are taken before the node resubscribes, so its own subscribers see no message numbered
through Redis between the unsequenced ones and the hole; what is published here while
it resubscribes gets its hole right after the node reports ``ok`` (then the hole may
come after a few live messages: it still comes, so the client is still told).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, Protocol

from ..protocol.ipc import Kind
from .backplane import Routes
from .base import Published
from .history import History
from .keys import HOLE_SCRIPT, SEQ_TTL, hole_keys
from .outbox import Outgoing

HOLES_PER_TRIP: Final = 1000  # hole scripts per pipeline round trip


class Plane(Protocol):
    """What the outage uses of the Redis backplane."""

    redis: Any  # redis.asyncio.Redis or RedisCluster
    cluster: bool
    history: History
    router: Routes

    def to_user(self, user: str, payload: bytes) -> int: ...


class Outage:
    """What this node delivered unsequenced, and the holes that make it known."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.channels: set[str] = set()  # delivered unsequenced on, hole not yet taken
        self.broadcast = False  # a broadcast delivered unsequenced, hole not yet taken
        self.delivered = 0  # publishes delivered on this node only
        self.holes = 0  # holes taken
        self.taking = asyncio.Lock()  # one at a time: a failed attempt gives its holes back

    @property
    def pending(self) -> bool:
        """Some hole is still to be taken."""
        return self.broadcast or bool(self.channels)

    def deliver(self, batch: list[Outgoing]) -> None:
        """Redis is away: this node's recipients still get what is published here.

        Channel and broadcast lines were encoded with seq 0 (the script puts the seq
        in): they go out as they are, unsequenced.
        """
        router = self.plane.router
        for kind, key, line, fut in batch:
            self.delivered += 1
            if kind == "u":
                workers = self.plane.to_user(key, line)  # a dm line, or a command
            elif kind == "b":
                self.broadcast = True
                workers = router.deliver_all(line)
            else:
                self.channels.add(key)
                workers = router.deliver_channel(key, line)
            if fut is not None and not fut.done():
                fut.set_result(Published(degraded=True, workers=workers))

    def deliver_excluding(self, kind: str, key: str, line: bytes, exclude: str) -> Published:
        """``deliver`` for the API's publish that leaves the connection ``exclude`` out."""
        self.delivered += 1
        if kind == "b":
            self.broadcast = True
            workers = self.plane.router.deliver(Kind.DELIVER_ALL, "", line, exclude)
        else:
            self.channels.add(key)
            workers = self.plane.router.deliver(Kind.DELIVER_CHANNEL, key, line, exclude)
        return Published(degraded=True, workers=workers)

    async def take_holes(self) -> None:
        """Take the pending holes in Redis; raise if it fails (they stay pending)."""
        async with self.taking:
            await self._take_pending()

    async def _take_pending(self) -> None:
        todo = [("c", channel) for channel in sorted(self.channels)]
        if self.broadcast:
            todo.append(("b", ""))
        self.channels, self.broadcast = set(), False
        try:
            while todo:
                part = todo[:HOLES_PER_TRIP]
                await self._take(part)
                del todo[: len(part)]
        except BaseException:  # what is left stays pending, taken on the next attempt
            for kind, key in todo:
                if kind == "b":
                    self.broadcast = True
                else:
                    self.channels.add(key)
            raise

    async def _take(self, part: list[tuple[str, str]]) -> None:
        plane = self.plane
        script = HOLE_SCRIPT % ("spublish" if plane.cluster else "publish")
        pipe = plane.redis.pipeline(transaction=False)
        for kind, key in part:
            size, ttl = plane.history.limits_of(key) if kind == "c" else (0, plane.history.ttl)
            args = (*hole_keys(kind, key), size, int(ttl) or 1, SEQ_TTL)
            pipe.execute_command("EVAL", script, 2, *args)
        await pipe.execute()
        self.holes += len(part)

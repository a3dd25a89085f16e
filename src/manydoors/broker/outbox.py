"""The Redis backplane's publishes: queued in order, sent pipelined, a round trip a batch.

A worker's ``pub`` and ``send`` and the API's publishes and commands queue here; one
task sends them in order, up to BATCH per pipeline round trip, each through the publish
script (INCR the seq, append to the history, PUBLISH; the channel's namespace gives the
history's size and TTL). The RESP of the parts every publish repeats is packed once per
batch. While Redis is away the backplane delivers the batch on this node instead.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any, Final, Protocol

from .base import Published
from .history import History
from .keys import PUBLISH_SCRIPT, SEQ_TTL, publish_args
from .pubsub import RawPipeline, bulks, pack

BATCH: Final = 1000  # publishes per pipeline round trip

# (kind: c channel, u user, b broadcast; key; the line; who waits for the answer)
Outgoing = tuple[str, str, bytes, "asyncio.Future[Published] | None"]


class Plane(Protocol):
    """What the outbox uses of the Redis backplane."""

    redis: Any  # redis.asyncio.Redis or RedisCluster
    cluster: bool
    degraded: bool
    history: History

    def lost_command(self, exc: Exception) -> None: ...

    def deliver_locally(self, batch: list[Outgoing]) -> None: ...

    def deliver_unseen(self) -> None: ...


class Outbox:
    """Publishes to Redis, in the order they were asked."""

    def __init__(self, plane: Plane, url: str) -> None:
        self.plane = plane
        self.queue: deque[Outgoing] = deque()
        self.ready = asyncio.Event()
        self.pipeline = RawPipeline(url)
        self.tails: dict[tuple[int, float], bytes] = {}  # packed script tails by limits
        self.sent = 0  # publishes this node sent to Redis
        # The last channel publishes Redis took (channel, seq, line with seq 0): if Redis
        # dies after answering and before its push reaches this node, the backplane
        # delivers them here (deliver_unseen) rather than lose them for this node.
        self.recent: deque[tuple[str, int, bytes]] = deque(maxlen=2 * BATCH)
        self.script = PUBLISH_SCRIPT % "publish"
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()

    def start(self, cluster: bool) -> None:
        """A cluster publishes with SPUBLISH (sharded pub/sub)."""
        self.script = PUBLISH_SCRIPT % ("spublish" if cluster else "publish")
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()

    def put(self, kind: str, key: str, line: bytes) -> None:
        """Queue a worker's publish (nobody waits for its answer)."""
        self.queue.append((kind, key, line, None))
        self.ready.set()

    async def ask(self, kind: str, key: str, line: bytes) -> Published:
        """Queue the API's publish or command; its answer comes with its batch's."""
        fut: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        self.queue.append((kind, key, line, fut))
        self.ready.set()
        return await fut

    async def run(self) -> None:
        """Send queued publishes in order, pipelined: one round trip per batch."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), BATCH))]
            if self.queue:
                self.ready.set()
            plane = self.plane
            if plane.degraded:
                plane.deliver_locally(batch)
                continue
            try:
                results = await self._execute(batch)
            except Exception as exc:
                plane.lost_command(exc)
                plane.deliver_locally(batch)
                continue
            self.sent += len(batch)
            for (kind, key, line, fut), result in zip(batch, results, strict=True):
                if kind == "c" and not isinstance(result, Exception):
                    self.recent.append((key, int(result[0]), line))
                if fut is None or fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                elif kind == "u":
                    fut.set_result(Published(nodes=int(result)))
                else:
                    fut.set_result(Published(seq=int(result[0]), nodes=int(result[1])))
            if plane.degraded:  # Redis went away while this batch's answers came back
                plane.deliver_unseen()

    def _fixed(self, kind: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """What every publish of a kind repeats, before and after ``publish_args``."""
        if kind == "u":
            return ("SPUBLISH" if self.plane.cluster else "PUBLISH",), ()
        size = self.plane.history.size if kind == "c" else 0
        tail = (size, int(self.plane.history.ttl) or 1, SEQ_TTL, b"m" if kind == "c" else b"b")
        # A cluster pipeline refuses EVALSHA; Redis caches EVAL's script by its SHA1.
        head = ("EVAL", self.script, 2) if self.plane.cluster else ("EVALSHA", self.sha, 2)
        return head, tail

    async def _execute(self, batch: list[Outgoing]) -> list[Any]:
        fixed = {kind: self._fixed(kind) for kind in ("c", "u", "b")}
        if self.plane.cluster:
            pipe = self.plane.redis.pipeline(transaction=False)
            for kind, key, line, _ in batch:
                head, tail = fixed[kind]
                if kind == "c" and self.plane.history.limits is not None:
                    size, ttl = self.plane.history.limits_of(key)
                    tail = (size, int(ttl) or 1, SEQ_TTL, b"m")
                pipe.execute_command(*head, *publish_args(kind, key, line), *tail)
            return list(await pipe.execute(raise_on_error=False))
        # RESP by hand: the fixed parts are packed once per batch, not per message.
        resp = {k: (len(h) + len(t), bulks(h), bulks(t)) for k, (h, t) in fixed.items()}
        packed = []
        for kind, key, line, _ in batch:
            count, before, after = resp[kind]
            if kind == "c" and self.plane.history.limits is not None:
                after = self._tail(key)  # the channel's namespace's history size and TTL
            args = publish_args(kind, key, line)
            packed.append(b"*%d\r\n" % (count + len(args)) + before + bulks(args) + after)
        results = await self.pipeline.execute(packed)
        again = [i for i, r in enumerate(results) if _no_script(r)]
        if again:
            # Redis restarted and forgot the script: load it, send again what failed.
            await self.pipeline.execute([pack("SCRIPT", "LOAD", self.script)])
            retried = await self.pipeline.execute([packed[i] for i in again])
            for i, result in zip(again, retried, strict=True):
                results[i] = result
        return results

    def _tail(self, channel: str) -> bytes:
        """The packed size, TTL, seq TTL and tag of a channel publish, by its limits."""
        limits = self.plane.history.limits_of(channel)
        tail = self.tails.get(limits)
        if tail is None:
            size, ttl = limits
            tail = self.tails[limits] = bulks((size, int(ttl) or 1, SEQ_TTL, b"m"))
        return tail


def _no_script(reply: Any) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")

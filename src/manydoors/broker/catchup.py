"""History through the Redis backplane: a ``sub`` with ``since``, and the API's reads.

Redis holds the authoritative history of every channel (a list beside its seq, written
by the publish script); this node keeps what it forwarded (``History``), so most
recoveries need no round trip. When they do, the seq and the list are read in one
script, and the client joins only once live delivery has reached what Redis holds, so
each seq reaches it once, in order. A hole in the seqs (left by a node that delivered
publishes unsequenced while cut off from Redis, broker/outage.py) is in no history: a
recovery across it answers ``recovered: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from ..node.link import Link
from .backplane import Routes, answer_recover
from .base import HistoryPage
from .history import Entry, History, missed
from .keys import HISTORY_SCRIPT, HOLE, tag

CATCH_UP: Final = 2.0  # seconds a recovery waits for pub/sub to reach Redis's history


@dataclass(slots=True)
class ChannelState:
    """What the node knows of a channel it subscribes to."""

    last: int = 0  # the highest seq delivered to workers
    ready: bool = False  # subscribed and ``last`` read from Redis
    # Arrived before ready: (seq, line or b"" for a hole, the connection id to leave out).
    buffer: list[tuple[int, bytes, str | None]] = field(default_factory=list)
    recoveries: list[tuple[Link, int, int]] = field(default_factory=list)  # before ready
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    def reached(self, seq: int) -> None:
        """Live delivery reached ``seq``: the recoveries waiting for it may answer."""
        for _want, fut in [w for w in self.waiters if w[0] <= seq]:
            if not fut.done():
                fut.set_result(None)
        self.waiters = [w for w in self.waiters if w[0] > seq]

    def skip(self, seq: int) -> None:
        """A hole at ``seq`` (outage.py): no message to deliver, but delivery is past it."""
        if seq > self.last:
            self.last = seq
            self.reached(seq)


class Plane(Protocol):
    """What history reads use of the Redis backplane."""

    redis: Any  # redis.asyncio.Redis or RedisCluster
    degraded: bool
    history: History
    state: dict[str, ChannelState]
    router: Routes

    def lost_command(self, exc: Exception) -> None: ...


async def stored(redis: Any, channel: str) -> tuple[int, list[Entry]]:
    """The channel's seq and the lines its list in Redis holds, read atomically."""
    t = tag(channel)
    value, lines = await redis.eval(HISTORY_SCRIPT, 2, f"md:c{t}:s", f"md:c{t}:h")
    seq = int(value)
    first = seq - len(lines) + 1  # the script pushes each seq's line as it counts
    # A hole (HOLE: a seq that names no message) is left out, so no read covers it.
    return seq, [(first + i, line) for i, line in enumerate(lines) if line != HOLE]


class Catchup:
    """Recoveries and history reads of one node."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.reads: dict[str, asyncio.Future[tuple[int, list[Entry]]]] = {}  # in flight

    async def stored_once(self, channel: str) -> tuple[int, list[Entry]]:
        """The channel's seq and history in Redis, one read in flight at a time.

        The recoveries of a reconnect storm share it: a read each would take a pool
        connection each, and redis-py's asyncio pool refuses past 100
        (MaxConnectionsError), which made the node degraded and answer them all
        ``recovered: false``. A read that started before a recovery asked is enough:
        what was published since reached this node live and is in its own history.
        """
        fut = self.reads.get(channel)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = self.reads[channel] = asyncio.get_running_loop().create_future()
        try:
            found = await stored(self.plane.redis, channel)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here; whoever shares the read gets it too
            raise
        finally:
            del self.reads[channel]
        fut.set_result(found)
        return found

    def recover(self, link: Link, channel: str, req: int, since: int) -> None:
        plane = self.plane
        st = plane.state.get(channel)
        if st is None:
            answer_recover(link, channel, req, 0, None)
            return
        if not st.ready:
            st.recoveries.append((link, req, since))
            return
        lines = missed(since, st.last, plane.history.entries(channel, time.monotonic()))
        if lines is not None or plane.degraded:
            answer_recover(link, channel, req, st.last, lines)
            return
        plane.router.spawn(self._from_redis(link, channel, req, since, st))

    async def _from_redis(
        self, link: Link, channel: str, req: int, since: int, st: ChannelState
    ) -> None:
        plane = self.plane
        try:
            cur, entries = await self.stored_once(channel)
        except Exception as exc:
            plane.lost_command(exc)
            answer_recover(link, channel, req, st.last, None)
            return
        if st.last < cur:
            # What Redis already holds is still on its way to us by pub/sub: wait for
            # it, so the client joins exactly where live delivery goes on.
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            st.waiters.append((cur, fut))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, CATCH_UP)
        if plane.state.get(channel) is not st:
            answer_recover(link, channel, req, st.last, None)
            return
        local = plane.history.entries(channel, time.monotonic())
        answer_recover(link, channel, req, st.last, missed(since, st.last, entries, local))

    async def read(self, channel: str, since: int | None, limit: int) -> HistoryPage:
        """The channel's history in Redis (while Redis is away: what this node
        forwarded, ``partial``)."""
        plane = self.plane
        if not plane.degraded:
            try:
                seq, entries = await stored(plane.redis, channel)
            except Exception as exc:
                plane.lost_command(exc)
            else:
                return HistoryPage.of(channel, seq, entries, since, limit)
        held = plane.history.entries(channel, time.monotonic())
        st = plane.state.get(channel)
        seq = st.last if st is not None else held[-1][0] if held else 0
        page = HistoryPage.of(channel, seq, held, since, limit)
        page.partial = True
        return page

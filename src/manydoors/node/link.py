"""Both ends of the worker <-> broker socketpair: frames in, frames out, batched."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from ..protocol.ipc import FrameError, IpcParser, Kind, encode_frame

# Handles one frame; returns the work it did in deliveries (writes to clients), or
# None for one: the link's measure of how much a loop callback has done.
FrameHandler = Callable[["Link", int, str, bytes], int | None]


class Link(asyncio.Protocol):
    """A framed stream over a Unix socketpair.

    Frames sent during one loop iteration are joined into one write, so a burst of
    hellos or deliveries costs one syscall instead of thousands. Interest frames and
    barriers (``LAZY``) may also wait: the link writes them at most once per
    ``COALESCE_S``, because every write wakes the other process, and on few cores
    those wake-ups cost more than the frames (a ramp of hellos, each needing a SYNC
    round trip, ran 25 % slower with a write per loop iteration). Messages and
    deliveries never wait: a frame of any other kind flushes the link (with what
    waits, in order) at the next loop iteration.

    Reading is bounded the same way: one callback handles frames until they have done
    ``BUDGET`` deliveries (a frame is at least one), then pauses reading and goes on
    with the rest of that read at a later loop iteration, after what else is ready
    (accepts, clients' reads): a worker's 256 KB read of deliveries, each to
    thousands, held its loop for seconds (issue 18). Frames keep their order, and
    at most one read's frames wait here.
    """

    COALESCE_S = 0.002
    # Deliveries per callback: ~10-20 ms of writes on loopback (docs/benchmarks.md, "A
    # publish flood against one worker"). A single fan-out larger than this is not split.
    BUDGET = 2000
    LAZY = frozenset((Kind.SUB, Kind.UNSUB, Kind.USER_ON, Kind.USER_OFF, Kind.SYNC, Kind.SYNCED))

    def __init__(self, on_frame: FrameHandler, name: str = "") -> None:
        self.on_frame = on_frame
        self.name = name
        self.parser = IpcParser()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.loop = asyncio.get_running_loop()  # asyncio.get_running_loop() is a getpid()
        self.flushed = 0.0  # loop time of the last write
        self.scheduled = False  # a flush is due (at the next iteration or later)
        self.soon = False  # a flush is due at the next iteration
        self.before_flush: Callable[[], None] | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.rest: list[tuple[int, str, bytes]] | None = None  # frames left for later
        self.at = 0  # the next of them

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.out.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameError:
            if self.transport is not None:
                self.transport.abort()
            return
        if self.rest is not None:  # read while paused: after those, in order
            self.rest.extend(frames)
        elif not self.handle(frames, 0) and self.transport is not None:
            self.transport.pause_reading()

    def handle(self, frames: list[tuple[int, str, bytes]], start: int) -> bool:
        """Handle ``frames`` from ``start`` until the budget is spent; False when some
        are left for the next loop iteration."""
        on_frame = self.on_frame
        left = self.BUDGET
        end = len(frames)
        for i in range(start, end):
            kind, key, payload = frames[i]
            left -= on_frame(self, kind, key, payload) or 1
            if left <= 0 and i + 1 < end:
                self.rest, self.at = frames, i + 1
                self.loop.call_soon(self.go_on)
                return False
        return True

    def go_on(self) -> None:
        """The next part of the frames left for later; reading resumes after the last."""
        frames, self.rest = self.rest, None
        if frames is None:
            return
        try:
            done = self.handle(frames, self.at)
        except BaseException:
            if self.transport is not None:  # as a handler's error in data_received does
                self.transport.abort()
            raise
        if done and self.transport is not None:
            self.transport.resume_reading()

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None:
        self.send_frame(encode_frame(kind, key, payload))

    def send_frame(self, frame: bytes) -> None:
        """Queue an already-encoded frame (a fan-out encodes once for all links)."""
        if self.transport is None:
            return
        self.out.append(frame)
        if frame[0] in self.LAZY:
            if not self.scheduled:
                self.schedule()
        elif not self.soon:
            self.soon = self.scheduled = True
            self.loop.call_soon(self.flush)

    def at_flush(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once just before the next write (it may send the last frames)."""
        self.before_flush = hook
        if not self.scheduled:
            self.schedule()

    def schedule(self) -> None:
        self.scheduled = True
        wait = self.flushed + self.COALESCE_S - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self.flush)
        else:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        hook, self.before_flush = self.before_flush, None
        if hook is not None:
            hook()  # may queue the last frames of this write
        self.scheduled = self.soon = False
        if self.transport is not None and self.out:
            self.flushed = self.loop.time()
            out = self.out
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.out.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

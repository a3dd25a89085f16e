"""Both ends of the worker <-> broker socketpair: frames in, frames out, batched."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from ..protocol.ipc import FrameError, IpcParser, Kind, encode_frame

FrameHandler = Callable[["Link", int, str, bytes], None]


class Link(asyncio.Protocol):
    """A framed stream over a Unix socketpair.

    Frames sent during one loop iteration are joined into one write, so a burst of
    hellos or deliveries costs one syscall instead of thousands.
    """

    def __init__(self, on_frame: FrameHandler, name: str = "") -> None:
        self.on_frame = on_frame
        self.name = name
        self.parser = IpcParser()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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
        on_frame = self.on_frame
        for kind, key, payload in frames:
            on_frame(self, kind, key, payload)

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None:
        self.send_frame(encode_frame(kind, key, payload))

    def send_frame(self, frame: bytes) -> None:
        """Queue an already-encoded frame (a fan-out encodes once for all links)."""
        if self.transport is None:
            return
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(frame)

    def flush(self) -> None:
        if self.transport is not None and self.out:
            out = self.out
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.out.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

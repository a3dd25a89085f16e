"""The TCP connection: a thin asyncio shell around the sans-I/O framer and schema.

``data_received`` feeds the framer, decodes each line and dispatches it to the
worker; everything else (routing, counting, broker traffic) lives in the worker.
A Connection is the per-door object, so it keeps only ``__slots__`` and reaches the
worker through a class attribute (one worker per process) instead of a per-object
reference.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar, cast

from ..protocol.framing import TOO_LONG, LineFramer
from ..protocol.messages import (
    PONG,
    Hello,
    Ping,
    ProtocolError,
    Pub,
    Send,
    Sub,
    Unsub,
    decode_op,
    error_line,
    pong_line,
)

if TYPE_CHECKING:
    from .worker import Worker


class Connection(LineFramer, asyncio.Protocol):
    __slots__ = ("channels", "slow", "strikes", "transport", "user")

    worker: ClassVar[Worker]

    def __init__(self) -> None:
        LineFramer.__init__(self)
        self.transport: asyncio.Transport | None = None
        self.user: str | None = None
        self.channels: str | tuple[str, ...] = ()
        self.strikes = 0  # consecutive bad lines
        self.slow = False  # write buffer over the cap: new messages are dropped

    # --- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = tr = cast(asyncio.Transport, transport)
        self.worker.admit(self, tr)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.worker.release(self)

    def pause_writing(self) -> None:
        self.slow = True

    def resume_writing(self) -> None:
        self.slow = False

    def data_received(self, data: bytes) -> None:
        worker = self.worker
        for line in self.feed_lines(data, worker.max_message_bytes):
            if self.transport is None:
                return  # closed while handling an earlier line
            if line is TOO_LONG:
                self.reject(
                    ProtocolError(
                        "too_long", f"message longer than {worker.max_message_bytes} bytes"
                    )
                )
                continue
            assert isinstance(line, bytes)
            try:
                op = decode_op(line)
            except ProtocolError as exc:
                self.reject(exc)
                continue
            self.strikes = 0
            worker.count_in()
            self.dispatch(op)

    # --- ops ----------------------------------------------------------------------------

    def dispatch(self, op: Hello | Sub | Unsub | Pub | Send | Ping) -> None:
        worker = self.worker
        if isinstance(op, Pub):
            worker.publish(self, op)
        elif isinstance(op, Sub):
            worker.subscribe(self, op)
        elif isinstance(op, Send):
            worker.send(self, op)
        elif isinstance(op, Hello):
            worker.hello(self, op)
        elif isinstance(op, Unsub):
            worker.unsubscribe(self, op)
        else:
            self.write(PONG if op.id is None else pong_line(op.id))

    def reject(self, exc: ProtocolError) -> None:
        """Answer a bad line; close a client that keeps sending them."""
        worker = self.worker
        worker.count_error(exc.code)
        self.write(error_line(exc.code, exc.reason, exc.op_id))
        self.strikes += 1
        if self.strikes >= worker.max_bad_messages:
            worker.close(self, "bad_input")

    def write(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(line)

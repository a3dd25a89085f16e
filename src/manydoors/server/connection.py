"""Client connections: thin asyncio shells around the sans-I/O framers and schema.

``data_received`` feeds the framer, decodes each message and dispatches it to the
worker; everything else (routing, counting, broker traffic) lives in the worker.
A connection is the per-door object, so it keeps only ``__slots__`` and reaches the
worker through a class attribute (one worker per process) instead of a per-object
reference. The framing comes from a slotted base (LineFramer for TCP, WsFrameParser
for WebSocket) so that its state lives in the connection object itself.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar, cast

from ..protocol.framing import TOO_LONG, LineFramer
from ..protocol.messages import (
    PONG,
    Hello,
    Ping,
    PongOp,
    PresenceOp,
    ProtocolError,
    Pub,
    Send,
    Sub,
    Unsub,
    decode_op,
    error_line,
    pong_line,
)
from ..protocol.websocket import (
    Binary,
    Close,
    HandshakeError,
    ProtocolFail,
    Text,
    WsFrameParser,
    encode_close,
    encode_pong,
    error_response,
    parse_handshake,
    text_header,
)
from ..protocol.websocket import Ping as WsPing

if TYPE_CHECKING:
    from .worker import Worker

# Each slot is 8 bytes of every connection, and objects come in 16-byte size classes:
# with the framer's slot, 8 slots fill the 112-byte class; one more costs 16 bytes.
_SLOTS = ("channels", "got", "ipb", "mark", "sent", "transport", "user")


class Connection(asyncio.Protocol):
    """What every client connection does, whatever its framing (no slots of its own)."""

    if not TYPE_CHECKING:
        # Subclasses declare the slots (beside their framer's): one slotted base only.
        # Hidden from mypy, which cannot see slots declared by subclasses.
        __slots__ = ()

    worker: ClassVar[Worker]
    transport: asyncio.Transport | None
    user: str | None
    channels: str | tuple[str, ...]
    # The worker's tick when the last message was completed, or (if later) the tick
    # when the message being received began: the heartbeat and read_timeout clock.
    # Ticks are shared int objects, so this costs the slot and nothing more.
    mark: int
    ipb: int | None  # bucket counting this peer against max_connections_per_ip
    # Messages and bytes received since the last sweep (the rate limits' buckets);
    # small ints are shared objects, so an idle connection pays only the slots.
    sent: int
    got: int

    def _init_state(self) -> None:
        self.transport = None
        self.user = None
        self.channels = ()
        self.mark = self.worker.tick
        self.ipb = None
        self.sent = self.got = 0

    @property
    def reading(self) -> bool:
        """True while a message (or handshake) has begun and not been completed."""
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.transport is not None:  # not one we closed
            self.worker.lost(exc)
        self.transport = None
        self.worker.release(self)

    def count_bytes(self, worker: Worker, n: int) -> None:
        """Count ``n`` bytes received against max_bytes_per_second (pause reading if over)."""
        got = self.got
        if not got:
            worker.active.append(self)  # its counts are zeroed at the next tick
        self.got = got = got + n
        if got > worker.bytes_per_tick:
            worker.throttle(self)

    def pause_writing(self) -> None:
        self.worker.slow.add(self)
        if self.worker.slow_disconnect:
            # Called from inside a write (often mid fan-out): close after it returns.
            asyncio.get_running_loop().call_soon(self.worker.close_slow, self)

    def resume_writing(self) -> None:
        self.worker.slow.discard(self)

    def handle(self, message: bytes) -> None:
        """One complete client message (a line, or a text frame's payload)."""
        worker = self.worker
        self.mark = worker.tick
        try:
            op = decode_op(message)
        except ProtocolError as exc:
            self.reject(exc)
            return
        self.sent = sent = self.sent + 1
        if sent > worker.msgs_per_tick:
            reason = f"more than {worker.spec.service.max_messages_per_second:g} messages/s"
            self.reject(ProtocolError("rate_limited", reason, getattr(op, "id", None)))
            return
        if worker.strikes:
            worker.strikes.pop(self, None)
        worker.count_in()
        if (
            self.user is None
            and worker.verifier is not None
            and not isinstance(op, Hello | Ping | PongOp)
        ):
            worker.count_error("unauthorized")
            self.write(error_line("unauthorized", "say hello with a token first", op.id))
            return
        self.dispatch(op)

    def dispatch(self, op: Hello | Sub | Unsub | Pub | Send | Ping | PresenceOp | PongOp) -> None:
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
        elif isinstance(op, PresenceOp):
            worker.presence(self, op)
        elif isinstance(op, Ping):
            self.write(PONG if op.id is None else pong_line(op.id))
        # PongOp: handle() has already reset the heartbeat clock

    def reject(self, exc: ProtocolError) -> None:
        """Answer a bad message; close a client that keeps sending them."""
        worker = self.worker
        worker.count_error(exc.code)
        self.write(error_line(exc.code, exc.reason, exc.op_id))
        strikes = worker.strikes[self] = worker.strikes.get(self, 0) + 1
        if strikes >= worker.max_bad_messages:
            worker.close(self, "bad_input")

    def write(self, line: bytes) -> None:
        """Send one NDJSON event line (with its newline) in this connection's framing."""
        raise NotImplementedError

    @staticmethod
    def frame(line: bytes) -> bytes:
        """The bytes that carry ``line`` to every client of this kind (fan-out encodes once)."""
        raise NotImplementedError


class TcpConnection(LineFramer, Connection):
    """Newline-delimited JSON over TCP: the bytes on the wire are the event lines."""

    __slots__ = _SLOTS

    def __init__(self) -> None:
        LineFramer.__init__(self)
        self._init_state()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = tr = cast(asyncio.Transport, transport)
        if self.worker.let_in(self, tr):
            self.worker.admit(self, tr)

    @property
    def reading(self) -> bool:
        return self._partial != b""  # a line begun (or an oversized one being skipped)

    def data_received(self, data: bytes) -> None:
        worker = self.worker
        if self._partial == b"":
            self.mark = worker.tick  # a new message begins
        self.count_bytes(worker, len(data))
        for line in self.feed_lines(data, worker.max_message_bytes):
            if self.transport is None:
                return  # closed while handling an earlier line
            if line is TOO_LONG:
                reason = f"message longer than {worker.max_message_bytes} bytes"
                self.reject(ProtocolError("too_long", reason))
            else:
                self.handle(cast(bytes, line))

    def write(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(line)

    @staticmethod
    def frame(line: bytes) -> bytes:
        return line


class WsConnection(WsFrameParser, Connection):
    """RFC 6455 WebSocket: the same JSON messages, one per text frame.

    Until the HTTP upgrade completes, ``head`` holds the request bytes received so far;
    the connection joins the hub (and gets its welcome) only once upgraded.
    """

    __slots__ = (*_SLOTS, "head")

    def __init__(self) -> None:
        WsFrameParser.__init__(self)
        self._init_state()
        self.head: bytes | None = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        self.worker.let_in(self, tr)

    @property
    def reading(self) -> bool:
        return self.head is not None or bool(self._buf) or self._frag is not None

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        worker = self.worker
        if self.head is None and self._buf == b"" and self._frag is None:
            self.mark = worker.tick  # a new frame begins
        self.count_bytes(worker, len(data))
        if self.head is not None:
            request = self.head + data
            try:
                done = parse_handshake(request)
            except HandshakeError as exc:
                worker.count_error("bad_handshake")
                self.transport = None  # nothing more is read or written
                transport.write(error_response(exc))
                transport.close()
                return
            if done is None:
                self.head = request
                return
            response, used = done
            self.head = None
            transport.write(response)
            worker.admit(self, transport)
            data = request[used:]
            if not data:
                return
        for event in self.feed(data, worker.max_message_bytes):
            if self.transport is None:
                return
            if isinstance(event, Text):
                # A raw newline in valid JSON is whitespace between tokens; TCP clients
                # read NDJSON, so it must not reach them inside a relayed ``data``.
                payload = event.payload
                self.handle(payload.replace(b"\n", b" ") if b"\n" in payload else payload)
            elif isinstance(event, WsPing):
                transport.write(encode_pong(event.payload))
            elif isinstance(event, Binary):
                self.reject(ProtocolError("bad_frame", "send JSON messages as text frames"))
            elif isinstance(event, Close):
                # Echo the peer's code (RFC 6455 5.5.1), then close our side.
                self.transport = None
                transport.write(encode_close(event.code) if event.code else b"\x88\x00")
                transport.close()
            elif isinstance(event, ProtocolFail):
                worker.count_error("too_long" if event.code == 1009 else "bad_frame")
                self.transport = None
                transport.write(encode_close(event.code, event.reason))
                transport.close()

    def write(self, line: bytes) -> None:
        if self.transport is not None and self.head is None:
            self.transport.write(text_header(len(line) - 1) + line[:-1])

    @staticmethod
    def frame(line: bytes) -> bytes:
        return text_header(len(line) - 1) + line[:-1]

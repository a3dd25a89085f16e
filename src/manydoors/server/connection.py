"""Client connections: thin asyncio shells around the sans-I/O framers.

``data_received`` feeds the framer and hands each complete message to the sessions;
admission, the clock and the sessions decide everything else. A connection is the
per-door object, so it keeps only ``__slots__`` and reaches those parts through class
attributes: ``bind`` makes a subclass per worker that carries them (no per-object
reference, no global). The framing comes from a slotted base (LineFramer for TCP,
WsFrameParser for WebSocket) so that its state lives in the connection object itself.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar, Final, cast

from ..protocol.framing import TOO_LONG, LineFramer
from ..protocol.messages import ProtocolError
from ..protocol.websocket import (
    Binary,
    Close,
    HandshakeError,
    ProtocolFail,
    Text,
    WsFrameParser,
    WsPing,
    encode_close,
    encode_line,
    encode_pong,
    error_response,
    parse_handshake,
)

if TYPE_CHECKING:
    from .admission import Admission
    from .clock import Clock
    from .sessions import Sessions

PONG_OP: Final = b'{"op":"pong"}\n'  # a client's answer to the heartbeat, as clients send it

# Each slot is 8 bytes of every connection, and objects come in 16-byte size classes:
# with the framer's slot, 8 slots fill the 112-byte class; one more costs 16 bytes.
_SLOTS = ("channels", "got", "ipb", "mark", "sent", "transport", "user")


class Connection(asyncio.Protocol):
    """What every client connection does, whatever its framing (no slots of its own)."""

    if not TYPE_CHECKING:
        # Subclasses declare the slots (beside their framer's): one slotted base only.
        # Hidden from mypy, which cannot see slots declared by subclasses.
        __slots__ = ()

    # The worker's parts, set on the subclass ``bind`` makes for one worker.
    admission: ClassVar[Admission]
    clock: ClassVar[Clock]
    sessions: ClassVar[Sessions]
    max_message_bytes: ClassVar[int]

    transport: asyncio.Transport | None
    user: str | None
    channels: str | tuple[str, ...] | set[str]  # hub.Channels: a set past hub.SMALL
    mark: int  # ticks are shared int objects: this costs the slot and nothing more
    ipb: int | None
    sent: int  # small ints are shared objects: an idle connection pays only the slots
    got: int

    def _init_state(self) -> None:
        self.transport = None
        self.user = None
        self.channels = ()
        self.mark = self.clock.tick
        self.ipb = None
        self.sent = self.got = 0

    @property
    def reading(self) -> bool:
        """True while a message (or handshake) has begun and not been completed."""
        raise NotImplementedError

    @property
    def handshaking(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = self.admission.ended(self, exc)
        self.transport = None
        self.sessions.release(self, why)

    def pause_writing(self) -> None:
        self.admission.slow_down(self)

    def resume_writing(self) -> None:
        self.admission.slow.discard(self)

    def write(self, line: bytes) -> None:
        """Send one NDJSON event line (with its newline) in this connection's framing."""
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
        if self.admission.let_in(self, tr):
            self.clock.watch(self)
            self.admission.admit(self, tr)

    @property
    def reading(self) -> bool:
        return self._partial != b""  # a line begun (or an oversized one being skipped)

    def data_received(self, data: bytes) -> None:
        clock, sessions = self.clock, self.sessions
        if self._partial == b"":
            self.mark = clock.tick  # a new message begins
            if data == PONG_OP:
                # The heartbeat's answer, alone in its read: at a million connections
                # the commonest message of all, and the mark above is all it does.
                # (Pongs sent back to back arrive in one read and take the full path.)
                clock.count_bytes(self, len(data))
                counters = sessions.counters
                counters.mv[counters.i_in] += 1
                return
        clock.count_bytes(self, len(data))
        limit = self.max_message_bytes
        for line in self.feed_lines(data, limit):
            if self.transport is None:
                return  # closed while handling an earlier line
            if line is TOO_LONG:
                sessions.reject(
                    self, ProtocolError("too_long", f"message longer than {limit} bytes")
                )
            else:
                sessions.handle(self, cast(bytes, line))

    def write(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(line)


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
        if self.admission.let_in(self, tr):
            self.clock.watch(self)

    @property
    def reading(self) -> bool:
        return self.head is not None or bool(self._buf) or self._frag is not None

    @property
    def handshaking(self) -> bool:
        return self.head is not None

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        clock, sessions = self.clock, self.sessions
        if self.head is None and self._buf == b"" and self._frag is None:
            self.mark = clock.tick  # a new frame begins
        clock.count_bytes(self, len(data))
        if self.head is not None:
            request = self.head + data
            try:
                done = parse_handshake(request)
            except HandshakeError as exc:
                sessions.counters.error("bad_handshake")
                self.transport = None  # nothing more is read or written
                transport.write(error_response(exc))
                transport.close()
                return
            if done is None:
                self.head = request
                return
            response, used, target = done
            self.head = None
            transport.write(response)
            if not self.upgraded(transport, target):
                return
            # The welcome may be held (welcome.py): what this read writes goes behind it.
            transport = cast(asyncio.Transport, self.transport)
            data = request[used:]
            if not data:
                return
        for event in self.feed(data, self.max_message_bytes):
            if self.transport is None:
                return
            if isinstance(event, Text):
                payload = event.payload
                if payload == PONG_OP[:-1]:  # the heartbeat's answer: the mark is all it does
                    counters = sessions.counters
                    counters.mv[counters.i_in] += 1
                    continue
                # A raw newline in valid JSON is whitespace between tokens; TCP clients
                # read NDJSON, so it must not reach them inside a relayed ``data``.
                sessions.handle(self, payload.replace(b"\n", b" ") if b"\n" in payload else payload)
            elif isinstance(event, WsPing):
                transport.write(encode_pong(event.payload))
            elif isinstance(event, Binary):
                sessions.reject(
                    self, ProtocolError("bad_frame", "send JSON messages as text frames")
                )
            elif isinstance(event, Close):
                # Echo the peer's code (RFC 6455 5.5.1), then close our side.
                self.transport = None
                transport.write(encode_close(event.code) if event.code else b"\x88\x00")
                transport.close()
            elif isinstance(event, ProtocolFail):
                sessions.counters.error("too_long" if event.code == 1009 else "bad_frame")
                self.transport = None
                transport.write(encode_close(event.code, event.reason))
                transport.close()

    def upgraded(self, transport: asyncio.Transport, target: bytes) -> bool:
        """The handshake is done (``target``: its path): join the hub (False: closed)."""
        self.admission.admit(self, transport)
        return True

    def write(self, line: bytes) -> None:
        if self.transport is not None and self.head is None:
            self.transport.write(encode_line(line))


def bind(
    cls: type[Connection],
    admission: Admission,
    clock: Clock,
    sessions: Sessions,
    max_bytes: int,
    **more: object,
) -> type[Connection]:
    """A subclass of ``cls`` that reaches one worker's parts (no slots added: no memory).

    ``more``: class attributes of the wire's own (the Pusher apps by key)."""
    attrs = {
        "__slots__": (),
        "admission": admission,
        "clock": clock,
        "sessions": sessions,
        "max_message_bytes": max_bytes,
        **more,
    }
    return cast(type[Connection], type(cls.__name__, (cls,), attrs))

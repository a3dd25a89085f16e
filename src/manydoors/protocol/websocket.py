"""WebSocket server core, RFC 6455 (sans-I/O).

Two halves, both bytes in and bytes or events out:

- the opening handshake: ``parse_handshake`` reads the client's HTTP/1.1 upgrade
  request (parsed by h11, never by hand), validates it and returns the ``101`` answer;
  a bad request raises ``HandshakeError``, which ``error_response`` turns into a
  complete HTTP error answer;
- the frames: ``WsFrameParser`` turns client frames into events (unmasked,
  defragmented, UTF-8 validated, size limited) and the ``encode_*`` functions build
  server frames. Server frames are never masked, so one encoded frame can be written
  to any number of connections.

No extensions and no subprotocols are negotiated (a ``permessage-deflate`` offer is
simply not accepted), which keeps every RSV bit an error and the per-connection state
to two attributes.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import h11

# --- opening handshake -----------------------------------------------------------------

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    """An upgrade request the server refuses; answer it with ``error_response(exc)``.

    ``status`` is the HTTP status, ``reason`` a short text for the body and
    ``headers`` any extra response headers the RFC asks for (``Sec-WebSocket-Version``
    with 426, ``Allow`` with 405).
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def parse_handshake(request: bytes, *, max_bytes: int = 8192) -> tuple[bytes, int, bytes] | None:
    """Validate an upgrade request; return ``(101 response, bytes consumed, target)``.

    ``target`` is the request's path and query (``/app/key?protocol=7``), for a wire
    that serves more than one thing (Pusher: one app per key).

    Feed everything received so far. Returns None while the request head is
    incomplete and no longer than ``max_bytes``. Bytes after the head (a client may
    send its first frames right behind the request) are not consumed: feed
    ``request[consumed:]`` to a ``WsFrameParser``. Raises HandshakeError for anything
    the RFC says to refuse.
    """
    if not request:
        return None  # h11 takes b"" for end of stream
    if len(request) <= max_bytes and b"\n\r\n" not in request and b"\n\n" not in request:
        # The head has not ended: parsing now would redo all of it for every byte a
        # client dribbles in (~17 us per read of an 8 KB head).
        return None
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
    conn.receive_data(request)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        # 431 once the incomplete head outgrows max_bytes, 400 for a malformed one.
        raise HandshakeError(exc.error_status_hint, str(exc)) from None
    if event is h11.NEED_DATA:
        return None
    if not isinstance(event, h11.Request):  # pragma: no cover - a server's first event
        raise HandshakeError(400, "expected an HTTP request")
    consumed = len(request) - len(conn.trailing_data[0])
    if consumed > max_bytes:
        raise HandshakeError(431, f"request head over {max_bytes} bytes")
    return _response(event), consumed, event.target


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The comma-separated tokens of every ``name`` header, lower-cased."""
    out: set[bytes] = set()
    for key, value in headers:
        if key == name:
            out.update(token.strip().lower() for token in value.split(b","))
    return out


def _response(request: h11.Request) -> bytes:
    if request.http_version != b"1.1":
        raise HandshakeError(400, "WebSocket needs HTTP/1.1")
    if request.method != b"GET":
        raise HandshakeError(405, "WebSocket upgrade must be a GET", (("Allow", "GET"),))
    # h11 has already refused a request without Host (or with two).
    headers = list(request.headers)  # h11 lower-cases names
    if b"websocket" not in _tokens(headers, b"upgrade"):
        raise HandshakeError(400, "missing or invalid Upgrade: websocket header")
    if b"upgrade" not in _tokens(headers, b"connection"):
        raise HandshakeError(400, "missing or invalid Connection: upgrade header")
    versions = [value for key, value in headers if key == b"sec-websocket-version"]
    if not versions:
        raise HandshakeError(400, "missing Sec-WebSocket-Version header")
    if versions != [b"13"]:
        raise HandshakeError(
            426, "unsupported WebSocket version (13 only)", (("Sec-WebSocket-Version", "13"),)
        )
    keys = [value for key, value in headers if key == b"sec-websocket-key"]
    if len(keys) != 1:
        raise HandshakeError(400, "need exactly one Sec-WebSocket-Key header")
    try:
        nonce = base64.b64decode(keys[0], validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not base64 of 16 bytes")
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(keys[0]) + b"\r\n\r\n"
    )


def error_response(exc: HandshakeError) -> bytes:
    """A complete HTTP answer refusing the upgrade; close the connection after it."""
    body = (exc.reason + "\n").encode()
    lines = [
        f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in exc.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- events ------------------------------------------------------------------------------


@dataclass(slots=True)
class Text:
    """A complete text message; ``payload`` is valid UTF-8."""

    payload: bytes


@dataclass(slots=True)
class Binary:
    """A complete binary message."""

    payload: bytes


@dataclass(slots=True)
class WsPing:
    """A ping control frame (answer it with ``encode_pong(payload)``)."""

    payload: bytes


@dataclass(slots=True)
class WsPong:
    payload: bytes


@dataclass(slots=True)
class Close:
    """The peer's close frame; ``code`` is None when it had no body."""

    code: int | None
    reason: str


@dataclass(slots=True)
class ProtocolFail:
    """Fail the connection: send ``encode_close(code, reason)`` and close."""

    code: int
    reason: str


Event = Text | Binary | WsPing | WsPong | Close | ProtocolFail

PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
TOO_BIG: Final = 1009

# --- frame parser ------------------------------------------------------------------------

_EMPTY: Final = b""
_unpack_u16: Final = struct.Struct("!H").unpack_from
_unpack_u64: Final = struct.Struct("!Q").unpack_from
_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")


def _close_code_ok(code: int) -> bool:
    # RFC 6455 7.4 plus the IANA registry (1012-1014); 1004-1006 and 1015 must never
    # be sent, 3000-4999 belong to libraries and applications.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _unmask(mask: bytes, payload: memoryview) -> bytes:
    """XOR ``payload`` with the 4-byte mask repeated, as two big integers (C speed)."""
    n = len(payload)
    if not n:
        return _EMPTY
    key = (mask * ((n >> 2) + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


class _Fragments:
    """A fragmented message in progress; exists only between its first and last frame."""

    __slots__ = ("decoder", "opcode", "parts", "size")

    def __init__(self, opcode: int, first: bytes) -> None:
        self.opcode = opcode
        self.parts = [first]
        self.size = len(first)
        # Text is validated as it arrives so a bad byte fails the connection at once.
        self.decoder = _utf8_decoder() if opcode == 1 else None
        if self.decoder is not None:
            self.decoder.decode(first, False)


class WsFrameParser:
    """Client frames in, events out.

    State is two attributes: ``_buf``, the bytes of an incomplete frame (the shared
    ``b""`` when there is none, so an idle connection pays nothing for it; None once
    the parser is done), and ``_frag``, the fragmented message in progress (None when
    there is none). The parser is done after a Close or a ProtocolFail event and
    ignores anything fed after it.
    """

    __slots__ = ("_buf", "_frag")

    def __init__(self) -> None:
        self._buf: bytes | bytearray | None = _EMPTY
        self._frag: _Fragments | None = None

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame plus the fragments of an incomplete message."""
        held = len(self._buf) if self._buf else 0
        return held + (self._frag.size if self._frag else 0)

    @property
    def done(self) -> bool:
        """True after a Close or ProtocolFail event: nothing more will be parsed."""
        return self._buf is None

    def feed(self, data: bytes, max_message: int) -> list[Event]:
        """Feed received bytes; return the events of every frame they complete.

        ``max_message`` bounds a message's payload (all its fragments together); a
        frame that would exceed it fails the connection with 1009 as soon as its
        header is read, before its payload is buffered.
        """
        buf = self._buf
        if buf is None:
            return []
        pending = buf if isinstance(buf, bytearray) else None  # an incomplete frame
        if pending is not None:
            pending += data
        src = data if pending is None else pending
        events: list[Event] = []
        with memoryview(src) as view:
            pos = self._parse(view, max_message, events)
        if pos < 0:  # done: drop everything
            self._buf = None
            self._frag = None
        elif pos == len(src):
            self._buf = _EMPTY
        elif pending is not None:
            del pending[:pos]  # amortised, so a frame dribbled in byte by byte is not quadratic
        else:
            self._buf = bytearray(memoryview(src)[pos:])  # one copy of the tail
        return events

    def _parse(self, view: memoryview, max_message: int, events: list[Event]) -> int:
        """Parse whole frames from ``view``; return the offset reached, -1 when done."""
        end = len(view)
        pos = 0
        frag = self._frag
        try:
            while end - pos >= 2:
                b0 = view[pos]
                b1 = view[pos + 1]
                fin = b0 & 0x80
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                # Everything checkable from the first two bytes fails before buffering.
                if b0 & 0x70:
                    return _fail(events, PROTOCOL_ERROR, "reserved bits set")
                if not b1 & 0x80:
                    return _fail(events, PROTOCOL_ERROR, "client frame not masked")
                if opcode >= 8:
                    if opcode > 10:
                        return _fail(events, PROTOCOL_ERROR, f"unknown opcode {opcode}")
                    if not fin:
                        return _fail(events, PROTOCOL_ERROR, "fragmented control frame")
                    if length > 125:
                        return _fail(events, PROTOCOL_ERROR, "control frame over 125 bytes")
                elif opcode > 2:
                    return _fail(events, PROTOCOL_ERROR, f"unknown opcode {opcode}")
                elif opcode == 0 and frag is None:
                    return _fail(events, PROTOCOL_ERROR, "continuation without a message")
                elif opcode and frag is not None:
                    return _fail(events, PROTOCOL_ERROR, "new message inside a fragmented one")
                head = pos + 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length = _unpack_u16(view, head)[0]
                    head += 2
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = _unpack_u64(view, head)[0]
                    if length >> 63:
                        return _fail(events, PROTOCOL_ERROR, "64-bit length with top bit set")
                    head += 8
                if opcode < 8 and length + (frag.size if frag else 0) > max_message:
                    return _fail(events, TOO_BIG, f"message over {max_message} bytes")
                start = head + 4
                stop = start + length
                if stop > end:
                    break
                payload = _unmask(bytes(view[head:start]), view[start:stop])
                pos = stop
                if opcode == 1 or opcode == 2:
                    if not fin:
                        frag = self._frag = _Fragments(opcode, payload)
                    elif opcode == 2:
                        events.append(Binary(payload))
                    elif payload.isascii():
                        events.append(Text(payload))
                    else:
                        payload.decode()
                        events.append(Text(payload))
                elif opcode == 0:
                    assert frag is not None  # checked with the header
                    frag.parts.append(payload)
                    frag.size += len(payload)
                    if frag.decoder is not None:
                        frag.decoder.decode(payload, bool(fin))
                    if fin:
                        message = b"".join(frag.parts)
                        events.append(Text(message) if frag.opcode == 1 else Binary(message))
                        frag = self._frag = None
                elif opcode == 9:
                    events.append(WsPing(payload))
                elif opcode == 10:
                    events.append(WsPong(payload))
                else:
                    return _close(events, payload)
        except UnicodeDecodeError:
            return _fail(events, INVALID_DATA, "invalid UTF-8 in a text message")
        return pos


def _fail(events: list[Event], code: int, reason: str) -> int:
    events.append(ProtocolFail(code, reason))
    return -1


def _close(events: list[Event], body: bytes) -> int:
    if not body:
        events.append(Close(None, ""))
        return -1
    if len(body) == 1:
        return _fail(events, PROTOCOL_ERROR, "close frame body of 1 byte")
    code = int.from_bytes(body[:2], "big")
    if not _close_code_ok(code):
        return _fail(events, PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = body[2:].decode()
    except UnicodeDecodeError:
        return _fail(events, INVALID_DATA, "invalid UTF-8 in close reason")
    events.append(Close(code, reason))
    return -1


# --- server frames ---------------------------------------------------------------------


def _header(first: int, length: int) -> bytes:
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def text_header(length: int) -> bytes:
    """Header of a final, unmasked text frame of ``length`` payload bytes.

    A fan-out writes ``header + body`` once and the same bytes to every recipient.
    """
    return _header(0x81, length)


def encode_line(line: bytes) -> bytes:
    """An NDJSON event line (with its newline) as one text frame, without the newline."""
    return _header(0x81, len(line) - 1) + line[:-1]


def encode_text(payload: bytes) -> bytes:
    """One final, unmasked text frame (``payload`` must be UTF-8)."""
    return _header(0x81, len(payload)) + payload


def encode_binary(payload: bytes) -> bytes:
    """One final, unmasked binary frame."""
    return _header(0x82, len(payload)) + payload


def _control(first: int, payload: bytes) -> bytes:
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    return bytes((first, len(payload))) + payload


def encode_ping(payload: bytes = b"") -> bytes:
    return _control(0x89, payload)


def encode_pong(payload: bytes = b"") -> bytes:
    return _control(0x8A, payload)


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame; a reason too long for a control frame is cut at a character edge."""
    text = reason.encode()
    if len(text) > 123:
        text = text[:123].decode(errors="ignore").encode()
    return _control(0x88, code.to_bytes(2, "big") + text)

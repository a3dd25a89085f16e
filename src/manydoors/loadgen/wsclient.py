"""The client side of WebSocket for the load generator (sans-I/O, minimal).

The load generator talks to its own server, whose frames are single, unfragmented
text frames, so the client side needs only: the upgrade request, masked text frames
out, and unmasked frames in. Masking uses an all-zero key: the mask bit is set as RFC
6455 requires, and XOR with zero keeps the payload as it is, at no cost per byte.

A peer may also ping (the ``websockets`` library does every 20 s and closes a
connection whose pong does not come back), so pings are answered with a pong carrying
the same payload; the answer is built while the frames are read and nothing is kept
per connection.
"""

from __future__ import annotations

from typing import Final

_ZERO_MASK: Final = b"\x00\x00\x00\x00"
_HEAD_END: Final = b"\r\n\r\n"


def upgrade_request(host: str, port: int, path: str = "/") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: bWFueWRvb3JzLWxvYWQtMQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def masked_text(payload: bytes) -> bytes:
    return _masked(0x81, payload)


def masked_pong(payload: bytes) -> bytes:
    """The answer to a ping with ``payload`` (at most 125 bytes, as for any control frame)."""
    return _masked(0x8A, payload)


def _masked(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _ZERO_MASK + payload


class UpgradeFailed(Exception):
    """The server answered the upgrade with something other than 101."""


def split_response(buf: bytes) -> tuple[bool, bytes]:
    """(upgrade finished, bytes after the response head). Raises UpgradeFailed."""
    end = buf.find(_HEAD_END)
    if end < 0:
        return False, buf
    status = buf[: buf.find(b"\r\n")]
    if not status.startswith(b"HTTP/1.1 101"):
        raise UpgradeFailed(status.decode("latin-1"))
    return True, buf[end + 4 :]


def read_frames(buf: bytes) -> tuple[list[bytes], bool, bytes]:
    """Complete text payloads in ``buf``, whether a close frame came, and the rest."""
    out, _, closed, rest = split_frames(buf)
    return out, closed, rest


def split_frames(buf: bytes) -> tuple[list[bytes], bytes, bool, bytes]:
    """(text payloads, bytes to send back, close frame came, the rest) of ``buf``.

    The bytes to send back are the pongs that answer the pings among the frames
    (empty when there were none).
    """
    out: list[bytes] = []
    answer = b""
    pos, end = 0, len(buf)
    closed = False
    while end - pos >= 2:
        opcode = buf[pos] & 0x0F
        length = buf[pos + 1] & 0x7F
        head = 2
        if length == 126:
            if end - pos < 4:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if end - pos < 10:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if end - pos < head + length:
            break
        if opcode == 1:
            out.append(buf[pos + head : pos + head + length])
        elif opcode == 9:
            answer += masked_pong(buf[pos + head : pos + head + length])
        elif opcode == 8:
            closed = True
        pos += head + length
    return out, answer, closed, buf[pos:]

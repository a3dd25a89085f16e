"""Wire formats: what the bytes of one event look like on each kind of service (sans-I/O).

The node speaks in NDJSON event lines (``{"ev":...}\\n``): the broker encodes each
message once as such a line, and everything the server says to a client starts as
one. A ``Wire`` turns a line into the bytes of its format: itself for TCP, one text
frame for WebSocket (a Pusher wire will be a third). A worker serves one service, so
one wire: a fan-out frames a message once and writes that same bytes object to every
recipient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .messages import PING, bye_line
from .websocket import encode_close, encode_line


def _same(line: bytes) -> bytes:
    return line


def _no_close(reason: str) -> bytes:
    return b""


def _ws_close(reason: str) -> bytes:
    # 1001 "going away" for a shutdown (clients reconnect), 1008 "policy" otherwise.
    return encode_close(1001 if reason == "shutdown" else 1008, reason)


@dataclass(frozen=True, slots=True)
class Wire:
    name: str  # the service's protocol as /api/connections reports it
    frame: Callable[[bytes], bytes]  # an NDJSON event line -> its bytes on this wire
    ping: bytes  # the heartbeat
    close: Callable[[str], bytes]  # the format's own closing bytes after a bye
    upgrade: bool  # clients speak HTTP first: a refusal before the upgrade is an HTTP answer

    def goodbye(self, reason: str) -> bytes:
        """``bye`` with a reason, then the format's close (WebSocket: 1001 or 1008)."""
        return self.frame(bye_line(reason)) + self.close(reason)


NDJSON: Final = Wire("tcp", _same, PING, _no_close, upgrade=False)
# The ping event, and a ping control frame that browsers answer by themselves.
WEBSOCKET: Final = Wire("websocket", encode_line, encode_line(PING) + b"\x89\x00", _ws_close, True)

_STATUS: Final = {
    401: b"Unauthorized",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}


def http_error(status: int, line: bytes) -> bytes:
    """An HTTP error carrying an error event, for a client not upgraded yet."""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, _STATUS[status], len(line), line)
    )

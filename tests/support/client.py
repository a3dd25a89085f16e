"""The blocking NDJSON client of the tests: what a person with ``nc`` does, with timeouts."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from typing import Any


class Client:
    """One connection to a TCP service, read line by line.

    ``welcome`` reads the welcome line at once (``self.welcome``, else ``{}``). ``source``
    binds the socket to that local address first (every 127.x.y.z is local), ``rcvbuf``
    sets a receive buffer before connecting (a reader that falls behind), and ``tls``
    speaks TLS with that context to a server named localhost.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        welcome: bool = True,
        *,
        source: str | None = None,
        rcvbuf: int | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            raw.settimeout(timeout)
            if rcvbuf is not None:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                raw.bind((source, 0))
            raw.connect((host, port))
            self.sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        # Our own buffer rather than makefile(): a file object that timed out once
        # cannot be read again, and drain() reads until the line goes quiet.
        self._buf = b""
        self.welcome: dict[str, Any] = self.recv() if welcome else {}

    @property
    def worker(self) -> int:
        return int(self.welcome["worker"])

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next raw line, newline included, like ``readline()``: b"" at end of stream."""
        while (end := self._buf.find(b"\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self._buf = self._buf, b""
                return rest
            self._buf += chunk
        line, self._buf = self._buf[: end + 1], self._buf[end + 1 :]
        return line

    def recv(self) -> dict[str, Any]:
        line = self.line()
        if not line:
            raise EOFError("server closed the connection")
        return dict(json.loads(line))

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send an op with an id and return its ok/error, failing on anything else first."""
        self.send(message)
        event = self.recv()
        assert event.get("id") == message["id"], event
        return event

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Events up to and including the first that matches ``predicate``."""
        seen = []
        while True:
            event = self.recv()
            seen.append(event)
            if predicate(event):
                return seen

    def drain(self, quiet: float = 1.0) -> list[dict[str, Any]]:
        """Every event that arrives until the connection has been quiet for ``quiet`` s."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(quiet)
        events = []
        try:
            while line := self.line():
                events.append(dict(json.loads(line)))
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(timeout)
        return events

    def closed(self) -> bool:
        """True once the server has closed the connection (after reading what is left)."""
        try:
            while self.line():
                pass
        except (ConnectionResetError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()

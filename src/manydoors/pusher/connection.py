"""A Pusher client connection: a WebSocket connection that belongs to one app.

The handshake's path names the app (``/app/<key>?protocol=7``). An unknown key or an
unsupported protocol version is told the way pusher-js understands: the upgrade
completes, then ``pusher:error`` and a close frame with Pusher's code (4001, 4007...),
so the client does not retry what cannot work. Everything after the upgrade is the
WebSocket connection's: text frames go to the sessions (``PusherSessions``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import parse_qs, urlsplit

from ..config import AppConfig
from ..protocol.websocket import encode_close
from ..server.connection import WsConnection
from ..server.tls import _Handshaken
from . import frames

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .sessions import PusherSessions


def route(target: bytes, apps: Mapping[str, AppConfig]) -> AppConfig | tuple[int, str]:
    """The app a handshake's path names, or (close code, reason) to refuse it with."""
    try:
        parts = urlsplit(target.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return frames.PATH_NOT_FOUND, "the path is not ASCII"
    head, _, key = parts.path.rpartition("/app/")
    if head or not key or "/" in key:
        return frames.PATH_NOT_FOUND, "connect to /app/<key>?protocol=7"
    app = apps.get(key)
    if app is None:
        return frames.APP_UNKNOWN, f"App key {key} does not exist"
    versions = parse_qs(parts.query).get("protocol")
    if not versions:
        return frames.NO_VERSION, "no protocol version supplied (?protocol=7)"
    if not versions[0].isdigit():
        return frames.BAD_VERSION, f"invalid version string {versions[0]!r}"
    if int(versions[0]) not in frames.VERSIONS:
        return frames.UNSUPPORTED_VERSION, f"unsupported protocol version {versions[0]} (5-7)"
    return app


class PusherConnection(WsConnection):
    """WebSocket framing; the app and socket id it was given at the upgrade."""

    __slots__ = ("app", "sid")

    apps: ClassVar[Mapping[str, AppConfig]]  # by key: set on the subclass ``bind`` makes
    sessions: ClassVar[PusherSessions]  # a Sessions, narrowed

    def __init__(self) -> None:
        super().__init__()
        self.app: AppConfig | None = None
        self.sid = ""  # the socket id, "<pid>.<token>" (Pusher's form)

    def upgraded(self, transport: asyncio.Transport, target: bytes) -> bool:
        app = route(target, self.apps)
        if isinstance(app, tuple):
            code, reason = app
            self.sessions.counters.error("bad_handshake")
            self.transport = None
            transport.write(frames.error(reason, code) + encode_close(code, reason))
            transport.close()
            return False
        if not self.sessions.let_in(self, app):
            self.transport = None
            why = f"app {app.id} is over its connection quota ({app.max_connections})"
            transport.write(frames.error(why, frames.OVER_QUOTA) + encode_close(frames.OVER_QUOTA))
            transport.close()
            return False
        self.app = app
        self.sid = self.admission.admit(self, transport).replace("-", ".")
        return True

    def write(self, line: bytes) -> None:
        if self.transport is not None and self.head is None:
            data = self.sessions.frame(line)
            if data:
                self.transport.write(data)


class TlsPusherConnection(_Handshaken, PusherConnection):
    __slots__ = ("made",)

    def __init__(self) -> None:
        super().__init__()
        self.made = False


def connection_class(tls: bool) -> type[PusherConnection]:
    """The Pusher connection class, with or without TLS."""
    return TlsPusherConnection if tls else PusherConnection

"""What the load generator keeps per connection: a socket, a framer, a few slots.

Memory per connection is the figure that matters at a million, so the classes are
slotted and hold only what the agent reads back. The ``Redial*`` variants exist only
with ``--reconnect``: a dropped connection dials again as the same user and resumes its
subscription where it left off, which needs two more slots (user, last seq); runs
without ``--reconnect`` do not pay for them.
"""

from __future__ import annotations

import socket
from typing import TypeAlias

from ..protocol.framing import LineFramer
from .tlspipe import TlsPipe


class LoadConn(LineFramer):
    """One held connection: its socket and what has arrived on it.

    Sockets are driven with add_writer/add_reader callbacks rather than transports
    created by coroutines: opening a connection is then a few synchronous calls, which
    is what lets one process open tens of thousands per second.
    """

    __slots__ = ("got", "ready", "sock", "started", "tls")

    def __init__(self, sock: socket.socket, started: float) -> None:
        LineFramer.__init__(self)
        self.sock = sock
        # When the current wait began: the connect, then (once connected) its answer.
        self.started = started
        self.got = 0  # bit n set: message number n arrived
        self.ready = False
        self.tls: TlsPipe | None = None

    def redial(self, sock: socket.socket, started: float) -> None:
        """Start over on a new socket; ``got`` stays (a message is counted once per client)."""
        LineFramer.__init__(self)
        self.sock = sock
        self.started = started
        self.ready = False
        self.tls = None


class WsLoadConn(LoadConn):
    """A WebSocket connection: bytes of an unfinished HTTP head or frame, and the state."""

    __slots__ = ("buf", "upgraded")

    def __init__(self, sock: socket.socket, started: float) -> None:
        super().__init__(sock, started)
        self.buf = b""
        self.upgraded = False

    def redial(self, sock: socket.socket, started: float) -> None:
        super().redial(sock, started)
        self.buf = b""
        self.upgraded = False


class RedialConn(LoadConn):
    """A connection that dials again when it drops (``--reconnect``)."""

    __slots__ = ("seq", "user")

    def __init__(self, sock: socket.socket, started: float, user: int) -> None:
        super().__init__(sock, started)
        self.user = user  # says hello as u<user> on every connection
        self.seq = 0  # the channel's last seq it saw (0: none yet): its next sub's since


class RedialWsConn(WsLoadConn):
    """The same over WebSocket (slots cannot come from two bases with slots)."""

    __slots__ = ("seq", "user")

    def __init__(self, sock: socket.socket, started: float, user: int) -> None:
        super().__init__(sock, started)
        self.user = user
        self.seq = 0


Redialed: TypeAlias = RedialConn | RedialWsConn

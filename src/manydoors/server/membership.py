"""What a worker tells beyond its interest frames: joins and leaves, connect events.

In a namespace with ``join_leave`` the worker sends JOIN when a user's first
connection on it joins a channel and LEAVE when its last one leaves; the router and
the backplane make that server-wide. For the webhooks it reports connects and
disconnects (``events``: only those asked for). Nothing here is per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

import msgspec

from ..namespaces import Namespaces
from ..protocol.ipc import Kind
from .hub import Hub, channels_of
from .peer import Peer

_encode_json: Final = msgspec.json.Encoder().encode


class Uplink(Protocol):
    """What the worker's parts need of the link to the broker (node.link.Link, or a fake)."""

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None: ...

    def at_flush(self, hook: Callable[[], None]) -> None: ...


def address(conn: Peer) -> str | None:
    """The peer's ``ip:port`` while the connection is open."""
    transport = conn.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None


class Membership:
    """Joins, leaves and connect events of one worker's connections."""

    __slots__ = ("events", "hub", "link", "namespaces", "service")

    def __init__(
        self, hub: Hub[Peer], namespaces: Namespaces, service: str, events: frozenset[str]
    ) -> None:
        self.hub = hub
        self.namespaces = namespaces
        self.service = service
        self.events = events  # webhook events this worker reports (connect, disconnect)
        self.link: Uplink | None = None  # set once the worker's link is up

    def _alone(self, conn: Peer, user: str, channel: str) -> bool:
        """No other connection of ``user`` on this worker is in ``channel``."""
        return not any(c is not conn and channel in channels_of(c) for c in self.hub.of_user(user))

    def joined(self, conn: Peer, channel: str) -> None:
        """``conn`` is now in ``channel``: tell the broker if its user is new there."""
        self._tell(Kind.JOIN, conn, channel)

    def left(self, conn: Peer, channel: str) -> None:
        """``conn`` has left ``channel``: tell the broker if it was its user's last one."""
        self._tell(Kind.LEAVE, conn, channel)

    def _tell(self, kind: Kind, conn: Peer, channel: str) -> None:
        user = conn.user
        if user is None or self.link is None or not self.namespaces(channel).join_leave:
            return
        if self._alone(conn, user, channel):
            self.link.send(kind, channel, user.encode())

    def leave_all(self, conn: Peer) -> None:
        for channel in channels_of(conn):
            self.left(conn, channel)

    def event(self, name: str, conn: Peer, reason: str | None = None) -> None:
        """A connect or disconnect event for the webhooks (sent by the supervisor)."""
        if name not in self.events or self.link is None:
            return
        body: dict[str, object] = {"user": conn.user, "service": self.service}
        where = address(conn)
        if where is not None:
            body["address"] = where
        if reason is not None:
            body["reason"] = reason
        self.link.send(Kind.EVENT, name, _encode_json(body))

"""What the parts of a worker need of a client connection, whatever its wire.

Admission, the clock and the sessions program against this Protocol, not against the
asyncio connection classes: so they import no connection module (no cycle), and their
unit tests drive them with a plain fake that records what is written.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .hub import Member


class Peer(Member, Protocol):
    """One client connection as the worker's parts see it (all slots of the connection)."""

    transport: asyncio.Transport | None  # None once closed: nothing more is read or written
    # The clock's tick when the last message was completed, or (if later) when the one
    # being received began: the heartbeat and read_timeout clock.
    mark: int
    ipb: int | None  # bucket counting this peer against max_connections_per_ip
    # Messages and bytes received since the last tick (the rate limits' buckets).
    sent: int
    got: int

    @property
    def reading(self) -> bool:
        """True while a message (or handshake) has begun and not been completed."""
        ...

    @property
    def handshaking(self) -> bool:
        """True until an upgrading wire (WebSocket) has completed its HTTP handshake."""
        ...

    def write(self, line: bytes) -> None:
        """Send one NDJSON event line in this connection's wire format."""
        ...

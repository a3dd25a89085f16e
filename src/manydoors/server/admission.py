"""Admission: who gets in, and how connections leave (one worker's doors).

A connection is counted when uvloop asks for its protocol (``accept``), checked against
the per-IP limit once its peer address is known (``let_in``), welcomed (``admit``), and
uncounted when it ends (``leave``). Refusals and closes say why, are counted, and
never wait on a peer: what is queued gets CLOSE_GRACE to go out, then the socket is
aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

from ..config import ServiceConfig
from ..protocol.messages import OpId, Welcome, encode, error_line
from ..protocol.wire import Wire, http_error
from .connids import ConnIds
from .hub import Hub
from .limits import CountTable, ip_bucket, is_loopback, user_bucket
from .peer import Peer
from .stats import Counters

CLOSE_GRACE: Final = 2.0  # seconds a closed connection has to take its bye before an abort


class Admission:
    """Accept, let in, welcome, refuse, close and release; per-IP and per-user counts."""

    def __init__(
        self,
        service: ServiceConfig,
        counters: Counters,
        hub: Hub[Peer],
        wire: Wire,
        cap: int,
        name: tuple[int, int],
        token_auth: bool = False,
    ) -> None:
        self.service = service
        self.counters = counters
        self.hub = hub
        self.wire = wire
        self.cap = cap  # connections this worker may hold (its fds less a reserve)
        self.pid, self.slot = name  # the welcome's conn (pid-token) and worker
        self.ids = ConnIds(self.pid)  # the welcome's conn: from the object, no slot
        # Every welcome of this worker but its conn (ASCII digits and a dash), encoded
        # once: the two sides of that field.
        head, _, tail = encode(Welcome("", service.name, self.slot)).partition(b'"conn":""')
        self.welcome_head, self.welcome_tail = head + b'"conn":"', b'"' + tail
        self.max_connections = service.max_connections
        self.per_ip = service.max_connections_per_ip
        # Bound to a loopback address, every peer is loopback: the peer's address (a
        # conversion to text for each connection) decides nothing.
        self.loopback_only = not service.limit_loopback and (
            service.host == "localhost" or is_loopback(service.host)
        )
        # Without auth a user name is a label anyone may claim: a per-user limit
        # would let anyone lock a user out, so it applies in auth modes "token" and
        # "proxy" only.
        self.per_user = service.max_connections_per_user if token_auth else 0
        self.ip_counts: CountTable | None = None  # shared with the service's workers
        self.user_counts: CountTable | None = None
        self.admitted = 0
        # Holds a welcome until the first acks can go with it (welcome.py); set by the
        # worker for the native wires. True: held.
        self.hold: Callable[[Peer, bytes], bool] | None = None
        self.next_conn = 0
        self.released = 0  # connections released since the worker last trimmed memory
        self.stopping = False
        self.conn_class: Callable[[], asyncio.Protocol] | None = None  # set by the worker
        # Readers over max_outbound_bytes: new messages for them are dropped (or they
        # are closed). Few at any time, so a set here rather than a flag in every one.
        self.slow: set[Peer] = set()
        self.slow_disconnect = service.slow_policy == "disconnect"
        # Why we closed the connections whose end is still to come (only kept when a
        # disconnect event must say it: webhooks).
        self.closing: dict[Peer, str] | None = None

    # --- coming in ---------------------------------------------------------------------

    def accept(self) -> asyncio.Protocol:
        """Protocol factory, called by uvloop synchronously for each accepted socket.

        Admission is decided here, not in connection_made: uvloop accepts a whole
        burst before any connection_made runs, and only a count kept at accept time
        stops a burst from running the worker out of fds.
        """
        c = self.counters
        if self.stopping:
            return Refusal(self, "server_full", "the server is shutting down", None)
        if self.admitted >= self.cap:
            return Refusal(
                self, "server_full", "this worker is at its fd limit", c.i_refused["worker_full"]
            )
        if c.connections() >= self.max_connections:
            reason = f"service is at max_connections ({self.max_connections})"
            return Refusal(self, "server_full", reason, c.i_refused["server_full"])
        assert self.conn_class is not None, "the worker binds its connection class first"
        self.admitted += 1
        c.mv[c.i_conn] += 1
        return self.conn_class()

    def unaccept(self) -> None:
        """Undo accept()'s count for a connection never made (its TLS handshake failed)."""
        self.admitted -= 1
        self.counters.mv[self.counters.i_conn] -= 1

    def let_in(self, conn: Peer, transport: asyncio.Transport) -> bool:
        """Count the peer against max_connections_per_ip, or refuse it (False)."""
        if not self.per_ip or self.ip_counts is None or self.loopback_only:
            return True
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        if not ip or (not self.service.limit_loopback and is_loopback(ip)):
            return True
        bucket = ip_bucket(ip)
        if self.ip_counts.total(bucket) >= self.per_ip:
            self.counters.mv[self.counters.i_refused["per_ip"]] += 1
            reason = f"more than {self.per_ip} connections from {ip}"
            self.refuse(conn, "too_many_connections", reason, 429)
            return False
        self.ip_counts.add(bucket, 1)
        conn.ipb = bucket
        return True

    def admit(self, conn: Peer, transport: asyncio.Transport) -> str:
        """Join the hub and say welcome (for WebSocket: once the upgrade is done).

        Returns the connection's id, as the welcome said it."""
        self.hub.add(conn)
        self.counters.mv[self.counters.i_accepted] += 1
        transport.set_write_buffer_limits(high=self.service.max_outbound_bytes)
        self.next_conn += 1
        name = self.ids.name(conn, self.next_conn)
        welcome = self.welcome_head + name.encode() + self.welcome_tail
        if self.hold is None or not self.hold(conn, welcome):
            conn.write(welcome)
        return name

    def take_user(self, conn: Peer, user: str) -> bool:
        """Count ``conn`` as ``user`` against max_connections_per_user (False: refused)."""
        counts = self.user_counts
        if counts is None or user == conn.user:
            return True
        bucket = user_bucket(user)
        if counts.total(bucket) >= self.per_user:
            self.counters.mv[self.counters.i_refused["per_user"]] += 1
            reason = f"user {user} has {self.per_user} connections already"
            self.refuse(conn, "too_many_connections", reason, 429)
            return False
        counts.add(bucket, 1)
        if conn.user is not None:
            counts.add(user_bucket(conn.user), -1)
        return True

    # --- going out ---------------------------------------------------------------------

    def refuse(self, conn: Peer, code: str, reason: str, status: int) -> None:
        """Answer ``code`` and close: in HTTP before a WebSocket upgrade, else as events."""
        transport = conn.transport
        if transport is None:
            return
        conn.transport = None
        self.counters.error(code)
        line = error_line(code, reason)
        transport.write(http_error(status, line) if conn.handshaking else self.wire.frame(line))
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def close(self, conn: Peer, reason: str, error: bytes = b"", bye: str | None = None) -> None:
        """Say (an error and) bye with a reason and close.

        ``reason`` is the counter (``closed.<reason>``); ``bye`` what the client and the
        disconnect webhook are told, when it differs (the API's own reason).

        What is queued is written first, but only for CLOSE_GRACE: then the connection
        is aborted, which frees the queued bytes of a peer that does not read (a slow
        reader, a vanished one) at once; close() alone would hold them until written.
        """
        transport = conn.transport
        if transport is None:
            return
        conn.transport = None  # nothing more is read or written; connection_lost releases
        self.counters.mv[self.counters.i_closed[reason]] += 1
        said = reason if bye is None else bye
        if self.closing is not None:
            self.closing[conn] = said
        goodbye = self.wire.goodbye(said)
        transport.write(self.wire.frame(error) + goodbye if error else goodbye)
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def fail(self, conn: Peer, code: str, reason: str, closed: str, op_id: OpId = None) -> None:
        """An error event with ``code``, then bye ``closed`` and close."""
        self.counters.error(code)
        self.close(conn, closed, error_line(code, reason, op_id))

    def slow_down(self, conn: Peer) -> None:
        """``conn`` is over its outbound cap (called from inside a write, often a fan-out)."""
        self.slow.add(conn)
        if self.slow_disconnect:
            asyncio.get_running_loop().call_soon(self.close_slow, conn)

    def close_slow(self, conn: Peer) -> None:
        """Give up on a reader still over its cap (the bye reaches it only if it reads)."""
        if conn in self.slow:
            self.close(conn, "slow")

    def ended(self, conn: Peer, exc: Exception | None) -> str:
        """Why a connection has ended (counted when it is a network error we did not cause).

        ``conn.transport`` is still set unless we closed it ourselves.
        """
        if conn.transport is None:
            return self.closing.pop(conn, "closed") if self.closing else "closed"
        if exc is not None:
            return self.lost(exc)
        return "shutdown" if self.stopping else "client"

    def lost(self, exc: Exception) -> str:
        """Count a connection that ended in an error we did not cause; say which."""
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            reason = "reset"
        elif isinstance(exc, TimeoutError):
            reason = "timed_out"  # keepalive gave up on the peer
        else:
            reason = "error"
        self.counters.mv[self.counters.i_lost[reason]] += 1
        return reason

    def leave(self, conn: Peer) -> None:
        """Uncount a connection that has ended (the hub has forgotten it already)."""
        self.admitted -= 1
        self.counters.mv[self.counters.i_conn] -= 1
        if conn.ipb is not None and self.ip_counts is not None:
            self.ip_counts.add(conn.ipb, -1)
        if conn.user is not None and self.user_counts is not None:
            self.user_counts.add(user_bucket(conn.user), -1)
        self.released += 1
        self.slow.discard(conn)


class Refusal(asyncio.Protocol):
    """The protocol of a connection that is refused: one error, then close."""

    __slots__ = ("admission", "counter", "reason", "why")

    def __init__(self, admission: Admission, why: str, reason: str, counter: int | None) -> None:
        self.admission = admission
        self.why = why
        self.reason = reason
        self.counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admission = self.admission
        if self.counter is not None:
            admission.counters.mv[self.counter] += 1
            admission.counters.error(self.why)
        tr = cast(asyncio.Transport, transport)
        line = error_line(self.why, self.reason)
        # An upgrading wire has not upgraded yet: its client reads HTTP.
        tr.write(http_error(503, line) if admission.wire.upgrade else line)
        tr.close()

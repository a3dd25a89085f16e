"""The worker's clock: ticks, deadlines, rate buckets and the heartbeat sweep.

No timer per connection (a timer handle is ~100 bytes, and the key figure is memory
per connection): one sweep per tick does everything due. Deadlines that every
connection has once (hello, WebSocket handshake) are queues in tick order; what
recurs (heartbeat, read timeout) is a ``mark`` slot that the sweep compares with the
tick. Looking at every connection's mark costs ~0.35 us a connection (a cache miss or
two), so that scan runs at a quarter of the heartbeat and read timeouts, not every
tick.
"""

from __future__ import annotations

from typing import Final

from ..config import ServiceConfig
from ..protocol.wire import Wire
from .admission import Admission
from .deadlines import Deadlines
from .expiry import Expiry
from .hub import Hub
from .peer import Peer
from .stats import Counters

MAX_TICK: Final = 1.0  # seconds between sweeps (shorter when a timeout is shorter)


def tick_seconds(svc: ServiceConfig) -> float:
    """The sweep period: a quarter of the shortest timeout, at most MAX_TICK."""
    timeouts = (svc.hello_timeout, svc.read_timeout, svc.ping_interval, svc.ping_timeout)
    return max(0.01, min(MAX_TICK, *(t / 4 for t in timeouts if t > 0)))


class Clock:
    """Time for one worker, in ticks of ``tick_s`` seconds."""

    def __init__(
        self,
        service: ServiceConfig,
        admission: Admission,
        hub: Hub[Peer],
        counters: Counters,
        wire: Wire,
        token_auth: bool = False,
    ) -> None:
        self.service = service
        self.admission = admission
        self.hub = hub
        self.counters = counters
        self.wire = wire
        self.tick = 0
        self.tick_s = tick_s = tick_seconds(service)

        def ticks(seconds: float) -> int:
            return max(1, round(seconds / tick_s)) if seconds > 0 else 0

        self.ping_ticks = ticks(service.ping_interval)
        self.pong_ticks = ticks(service.ping_timeout)
        self.read_ticks = ticks(service.read_timeout)
        self.hello_ticks = ticks(service.hello_timeout) if token_auth else 0
        scanned = [t for t in (self.ping_ticks, self.pong_ticks, self.read_ticks) if t]
        self.scan_ticks = max(1, min(scanned) // 4) if scanned else 0
        # Connections that must say a valid hello (token mode) or finish the WebSocket
        # handshake by a tick.
        self.hello_due = Deadlines()
        self.handshake_due = Deadlines()
        # Rate limits as token buckets refilled whole at every tick: a connection
        # counts what it sent since the last tick (``sent``, ``got``), the sweep zeroes
        # the counts of the connections in ``active`` (those that got bytes). Reading
        # of a connection over its bytes pauses until then.
        rate, byte_rate = service.max_messages_per_second, service.max_bytes_per_second
        self.msgs_per_tick = max(1, round(rate * tick_s)) if rate else 1 << 62
        self.bytes_per_tick = max(1, round(byte_rate * tick_s)) if byte_rate else 1 << 62
        self.paused: set[Peer] = set()
        self.active: list[Peer] = []
        # Connections whose credentials end (a JWT's exp, the connect proxy's expire_at).
        self.expiry = Expiry(tick_s, self.expired)

    def watch(self, conn: Peer) -> None:
        """Start the deadlines of a connection let in: its hello, its handshake."""
        if self.hello_ticks:
            self.hello_due.add(self.tick + self.hello_ticks, conn)
        if self.wire.upgrade and self.read_ticks:
            self.handshake_due.add(self.tick + self.read_ticks, conn)

    def count_bytes(self, conn: Peer, n: int) -> None:
        """Count ``n`` bytes received against max_bytes_per_second (pause reading if over)."""
        got = conn.got
        if not got:
            self.active.append(conn)  # its counts are zeroed at the next tick
        conn.got = got = got + n
        if got > self.bytes_per_tick:
            self.throttle(conn)

    def throttle(self, conn: Peer) -> None:
        """Over max_bytes_per_second: stop reading it until the next tick.

        This is TCP flow control: the client's sends block, nothing is lost.
        """
        if conn not in self.paused and conn.transport is not None:
            conn.transport.pause_reading()
            self.paused.add(conn)
            self.counters.mv[self.counters.i_throttled] += 1

    def forget(self, conn: Peer) -> None:
        """A connection has ended: nothing is to be resumed for it."""
        self.paused.discard(conn)
        if self.expiry.ends:
            self.expiry.forget(conn)

    def expires(self, conn: Peer, end: float | None) -> None:
        """``conn``'s credentials end at ``end`` (unix seconds; None: never)."""
        self.expiry.set(conn, end, self.tick)

    def expired(self, conn: Peer) -> None:
        self.admission.close(conn, "expired")

    def sweep(self) -> None:
        """One tick: refill the rate buckets, close or ping whoever is due."""
        self.tick = now = self.tick + 1
        for conn in self.active:
            conn.sent = conn.got = 0
        self.active.clear()
        for conn in self.paused:
            if conn.transport is not None:
                conn.transport.resume_reading()
        self.paused.clear()
        admission, svc = self.admission, self.service
        for conn in self.handshake_due.due(now):
            if conn.transport is not None and conn.handshaking:
                self.counters.mv[self.counters.i_closed["read_timeout"]] += 1
                why = f"no WebSocket handshake within {svc.read_timeout:g} s"
                admission.refuse(conn, "read_timeout", why, 408)
        for conn in self.hello_due.due(now):
            if conn.transport is not None and conn.user is None:
                why = f"no valid hello within {svc.hello_timeout:g} s"
                admission.fail(conn, "unauthorized", why, "hello_timeout")
        if self.expiry.ends or self.expiry.stale:
            self.expiry.sweep(now)
        if self.scan_ticks and not now % self.scan_ticks:
            self.scan(now)

    def scan(self, now: int) -> None:
        """Ping the connections quiet for ping_interval; close the dead and the stalled."""
        ping_at = now - self.ping_ticks if self.ping_ticks else -1
        # A connection is pinged at the scan when it has been idle for ping_ticks and
        # less than one scan more: every mark falls in one such window, so one ping.
        ping_from = ping_at - self.scan_ticks
        dead = ping_at - self.pong_ticks
        stalled = now - self.read_ticks if self.read_ticks else -1
        newest = max(ping_at, stalled)  # no connection with a later mark is due
        late: list[tuple[Peer, str]] = []
        pinged = 0
        ping = self.wire.ping
        for conn in self.hub.conns:
            mark = conn.mark
            if mark > newest:
                continue
            if mark <= stalled and conn.reading:
                late.append((conn, "read_timeout"))
            elif mark > ping_at or not self.ping_ticks:
                continue
            elif mark > ping_from:
                if conn.transport is not None:
                    conn.transport.write(ping)
                    pinged += 1
            elif mark <= dead:
                late.append((conn, "ping_timeout"))
        self.counters.mv[self.counters.i_pings] += pinged
        for conn, why in late:
            if why == "read_timeout":
                reason = f"message not finished within {self.service.read_timeout:g} s"
                self.admission.fail(conn, "read_timeout", reason, "read_timeout")
            else:
                self.admission.close(conn, "ping_timeout")

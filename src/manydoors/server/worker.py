"""A worker process: one uvloop event loop serving one service's listening socket.

The worker owns a Hub (its connections by user and channel) and a link to the
broker. It tells the broker only about 0 -> 1 and 1 -> 0 transitions of the users and
channels it holds, and receives each message once, already encoded, together with
the key to route it by. Fan-out writes that same bytes object to every recipient.

This module is preloaded by the fork server, so it imports only what a worker needs
(not aiohttp, not rich): every worker shares those pages copy-on-write.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import itertools
import os
import resource
import signal
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, cast

import msgspec
import uvloop

from ..broker.base import PresenceResult
from ..config import AuthConfig, ServiceConfig
from ..protocol.ipc import RECOVER_HEAD, RECOVERED_HEAD, TOKEN, Kind
from ..protocol.messages import (
    ERROR_CODES,
    PING,
    PRIVATE,
    Hello,
    OpId,
    Presence,
    PresenceOp,
    Pub,
    Recovered,
    Send,
    Sub,
    Unsub,
    Welcome,
    bye_line,
    encode,
    error_line,
    ok_line,
)
from ..protocol.websocket import encode_close, text_header
from . import tls
from .connection import Connection, TcpConnection, WsConnection
from .hub import Hub, channels_of
from .limits import CountTable, ip_bucket, is_loopback, tables, user_bucket
from ..node.link import Link
from .stats import CLOSED, COL, CONNECTIONS, LOST, REFUSED, StatsTable
from .tokens import TokenError, Verifier

GC_THRESHOLDS: Final = (50_000, 20, 100)
HEADROOM: Final = 8  # fds kept free for refusals and the odd file
DRAIN_BATCH: Final = 2000  # connections closed per loop iteration while draining
CLOSE_GRACE: Final = 2.0  # seconds a closed connection has to take its bye before an abort
MAX_TICK: Final = 1.0  # seconds between sweeps (shorter when a timeout is shorter)
_encode_json: Final = msgspec.json.Encoder().encode
_decode_presence: Final = msgspec.json.Decoder(PresenceResult).decode
TRIM_AFTER: Final = 1000  # connections released before the sweep hands memory back
_libc_name = ctypes.util.find_library("c")
# glibc keeps freed heap pages (slow readers' queues, closed connections) for reuse;
# malloc_trim returns them to the system. Absent on other C libraries.
_malloc_trim = getattr(ctypes.CDLL(_libc_name), "malloc_trim", None) if _libc_name else None


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    service: ServiceConfig
    slot: int  # row in the service's stats table and the number clients see
    rows: int
    fd_limit: int
    fd_reserve: int
    drain_timeout: float
    auth: AuthConfig = field(default_factory=AuthConfig)


def tick_seconds(svc: ServiceConfig) -> float:
    """The sweep period: a quarter of the shortest timeout, at most MAX_TICK."""
    timeouts = (svc.hello_timeout, svc.read_timeout, svc.ping_interval, svc.ping_timeout)
    return max(0.01, min(MAX_TICK, *(t / 4 for t in timeouts if t > 0)))


class Worker:
    """Everything one worker process knows; Connections reach it as a class attribute."""

    def __init__(self, spec: WorkerSpec, stats: StatsTable) -> None:
        svc = spec.service
        self.spec = spec
        self.hub: Hub[Connection] = Hub()
        self.stats = stats
        self.mv = stats.mv
        self.max_message_bytes = svc.max_message_bytes
        self.max_bad_messages = svc.max_bad_messages
        self.max_outbound_bytes = svc.max_outbound_bytes
        self.slow_disconnect = svc.slow_policy == "disconnect"
        self.max_subscriptions = svc.max_subscriptions
        self.max_connections = svc.max_connections
        self.verifier = Verifier(spec.auth) if spec.auth.mode == "token" else None
        # The private channels each token-holding connection may use (only those).
        self.grants: dict[Connection, frozenset[str]] = {}
        self.per_ip = svc.max_connections_per_ip
        # Without tokens a user name is a label anyone may claim: a per-user limit
        # would let anyone lock a user out, so it applies in auth mode "token" only.
        self.per_user = svc.max_connections_per_user if self.verifier is not None else 0
        self.ip_counts: CountTable | None = None  # shared with the service's workers
        self.user_counts: CountTable | None = None
        # Timeouts run on a clock of ticks (no timer per connection: a timer handle is
        # ~100 bytes): every ``scan_ticks`` the sweep looks at every connection's
        # ``mark``, which costs ~0.35 us per connection (a cache miss or two), so the
        # scan runs at a quarter of the heartbeat and read timeouts, not every tick.
        self.tick = 0
        self.tick_s = tick_s = tick_seconds(svc)

        def ticks(seconds: float) -> int:
            return max(1, round(seconds / tick_s)) if seconds > 0 else 0

        self.ping_ticks = ticks(svc.ping_interval)
        self.pong_ticks = ticks(svc.ping_timeout)
        self.read_ticks = ticks(svc.read_timeout)
        self.hello_ticks = ticks(svc.hello_timeout)
        scanned = [t for t in (self.ping_ticks, self.pong_ticks, self.read_ticks) if t]
        self.scan_ticks = max(1, min(scanned) // 4) if scanned else 0
        # Deadlines of connections that must say a valid hello (token mode) or finish
        # the WebSocket handshake; appended in tick order, so each is a queue.
        self.hello_due: deque[tuple[int, Connection]] = deque()
        self.handshake_due: deque[tuple[int, Connection]] = deque()
        # Rate limits as token buckets refilled whole at every tick: a connection
        # counts what it sent since the last sweep (``sent``, ``got``), the sweep
        # zeroes the counts of the connections in ``active`` (those that got bytes).
        # Reading of a connection over its bytes pauses until then.
        rate, byte_rate = svc.max_messages_per_second, svc.max_bytes_per_second
        self.msgs_per_tick = max(1, round(rate * tick_s)) if rate else 1 << 62
        self.bytes_per_tick = max(1, round(byte_rate * tick_s)) if byte_rate else 1 << 62
        self.paused: set[Connection] = set()
        self.active: list[Connection] = []
        # Readers over max_outbound_bytes: new messages for them are dropped (or they
        # are closed). Few at any time, so a set here rather than a flag in every one.
        self.slow: set[Connection] = set()
        # Consecutive bad messages of the connections that sent one lately: rare, so
        # kept here rather than in a slot of every connection.
        self.strikes: dict[Connection, int] = {}
        self.released = 0  # connections released since memory was last trimmed
        self.websocket = svc.protocol == "websocket"
        self.conn_class: type[Connection] = WsConnection if self.websocket else TcpConnection
        self.conn_class = tls.connection_class(svc, self.conn_class)
        self.frame = self.conn_class.frame  # NDJSON event line -> bytes on this service's wire
        self.cap = spec.fd_limit - spec.fd_reserve  # lowered in run() to what is really free
        self.admitted = 0
        self.pid = os.getpid()
        self.next_conn = 0
        self.stopping = False
        self.link: Link | None = None
        self.stop_event = asyncio.Event()
        # Acks that must wait until the broker has applied our earlier interest frames.
        self.dirty = False
        self.waiting: deque[list[tuple[Connection, OpId]]] = deque()
        self.unsynced: list[tuple[Connection, OpId]] = []  # acks of this loop iteration
        # Requests to the broker that a client waits for, by request id.
        self.requests = itertools.count(1)
        self.recovering: dict[int, tuple[Connection, str, OpId]] = {}
        self.presences: dict[int, tuple[Connection, OpId]] = {}
        # Channels with a connection waiting for its history: the worker keeps its
        # interest in them even while the hub holds no subscriber.
        self.pending: dict[str, int] = {}
        row = spec.slot
        ix = {name: stats.index(col, row) for name, col in COL.items()}
        self.i_conn = ix["connections"]
        self.i_accepted = ix["accepted"]
        self.i_in = ix["messages_in"]
        self.i_out = ix["messages_out"]
        self.i_dropped = ix["dropped"]
        self.i_refused = {r: ix[f"refused_{r}"] for r in REFUSED}
        self.i_closed = {r: ix[f"closed_{r}"] for r in CLOSED}
        self.i_lost = {r: ix[f"lost_{r}"] for r in LOST}
        self.i_throttled = ix["throttled"]
        self.i_pings = ix["pings"]
        self.ping = PING
        if self.websocket:  # the event, and a control frame that browsers answer by themselves
            self.ping = text_header(len(PING) - 1) + PING[:-1] + b"\x89\x00"
        self.i_error = {code: ix[f"error_{code}"] for code in ERROR_CODES}

    # --- connection lifecycle --------------------------------------------------------

    def accept(self) -> asyncio.Protocol:
        """Protocol factory, called by uvloop synchronously for each accepted socket.

        Admission is decided here, not in connection_made: uvloop accepts a whole
        burst before any connection_made runs, and only a count kept at accept time
        stops a burst from running the worker out of fds.
        """
        if self.stopping:
            return Refusal("server_full", "the server is shutting down", None)
        if self.admitted >= self.cap:
            return Refusal(
                "server_full", "this worker is at its fd limit", self.i_refused["worker_full"]
            )
        if self.stats.total(CONNECTIONS) >= self.max_connections:
            reason = f"service is at max_connections ({self.max_connections})"
            return Refusal("server_full", reason, self.i_refused["server_full"])
        self.admitted += 1
        self.mv[self.i_conn] += 1
        return self.conn_class()

    def unaccept(self) -> None:
        """Undo accept()'s count for a connection never made (its TLS handshake failed)."""
        self.admitted -= 1
        self.mv[self.i_conn] -= 1

    def let_in(self, conn: Connection, transport: asyncio.Transport) -> bool:
        """Count the peer against max_connections_per_ip (or refuse it); start its clocks."""
        if self.per_ip:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            if ip and (self.spec.service.limit_loopback or not is_loopback(ip)):
                bucket = ip_bucket(ip)
                counts = self.ip_counts
                if counts is not None:
                    if counts.total(bucket) >= self.per_ip:
                        self.mv[self.i_refused["per_ip"]] += 1
                        reason = f"more than {self.per_ip} connections from {ip}"
                        self.refuse(conn, "too_many_connections", reason, 429)
                        return False
                    counts.add(bucket, 1)
                    conn.ipb = bucket
        if self.verifier is not None:
            self.hello_due.append((self.tick + self.hello_ticks, conn))
        if self.websocket and self.read_ticks:
            self.handshake_due.append((self.tick + self.read_ticks, conn))
        return True

    def refuse(self, conn: Connection, code: str, reason: str, status: int) -> None:
        """Answer ``code`` and close: in HTTP before a WebSocket upgrade, else as events."""
        transport = conn.transport
        if transport is None:
            return
        conn.transport = None
        self.count_error(code)
        line = error_line(code, reason)
        if getattr(conn, "head", None) is not None:
            transport.write(_http_error(status, line))
        else:
            transport.write(self.frame(line))
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def admit(self, conn: Connection, transport: asyncio.Transport) -> None:
        self.hub.add(conn)
        self.mv[self.i_accepted] += 1
        transport.set_write_buffer_limits(high=self.max_outbound_bytes)
        self.next_conn += 1
        welcome = Welcome(f"{self.pid}-{self.next_conn}", self.spec.service.name, self.spec.slot)
        conn.write(encode(welcome))

    def release(self, conn: Connection) -> None:
        lost, gone = self.hub.remove(conn)
        self.admitted -= 1
        self.mv[self.i_conn] -= 1
        if conn.ipb is not None and self.ip_counts is not None:
            self.ip_counts.add(conn.ipb, -1)
        if conn.user is not None and self.user_counts is not None:
            self.user_counts.add(user_bucket(conn.user), -1)
        self.released += 1
        self.paused.discard(conn)
        self.slow.discard(conn)
        self.strikes.pop(conn, None)
        self.grants.pop(conn, None)
        link = self.link
        if link is not None:
            for channel in lost:
                if channel not in self.pending:
                    link.send(Kind.UNSUB, channel)
            if gone is not None:
                link.send(Kind.USER_OFF, gone)

    def lost(self, exc: Exception) -> None:
        """Count a connection that ended in an error we did not cause."""
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            reason = "reset"
        elif isinstance(exc, TimeoutError):
            reason = "timed_out"  # keepalive gave up on the peer
        else:
            reason = "error"
        self.mv[self.i_lost[reason]] += 1

    def close(self, conn: Connection, reason: str, error: bytes = b"") -> None:
        """Say (an error and) bye with a reason and close.

        What is queued is written first, but only for CLOSE_GRACE: then the connection
        is aborted, which frees the queued bytes of a peer that does not read (a slow
        reader, a vanished one) at once; close() alone would hold them until written.
        """
        transport = conn.transport
        if transport is None:
            return
        conn.transport = None  # nothing more is read or written; connection_lost releases
        self.mv[self.i_closed[reason]] += 1
        transport.write(self.frame(error) + self.goodbye(reason) if error else self.goodbye(reason))
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def close_slow(self, conn: Connection) -> None:
        """Give up on a reader over its outbound cap (the bye reaches it only if it reads)."""
        if conn in self.slow:
            self.close(conn, "slow")

    def goodbye(self, reason: str) -> bytes:
        """``bye`` with a reason; on WebSocket also the close frame (1001 or 1008)."""
        data = self.frame(bye_line(reason))
        if self.websocket:
            data += encode_close(1001 if reason == "shutdown" else 1008, reason)
        return data

    # --- counting --------------------------------------------------------------------

    def count_in(self) -> None:
        self.mv[self.i_in] += 1

    def count_error(self, code: str) -> None:
        self.mv[self.i_error[code]] += 1

    def fail(
        self, conn: Connection, code: str, reason: str, closed: str, op_id: OpId = None
    ) -> None:
        """An error event with ``code``, then bye ``closed`` and close."""
        self.count_error(code)
        self.close(conn, closed, error_line(code, reason, op_id))

    def forbid(self, conn: Connection, channel: str, op_id: OpId) -> bool:
        """Refuse a private channel the connection's token does not grant."""
        if not channel.startswith(PRIVATE) or channel in self.grants.get(conn, ()):
            return False
        self.count_error("forbidden")
        why = "needs a token granting it" if self.verifier else "needs auth mode token"
        conn.write(error_line("forbidden", f"channel {channel} is private: it {why}", op_id))
        return True

    def throttle(self, conn: Connection) -> None:
        """Over max_bytes_per_second: stop reading it until the next sweep.

        This is TCP flow control: the client's sends block, nothing is lost.
        """
        if conn not in self.paused and conn.transport is not None:
            conn.transport.pause_reading()
            self.paused.add(conn)
            self.mv[self.i_throttled] += 1

    # --- timeouts --------------------------------------------------------------------

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.sweep()

    def sweep(self) -> None:
        """One tick: refill the rate buckets, close or ping whoever is due."""
        self.tick = now = self.tick + 1
        if self.released >= TRIM_AFTER and _malloc_trim is not None:
            self.released = 0
            _malloc_trim(0)
        for conn in self.active:
            conn.sent = conn.got = 0
        self.active.clear()
        for conn in self.paused:
            if conn.transport is not None:
                conn.transport.resume_reading()
        self.paused.clear()
        for conn in _due(self.handshake_due, now):
            if conn.transport is not None and getattr(conn, "head", None) is not None:
                self.mv[self.i_closed["read_timeout"]] += 1
                why = f"no WebSocket handshake within {self.spec.service.read_timeout:g} s"
                self.refuse(conn, "read_timeout", why, 408)
        for conn in _due(self.hello_due, now):
            if conn.transport is not None and conn.user is None:
                why = f"no valid hello within {self.spec.service.hello_timeout:g} s"
                self.fail(conn, "unauthorized", why, "hello_timeout")
        if not self.scan_ticks or now % self.scan_ticks:
            return
        ping_at = now - self.ping_ticks if self.ping_ticks else -1
        # A connection is pinged at the scan when it has been idle for ping_ticks and
        # less than one scan more: every mark falls in one such window, so one ping.
        ping_from = ping_at - self.scan_ticks
        dead = ping_at - self.pong_ticks
        stalled = now - self.read_ticks if self.read_ticks else -1
        newest = max(ping_at, stalled)  # no connection with a later mark is due
        late: list[tuple[Connection, str]] = []
        pinged = 0
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
                    conn.transport.write(self.ping)
                    pinged += 1
            elif mark <= dead:
                late.append((conn, "ping_timeout"))
        self.mv[self.i_pings] += pinged
        for conn, why in late:
            if why == "read_timeout":
                reason = f"message not finished within {self.spec.service.read_timeout:g} s"
                self.fail(conn, "read_timeout", reason, "read_timeout")
            else:
                self.close(conn, "ping_timeout")

    # --- client ops ------------------------------------------------------------------

    def ok(self, conn: Connection, op_id: OpId) -> None:
        if op_id is not None:
            conn.write(ok_line(op_id))

    def ok_when_applied(self, conn: Connection, op_id: OpId) -> None:
        """Ack only once the broker has applied our interest frames sent so far.

        Otherwise a client could get ``ok`` for a sub, publish through the API at once,
        and miss its own message because our SUB frame was still in flight.
        """
        if op_id is None:
            return
        if self.dirty or self.unsynced:
            # One SYNC per link write covers every ack since the last: a ramp of hellos
            # costs the broker one round trip per Link.COALESCE_S, not one per connection.
            if not self.unsynced and self.link is not None:
                self.link.at_flush(self.sync)
            self.unsynced.append((conn, op_id))
        elif self.waiting:
            self.waiting[-1].append((conn, op_id))
        else:
            conn.write(ok_line(op_id))

    def sync(self) -> None:
        self.dirty = False
        if self.link is not None:
            self.link.send(Kind.SYNC)
        self.waiting.append(self.unsynced)
        self.unsynced = []

    def hello(self, conn: Connection, op: Hello) -> None:
        user = op.user
        if self.verifier is not None:
            try:
                if op.token is None:
                    raise TokenError("hello needs a token")
                grant = self.verifier.verify(op.token)
                if user not in (None, grant.user):
                    raise TokenError("user differs from the token's sub")
            except TokenError as exc:
                self.fail(conn, "unauthorized", str(exc), "unauthorized", op.id)
                return
            user = grant.user
            if grant.channels:
                self.grants[conn] = grant.channels
            else:
                self.grants.pop(conn, None)
        elif user is None:
            self.count_error("missing_field")
            conn.write(error_line("missing_field", "missing field 'user'", op.id))
            return
        if user != conn.user and self.user_counts is not None:
            counts, bucket = self.user_counts, user_bucket(user)
            if counts.total(bucket) >= self.per_user:
                self.mv[self.i_refused["per_user"]] += 1
                reason = f"user {user} has {self.per_user} connections already"
                self.refuse(conn, "too_many_connections", reason, 429)
                return
            counts.add(bucket, 1)
            if conn.user is not None:
                counts.add(user_bucket(conn.user), -1)
        new, lost = self.hub.set_user(conn, user)
        self._interest(Kind.USER_OFF, lost)
        self._interest(Kind.USER_ON, user if new else None)
        self.ok_when_applied(conn, op.id)

    def subscribe(self, conn: Connection, op: Sub) -> None:
        channel = op.channel
        if self.forbid(conn, channel, op.id):
            return
        held = channels_of(conn)
        if channel not in held and len(held) >= self.max_subscriptions:
            self.count_error("too_many_subscriptions")
            reason = f"a connection may be in at most {self.max_subscriptions} channels"
            conn.write(error_line("too_many_subscriptions", reason, op.id))
            return
        if op.since is not None and channel not in held:
            self.recover(conn, channel, op.since, op.id)
            return
        if self.hub.subscribe(conn, channel) and channel not in self.pending:
            self._interest(Kind.SUB, channel)
        self.ok_when_applied(conn, op.id)

    def unsubscribe(self, conn: Connection, op: Unsub) -> None:
        channel = op.channel
        for req in [r for r, (c, ch, _) in self.recovering.items() if c is conn and ch == channel]:
            # Its answer will find nobody waiting; the sub is acked now, before the unsub.
            self.ok(conn, self.recovering.pop(req)[2])
        if self.hub.unsubscribe(conn, channel) and channel not in self.pending:
            self._interest(Kind.UNSUB, channel)
        self.ok(conn, op.id)

    def recover(self, conn: Connection, channel: str, since: int, op_id: OpId) -> None:
        """Join ``channel`` only once the broker has sent what the client missed.

        The broker answers on the link, in order with the channel's deliveries: every
        seq up to its answer comes from history, every later one live, each once.
        """
        link = self.link
        if link is None:
            return
        if channel not in self.hub.channels and channel not in self.pending:
            link.send(Kind.SUB, channel)
        self.pending[channel] = self.pending.get(channel, 0) + 1
        req = next(self.requests)
        self.recovering[req] = (conn, channel, op_id)
        link.send(Kind.RECOVER, channel, RECOVER_HEAD.pack(req, since))

    def recovered(self, channel: str, payload: bytes) -> None:
        req, ok, seq = RECOVERED_HEAD.unpack_from(payload)
        left = self.pending.get(channel, 1) - 1
        if left > 0:
            self.pending[channel] = left
        else:
            self.pending.pop(channel, None)
        conn, _, op_id = self.recovering.pop(req, (None, channel, None))
        if conn is None or conn.transport is None:
            if not left and channel not in self.hub.channels and self.link is not None:
                self.link.send(Kind.UNSUB, channel)
            return
        if channel in channels_of(conn):
            self.ok(conn, op_id)  # subscribed meanwhile: it has been receiving live
            return
        self.hub.subscribe(conn, channel)  # the broker knows our interest already
        # Split on newlines only: a relayed ``data`` may hold a raw \r (JSON whitespace).
        lines = [line + b"\n" for line in payload[RECOVERED_HEAD.size :].split(b"\n")[:-1]]
        frame = self.frame
        out = [frame(encode(Recovered(op_id, bool(ok), seq, len(lines))))]
        out.extend(frame(line) for line in lines)
        conn.transport.write(b"".join(out))
        self.mv[self.i_out] += len(lines)

    def presence(self, conn: Connection, op: PresenceOp) -> None:
        if self.link is not None and not self.forbid(conn, op.channel, op.id):
            req = next(self.requests)
            self.presences[req] = (conn, op.id)
            self.link.send(Kind.PRESENCE, op.channel, TOKEN.pack(req))

    def presence_part(self, channel: str) -> bytes:
        """This worker's subscribers of ``channel``: ([{user: connections}, anonymous])."""
        users: dict[str, int] = {}
        anonymous = 0
        for conn in self.hub.channels.get(channel, ()):
            if conn.user is None:
                anonymous += 1
            else:
                users[conn.user] = users.get(conn.user, 0) + 1
        return _encode_json((users, anonymous))

    def _interest(self, kind: Kind, key: str | None) -> None:
        if key is not None and self.link is not None:
            self.link.send(kind, key)
            self.dirty = True

    def publish(self, conn: Connection, op: Pub) -> None:
        if self.forbid(conn, op.channel, op.id):
            return
        if self.link is not None:
            self.link.send(Kind.PUB, op.channel, _encode_json((conn.user, op.data)))
        self.ok(conn, op.id)

    def send(self, conn: Connection, op: Send) -> None:
        if self.link is not None:
            self.link.send(Kind.SEND, op.user, _encode_json((conn.user, op.data)))
        self.ok(conn, op.id)

    # --- broker frames ---------------------------------------------------------------

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        hub = self.hub
        # Deliveries arrive as NDJSON lines; framed once here for this service's wire.
        if kind == Kind.DELIVER_CHANNEL:
            self.fanout(hub.channels.get(key, ()), self.frame(payload))
        elif kind == Kind.DELIVER_USER:
            self.fanout(hub.of_user(key), self.frame(payload))
        elif kind == Kind.DELIVER_ALL:
            self.fanout(hub.conns, self.frame(payload))
        elif kind == Kind.SAMPLE:
            link.send(Kind.SAMPLED, "", _encode_json(self.sample(int(key or 0))))
        elif kind == Kind.RECOVERED:
            self.recovered(key, payload)
        elif kind == Kind.PRESENCE_ASK:
            link.send(Kind.PRESENCE_PART, key, payload + self.presence_part(key))
        elif kind == Kind.PRESENCE_DONE:
            asked = self.presences.pop(TOKEN.unpack_from(payload)[0], None)
            if asked is not None:
                got = _decode_presence(payload[TOKEN.size :])
                conn, op_id = asked
                conn.write(encode(Presence(key, got.users, got.anonymous, op_id, got.partial)))
        elif kind == Kind.SYNCED and self.waiting:
            # A hello and a sub sent together are acked in one write.
            acks: dict[Connection, bytes] = {}
            frame = self.frame
            for conn, op_id in self.waiting.popleft():
                acks[conn] = acks.get(conn, b"") + frame(ok_line(op_id))
            for conn, data in acks.items():
                if conn.transport is not None:
                    conn.transport.write(data)

    def sample(self, limit: int) -> list[dict[str, object]]:
        """A few live connections as 5-tuples with their user and channels."""
        out: list[dict[str, object]] = []
        proto = "websocket" if self.websocket else "tcp"
        for conn in itertools.islice(self.hub.conns, max(0, limit)):
            transport = conn.transport
            if transport is None:
                continue
            peer = transport.get_extra_info("peername") or ("?", 0)
            local = transport.get_extra_info("sockname") or ("?", 0)
            out.append(
                {
                    "tuple": ["tcp", peer[0], peer[1], local[0], local[1]],
                    "service": self.spec.service.name,
                    "protocol": proto,
                    "worker": self.spec.slot,
                    "user": conn.user,
                    "channels": list(channels_of(conn)),
                }
            )
        return out

    def fanout(self, members: Iterable[Connection], line: bytes) -> None:
        # The hot loop of a broadcast: one write of the same bytes per recipient.
        sent = dropped = 0
        slow = self.slow
        for conn in members:
            transport = conn.transport
            if transport is None:
                continue
            if slow and conn in slow:
                dropped += 1
            else:
                transport.write(line)
                sent += 1
        mv = self.mv
        mv[self.i_out] += sent
        if dropped:
            mv[self.i_dropped] += dropped

    # --- run and drain ---------------------------------------------------------------

    async def run(self, listen_sock: socket.socket, link_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        Connection.worker = self
        self.link = link = Link(self.on_frame, "broker")
        await loop.create_unix_connection(lambda: link, sock=link_sock)
        # Whatever happens, keep HEADROOM fds free so that a refusal can still be
        # accepted and answered; libuv's reserve-fd trick (accept and close) is only
        # the last line of defence, for fds that something else used up.
        self.cap = min(self.cap, self.spec.fd_limit - _open_fds() - HEADROOM)
        tls_options = tls.listen_options(self.spec.service)  # {} without TLS
        server = await loop.create_server(
            self.accept, sock=listen_sock, backlog=self.spec.service.backlog, **tls_options
        )
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        link.send(Kind.READY, str(self.pid))
        # Losing the supervisor (the link) stops us as SIGTERM would.
        link.lost.add_done_callback(lambda _: self.stop_event.set())
        sweeper = asyncio.ensure_future(self.sweeper())
        await self.stop_event.wait()
        sweeper.cancel()
        server.close()
        await self.drain()

    async def drain(self) -> None:
        """Stop accepting, say bye to every client, close in batches, within the timeout."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.drain_timeout * 0.8
        bye = self.goodbye("shutdown")
        conns = list(self.hub.conns)
        for i in range(0, len(conns), DRAIN_BATCH):
            for conn in conns[i : i + DRAIN_BATCH]:
                transport = conn.transport
                if transport is not None:
                    transport.write(bye)
                    transport.close()
            await asyncio.sleep(0)
        while self.hub.conns and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.hub.conns):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)


class Refusal(asyncio.Protocol):
    """The protocol of a connection that is refused: one error line, then close."""

    __slots__ = ("counter", "reason", "why")

    def __init__(self, why: str, reason: str, counter: int | None) -> None:
        self.why = why
        self.reason = reason
        self.counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = Connection.worker
        if self.counter is not None:
            worker.mv[self.counter] += 1
            worker.count_error(self.why)
        tr = cast(asyncio.Transport, transport)
        line = error_line(self.why, self.reason)
        tr.write(_http_error(503, line) if worker.websocket else line)  # WS: not upgraded yet
        tr.close()


_STATUS: Final = {
    401: b"Unauthorized",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}


def _http_error(status: int, line: bytes) -> bytes:
    """An HTTP error carrying an error event, for a WebSocket client not upgraded yet."""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, _STATUS[status], len(line), line)
    )


def _due(queue: deque[tuple[int, Connection]], now: int) -> Iterator[Connection]:
    """Take the connections whose deadline (in ticks) has come from a queue in tick order."""
    while queue and queue[0][0] <= now:
        yield queue.popleft()[1]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def worker_main(
    spec: WorkerSpec,
    listen_sock: socket.socket,
    link_sock: socket.socket,
    stats_buffer: memoryview,
    counts_buffer: memoryview | None = None,
) -> None:
    """Entry point of a worker process (started by the supervisor's fork server)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(spec.fd_limit, hard), hard))
    stats = StatsTable(memoryview(stats_buffer), spec.rows)
    # Everything allocated so far lives forever: keep the collector from touching
    # (and so un-sharing) those pages.
    gc.collect()
    gc.freeze()
    # Each accept allocates a few tracked objects, so the default threshold (700) runs
    # a collection every ~200 accepts and the older generations rescan every held
    # connection: py-spy put 6.6 % of an accept storm in gc. Connections free by
    # refcount (connection_lost breaks the transport <-> protocol cycle), so collect
    # rarely.
    gc.set_threshold(*GC_THRESHOLDS)
    worker = Worker(spec, stats)
    if counts_buffer is not None:
        ip_counts, user_counts = tables(memoryview(counts_buffer), spec.rows, spec.slot)
        worker.ip_counts = ip_counts if worker.per_ip else None
        worker.user_counts = user_counts if worker.per_user else None
    uvloop.run(worker.run(listen_sock, link_sock))

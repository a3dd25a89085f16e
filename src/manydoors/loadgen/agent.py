"""One load process: opens its share of connections, holds them, counts what arrives.

Lean by design so that it is never the bottleneck: a held connection is a uvloop
transport and a slotted protocol object; there is no task or stream per connection
(a short coroutine exists only while a connect is in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import os
import resource
import signal
import socket
import ssl
import struct
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any, Final, cast

import msgspec
import uvloop

from ..node import procfs
from ..node.tuning import GC_THRESHOLDS
from ..protocol.framing import TOO_LONG
from . import pusherclient, wsclient
from .conns import LoadConn as LoadConn
from .conns import RedialConn, RedialWsConn
from .conns import WsLoadConn as WsLoadConn
from .errors import errno_name
from .planner import AgentPlan
from .reconnect import Backoff, Redial, sub_op
from .tlspipe import TlsPipe, client_context
from .window import Window

IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE: Final = getattr(socket, "IP_LOCAL_PORT_RANGE", 51)
TICK: Final = 0.005
REPORT_EVERY: Final = 0.5
SWEEP_EVERY: Final = 0.5  # how often connects and greetings are checked against the timeout
LINE_LIMIT: Final = 1024 * 1024
RECV_BYTES: Final = 65536  # < glibc's mmap threshold: 256 KiB was mmap+mremap+munmap a recv
PONG: Final = b'{"op":"pong"}'  # the answer to the server's heartbeat {"ev":"ping"}


@dataclass(frozen=True, slots=True)
class AgentOptions:
    rate: float  # connections per second for this process
    hello: bool
    subscribe: str | None
    connect_timeout: float
    fd_limit: int
    source_ports: tuple[int, int] | None = None  # per-socket ephemeral range
    ws: bool = False  # speak WebSocket (the same JSON messages in text frames)
    tls: bool = False  # TLS (no certificate check: see tlspipe)
    pusher: pusherclient.PusherApp | None = None  # speak Pusher protocol 7 (over ws)
    reconnect: Backoff | None = None  # dial again after a drop, resubscribe with since
    nice: int = 0  # added to this process's nice value (the load's --nice)


class Event(msgspec.Struct):
    ev: str
    id: int | None = None
    code: str | None = None
    reason: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"")  # Raw cannot be in a union; empty means absent
    seq: int | None = None  # a msg's; the ok of a sub with since: the seq at the join
    recovered: bool | None = None  # only in the ok of a sub with since
    missed: int = 0


class Stamp(msgspec.Struct):
    """The payload the controller publishes: its send time and its number."""

    t: float
    n: int


_decode_event: Final = msgspec.json.Decoder(Event).decode
_decode_stamp: Final = msgspec.json.Decoder(Stamp).decode


class Agent:
    def __init__(self, plan: AgentPlan, opts: AgentOptions, pipe: Pipe) -> None:
        self.plan = plan
        self.opts = opts
        self.pipe = pipe
        self.conns: set[LoadConn] = set()
        self.connecting: dict[int, LoadConn] = {}  # fd -> connection being opened
        self.open_now = 0
        self.attempted = 0
        self.ready = 0
        self.errors: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.connect_hist: Counter[int] = Counter()  # 0.1 ms buckets
        self.received: Counter[int] = Counter()  # message number -> connections that got it
        self.latency: dict[int, Counter[int]] = {}  # message number -> 1 ms buckets
        self.duplicates = 0
        self.ramp_done = False
        self.ramp_task: asyncio.Task[None] | None = None
        self.rss_start = procfs.rss() or 0  # this process before its first connection
        self.first_attempt = self.last_connect = 0.0
        self.peak = 0
        self.stop = asyncio.Event()
        self.tls = client_context() if opts.tls else None
        # A connection counts as in flight until the server answers: its hello's ack, or
        # with --raw --tls the end of its handshake.
        self.awaits_answer = opts.hello or opts.tls or opts.pusher is not None
        # Open connections still waiting for that answer -> the user number their
        # greeting uses (sent once the TLS handshake is done). Oldest first, so the sweep
        # stops at the first one within its time; entries leave on the answer, so this
        # holds at most window.CEILING connections, never every held one.
        self.waiting: dict[LoadConn, int] = {}
        self.window = Window(opts.connect_timeout)  # how many may wait at once
        # One shared answer to every heartbeat: no state per connection.
        self.pong = wsclient.masked_text(PONG) if opts.ws else PONG + b"\n"
        # Pusher: the subscribe to a public channel, the same bytes for every connection
        # (a private channel's is signed per connection, from its socket id).
        self.pusher_sub = b""
        if opts.pusher is not None:
            self.pong = pusherclient.PONG
            if opts.subscribe and not pusherclient.needs_auth(opts.subscribe):
                self.pusher_sub = pusherclient.subscribe(opts.subscribe)
        last = 2 if opts.subscribe else 1
        self.ready_id = last if opts.hello else None
        # --reconnect: connections remember their user and last seq, and dial again.
        self.redial = Redial(plan, opts.reconnect) if opts.reconnect is not None else None
        # IP_LOCAL_PORT_RANGE (Linux 6.3+) takes the range as hi << 16 | lo.
        ports = opts.source_ports
        self.port_range = struct.pack("I", ports[1] << 16 | ports[0]) if ports else b""

    # --- per line -------------------------------------------------------------------

    def on_line(self, conn: LoadConn, line: bytes) -> None:
        try:
            ev = _decode_event(line)
        except msgspec.DecodeError:
            self.errors["bad_line"] += 1
            return
        kind = ev.ev
        if kind == "msg" or kind == "broadcast" or kind == "dm":
            if self.redial is not None and kind == "msg" and ev.seq is not None:
                self.redial.seen(cast(RedialConn, conn), ev.seq)
            self.record(conn, ev.data)
        elif kind == "ok":
            if ev.recovered is not None and self.redial is not None:
                self.redial.resumed(cast(RedialConn, conn), ev.recovered, ev.seq or 0, ev.missed)
            if ev.id == self.ready_id and not conn.ready:
                self.mark_ready(conn)
        elif kind == "ping":
            self.send(conn, self.pong)
        elif kind == "error":
            self.errors[ev.code or "error"] += 1
            # A refusal is an answer: the connection no longer holds a ramp slot.
            self.waiting.pop(conn, None)
        elif kind == "bye":
            self.closed[ev.reason or "bye"] += 1
        elif kind == "welcome" and self.ready_id is None and not conn.ready:
            self.mark_ready(conn)

    def record(self, conn: LoadConn, data: bytes | str | msgspec.Raw) -> None:
        """A message arrived: count it, and its latency when ``data`` is a Stamp."""
        now = time.time()
        try:
            stamp = _decode_stamp(data) if len(data) else None
        except msgspec.DecodeError:
            stamp = None
        if stamp is None:
            self.received[0] += 1
            return
        bit = 1 << stamp.n
        if conn.got & bit:
            self.duplicates += 1
            return
        conn.got |= bit
        self.received[stamp.n] += 1
        hist = self.latency.get(stamp.n)
        if hist is None:
            hist = self.latency[stamp.n] = Counter()
        hist[int((now - stamp.t) * 1000)] += 1

    def on_pusher(self, conn: LoadConn, payload: bytes) -> None:
        """One Pusher frame: an app's event (timed), or the protocol's own."""
        try:
            ev = pusherclient.decode_event(payload)
            kind = ev.event
            if not kind.startswith("pusher"):
                self.record(conn, pusherclient.inner(ev.data))
            elif kind == pusherclient.PING:
                self.send(conn, self.pong)
            elif kind == pusherclient.SUBSCRIBED:
                if not conn.ready:
                    self.mark_ready(conn)
            elif kind == pusherclient.ESTABLISHED:
                self.established(conn, ev.data)
            elif kind == pusherclient.ERROR:
                self.errors[pusherclient.error_name(ev.data)] += 1
                self.waiting.pop(conn, None)  # an answer: the server closes it next
            elif kind in pusherclient.SUBSCRIPTION_ERRORS and conn in self.waiting:
                # Pusher's two names for it, both sent: counted once.
                self.errors[pusherclient.subscription_error_name(ev.data)] += 1
                self.waiting.pop(conn, None)
        except msgspec.DecodeError:
            self.errors["bad_line"] += 1

    def established(self, conn: LoadConn, data: msgspec.Raw) -> None:
        """``pusher:connection_established``: subscribe, or (no channel) ready."""
        app, channel = self.opts.pusher, self.opts.subscribe
        if channel is None or app is None:
            if not conn.ready:
                self.mark_ready(conn)
            return
        sub = self.pusher_sub
        if not sub:
            sub = pusherclient.subscribe_signed(app, channel, pusherclient.socket_id(data))
        self.send(conn, sub)

    def mark_ready(self, conn: LoadConn) -> None:
        conn.ready = True
        self.ready += 1
        if self.waiting.pop(conn, None) is not None:
            now = time.perf_counter()
            self.window.answered(now - conn.started, now)
        if self.redial is not None:
            self.redial.ready(cast(RedialConn, conn))

    def close(self, conn: LoadConn, error: str | None) -> None:
        """Forget a connection (open or connecting), counting why it ended."""
        loop = asyncio.get_running_loop()
        sock = conn.sock
        fd = sock.fileno()
        if fd < 0:
            return
        if self.connecting.pop(fd, None) is not None:
            loop.remove_writer(fd)
            loop.remove_reader(fd)
        else:
            loop.remove_reader(fd)
            self.open_now -= 1
            self.conns.discard(conn)
        if conn.ready:
            conn.ready = False
            self.ready -= 1
        self.waiting.pop(conn, None)
        sock.close()
        self.lost(conn, error)

    def lost(self, conn: LoadConn, error: str | None) -> None:
        """Count why ``conn`` ended; with --reconnect, it dials again after its backoff."""
        if self.redial is not None and not self.stop.is_set():
            self.redial.dropped(cast(RedialConn, conn), error or "closed", time.monotonic())
        elif error is not None:
            self.errors[error] += 1

    # --- ramp -----------------------------------------------------------------------

    def greeting(self, user: int, since: int = 0) -> bytes:
        """The first bytes of a connection; its sub asks for what followed seq ``since``."""
        if self.opts.pusher is not None:
            # Pusher: the client speaks once the server has (connection_established).
            return pusherclient.upgrade(self.opts.pusher.key)
        hello = b'{"op":"hello","user":"u%d","id":1}' % user
        sub = sub_op(self.opts.subscribe, since) if self.opts.subscribe else b""
        if self.opts.ws:
            # The server takes frames sent right behind the upgrade request.
            out = wsclient.upgrade_request("load", 0)
            if self.opts.hello:
                out += wsclient.masked_text(hello) + (wsclient.masked_text(sub) if sub else b"")
            return out
        if not self.opts.hello:
            return b""
        return hello + b"\n" + (sub + b"\n" if sub else b"")

    def open_one(
        self, src: str, dst: str, port: int, user: int, again: LoadConn | None = None
    ) -> None:
        """Dial a connection for ``user``: a new one, or ``again`` (--reconnect) anew."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self.failed(again, errno_name(exc))
            return
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            if self.port_range:
                sock.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, self.port_range)
            sock.bind((src, 0))
        except OSError as exc:
            sock.close()
            self.failed(again, errno_name(exc))
            return
        conn = again
        if conn is not None:
            conn.redial(sock, time.perf_counter())
        elif self.redial is not None:
            conn = (RedialWsConn if self.opts.ws else RedialConn)(sock, time.perf_counter(), user)
        else:
            conn = (WsLoadConn if self.opts.ws else LoadConn)(sock, time.perf_counter())
        code = sock.connect_ex((dst, port))
        if code == errno.EINPROGRESS:
            # On loopback the kernel usually completes the handshake before connect()
            # returns; getpeername() tells (ENOTCONN while SYN_SENT) for one cheap
            # syscall, and only a connect really in flight (full backlog, SYN retry)
            # costs a writer registration and a callback.
            try:
                sock.getpeername()
                code = 0
            except OSError:
                self.connecting[sock.fileno()] = conn
                loop = asyncio.get_running_loop()
                loop.add_writer(sock.fileno(), self.on_connected, conn, user)
                return
        if code == 0:
            self.connected(conn, user)
        else:
            sock.close()
            self.failed(conn, errno.errorcode.get(code, str(code)))

    def failed(self, conn: LoadConn | None, error: str) -> None:
        """A dial failed before its connect was under way (``conn``: None if not made)."""
        if conn is None:
            self.errors[error] += 1
        else:
            self.lost(conn, error)

    def on_connected(self, conn: LoadConn, user: int) -> None:
        sock = conn.sock
        asyncio.get_running_loop().remove_writer(sock.fileno())
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.close(conn, errno.errorcode.get(code, str(code)))
            return
        self.connected(conn, user)

    def connected(self, conn: LoadConn, user: int) -> None:
        sock = conn.sock
        fd = sock.fileno()
        self.connecting.pop(fd, None)
        now = time.perf_counter()
        self.connect_hist[int((now - conn.started) * 10_000)] += 1
        conn.started = now  # from here on: waiting for the server's answer
        if not self.ramp_done:  # --reconnect: dials after the ramp are not the ramp's
            self.last_connect = now
        self.open_now += 1
        self.peak = max(self.peak, self.open_now)
        self.conns.add(conn)
        if self.awaits_answer:
            self.waiting[conn] = user
        if self.tls is not None:
            # The greeting waits for the handshake, which needs reading even with --raw.
            conn.tls = TlsPipe(self.tls)
            first = conn.tls.start()
        elif not self.opts.hello and not self.opts.ws:
            # --raw only holds: not reading saves a poll registration per connection
            # (what the server sends waits in the kernel buffer).
            self.mark_ready(conn)
            return
        else:
            first = self.greeting(user, self.since(conn))
        try:  # a few dozen bytes into an empty buffer: never short
            sock.send(first)
        except OSError as exc:  # reset already: a listener closed with it in its queue
            self.close(conn, errno_name(exc))
            return
        asyncio.get_running_loop().add_reader(fd, self.on_readable, conn)

    def since(self, conn: LoadConn) -> int:
        """The seq a (re)subscription resumes after (0: none seen, or no --reconnect)."""
        return cast(RedialConn, conn).seq if self.redial is not None else 0

    def send(self, conn: LoadConn, data: bytes) -> None:
        """Send a few bytes (a pong) on an open connection, through its TLS if any."""
        if conn.tls is not None:
            data = conn.tls.wrap(data)
        # Nearly idle connections: the buffer has room. A reset shows on the next read.
        with contextlib.suppress(OSError):
            conn.sock.send(data)

    def unwrap(self, conn: LoadConn, pipe: TlsPipe, data: bytes) -> bytes:
        """Decrypt ``data``; once the handshake completes, send the greeting."""
        handshaking = not pipe.done
        try:
            data = pipe.receive(data)
        except ssl.SSLError as exc:
            self.close(conn, f"tls_failed: {exc.reason or exc}")
            return b""
        out = pipe.pending()
        if handshaking and pipe.done:
            greeting = self.greeting(self.waiting.get(conn, 0), self.since(conn))
            if greeting:
                out += pipe.wrap(greeting)
            elif not conn.ready:  # --raw: held once the handshake is done
                self.mark_ready(conn)
        if out:
            conn.sock.send(out)
        return data

    def on_readable(self, conn: LoadConn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(conn, errno_name(exc))
            return
        if not data:
            self.close(conn, None if self.stop.is_set() else "closed_by_server")
            return
        self.received_data(conn, data)

    def received_data(self, conn: LoadConn, data: bytes) -> None:
        pipe = conn.tls
        if pipe is not None:
            data = self.unwrap(conn, pipe, data)
        if isinstance(conn, WsLoadConn):
            if data:
                self.received_ws(conn, data)
        else:
            for line in conn.feed_lines(data, LINE_LIMIT):
                if line is not TOO_LONG:
                    self.on_line(conn, cast(bytes, line))
        if pipe is not None and pipe.closed:  # close_notify: as EOF without TLS
            self.close(conn, None if self.stop.is_set() else "closed_by_server")

    def received_ws(self, conn: WsLoadConn, data: bytes) -> None:
        buf = conn.buf + data
        if not conn.upgraded:
            try:
                conn.upgraded, buf = wsclient.split_response(buf)
            except wsclient.UpgradeFailed as exc:
                # A refusal before the upgrade is an HTTP answer whose body is the event.
                body = buf[buf.find(b"\r\n\r\n") + 4 :]
                if body.startswith(b"{") and self.opts.pusher is None:
                    self.on_line(conn, body)
                else:
                    self.errors[f"upgrade refused: {exc}"] += 1
                self.close(conn, None)
                return
            if not conn.upgraded:
                conn.buf = buf
                return
        payloads, pongs, closed, conn.buf = wsclient.split_frames(buf)
        if pongs:  # the peer's keepalive pings, answered at once
            self.send(conn, pongs)
        handle = self.on_line if self.opts.pusher is None else self.on_pusher
        for payload in payloads:
            handle(conn, payload)
        if closed:
            self.close(conn, None if self.stop.is_set() else "closed_by_server")

    def sweep(self) -> None:
        """Fail connects, and greetings, in flight for longer than the connect timeout.

        A server that stops accepting without closing leaves its connections in the
        listen backlog: the connect succeeds, the hello is never answered. Closing
        them (as no_answer) frees their ramp slots, so the ramp still ends.
        """
        limit = time.perf_counter() - self.opts.connect_timeout
        for conn in [c for c in self.connecting.values() if c.started < limit]:
            self.close(conn, "ETIMEDOUT")
        for conn in list(itertools.takewhile(lambda c: c.started < limit, self.waiting)):
            self.close(conn, "no_answer")

    async def sweep_loop(self) -> None:
        while not self.stop.is_set():
            self.sweep()
            await asyncio.sleep(SWEEP_EVERY)

    async def ramp(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.first_attempt = time.perf_counter()
        user = self.plan.first_user
        for lane in self.plan.lanes:
            left = lane.count
            while left and not self.stop.is_set():
                now = loop.time()
                due = int((now - start) * self.opts.rate) + 1 - self.attempted
                # Backpressure: connects in flight and connections still waiting for
                # their answer both count, so a server that falls behind slows the ramp
                # instead of drowning in connections it has not greeted yet.
                room = self.window.size - len(self.connecting) - len(self.waiting)
                for _ in range(max(0, min(due, room, left))):
                    self.open_one(lane.src, lane.dst, lane.port, user)
                    self.attempted += 1
                    user += 1
                    left -= 1
                await asyncio.sleep(TICK)
        # Done once every connection has its outcome (the sweep bounds the wait); with
        # --reconnect, once every one is ready (a stalled ramp is ended by the controller).
        redial = self.redial
        while (self.connecting or self.waiting or (redial and redial.pending)) and (
            not self.stop.is_set()
        ):
            await asyncio.sleep(0.05)
        self.ramp_done = True

    async def redial_loop(self, redial: Redial) -> None:
        """Dial again the connections whose backoff is over, within the in-flight room."""
        while not self.stop.is_set():
            room = self.window.size - len(self.connecting) - len(self.waiting)
            for conn in redial.due(time.monotonic(), room):
                lane = redial.lane(conn.user)
                self.open_one(lane.src, lane.dst, lane.port, conn.user, conn)
            await asyncio.sleep(TICK)

    # --- reporting ------------------------------------------------------------------

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        snap: dict[str, Any] = {
            "agent": self.plan.index,
            "planned": self.plan.count,
            "attempted": self.attempted,
            "open": self.open_now,
            "peak": self.peak,
            "ready": self.ready,
            "errors": dict(self.errors),
            "closed": dict(self.closed),
            "received": dict(self.received),
            "duplicates": self.duplicates,
            "ramp_done": self.ramp_done,
            "ramp_seconds": max(0.0, self.last_connect - self.first_attempt),
            "rss_bytes": procfs.rss() or 0,
            "rss_start": self.rss_start,
            "final": final,
        }
        if self.redial is not None:
            snap["reconnect"] = self.redial.snapshot(final)
        if final:
            snap["connect_hist"] = dict(self.connect_hist)
            snap["latency"] = {n: dict(h) for n, h in self.latency.items()}
        return snap

    async def report_loop(self) -> None:
        while not self.stop.is_set():
            self.pipe.send(self.snapshot())
            await asyncio.sleep(REPORT_EVERY)

    def task_ended(self, task: asyncio.Task[None]) -> None:
        """A bug in a task shows in the report; a dead ramp must not leave the
        controller waiting forever."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.errors[f"load_bug: {type(exc).__name__}: {exc}"] += 1
        if task is self.ramp_task:
            self.ramp_done = True

    def on_command(self) -> None:
        try:
            cmd = self.pipe.recv()
        except EOFError:
            cmd = "stop"
        if cmd == "stop":
            self.stop.set()
        elif cmd == "end_ramp" and self.ramp_task is not None:
            # The controller saw the ramp stall: hold what is open, start nothing more.
            # Connects and greetings still in flight keep their timeout (the sweep).
            self.ramp_task.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        reporter = loop.create_task(self.report_loop())
        ramp = self.ramp_task = loop.create_task(self.ramp())
        tasks = [ramp, reporter, loop.create_task(self.sweep_loop())]
        if self.redial is not None:
            tasks.append(loop.create_task(self.redial_loop(self.redial)))
        for task in tasks:
            task.add_done_callback(self.task_ended)
        await self.stop.wait()
        for task in tasks:
            task.cancel()
        loop.remove_reader(self.pipe.fileno())
        # Report first: closing tens of thousands of sockets on a busy machine takes a
        # while, and the controller should not have to wait for it to get the figures.
        self.pipe.send(self.snapshot(final=True))
        for conn in [*self.conns, *self.connecting.values()]:
            self.close(conn, None)


def agent_main(plan: AgentPlan, opts: AgentOptions, pipe: Pipe) -> None:
    """Entry point of one load process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us
    if opts.nice:
        os.nice(opts.nice)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(opts.fd_limit, hard), hard))
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)  # why: node/tuning.py
    uvloop.run(Agent(plan, opts, pipe).run())
    os._exit(0)

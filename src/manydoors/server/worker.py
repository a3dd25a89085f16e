"""A worker process: one uvloop event loop serving one service's listening socket.

The worker is its loop, its link to the broker and the fan-out; its parts do the rest:
``Admission`` (who gets in, how they leave), ``Clock`` (ticks, deadlines, rate
buckets, heartbeat), ``Sessions`` (every client op), over one ``Hub`` (its connections
by user and channel). It receives each message from the broker once, as an NDJSON
line with the key to route it by, frames it once for its service's wire and writes
that same bytes object to every recipient.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, cast

import msgspec
import uvloop

from ..config import AppConfig, AuthConfig, HooksConfig, NamespaceConfig, ServiceConfig
from ..namespaces import Namespaces
from ..node.link import Link
from ..node.procfs import open_fds
from ..node.tuning import GC_THRESHOLDS
from ..protocol.ipc import Kind
from ..protocol.wire import NDJSON, WEBSOCKET
from ..pusher import frames as pusher_frames
from ..pusher.connection import connection_class as pusher_connection
from ..pusher.sessions import PusherSessions
from . import tls, welcome
from .admission import Admission
from .clock import Clock
from .commands import Commands
from .connection import bind
from .hub import Hub, channels_of
from .limits import tables
from .peer import Peer
from .sessions import Sessions
from .stats import Counters, StatsTable

HEADROOM: Final = 8  # fds kept free for refusals and the odd file
DRAIN_BATCH: Final = 2000  # connections closed per loop iteration while draining
TRIM_AFTER: Final = 1000  # connections released before the sweep hands memory back
_encode_json: Final = msgspec.json.Encoder().encode
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
    events: frozenset[str] = frozenset()  # webhook events the workers report (connect, ...)
    namespaces: Namespaces = field(default_factory=lambda: Namespaces(NamespaceConfig()))
    hooks: HooksConfig = field(default_factory=HooksConfig)  # the proxies' (no webhook secret)
    apps: tuple[AppConfig, ...] = ()  # Pusher apps (a service with protocol "pusher")
    nice: int = 0  # added to the worker's nice value (config.worker_nice)


class Worker:
    """One worker process: its parts, its link to the broker, its fan-out."""

    def __init__(self, spec: WorkerSpec, stats: StatsTable) -> None:
        svc = spec.service
        self.pusher = svc.protocol == "pusher"  # Pusher apps authenticate their own way
        auth = AuthConfig() if self.pusher else spec.auth
        token_auth = auth.mode != "none"  # token or proxy: a hello says who
        self.spec = spec
        self.hub: Hub[Peer] = Hub()
        self.counters = counters = Counters(stats, spec.slot)
        if self.pusher:
            wire = pusher_frames.wire(svc.ping_interval)
        else:
            wire = WEBSOCKET if svc.protocol == "websocket" else NDJSON
        self.wire = wire
        self.pid = os.getpid()
        cap = spec.fd_limit - spec.fd_reserve  # lowered in run() to what is really free
        self.admission = Admission(
            svc, counters, self.hub, wire, cap, (self.pid, spec.slot), token_auth
        )
        self.clock = Clock(svc, self.admission, self.hub, counters, wire, token_auth)
        self.sessions = (PusherSessions if self.pusher else Sessions)(
            svc,
            auth,
            self.hub,
            self.admission,
            self.clock,
            counters,
            wire,
            spec.namespaces,
            spec.events,
            spec.hooks,
            spec.slot,
        )
        if self.pusher:
            cast(PusherSessions, self.sessions).apps = {
                app.id: i for i, app in enumerate(spec.apps)
            }
        if "disconnect" in spec.events:
            self.admission.closing = {}
        tls_on = svc.tls_cert is not None
        base = pusher_connection(tls_on) if self.pusher else tls.connection_class(svc)
        self.admission.conn_class = bind(
            base,
            self.admission,
            self.clock,
            self.sessions,
            svc.max_message_bytes,
            apps={app.key: app for app in spec.apps},
        )
        self.welcomes: welcome.Welcomes | None = None
        if not self.pusher:  # a Pusher client says nothing before its welcome
            self.welcomes = welcome.Welcomes(self.sessions)
            self.admission.hold = self.welcomes.hold
        self.commands = Commands(self.hub, self.admission, self.sessions, wire, self.fanout)
        self.link: Link | None = None
        self.stop_event = asyncio.Event()

    # --- broker frames ---------------------------------------------------------------

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> int | None:
        """A frame from the broker; returns the deliveries it made (the link bounds the
        deliveries of one loop callback: see Link.BUDGET), None for one."""
        hub = self.hub
        # Deliveries arrive as NDJSON lines; framed once here for this service's wire.
        if kind == Kind.DELIVER_CHANNEL:
            members: Iterable[Peer] = hub.channels.get(key, ())
            if self.pusher and payload.startswith(b'{"ev":"join"'):
                # Pusher tells a member's arrival to the others only.
                members = cast(PusherSessions, self.sessions).pusher.others(key, payload, members)
            return self.fanout(members, self.wire.frame(payload))
        if kind == Kind.DELIVER_USER:
            return self.fanout(hub.of_user(key), self.wire.frame(payload))
        if kind == Kind.DELIVER_ALL:
            return self.fanout(hub.conns, self.wire.frame(payload))
        if kind == Kind.SYNCED:
            return self.sessions.synced()
        if kind == Kind.RECOVERED:
            self.sessions.recovered(key, payload)
        elif kind == Kind.PRESENCE_ASK:
            link.send(Kind.PRESENCE_PART, key, payload + self.sessions.presence_part(key))
        elif kind == Kind.PRESENCE_DONE:
            self.sessions.presence_done(key, payload)
        elif kind == Kind.JOINED and self.pusher:
            cast(PusherSessions, self.sessions).seated(key, payload)
        elif kind == Kind.SAMPLE:
            link.send(Kind.SAMPLED, "", _encode_json(self.sample(int(key or 0))))
        elif kind >= Kind.DISCONNECT:  # the API's: disconnect, unsubscribe, exclusions
            return self.commands.on_frame(link, kind, key, payload)
        return None

    def fanout(self, members: Iterable[Peer], data: bytes) -> int:
        """Write ``data`` to each of ``members``; return how many were written to or
        skipped (over their outbound cap)."""
        # The hot loop of a broadcast: one write of the same bytes per recipient.
        sent = dropped = 0
        slow = self.admission.slow
        for conn in members:
            transport = conn.transport
            if transport is None:
                continue
            if slow and conn in slow:
                dropped += 1
            else:
                transport.write(data)
                sent += 1
        c = self.counters
        c.mv[c.i_out] += sent
        if dropped:
            c.mv[c.i_dropped] += dropped
        return sent + dropped

    def sample(self, limit: int) -> list[dict[str, object]]:
        """A few live connections as 5-tuples with their user and channels."""
        out: list[dict[str, object]] = []
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
                    "protocol": self.wire.name,
                    "worker": self.spec.slot,
                    "user": conn.user,
                    "channels": list(channels_of(conn)),
                }
            )
        return out

    # --- run and drain ---------------------------------------------------------------

    async def run(self, listen_sock: socket.socket, link_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.link = link = Link(self.on_frame, "broker")
        if self.welcomes is not None:
            self.welcomes.soon = loop.call_soon
        self.sessions.link = self.sessions.members.link = link
        await loop.create_unix_connection(lambda: link, sock=link_sock)
        # Whatever happens, keep HEADROOM fds free so that a refusal can still be
        # accepted and answered; libuv's reserve-fd trick (accept and close) is only
        # the last line of defence, for fds that something else used up.
        held = open_fds() or 0
        self.admission.cap = min(self.admission.cap, self.spec.fd_limit - held - HEADROOM)
        tls_options = tls.listen_options(self.spec.service)  # {} without TLS
        server = await loop.create_server(
            self.admission.accept,
            sock=listen_sock,
            backlog=self.spec.service.backlog,
            **tls_options,
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
        if self.sessions.proxies is not None:
            await self.sessions.proxies.close()

    async def sweeper(self) -> None:
        clock, admission, counters = self.clock, self.admission, self.counters
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + clock.tick_s
            await asyncio.sleep(clock.tick_s)
            counters.worst(counters.i_lag, loop.time() - due)
            if admission.released >= TRIM_AFTER and _malloc_trim is not None:
                admission.released = 0
                _malloc_trim(0)
            clock.sweep()

    async def drain(self) -> None:
        """Stop accepting, say bye to every client, close in batches, within the timeout."""
        self.admission.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.drain_timeout * 0.8
        bye = self.wire.goodbye("shutdown")
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


def worker_main(
    spec: WorkerSpec,
    listen_sock: socket.socket,
    link_sock: socket.socket,
    stats_buffer: memoryview,
    counts_buffer: memoryview | None = None,
) -> None:
    """Entry point of a worker process (started by the supervisor's fork server)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    if spec.nice:
        os.nice(spec.nice)  # below the supervisor: why in config.py (worker_nice)
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
        admission = worker.admission
        admission.ip_counts = ip_counts if admission.per_ip else None
        admission.user_counts = user_counts if admission.per_user else None
        if worker.pusher:
            cast(PusherSessions, worker.sessions).quotas = user_counts
    uvloop.run(worker.run(listen_sock, link_sock))

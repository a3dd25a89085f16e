"""The supervisor: sizes pools, binds, spawns, restarts, drains.

One process per node runs the supervisor, the local broker and the HTTP API on one
uvloop loop. Workers are forked by a multiprocessing fork server that has imported
the worker module once, so every worker starts small and shares those pages.

Each worker slot gets its own SO_REUSEPORT listening socket, bound here and kept
open here for the life of the node. The kernel spreads new connections evenly over
the slots by 4-tuple hash (a shared socket would let whichever worker wakes first
drain the whole backlog), and a slot's socket outlives its worker: connections that
arrive while a worker is being restarted wait in that socket's backlog and are
accepted by the new worker instead of being reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import math
import multiprocessing as mp
import os
import resource
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Final

from ..broker.base import Broker
from ..broker.local import LocalBroker
from ..config import Config, ServiceConfig
from ..protocol.ipc import Kind
from ..protocol.messages import ERROR_CODES
from .limits import shared_bytes, tables
from ..node.link import Link
from .stats import CLOSED, LOST, REFUSED, StatsTable
from .tls import TlsError, server_context
from .tokens import KeyFileError, Verifier
from .worker import WorkerSpec, worker_main

# SO_REUSEPORT hashes connections to workers unevenly, so a pool sized exactly fills
# some workers before the service is full: 1.3M connections over 66 workers with 1.2 %
# spare refused 71 (worker_full). 5 % spare is > 20 standard deviations of the hash
# spread at ~20,000 connections a worker.
SLACK: Final = 1.05
RESTART_BACKOFF: Final = 1.0  # seconds before restarting a worker that died young
YOUNG: Final = 2.0  # a worker that dies within this many seconds of starting is "young"


class StartupError(Exception):
    """The node cannot start (port in use, bad address); the message says why."""


def make_broker(config: Config) -> Broker:
    if config.broker == "redis":
        from ..broker.redis import RedisBroker  # redis-py stays out of local nodes

        return RedisBroker(config.redis_url, config.history_size, config.history_ttl)
    return LocalBroker(config.history_size, config.history_ttl)


def fd_limits(config: Config) -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE to the hard limit; return (per-worker limit, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if config.fd_limit is None else min(config.fd_limit, hard)
    return limit, hard


def pool_size(service: ServiceConfig, fd_limit: int, fd_reserve: int) -> int:
    """Workers so that workers x (fd limit - reserve) >= max_connections x SLACK.

    Never fewer than asked; "auto" also asks for one per core, since a worker is one
    event loop on one core.
    """
    per_worker = fd_limit - fd_reserve
    needed = math.ceil(service.max_connections * SLACK / per_worker)
    asked = service.workers if service.workers is not None else (os.cpu_count() or 1)
    return max(needed, asked, 1)


def _bind(host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_slots(service: ServiceConfig, count: int) -> list[socket.socket]:
    """One listening socket per worker slot, all on the service's address."""
    # A probe without SO_REUSEPORT fails if anyone (even another manydoors of the same
    # user, which SO_REUSEPORT would silently let us share the port with) holds it.
    try:
        probe = _bind(service.host, service.port, 1, reuseport=False)
    except OSError as exc:
        why = "is in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(
            f"service {service.name}: cannot listen on {service.host}:{service.port}: {why}"
        ) from None
    port = probe.getsockname()[1]
    probe.close()
    sockets = [_bind(service.host, port, service.backlog, reuseport=True) for _ in range(count)]
    for sock in sockets:
        tune(sock, service.send_buffer)
    return sockets


def tune(sock: socket.socket, send_buffer: int) -> None:
    """Socket options for every connection: accepted sockets inherit the listener's.

    Keepalive: the heartbeat finds a dead peer first; keepalive also covers a
    heartbeat turned off (ping_interval = 0). It probes after 5 minutes of silence,
    not 1: a probe per idle connection per minute was 16,700 probes/s at 1M, and
    while a ramp overloaded the loopback (which then drops packets) six lost probes
    in a row closed 46,072 healthy connections of 1M. No TCP_USER_TIMEOUT either:
    with keepalive on it makes the first unanswered probe fatal.
    """
    if send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    for level, name, value in (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 300),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 30),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
    ):
        sock.setsockopt(level, name, value)


@dataclass
class Slot:
    """One worker position: its socket and stats row outlive the processes that fill it."""

    index: int
    sock: socket.socket
    process: BaseProcess | None = None
    link: Link | None = None
    started: float = 0.0
    ready: bool = False
    restarts: int = 0
    base_fds: int = 0  # fds the worker had open before its first client


@dataclass
class Pool:
    """A service's worker processes ("the cooks of one house")."""

    service: ServiceConfig
    port: int
    slots: list[Slot]
    table: StatsTable
    buffer: Any  # the shared ctypes array behind ``table``
    counts: Any = None  # shared per-IP and per-user connection counts (limits.py)
    retired: Counter[str] = field(default_factory=Counter)  # counters of dead workers


class Supervisor:
    def __init__(self, config: Config, out: Any = None) -> None:
        self.config = config
        self.out = out or sys.stderr
        self.broker: Broker = make_broker(config)
        self.pools: list[Pool] = []
        self.fd_limit, self.fd_hard = fd_limits(config)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["manydoors.server.worker"])
        self.stop_requested: asyncio.Event | None = None
        self.stopping = False
        self.api_port = config.api.port
        self.started = time.time()
        self.samples: dict[Link, asyncio.Future[bytes]] = {}  # SAMPLE asked, not answered

    def say(self, line: str) -> None:
        print(f"manydoors: {line}", file=self.out, flush=True)

    # --- start ------------------------------------------------------------------------

    def plan(self) -> list[tuple[ServiceConfig, int]]:
        cfg = self.config
        return [(s, pool_size(s, self.fd_limit, cfg.fd_reserve)) for s in cfg.services]

    def check_tls(self) -> None:
        """Load each service's certificate and key now: a bad file stops the start."""
        for service in self.config.services:
            if service.tls_cert is not None and service.tls_key is not None:
                try:
                    server_context(service.tls_cert, service.tls_key)
                except TlsError as exc:
                    raise StartupError(f"service {service.name}: {exc}") from None

    def bind(self) -> None:
        from ..doctor.capacity import startup_warning

        target = sum(s.max_connections for s in self.config.services)
        warning = startup_warning("server", target, fd_limit=self.fd_limit)
        if warning:
            self.say(f"warning: {warning}")
        cap = self.fd_limit - self.config.fd_reserve
        for service, count in self.plan():
            sockets = bind_slots(service, count)
            port = sockets[0].getsockname()[1]
            buffer = self.ctx.RawArray(ctypes.c_ubyte, StatsTable.size(count) * 8)
            table = StatsTable(memoryview(buffer), count)
            slots = [Slot(i, s) for i, s in enumerate(sockets)]
            counts = None
            per_user = service.max_connections_per_user and self.config.auth.mode == "token"
            if service.max_connections_per_ip or per_user:
                counts = self.ctx.RawArray(ctypes.c_ubyte, shared_bytes(count))
            self.pools.append(Pool(service, port, slots, table, buffer, counts=counts))
            self.say(
                f"{service.name} {service.host}:{port} backlog {service.backlog}: "
                f"{count} workers x {cap:,} fds = {count * cap:,} connections"
                f" (max_connections {service.max_connections:,})"
            )

    async def spawn(self, pool: Pool, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        spec = WorkerSpec(
            pool.service,
            slot.index,
            len(pool.slots),
            self.fd_limit,
            self.config.fd_reserve,
            self.config.drain_timeout,
            self.config.auth,
        )
        proc = self.ctx.Process(
            target=worker_main,
            args=(spec, slot.sock, theirs, pool.buffer, pool.counts),
            name=f"manydoors-{pool.service.name}-{slot.index}",
        )
        proc.start()
        theirs.close()
        slot.process, slot.started, slot.ready = proc, time.monotonic(), False
        _, link = await loop.create_unix_connection(
            lambda: Link(self.on_frame, f"{pool.service.name}/{slot.index}"), sock=mine
        )
        slot.link = link
        self.broker.attach(link)
        loop.add_reader(proc.sentinel, self.on_exit, pool, slot, proc)

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        if kind == Kind.SAMPLED:
            waiter = self.samples.pop(link, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(payload)
            return
        if kind == Kind.READY:
            for pool in self.pools:
                for slot in pool.slots:
                    if slot.link is link:
                        slot.ready = True
                        slot.base_fds = _count_fds(int(key)) or 0
            return
        self.broker.on_frame(link, kind, key, payload)

    def on_exit(self, pool: Pool, slot: Slot, proc: BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.sentinel)
        proc.join()
        if slot.process is not proc:
            return
        if slot.link is not None:
            self.broker.detach(slot.link)
            slot.link.close()
            slot.link = None
        pool.retired.update(pool.table.clear_row(slot.index))
        if pool.counts is not None:  # its connections are gone, and so are their counts
            for table in tables(memoryview(pool.counts), len(pool.slots)):
                table.clear_row(slot.index)
        pool.retired["connections"] = 0  # a gauge, not a counter
        slot.process = None
        if self.stopping:
            return
        slot.restarts += 1
        young = time.monotonic() - slot.started < YOUNG
        self.say(
            f"worker {pool.service.name}/{slot.index} (pid {proc.pid}) exited with code "
            f"{proc.exitcode}; restarting{' in 1 s' if young else ''}"
        )
        loop.call_later(
            RESTART_BACKOFF if young else 0,
            lambda: asyncio.ensure_future(self.spawn(pool, slot)),
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(s.ready for p in self.pools for s in p.slots):
            if time.monotonic() > deadline:
                raise StartupError("workers did not become ready in time")
            await asyncio.sleep(0.02)

    # --- run --------------------------------------------------------------------------

    async def run(self, ready_file: str | None = None) -> int:
        from .api import start_api  # aiohttp stays out of the fork server's preload

        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The handler only records the request; the loop below acts on it.
            loop.add_signal_handler(sig, self.stop_requested.set)
        if self.config.auth.mode == "token":
            try:  # a bad key file stops the start here, not in every worker
                Verifier(self.config.auth)
            except KeyFileError as exc:
                raise StartupError(str(exc)) from None
        self.check_tls()
        self.bind()
        try:
            await self.broker.start()
        except ConnectionError as exc:
            await self.broker.close()
            raise StartupError(str(exc)) from None
        runner = await start_api(self)
        try:
            for pool in self.pools:
                for slot in pool.slots:
                    await self.spawn(pool, slot)
            await self.wait_ready()
            self.announce(ready_file)
            await self.stop_requested.wait()
            self.say("stopping: draining connections")
        finally:
            await self.shutdown()
            await runner.cleanup()
            await self.broker.close()
        self.say("stopped")
        return 0

    def announce(self, ready_file: str | None) -> None:
        api = f"http://{self.config.api.host}:{self.api_port}"
        services = {
            p.service.name: {
                "host": p.service.host,
                "port": p.port,
                "workers": [s.process.pid for s in p.slots if s.process is not None],
            }
            for p in self.pools
        }
        first = self.pools[0]
        try_it = "openssl s_client -quiet -connect {}:{}" if first.service.tls_cert else "nc {} {}"
        self.say(f"ready: API {api}; try: {try_it.format(first.service.host, first.port)}")
        if ready_file:
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "api": api, "services": services}, f)
            os.replace(tmp, ready_file)

    async def shutdown(self) -> None:
        """SIGTERM every worker (they drain themselves); SIGKILL whoever outlives the timeout."""
        self.stopping = True
        procs = [s.process for p in self.pools for s in p.slots if s.process is not None]
        for proc in procs:
            if proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for proc in procs:
            if proc.is_alive():
                self.say(f"worker pid {proc.pid} did not drain in time: killing it")
                proc.kill()
            proc.join(1)
        for pool in self.pools:
            for slot in pool.slots:
                slot.sock.close()
                if slot.link is not None:
                    slot.link.close()

    # --- stats ------------------------------------------------------------------------

    def queued_to_workers(self) -> int:
        """Bytes of broker frames written to worker links and not yet taken by them."""
        total = 0
        for pool in self.pools:
            for slot in pool.slots:
                link = slot.link
                if link is not None and link.transport is not None:
                    total += link.transport.get_write_buffer_size()
        return total

    async def connections(self, service: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` live connections, asked of the workers (spread over them)."""
        loop = asyncio.get_running_loop()
        links = [
            s.link
            for p in self.pools
            for s in p.slots
            if s.link is not None and (service is None or p.service.name == service)
        ]
        if not links or limit < 1:
            return []
        each = max(1, math.ceil(limit / len(links)))
        waits = []
        for link in links:
            if link in self.samples:
                continue  # an earlier question is still out; skip this worker
            waiter: asyncio.Future[bytes] = loop.create_future()
            self.samples[link] = waiter
            link.send(Kind.SAMPLE, str(each))
            waits.append(waiter)
        done, _ = await asyncio.wait(waits, timeout=2.0) if waits else (set(), set())
        for link in [k for k, w in self.samples.items() if w in waits and not w.done()]:
            del self.samples[link]  # a busy worker: answer without it
        out: list[dict[str, Any]] = []
        for waiter in done:
            out.extend(json.loads(waiter.result()))
        return out[:limit]

    def stats(self) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        services = []
        for pool in self.pools:
            svc = pool.service
            workers = []
            svc_totals: Counter[str] = Counter(pool.retired)
            for slot in pool.slots:
                row = pool.table.row(slot.index)
                svc_totals.update(row)
                pid = slot.process.pid if slot.process is not None else None
                workers.append(
                    {
                        "slot": slot.index,
                        "pid": pid,
                        "connections": row["connections"],
                        # Listing /proc/PID/fd costs milliseconds at 20,000 fds;
                        # the worker's own fds plus one per connection is exact enough.
                        "fds": slot.base_fds + row["connections"] if pid else None,
                        "fd_limit": self.fd_limit,
                        "rss_bytes": _rss(pid),
                        "restarts": slot.restarts,
                    }
                )
            totals.update(svc_totals)
            services.append(
                {
                    "name": svc.name,
                    "host": svc.host,
                    "port": pool.port,
                    "protocol": svc.protocol,
                    "tls": svc.tls_cert is not None,
                    "max_connections": svc.max_connections,
                    "connections": svc_totals["connections"],
                    "workers": workers,
                }
            )
        return {
            "connections": totals["connections"],
            "accepted": totals["accepted"],
            "refused": {r: totals[f"refused_{r}"] for r in REFUSED},
            "messages_in": totals["messages_in"],
            "messages_out": totals["messages_out"],
            "dropped": totals["dropped"],
            "throttled": totals["throttled"],
            "pings": totals["pings"],
            "closed": {r: totals[f"closed_{r}"] for r in CLOSED},
            "lost": {r: totals[f"lost_{r}"] for r in LOST},
            "errors": {c: totals[f"error_{c}"] for c in ERROR_CODES},
            "broker": self.broker.stats(),
            "uptime_s": round(time.time() - self.started, 3),
            "services": services,
        }


def _count_fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None

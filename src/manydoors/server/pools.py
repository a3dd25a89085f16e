"""Worker pools: how many workers each service gets, and the sockets they accept on.

A pool is a service's worker *slots*. Each slot gets its own SO_REUSEPORT listening
socket, bound here once and kept open by the supervisor for the life of the node. The
kernel spreads new connections evenly over the slots by 4-tuple hash (a shared socket
would let whichever worker wakes first drain the whole backlog), and a slot's socket
outlives its worker: connections that arrive while a worker is being restarted wait in
that socket's backlog and are accepted by the new worker instead of being reset.

Nothing here starts a process: the supervisor fills the slots.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import socket
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Final

from ..config import Config, ServiceConfig
from ..node.link import Link
from .errors import StartupError
from .limits import shared_bytes
from .stats import StatsTable
from .tls import TlsError, server_context

# SO_REUSEPORT hashes connections to workers unevenly, so a pool sized exactly fills
# some workers before the service is full: 1.3M connections over 66 workers with 1.2 %
# spare refused 71 (worker_full). 5 % spare is > 20 standard deviations of the hash
# spread at ~20,000 connections a worker.
SLACK: Final = 1.05


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


def plan(config: Config, fd_limit: int) -> list[tuple[ServiceConfig, int]]:
    """Each service with the number of workers it gets at ``fd_limit`` per worker.

    Raises StartupError when the fd limit leaves no fd beside the reserve (config checks
    a configured fd_limit; an unset one is the hard RLIMIT_NOFILE, known only here).
    """
    if fd_limit <= config.fd_reserve + 1:
        raise StartupError(
            f"the fd limit ({fd_limit}) leaves no room beside fd_reserve ({config.fd_reserve}):"
            " raise RLIMIT_NOFILE (manydoors doctor says how) or lower fd_reserve"
        )
    return [(s, pool_size(s, fd_limit, config.fd_reserve)) for s in config.services]


def check_tls(config: Config) -> None:
    """Load each service's certificate and key now: a bad file stops the start."""
    for service in config.services:
        if service.tls_cert is not None and service.tls_key is not None:
            try:
                server_context(service.tls_cert, service.tls_key)
            except TlsError as exc:
                raise StartupError(f"service {service.name}: {exc}") from None


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


@dataclass(slots=True)
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


@dataclass(frozen=True, slots=True)
class Pool:
    """A service's worker processes ("the cooks of one house")."""

    service: ServiceConfig
    port: int
    slots: list[Slot]
    table: StatsTable
    buffer: Any  # the shared ctypes array behind ``table``
    counts: Any = None  # shared per-IP and per-user connection counts (limits.py)
    retired: Counter[str] = field(default_factory=Counter)  # counters of dead workers


def bind_pool(service: ServiceConfig, count: int, config: Config, ctx: BaseContext) -> Pool:
    """Bind ``count`` slots of ``service`` and allocate the memory its workers share.

    The stats table and the per-IP/per-user counts are raw shared arrays from ``ctx``,
    created before any worker so that every worker, and its replacements, map the same
    pages.
    """
    sockets = bind_slots(service, count)
    port = sockets[0].getsockname()[1]
    buffer = ctx.RawArray(ctypes.c_ubyte, StatsTable.size(count) * 8)
    table = StatsTable(memoryview(buffer), count)
    slots = [Slot(i, s) for i, s in enumerate(sockets)]
    counts = None
    per_user = service.max_connections_per_user and config.auth.mode == "token"
    # A Pusher service has no per-user limit: its user table counts each app's
    # connections instead (bucket = the app's index), for the apps' max_connections.
    quotas = service.protocol == "pusher" and any(app.max_connections for app in config.apps)
    if service.max_connections_per_ip or per_user or quotas:
        counts = ctx.RawArray(ctypes.c_ubyte, shared_bytes(count))
    return Pool(service, port, slots, table, buffer, counts=counts)

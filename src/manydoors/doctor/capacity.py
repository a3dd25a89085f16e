"""How many connections this machine can hold now, and which limit binds first.

Pure arithmetic over a :class:`~manydoors.doctor.limits.Limits` snapshot and the cost
of one connection. Each limit becomes a :class:`Bound`: the number of connections it
allows and one line of arithmetic saying why. The smallest bound binds first.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import resource
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Final

from ..config import Config, ServiceConfig
from ..node.tuning import LANE_FILL
from .limits import GetRlimit, Limits, read_limits

# Cost of one connection, in bytes, measured on the reference machine (2 cores,
# 23.5 GiB, Linux 6.18; docs/benchmarks.md). `manydoors doctor measure` replaces them
# with figures measured on this machine.
#
# Kernel slab per idle loopback TCP socket (DESIGN.md, /proc/meminfo Slab delta).
KERNEL_BYTES_PER_SOCKET: Final = 4_800
# Kernel slab per connection when both ends live on this box (server socket + load
# socket, after hello and subscribe): c200k run, 2,031,804,416 B / 200,000 (bench/
# results/c200k.json "kernel.bytes_per_connection_pair").
KERNEL_BYTES_PER_PAIR: Final = 10_159
# Server worker RSS growth per held connection: c200k run, 11 workers (c200k.json
# "server.user_bytes_per_connection"; 1,521 B in the 40,000-connection memory bench).
SERVER_USER_BYTES: Final = 1_593
# Load generator RSS growth per open connection: c200k run, 11 load processes.
LOAD_USER_BYTES: Final = 1_047
# A bare uvloop transport + one-slot Protocol (benchmarks.md "Memory per connection");
# manydoors adds SERVER_USER_BYTES - UVLOOP_FLOOR_BYTES on top of it.
UVLOOP_FLOOR_BYTES: Final = 1_296
# Proportional set size of one idle worker or load process (benchmarks.md: 11.5 MB PSS,
# 22.2 MB RSS; pages of the interpreter are shared between forked processes).
PROCESS_BASELINE_BYTES: Final = 11_500_000
# More processes than this per core and the per-process baseline and scheduling cost
# more than a higher fd limit would: raise RLIMIT_NOFILE instead of adding workers.
MAX_PROCESSES_PER_CORE: Final = 32
# 127.0.0.0/8 is all local; the load generator takes source addresses from 127.0.1.1.
LOOPBACK_SOURCES: Final = (1 << 24) - 257
FD_RESERVE: Final = Config().fd_reserve
BACKLOG: Final = ServiceConfig().backlog
ROLES: Final = ("server", "client", "both")


@dataclass(frozen=True, slots=True)
class Costs:
    """Bytes one connection costs; the defaults are the measured figures above."""

    kernel_per_socket: int = KERNEL_BYTES_PER_SOCKET
    kernel_per_pair: int = KERNEL_BYTES_PER_PAIR
    server_user: int = SERVER_USER_BYTES
    load_user: int = LOAD_USER_BYTES
    source: str = field(default="defaults (docs/benchmarks.md)", compare=False)


def default_store() -> Path:
    """Where `doctor measure` keeps its figures: $XDG_CACHE_HOME/manydoors/measured.json."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "manydoors" / "measured.json"


def load_costs(store: Path | None = None) -> Costs:
    """Measured costs from ``store`` (default :func:`default_store`), else the defaults."""
    path = store or default_store()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return Costs()
    if not isinstance(data, dict):
        return Costs()
    known = {
        f.name: data[f.name]
        for f in fields(Costs)
        if f.name != "source" and isinstance(data.get(f.name), int) and data[f.name] > 0
    }
    if not known:
        return Costs()
    return replace(Costs(), **known, source=f"measured {data.get('measured_at', '')} ({path})")


def save_costs(costs: Costs, store: Path, **extra: object) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in asdict(costs).items() if k != "source"}
    store.write_text(json.dumps({**data, **extra}, indent=1) + "\n")


@dataclass(frozen=True, slots=True)
class Scenario:
    """What the machine is asked to do."""

    target: int = 1_000_000
    role: str = "server"  # server | client | both (load and server on this box)
    backlog: int = BACKLOG
    fd_reserve: int = FD_RESERVE
    fd_limit: int | None = None  # a per-process limit below the hard one (--fd-limit)
    servers: tuple[tuple[str, int], ...] = (("127.0.0.1", 7000),)
    source_ips: int | None = None  # None: loopback sources as needed, as `load` does
    ping_interval: float = ServiceConfig().ping_interval  # the services' heartbeat (0: off)
    cores: int = os.cpu_count() or 1

    @property
    def sides(self) -> tuple[str, ...]:
        return ("server", "client") if self.role == "both" else (self.role,)

    @property
    def loopback(self) -> bool:
        return all(ipaddress.ip_address(host).is_loopback for host, _ in self.servers)


@dataclass(frozen=True, slots=True)
class Bound:
    """One limit: how many connections it allows on one side, and why."""

    name: str
    side: str
    connections: int
    why: str


@dataclass(frozen=True, slots=True)
class Capacity:
    scenario: Scenario
    server: int
    client: int
    processes: dict[str, int]
    bounds: tuple[Bound, ...]  # of the role's sides
    binding: Bound


def fd_hard(limits: Limits, side: str) -> int:
    """The per-process fd limit a side's processes get (they raise soft to hard)."""
    proc = limits.server if side == "server" and limits.server else limits.this
    hard = proc.hard
    if hard < 0 or hard == resource.RLIM_INFINITY:
        hard = limits.nr_open or 1 << 20  # the kernel caps RLIMIT_NOFILE at fs.nr_open
    return hard


def max_processes(cores: int | None) -> int:
    return MAX_PROCESSES_PER_CORE * (cores or 1)


def processes_needed(target: int, fd_limit: int, reserve: int) -> int | None:
    """Processes for ``target`` connections at ``fd_limit`` each, None if none fit."""
    per = fd_limit - reserve
    return math.ceil(target / per) if per > 0 else None


def port_lanes(
    port_range: tuple[int, int], source_ips: int, server_ports: int, explicit: bool = False
) -> tuple[int, int, str]:
    """(lane capacity, connections, arithmetic) for the 5-tuple: one lane is one
    (source IP, server port) pair, holding at most the ephemeral ports, filled to 90 %
    (all of them for ``explicit`` source ports, as `load --source-ports` does)."""
    lo, hi = port_range
    fill = 1.0 if explicit else LANE_FILL
    lane = int((hi - lo + 1) * fill)
    total = lane * source_ips * server_ports
    name = "--source-ports" if explicit else "ip_local_port_range"
    why = (
        f"{source_ips:,} source IPs x {server_ports:,} server ports x {lane:,} ports per lane "
        f"({name} {lo}-{hi} = {hi - lo + 1:,} ports, filled to {fill:.0%})"
    )
    return lane, total, why


def _fd_bound(limits: Limits, scen: Scenario, side: str) -> tuple[Bound, int]:
    fd = fd_hard(limits, side)
    if scen.fd_limit is not None:
        fd = min(fd, scen.fd_limit)
    cap = max_processes(limits.cores)
    needed = processes_needed(scen.target, fd, scen.fd_reserve)
    if needed is None:
        why = f"fd limit {fd:,} leaves nothing beside the {scen.fd_reserve} reserved fds"
        return Bound("RLIMIT_NOFILE", side, 0, why), 1
    # Processes scale with the target, up to the sensible maximum: that maximum times
    # the connections one process holds is what the fd limit allows.
    why = (
        f"at most {cap:,} processes ({MAX_PROCESSES_PER_CORE} per core x {limits.cores or 1}) "
        f"x ({fd:,} fds - {scen.fd_reserve} reserved); the target needs {needed:,}"
    )
    return Bound("RLIMIT_NOFILE", side, cap * (fd - scen.fd_reserve), why), min(needed, cap)


def _memory_bound(
    limits: Limits, scen: Scenario, side: str, costs: Costs, procs: int
) -> Bound | None:
    if limits.mem_available is None:
        return None
    if scen.role == "both":
        per = costs.kernel_per_pair + costs.server_user + costs.load_user
        parts = f"kernel pair {costs.kernel_per_pair:,} + server {costs.server_user:,} + "
        parts += f"load {costs.load_user:,}"
    else:
        user = costs.server_user if side == "server" else costs.load_user
        per = costs.kernel_per_socket + user
        parts = f"kernel {costs.kernel_per_socket:,} + user {user:,}"
    base = procs * PROCESS_BASELINE_BYTES
    free = max(0, limits.mem_available - base)
    why = (
        f"(available {gib(limits.mem_available)} - {procs:,} processes x "
        f"{PROCESS_BASELINE_BYTES / 1e6:.1f} MB) / {per:,} B per connection ({parts})"
    )
    return Bound("memory", side, free // per, why)


def conntrack_state(limits: Limits) -> str:
    """absent | idle (loaded, tracks nothing) | unknown | tracking."""
    if limits.conntrack_max is None:
        return "absent"
    if limits.conntrack_count:
        return "tracking"
    # The module only tracks when a netfilter rule needs it: thousands of open TCP
    # sockets and an empty table prove it is idle.
    return "idle" if (limits.tcp_in_use or 0) >= 1000 else "unknown"


def side_bounds(limits: Limits, scen: Scenario, side: str, costs: Costs) -> tuple[list[Bound], int]:
    """Every limit of one side (server or client), and the processes it needs."""
    fd, procs = _fd_bound(limits, scen, side)
    bounds = [fd]
    # On one box both sides share the machine: two fds, two sockets per connection.
    all_procs = procs * (2 if scen.role == "both" else 1)
    if limits.file_max is not None:
        free = max(0, limits.file_max - (limits.file_in_use or 0))
        per = 2 if scen.role == "both" else 1
        why = f"fs.file-max {limits.file_max:,} - {limits.file_in_use or 0:,} in use"
        why += ", 2 fds per connection (both ends here)" if per == 2 else ""
        bounds.append(Bound("fs.file-max", side, free // per, why))
    mem = _memory_bound(limits, scen, side, costs, all_procs)
    if mem is not None:
        bounds.append(mem)
    if conntrack_state(limits) == "tracking":
        top, count = limits.conntrack_max or 0, limits.conntrack_count or 0
        free = max(0, top - count)
        why = f"nf_conntrack_max {top:,} - {count:,} tracked"
        bounds.append(Bound("nf_conntrack_max", side, free, why))
    if side == "client" and limits.port_range is not None:
        ips = scen.source_ips or (LOOPBACK_SOURCES if scen.loopback else 1)
        _, total, why = port_lanes(limits.port_range, ips, len(scen.servers))
        bounds.append(Bound("ip_local_port_range", side, total, why))
    return bounds, procs


def capacity(limits: Limits, scen: Scenario, costs: Costs | None = None) -> Capacity:
    """Connections each side can hold now, and the limit of the role that binds first."""
    costs = costs or Costs()
    per_side: dict[str, int] = {}
    processes: dict[str, int] = {}
    role_bounds: list[Bound] = []
    for side in ("server", "client"):
        bounds, procs = side_bounds(limits, scen, side, costs)
        per_side[side] = min(b.connections for b in bounds)
        processes[side] = procs
        if side in scen.sides:
            role_bounds.extend(bounds)
    binding = min(role_bounds, key=lambda b: b.connections)
    return Capacity(
        scen, per_side["server"], per_side["client"], processes, tuple(role_bounds), binding
    )


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def startup_warning(
    role: str,
    target: int,
    root: str = "/",
    *,
    getrlimit: GetRlimit = resource.getrlimit,
    fd_limit: int | None = None,
    costs: Costs | None = None,
) -> str | None:
    """One line when a limit of this machine binds before ``target`` connections.

    For `serve` (role "server") and `load` (role "client") at start-up; None when
    every limit allows the target. Costs are the measured ones when `doctor measure`
    has stored some, else the defaults.
    """
    limits = read_limits(root, getrlimit=getrlimit, find=False)
    scen = Scenario(target=target, role=role, fd_limit=fd_limit)
    cap = capacity(limits, scen, costs or load_costs())
    bound = cap.binding
    if bound.connections >= target:
        return None
    return (
        f"{bound.name} binds at {bound.connections:,} connections, before the target "
        f"{target:,} ({bound.why}); `manydoors doctor --target {target} --role {role}` "
        "says how to raise it"
    )

"""The 5-tuple plan (pure arithmetic, no I/O).

A TCP connection is unique by (src ip, src port, dst ip, dst port). One source IP can
reach one server address through at most as many connections as the ephemeral port
range holds, so a million connections from one box need many (source IP, target)
*lanes*. The planner splits the requested count over lanes and over load processes,
each of which must stay under its fd limit.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

# Fill a lane to at most this share of the port range: ports in TIME_WAIT from an
# earlier run and other programs' connections need the rest.
LANE_FILL = 0.9
# With default (loopback) source IPs, keep lanes sparse: connect() searches the port
# range for a free port of the 4-tuple, and measured here a lane 15,000 deep made that
# search cost ~120 us per connect against ~10 us at 1,000 deep (docs/benchmarks.md).
SPARSE_LANE = 2000


class PlanError(ValueError):
    """The requested load cannot be planned; the message shows the arithmetic."""


@dataclass(frozen=True, slots=True)
class Lane:
    src: str
    dst: str
    port: int
    count: int


@dataclass(frozen=True, slots=True)
class AgentPlan:
    index: int
    lanes: tuple[Lane, ...]
    first_user: int  # users are u<first_user>, u<first_user + 1>, ...

    @property
    def count(self) -> int:
        return sum(lane.count for lane in self.lanes)


@dataclass(frozen=True, slots=True)
class Plan:
    connections: int
    targets: tuple[tuple[str, int], ...]
    source_ips: tuple[str, ...]
    port_range: tuple[int, int]
    lane_capacity: int
    agents: tuple[AgentPlan, ...]

    def describe(self) -> str:
        lo, hi = self.port_range
        return (
            f"{self.connections:,} connections = {len(self.source_ips)} source IPs x "
            f"{len(self.targets)} target ports x up to {self.lane_capacity:,} each "
            f"(ephemeral ports {lo}-{hi}, filled to {LANE_FILL:.0%}), "
            f"over {len(self.agents)} load processes"
        )


def parse_target(text: str) -> tuple[tuple[str, int], ...]:
    """``127.0.0.1:7000`` or ``127.0.0.1:7000-7003``."""
    host, sep, ports = text.rpartition(":")
    if not sep or not host:
        raise PlanError(f"target {text!r}: expected HOST:PORT or HOST:PORT-PORT")
    try:
        lo_s, dash, hi_s = ports.partition("-")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo  # "7000-" is a typo, not port 7000
    except ValueError:
        raise PlanError(f"target {text!r}: ports must be numbers") from None
    if not 0 < lo <= hi <= 65535:
        raise PlanError(f"target {text!r}: port range must be within 1-65535")
    return tuple((host, p) for p in range(lo, hi + 1))


def parse_port_range(text: str) -> tuple[int, int]:
    """``40000-40009`` (or one port)."""
    lo_s, dash, hi_s = text.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
    except ValueError:
        raise PlanError(f"port range {text!r}: expected LO-HI") from None
    if not 0 < lo <= hi <= 65535:
        raise PlanError(f"port range {text!r}: must be within 1-65535, low to high")
    return lo, hi


def parse_ip_range(text: str) -> tuple[str, ...]:
    """``127.0.1.1-127.0.1.64``, a single address, or a comma-separated list of either."""
    out: list[str] = []
    for part in text.split(","):
        lo_s, dash, hi_s = part.strip().partition("-")
        try:
            lo = ipaddress.ip_address(lo_s)
            hi = ipaddress.ip_address(hi_s) if dash else lo
        except ValueError as exc:
            raise PlanError(f"source IPs {part!r}: {exc}") from None
        if int(hi) < int(lo) or lo.version != hi.version:
            raise PlanError(f"source IPs {part!r}: the range is empty")
        # ip_address(int) would make an IPv4 address of a small IPv6 one (::1 -> 0.0.0.1)
        out.extend(str(type(lo)(i)) for i in range(int(lo), int(hi) + 1))
    return tuple(out)


def default_source_ips(count: int) -> tuple[str, ...]:
    """Loopback source addresses from 127.0.1.1 upward (all of 127/8 is local)."""
    base = int(ipaddress.ip_address("127.0.1.1"))
    return tuple(str(ipaddress.ip_address(base + i)) for i in range(count))


def make_plan(
    connections: int,
    targets: tuple[tuple[str, int], ...],
    port_range: tuple[int, int],
    fd_limit: int,
    source_ips: tuple[str, ...] | None = None,
    processes: int | None = None,
    fd_reserve: int = 64,
    explicit_ports: bool = False,
    force: bool = False,
) -> Plan:
    """Split ``connections`` over lanes and processes.

    ``explicit_ports``: ``port_range`` was given for the load's own sockets (each
    socket is limited to it), so lanes may fill it entirely. ``force``: plan even when
    the lanes cannot hold the count, to watch the kernel refuse (EADDRNOTAVAIL).
    """
    if connections < 1:
        raise PlanError("connections must be at least 1")
    if not targets:
        raise PlanError("no target to connect to")
    lo, hi = port_range
    fill = 1.0 if explicit_ports else LANE_FILL
    lane_capacity = int((hi - lo + 1) * fill)
    if lane_capacity < 1:
        raise PlanError(f"ephemeral port range {lo}-{hi} leaves no ports for connections")
    per_ip = lane_capacity * len(targets)
    if source_ips is None:
        if not all(ipaddress.ip_address(h).is_loopback for h, _ in targets):
            raise PlanError("give --source-ips for a target that is not on loopback")
        sparse = min(lane_capacity, SPARSE_LANE) * len(targets)
        source_ips = default_source_ips(math.ceil(connections / sparse))
    reachable = per_ip * len(source_ips)
    if reachable < connections and not force:
        need = math.ceil(connections / per_ip)
        raise PlanError(
            f"cannot open {connections:,} connections: {len(source_ips)} source IPs x "
            f"{len(targets)} target ports x {lane_capacity:,} ports per lane "
            f"(range {lo}-{hi} filled to {fill:.0%}) = {reachable:,}. "
            f"Use at least {need} source IPs, or more target ports, or widen "
            "net.ipv4.ip_local_port_range."
        )
    per_process = fd_limit - fd_reserve
    if per_process < 1:
        raise PlanError(f"fd limit {fd_limit} leaves no room for connections")
    needed = math.ceil(connections / per_process)
    if processes is None:
        processes = needed
    elif processes < needed:
        raise PlanError(
            f"{processes} load processes x {per_process:,} fds = {processes * per_process:,}"
            f" < {connections:,}: use --processes {needed} or auto"
        )
    # Fill lanes evenly: every (source IP, target) pair gets the same share.
    pairs = [(src, dst, port) for src in source_ips for dst, port in targets]
    shares = _split(connections, len(pairs))
    lane_counts = [(p, n) for p, n in zip(pairs, shares, strict=True) if n]
    # Deal the lanes' connections out to processes in contiguous chunks.
    agent_counts = _split(connections, processes)
    agents: list[AgentPlan] = []
    lane_iter = iter(lane_counts)
    current: tuple[tuple[str, str, int], int] | None = None
    first_user = 0
    for index, want in enumerate(agent_counts):
        lanes: list[Lane] = []
        while want:
            if current is None or current[1] == 0:
                current = next(lane_iter)
            (src, dst, port), left = current
            take = min(left, want)
            lanes.append(Lane(src, dst, port, take))
            current = ((src, dst, port), left - take)
            want -= take
        agents.append(AgentPlan(index, tuple(lanes), first_user))
        first_user += sum(lane.count for lane in lanes)
    return Plan(connections, targets, tuple(source_ips), port_range, lane_capacity, tuple(agents))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

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

# The parsers and LANE_FILL live below both the planner and the doctor; they are
# re-exported here because the planner is where a reader looks for them.
from ..node.addresses import PlanError as PlanError
from ..node.addresses import parse_ip_range as parse_ip_range
from ..node.addresses import parse_port_range as parse_port_range
from ..node.addresses import parse_target as parse_target
from ..node.tuning import LANE_FILL as LANE_FILL

# With default (loopback) source IPs, keep lanes sparse: connect() searches the port
# range for a free port of the 4-tuple, and measured here a lane 15,000 deep made that
# search cost ~120 us per connect against ~10 us at 1,000 deep (docs/benchmarks.md).
SPARSE_LANE = 2000


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

"""Explain each limit against a target and give the exact command that raises it.

One function per check; each returns a :class:`Check` with the current value, the
value the target needs, a status (ok / warn / fail), one sentence on why it matters
and the fix. ``sysctl`` on a check is what ``doctor --apply`` may write; ``cannot`` is
what it must leave to the user (limits owned by a parent process or a container).

``--apply`` raises the sysctls a target needs and never lowers one. Writes go to
``root/proc/sys/...``, so a fake root in a test receives them.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from ..node.procfs import read_ints, sysctl_path
from .capacity import (
    MAX_PROCESSES_PER_CORE,
    PROCESS_BASELINE_BYTES,
    Capacity,
    Costs,
    Scenario,
    conntrack_state,
    fd_hard,
    gib,
    max_processes,
    port_lanes,
)
from .limits import Limits

OK: Final = "ok"
WARN: Final = "warn"
FAIL: Final = "fail"
SYSCTL_FILE: Final = "/etc/sysctl.d/90-manydoors.conf"
# The kernel's own ceiling for fs.nr_open (sysctl_nr_open_max on 64-bit).
NR_OPEN_MAX: Final = 1_073_741_816
# A loopback connect queues 3 packets on the CPU's backlog. At 25,000 connects/s (the
# ramp to 1M) a 100 ms softirq stall on a busy 2-core box queues 7,500 packets: round
# up to 8,192 for a large target. The kernel default is 1,000.
NETDEV_BACKLOG_FOR_RAMP: Final = 8_192
# Below this, listen queues overflow on the first scheduling stall of a fast ramp,
# whatever backlog the service asked for (the old kernel default was 128).
MIN_LISTEN_QUEUE: Final = 1_024
# A port range narrower than this fills a lane in seconds and leaves TIME_WAIT from an
# earlier run a large share of it (the default 32768-60999 is 28,232 ports).
NARROW_PORT_RANGE: Final = 10_000
WIDE_PORT_RANGE: Final = (10_000, 65_535)  # different parity, as the kernel prefers
PAGE: Final = 4096
HEADROOM: Final = 1.1  # leave 10 % of system-wide tables to everything else


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    current: int | str | None
    needed: int | str | None
    status: str
    why: str
    fix: str
    unit: str = ""  # "bytes": shown in GiB
    sysctl: tuple[str, tuple[int, ...]] | None = None  # key and values --apply may raise to
    cannot: str | None = None  # what --apply cannot change, and who owns it

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "current": self.current,
            "needed": self.needed,
            "status": self.status,
            "why": self.why,
            "fix": self.fix,
        }


def sysctl_fix(key: str, values: tuple[int, ...]) -> str:
    """``sysctl -w`` now and the /etc/sysctl.d line that keeps it after a reboot."""
    text = " ".join(str(v) for v in values)
    now = f"sysctl -w {key}={text}" if len(values) == 1 else f"sysctl -w {key}='{text}'"
    return f"{now}; persist: echo '{key} = {text}' >> {SYSCTL_FILE}"


def _sysctl_check(
    name: str,
    current: int | str | None,
    needed: int | str | None,
    status: str,
    why: str,
    values: tuple[int, ...],
) -> Check:
    fix = "-" if status == OK else sysctl_fix(name, values)
    return Check(name, current, needed, status, why, fix, sysctl=(name, values))


def unreadable(name: str, path: str) -> Check:
    return Check(name, None, None, WARN, f"could not read {path}; the check was skipped.", "-")


def nofile_fix(limits: Limits, side: str, want: int) -> tuple[str, str]:
    """(fix, what --apply cannot do) for a per-process fd limit below ``want``."""
    proc = limits.server if side == "server" and limits.server else limits.this
    steps: list[str] = []
    if limits.nr_open is not None and want > limits.nr_open:
        # LimitNOFILE, prlimit and ulimit above fs.nr_open all fail with EPERM.
        steps.append(f"sysctl -w fs.nr_open={want}")
    if proc.pid is not None:
        steps.append(f"prlimit --pid {proc.pid} --nofile={want}:{want} (for new workers)")
    if proc.systemd_unit is not None:
        unit = proc.systemd_unit or "<unit>.service"
        dropin = f"/etc/systemd/system/{unit}.d/90-manydoors.conf"
        # A drop-in, not ulimit: systemd sets the limits of a service's processes.
        steps.append(
            f"mkdir -p {dropin.rsplit('/', 1)[0]} && printf '[Service]\\nLimitNOFILE={want}\\n' "
            f"> {dropin} && systemctl daemon-reload && systemctl restart {unit}"
        )
        owner = f"the systemd unit {unit}"
    elif limits.container:
        steps.append(f"start the container with --ulimit nofile={want}:{want}")
        owner = f"the {limits.container} container runtime"
    else:
        steps.append(f"ulimit -Hn {want} && ulimit -n {want} in the shell that starts it")
        owner = "the shell or service manager that started this process"
    fix = "; then ".join(steps)
    return fix, f"RLIMIT_NOFILE hard limit {proc.hard:,} is set by {owner}: {fix}"


def check_nofile(limits: Limits, scen: Scenario, cap: Capacity, side: str) -> Check:
    proc = limits.server if side == "server" and limits.server else limits.this
    fd = fd_hard(limits, side)
    cores = limits.cores or 1
    # One process per core is the goal; the kernel allows no more than NR_OPEN_MAX.
    want = min(math.ceil(scen.target / cores) + scen.fd_reserve, NR_OPEN_MAX)
    least = math.ceil(scen.target / max_processes(limits.cores)) + scen.fd_reserve
    status = OK if fd >= want else WARN if fd >= least else FAIL
    name = f"RLIMIT_NOFILE (server pid {proc.pid})" if proc.pid is not None else "RLIMIT_NOFILE"
    procs = cap.processes[side]
    why = (
        f"A process holds at most {fd:,} fds (manydoors raises its soft limit, {proc.soft:,}, "
        f"to the hard one), so {scen.target:,} connections take {procs:,} processes on "
        f"{cores} cores; past {MAX_PROCESSES_PER_CORE} per core, raise the limit instead."
    )
    if status == OK:
        return Check(name, fd, want, status, why, "-")
    fix, cannot = nofile_fix(limits, side, want)
    return Check(name, fd, want, status, why, fix, cannot=cannot)


def check_nr_open(limits: Limits, scen: Scenario) -> Check:
    if limits.nr_open is None:
        return unreadable("fs.nr_open", "/proc/sys/fs/nr_open")
    want = min(math.ceil(scen.target / (limits.cores or 1)) + scen.fd_reserve, NR_OPEN_MAX)
    least = math.ceil(scen.target / max_processes(limits.cores)) + scen.fd_reserve
    cur = limits.nr_open
    status = OK if cur >= want else WARN if cur >= least else FAIL
    why = (
        "No process can have a higher fd limit than this, whatever LimitNOFILE, prlimit or "
        "ulimit ask for (1,048,576 by default)."
    )
    return _sysctl_check("fs.nr_open", cur, want, status, why, (want,))


def check_file_max(limits: Limits, scen: Scenario) -> Check:
    if limits.file_max is None:
        return unreadable("fs.file-max", "/proc/sys/fs/file-max")
    in_use = limits.file_in_use or 0
    per = 2 if scen.role == "both" else 1
    need = scen.target * per
    want = in_use + math.ceil(need * HEADROOM)
    cur = limits.file_max
    status = OK if cur >= want else WARN if cur >= in_use + need else FAIL
    why = (
        f"Open files of all processes together ({in_use:,} in use now) stop at this, with "
        f"ENFILE for everyone; the target needs {need:,} more."
    )
    return _sysctl_check("fs.file-max", cur, want, status, why, (want,))


def check_memory(limits: Limits, scen: Scenario, cap: Capacity, costs: Costs) -> Check:
    if limits.mem_available is None:
        return unreadable("memory", "/proc/meminfo")
    if scen.role == "both":
        per = costs.kernel_per_pair + costs.server_user + costs.load_user
        procs = cap.processes["server"] + cap.processes["client"]
    else:
        side = scen.role
        per = costs.kernel_per_socket + (costs.server_user if side == "server" else costs.load_user)
        procs = cap.processes[side]
    need = scen.target * per + procs * PROCESS_BASELINE_BYTES
    cur = limits.mem_available
    # Keep 15 % free for page cache, queued messages and the broker.
    status = OK if need <= cur * 0.85 else WARN if need <= cur else FAIL
    why = (
        f"Each connection costs ~{per:,} B of kernel and user memory ({costs.source}), "
        f"each process {PROCESS_BASELINE_BYTES / 1e6:.1f} MB; past available memory the "
        "OOM killer ends a worker."
    )
    fix = "-"
    cannot = None
    if status != OK:
        where = (
            f"raise the container's memory limit ({gib(limits.cgroup_memory_limit)} now)"
            if limits.cgroup_memory_limit
            else "add memory"
        )
        fix = f"{where}, or spread the target over more machines"
        cannot = f"memory: {fix}"
    return Check("memory", cur, need, status, why, fix, unit="bytes", cannot=cannot)


def _queue_check(name: str, cur: int | None, scen: Scenario, why: str, syn: bool) -> Check:
    if cur is None:
        return unreadable(name, "/proc/sys/" + name.replace(".", "/"))
    want = scen.backlog
    if cur >= want:
        status = OK
    elif syn:
        status = WARN
    else:
        status = FAIL if cur < MIN_LISTEN_QUEUE else WARN
    return _sysctl_check(name, cur, want, status, why, (want,))


def check_somaxconn(limits: Limits, scen: Scenario) -> Check:
    why = (
        f"listen() silently caps every service's backlog ({scen.backlog:,}) at this; when "
        "the accept queue is full, SYNs are dropped and clients retry only after 1 s."
    )
    return _queue_check("net.core.somaxconn", limits.somaxconn, scen, why, syn=False)


def check_syn_backlog(limits: Limits, scen: Scenario) -> Check:
    cookies = limits.tcp_syncookies
    beyond = (
        "answers with SYN cookies and logs 'Possible SYN flooding'."
        if cookies
        else "drops SYNs, since tcp_syncookies is off."
    )
    why = f"Half-open connections wait here for the client's ACK; beyond it the kernel {beyond}"
    check = _queue_check(
        "net.ipv4.tcp_max_syn_backlog", limits.tcp_max_syn_backlog, scen, why, syn=True
    )
    if check.status == WARN and cookies == 0:
        return replace(check, status=FAIL)
    return check


def check_netdev_backlog(limits: Limits, scen: Scenario) -> Check:
    name = "net.core.netdev_max_backlog"
    if limits.netdev_max_backlog is None:
        return unreadable(name, "/proc/sys/net/core/netdev_max_backlog")
    cur = limits.netdev_max_backlog
    want = NETDEV_BACKLOG_FOR_RAMP if scen.target >= 10_000 else 1_000
    dropped = limits.netdev_dropped or 0
    # Drops counted since boot prove the queue overflowed on this box; with the value
    # already raised they may be old, so they only warn (watch the count grow).
    status = (WARN if dropped else OK) if cur >= want else (FAIL if dropped else WARN)
    why = (
        "Each CPU queues incoming packets, loopback too, up to this many; a fast ramp "
        f"overflows it and the SYN is lost for 1 s ({dropped:,} packets dropped since boot)."
    )
    check = _sysctl_check(name, cur, want, status, why, (want,))
    if cur >= want and dropped:
        fix = "watch column 2 of /proc/net/softnet_stat during a ramp; if it grows, double it"
        return replace(check, fix=fix)
    return check


def check_tcp_mem(limits: Limits, scen: Scenario) -> Check:
    name = "net.ipv4.tcp_mem"
    mem = limits.tcp_mem
    if mem is None or len(mem) != 3:
        return unreadable(name, "/proc/sys/net/ipv4/tcp_mem")
    # A socket with any data queued holds at least one page of TCP memory; in a
    # broadcast every connection may have a message queued at once (both ends when both
    # are here). Only a warning: the 1M benchmark broadcast three times with
    # tcp_mem 287901 383869 575802 and the kernel never entered memory pressure
    # (TcpExt TCPMemoryPressures stayed 0), because readers drain as writers fill.
    need = scen.target * (2 if scen.role == "both" else 1)
    want = (mem[0], need, math.ceil(need * 1.25))
    status = OK if mem[1] >= need else WARN
    rmem = limits.tcp_rmem[0] if limits.tcp_rmem else PAGE
    wmem = limits.tcp_wmem[0] if limits.tcp_wmem else PAGE
    why = (
        f"All TCP buffers together, in 4 KiB pages (max {gib(mem[2] * PAGE)}); a socket with "
        f"data queued holds at least a page (tcp_rmem/tcp_wmem minimum {rmem:,}/{wmem:,} B), "
        "so past this a broadcast's packets are dropped and resent 200 ms+ later."
    )
    current = " ".join(str(v) for v in mem)
    needed = " ".join(str(v) for v in want)
    return _sysctl_check(name, current, needed, status, why, want)


def check_port_range(limits: Limits, scen: Scenario) -> Check:
    name = "net.ipv4.ip_local_port_range"
    if limits.port_range is None:
        return unreadable(name, "/proc/sys/net/ipv4/ip_local_port_range")
    lo, hi = limits.port_range
    width = hi - lo + 1
    ports = len(scen.servers)
    lane, _, _ = port_lanes(limits.port_range, 1, ports)
    auto = scen.source_ips is None and scen.loopback
    ips = scen.source_ips or 1
    reachable = lane * ports * ips
    need_ips = math.ceil(scen.target / max(1, lane * ports))
    if auto:
        needed: str = f"{need_ips:,} loopback source IPs (chosen by load)"
        status = WARN if width < NARROW_PORT_RANGE else OK
    else:
        needed = f"{need_ips:,} source IPs x {ports} server ports"
        status = FAIL if reachable < scen.target else WARN if width < NARROW_PORT_RANGE else OK
    why = (
        f"One source IP reaches one server port through at most {lane:,} connections "
        f"({width:,} ephemeral ports, filled to 90 %), so {scen.target:,} connections to "
        f"{ports} server port(s) need {need_ips:,} source IPs."
    )
    fix = "-"
    if status != OK:
        widen = sysctl_fix(name, WIDE_PORT_RANGE)
        last = ipaddress.ip_address("127.0.1.1") + max(1, need_ips) - 1
        fix = (
            f"add source IPs (--source-ips 127.0.1.1-{last} on loopback, `ip addr add` "
            f"elsewhere) or server ports, or widen: {widen}"
        )
    want = (min(lo, WIDE_PORT_RANGE[0]), max(hi, WIDE_PORT_RANGE[1]))
    return Check(name, f"{lo} {hi}", needed, status, why, fix, sysctl=(name, want))


def check_tw_reuse(limits: Limits, scen: Scenario) -> Check:
    name = "net.ipv4.tcp_tw_reuse"
    cur = limits.tcp_tw_reuse
    if cur is None:
        return unreadable(name, "/proc/sys/net/ipv4/tcp_tw_reuse")
    status = OK if cur == 1 or (cur == 2 and scen.loopback) else WARN
    why = (
        "A client's closed connection keeps its port in TIME_WAIT for 60 s; reuse lets a "
        "reconnect storm take those ports again (2 = loopback only)."
    )
    needed = "1 (2: loopback only)" if scen.loopback else 1
    return _sysctl_check(name, cur, needed, status, why, (1,))


def check_conntrack(limits: Limits, scen: Scenario) -> Check | None:
    state = conntrack_state(limits)
    if state == "absent" or limits.conntrack_max is None:
        return None
    name = "net.netfilter.nf_conntrack_max"
    count = limits.conntrack_count or 0
    cur = limits.conntrack_max
    want = count + math.ceil(scen.target * HEADROOM)
    free = cur - count
    if state == "idle":
        status = OK
    elif state == "unknown":
        status = OK if free >= scen.target * HEADROOM else WARN
    else:
        status = OK if free >= scen.target * HEADROOM else WARN if free >= scen.target else FAIL
    why = (
        f"When netfilter tracks connections ({count:,} tracked, {limits.tcp_in_use or 0:,} "
        "TCP sockets open), a full table drops new SYNs ('nf_conntrack: table full')."
    )
    return _sysctl_check(name, cur, want, status, why, (want,))


def check_kernel(limits: Limits, scen: Scenario) -> Check:
    version = limits.kernel_version
    client = "client" in scen.sides
    if version is None:
        return unreadable("kernel", "/proc/sys/kernel/osrelease")
    if client:
        # IP_BIND_ADDRESS_NO_PORT (4.2) lets a socket bound to a source IP share ports
        # across server addresses; IP_LOCAL_PORT_RANGE (6.3) backs `load --source-ports`.
        status = OK if version >= (6, 3) else WARN if version >= (4, 2) else FAIL
        needed = "6.3 (4.2 at least)"
    else:
        status = OK if version >= (3, 9) else FAIL  # SO_REUSEPORT for the workers
        needed = "3.9"
    why = (
        "The load generator binds source IPs with IP_BIND_ADDRESS_NO_PORT (4.2+) and "
        "--source-ports needs IP_LOCAL_PORT_RANGE (6.3+); workers share a port with "
        "SO_REUSEPORT (3.9+)."
    )
    fix = "-" if status == OK else "upgrade the kernel"
    cannot = None if status == OK else f"kernel {limits.kernel}: upgrade the kernel"
    return Check("kernel", limits.kernel, needed, status, why, fix, cannot=cannot)


# Server CPU per heartbeat (a ping written, its pong read), measured with 20,000 held
# TCP connections and ping_interval 2 s: 12.7-13.3 us (docs/benchmarks.md, issue 18).
PING_PONG_SECONDS: Final = 13e-6
HEARTBEAT_SHARE: Final = 0.10  # of the cores: more than this and the heartbeat is a load


def check_heartbeat(scen: Scenario) -> Check:
    """The heartbeat's CPU: every quiet connection is pinged each ping_interval."""
    name = "heartbeat"
    if scen.ping_interval <= 0:
        why = "off (ping_interval 0): dead peers are found by TCP keepalive (~7 minutes)."
        return Check(name, "off", "-", OK, why, "-")
    per_second = scen.target / scen.ping_interval
    share = per_second * PING_PONG_SECONDS / scen.cores
    slowest = scen.target * PING_PONG_SECONDS / (HEARTBEAT_SHARE * scen.cores)
    why = (
        f"{scen.target:,} connections / ping_interval {scen.ping_interval:g} s = "
        f"{per_second:,.0f} pings/s x {PING_PONG_SECONDS * 1e6:g} us (a ping and its pong) = "
        f"{share:.0%} of {scen.cores} cores"
    )
    if share <= HEARTBEAT_SHARE:
        return Check(name, f"{scen.ping_interval:g} s", "-", OK, why + ".", "-")
    fix = (
        f"ping_interval = {math.ceil(slowest)} (or more) keeps it to "
        f"{HEARTBEAT_SHARE:.0%}; a dead peer is then found within ping_interval + "
        "ping_timeout. 0 leaves it to TCP keepalive."
    )
    status = WARN if share <= 3 * HEARTBEAT_SHARE else FAIL
    return Check(
        name, f"{scen.ping_interval:g} s", f">= {math.ceil(slowest)} s", status, why + ".", fix
    )


def checks(limits: Limits, scen: Scenario, cap: Capacity, costs: Costs) -> list[Check]:
    """Every check that matters for the scenario's role, in the order to read them."""
    out: list[Check] = []
    if "server" in scen.sides:
        out.append(check_nofile(limits, scen, cap, "server"))
    if "client" in scen.sides and (limits.server is not None or scen.role == "client"):
        out.append(check_nofile(limits, scen, cap, "client"))
    out += [check_nr_open(limits, scen), check_file_max(limits, scen)]
    out.append(check_memory(limits, scen, cap, costs))
    if "server" in scen.sides:
        out += [check_somaxconn(limits, scen), check_syn_backlog(limits, scen)]
    out += [check_netdev_backlog(limits, scen), check_tcp_mem(limits, scen)]
    if "client" in scen.sides:
        out += [check_port_range(limits, scen), check_tw_reuse(limits, scen)]
    conntrack = check_conntrack(limits, scen)
    if conntrack is not None:
        out.append(conntrack)
    out.append(check_kernel(limits, scen))
    if "server" in scen.sides:
        out.append(check_heartbeat(scen))
    return out


def report(cap: Capacity, found: list[Check]) -> dict[str, Any]:
    """The ``--json`` document."""
    return {
        "target": cap.scenario.target,
        "max_connections": {"server": cap.server, "client": cap.client},
        "binding_limit": cap.binding.name,
        "checks": [c.to_json() for c in found],
    }


# --- --apply ----------------------------------------------------------------------------


class NotRoot(PermissionError):
    """--apply without root: nothing was written."""


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    old: tuple[int, ...]
    new: tuple[int, ...]

    def describe(self, verb: str) -> str:
        old = " ".join(str(v) for v in self.old)
        new = " ".join(str(v) for v in self.new)
        return f"{verb} {self.key}: {old} -> {new}"


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    changes: tuple[Change, ...]
    kept: tuple[str, ...]  # sysctls left alone, and why
    cannot: tuple[str, ...]  # what only the user (or the parent process) can change


def raise_only(key: str, old: tuple[int, ...], want: tuple[int, ...]) -> tuple[int, ...]:
    """The values to write: each at least what it is now.

    The port range is a width: it grows by a lower start and a higher end.
    """
    if len(old) != len(want):
        return old
    if key == "net.ipv4.ip_local_port_range":
        return (min(old[0], want[0]), max(old[1], want[1]))
    return tuple(max(o, w) for o, w in zip(old, want, strict=True))


def _lowers(key: str, old: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return raise_only(key, old, want) != want


def plan_apply(root: str | Path, found: Iterable[Check]) -> ApplyPlan:
    """What --apply would do for the checks that are not ok."""
    changes: list[Change] = []
    kept: list[str] = []
    cannot: list[str] = []
    for check in found:
        if check.status == OK:
            continue
        if check.sysctl is None:
            if check.cannot:
                cannot.append(check.cannot)
            continue
        key, want = check.sysctl
        old = read_ints(root, sysctl_path(key))
        if old is None:
            cannot.append(f"{key}: cannot read /{sysctl_path(key)}")
            continue
        new = raise_only(key, old, want)
        if new == old:
            why = "it would lower it" if _lowers(key, old, want) else "it is already there"
            kept.append(f"{key} stays {' '.join(map(str, old))}: {why}")
            continue
        changes.append(Change(key, old, new))
    return ApplyPlan(tuple(changes), tuple(kept), tuple(cannot))


def apply(root: str | Path, plan: ApplyPlan, *, euid: int, dry_run: bool) -> list[str]:
    """Write the plan's changes (unless ``dry_run``) and return the lines to print.

    Raises :class:`NotRoot` before writing anything when ``euid`` is not 0.
    """
    if not dry_run and euid != 0:
        raise NotRoot(
            f"--apply writes kernel settings and must run as root (euid is {euid}); "
            "run it with sudo, or add --dry-run to see what it would do"
        )
    lines: list[str] = []
    written: list[Change] = []
    for change in plan.changes:
        if dry_run:
            lines.append(change.describe("would set"))
            written.append(change)
            continue
        path = Path(root) / sysctl_path(change.key)
        try:
            path.write_text(" ".join(str(v) for v in change.new) + "\n")
        except OSError as exc:
            # /proc/sys is read-only in most containers; fs.* is not per-namespace.
            lines.append(f"cannot set {change.key}: {exc.strerror} (the host or container owns it)")
            continue
        lines.append(change.describe("set"))
        written.append(change)
    if not plan.changes:
        lines.append("no sysctl needs raising")
    lines += [f"left alone: {k}" for k in plan.kept]
    if written:
        lines.append(f"to keep them after a reboot, add to {SYSCTL_FILE}:")
        lines += [f"  {c.key} = {' '.join(str(v) for v in c.new)}" for c in written]
    lines += [f"cannot change: {c}" for c in plan.cannot]
    return lines

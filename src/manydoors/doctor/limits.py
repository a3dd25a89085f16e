"""Read the limits that decide how many connections this machine can hold.

Every reader takes ``root`` (``"/"`` on a real machine) and only opens files below it
(through :mod:`manydoors.node.procfs`), so tests hand in a fake ``/proc`` tree built in
a temporary directory. A file that is missing or unreadable gives ``None``: a kernel
without conntrack, a container that hides ``/proc/slabinfo`` or a ``/proc`` without a
running server are normal, not errors.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..node.procfs import (
    meminfo,
    nofile,
    pids,
    read_int,
    read_ints,
    read_text,
    sysctl_path,
    tcp_sockstat,
)

GetRlimit = Callable[[int], tuple[int, int]]

# An "unlimited" cgroup v1 memory limit is the largest page-aligned signed 64-bit value.
_CGROUP_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class ProcessLimits:
    """RLIMIT_NOFILE of one process and who set it."""

    pid: int | None  # None: this process (read with getrlimit)
    soft: int
    hard: int
    # The systemd unit that started the process ("" if systemd but the unit is unknown):
    # its LimitNOFILE= wins over any ulimit, so it decides what the fix is.
    systemd_unit: str | None


@dataclass(frozen=True, slots=True)
class Limits:
    """A snapshot of everything the doctor checks; ``None`` where it could not be read."""

    this: ProcessLimits
    server: ProcessLimits | None  # a running ``manydoors serve``, if one was found
    nr_open: int | None
    file_max: int | None
    file_in_use: int | None
    port_range: tuple[int, int] | None
    somaxconn: int | None
    tcp_max_syn_backlog: int | None
    tcp_syncookies: int | None
    netdev_max_backlog: int | None
    netdev_dropped: int | None  # packets dropped at a full netdev backlog, since boot
    tcp_mem: tuple[int, ...] | None  # pages
    tcp_rmem: tuple[int, ...] | None
    tcp_wmem: tuple[int, ...] | None
    tcp_tw_reuse: int | None
    conntrack_max: int | None
    conntrack_count: int | None
    tcp_in_use: int | None  # TCP sockets open now (/proc/net/sockstat)
    mem_total: int | None  # bytes
    mem_available: int | None  # bytes, already lowered to a cgroup's free memory
    cgroup_memory_limit: int | None  # bytes, when a memory cgroup limit applies
    cores: int | None
    kernel: str | None
    container: str | None

    @property
    def kernel_version(self) -> tuple[int, int] | None:
        return parse_kernel_version(self.kernel)


def parse_kernel_version(release: str | None) -> tuple[int, int] | None:
    """``6.18.44-fc-v595`` -> (6, 18)."""
    if not release:
        return None
    parts = release.strip().split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def systemd_unit(root: str | Path, pid: int | str) -> str | None:
    """The .service that started ``pid``, "" if systemd started it but the unit is
    unknown, None if systemd did not."""
    for line in (read_text(root, f"proc/{pid}/cgroup") or "").splitlines():
        path = line.split(":", 2)[-1]
        # The deepest unit owns the process: user@1000.service/app.slice/web.service is
        # the user unit web.service; a .scope below a service (a terminal's shell, a
        # container) is not a service, and ulimit there works.
        units = [p for p in path.split("/") if p.endswith((".service", ".scope"))]
        if units and units[-1].endswith(".service"):
            return units[-1]
    environ = read_text(root, f"proc/{pid}/environ") or ""
    if any(var.startswith("INVOCATION_ID=") for var in environ.split("\0")):
        return ""
    return None


def process_limits(root: str | Path, pid: int) -> ProcessLimits | None:
    """RLIMIT_NOFILE of a running process from /proc/PID/limits."""
    parsed = nofile(pid, root)
    if parsed is None:
        return None
    return ProcessLimits(pid, parsed[0], parsed[1], systemd_unit(root, pid))


def find_server(root: str | Path, exclude: int | None = None) -> int | None:
    """The pid of a running ``manydoors serve`` supervisor (the lowest, the parent)."""
    for pid in pids(root):
        if pid == exclude:
            continue
        args = (read_text(root, f"proc/{pid}/cmdline") or "").split("\0")
        # Exact tokens, so that the supervisor's forkserver children (whose -c
        # argument merely mentions manydoors) and this doctor do not match.
        named = any(a == "manydoors" or a.endswith("/manydoors") for a in args)
        if named and "serve" in args:
            return pid
    return None


def _cgroup_memory(root: str | Path) -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup, if it has a limit."""
    for line in (read_text(root, "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1], parts[2].strip("/")
        if controllers == "":  # cgroup v2
            base = f"sys/fs/cgroup/{path}".rstrip("/")
            files = (f"{base}/memory.max", f"{base}/memory.current")
        elif "memory" in controllers.split(","):
            base = f"sys/fs/cgroup/memory/{path}".rstrip("/")
            files = (f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes")
        else:
            continue
        limit, usage = read_int(root, files[0]), read_int(root, files[1])
        if limit is not None and usage is not None and limit < _CGROUP_UNLIMITED:
            return limit, usage
    return None


def _cores(root: str | Path) -> int | None:
    online = read_text(root, "sys/devices/system/cpu/online")
    if online and online.strip():
        count = 0
        try:
            for part in online.strip().split(","):
                lo, _, hi = part.partition("-")
                count += int(hi) - int(lo) + 1 if hi else 1
        except ValueError:
            count = 0
        if count:
            return count
    cpuinfo = read_text(root, "proc/cpuinfo") or ""
    return sum(1 for line in cpuinfo.splitlines() if line.startswith("processor")) or None


def _netdev_dropped(root: str | Path) -> int | None:
    # Second column of each CPU's line, hex: packets dropped because that CPU's
    # backlog queue (net.core.netdev_max_backlog) was full. Loopback goes through it.
    text = read_text(root, "proc/net/softnet_stat")
    if text is None:
        return None
    try:
        return sum(int(line.split()[1], 16) for line in text.splitlines() if line.strip())
    except (IndexError, ValueError):
        return None


def _container(root: str | Path) -> str | None:
    if (Path(root) / ".dockerenv").exists():
        return "docker"
    if (Path(root) / "run/.containerenv").exists():
        return "podman"
    for var in (read_text(root, "proc/1/environ") or "").split("\0"):
        if var.startswith("container="):
            return var.partition("=")[2] or "container"
    cgroup = read_text(root, "proc/1/cgroup") or ""
    for name in ("kubepods", "docker", "containerd", "lxc"):
        if name in cgroup:
            return name
    return None


def read_limits(
    root: str | Path = "/",
    *,
    getrlimit: GetRlimit = resource.getrlimit,
    server_pid: int | None = None,
    find: bool = True,
) -> Limits:
    """Everything the doctor needs, read from ``root``; never raises for a missing file.

    ``server_pid``: read this manydoors server's limits; else, with ``find``, look for a
    running ``manydoors serve`` in ``root/proc``.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    this = ProcessLimits(None, soft, hard, systemd_unit(root, "self"))
    if server_pid is None and find:
        server_pid = find_server(root, exclude=os.getpid() if str(root) == "/" else None)
    server = process_limits(root, server_pid) if server_pid is not None else None
    file_nr = read_ints(root, "proc/sys/fs/file-nr")
    port_range = read_ints(root, sysctl_path("net.ipv4.ip_local_port_range"))
    mem = meminfo(root)
    available = mem.get("MemAvailable")
    cgroup = _cgroup_memory(root)
    if cgroup is not None:
        free = max(0, cgroup[0] - cgroup[1])
        available = free if available is None else min(available, free)
    release = read_text(root, "proc/sys/kernel/osrelease")
    return Limits(
        this=this,
        server=server,
        nr_open=read_int(root, "proc/sys/fs/nr_open"),
        file_max=read_int(root, "proc/sys/fs/file-max"),
        # file-nr is "allocated  free  max"; free is 0 on kernels since 2.6.
        file_in_use=file_nr[0] - file_nr[1] if file_nr and len(file_nr) >= 2 else None,
        port_range=(port_range[0], port_range[1]) if port_range and len(port_range) == 2 else None,
        somaxconn=read_int(root, sysctl_path("net.core.somaxconn")),
        tcp_max_syn_backlog=read_int(root, sysctl_path("net.ipv4.tcp_max_syn_backlog")),
        tcp_syncookies=read_int(root, sysctl_path("net.ipv4.tcp_syncookies")),
        netdev_max_backlog=read_int(root, sysctl_path("net.core.netdev_max_backlog")),
        netdev_dropped=_netdev_dropped(root),
        tcp_mem=read_ints(root, sysctl_path("net.ipv4.tcp_mem")),
        tcp_rmem=read_ints(root, sysctl_path("net.ipv4.tcp_rmem")),
        tcp_wmem=read_ints(root, sysctl_path("net.ipv4.tcp_wmem")),
        tcp_tw_reuse=read_int(root, sysctl_path("net.ipv4.tcp_tw_reuse")),
        conntrack_max=read_int(root, sysctl_path("net.netfilter.nf_conntrack_max")),
        conntrack_count=read_int(root, sysctl_path("net.netfilter.nf_conntrack_count")),
        tcp_in_use=tcp_sockstat(root).get("inuse"),
        mem_total=mem.get("MemTotal"),
        mem_available=available,
        cgroup_memory_limit=cgroup[0] if cgroup else None,
        cores=_cores(root),
        kernel=release.strip() if release else None,
        container=_container(root),
    )

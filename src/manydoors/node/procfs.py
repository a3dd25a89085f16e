"""The one reader of ``/proc`` (and ``/sys``): a process's memory, fds, CPU, limits, and
the machine-wide files the doctor, the supervisor, the load generator and the benchmarks
look at.

Every reader takes ``root`` (``"/"`` on a real machine) and only opens files below it,
so tests hand in a fake tree built in a temporary directory; a process is ``pid``, a
number or ``"self"``. A file that is missing or unreadable gives ``None`` (or an empty
result): a process that exited between two readings, a kernel without conntrack or a
container that hides ``/proc/slabinfo`` are normal, not errors.

The workers import this module in the fork server's preload: it imports only ``os``
and ``resource``, which they have already.
"""

from __future__ import annotations

import os
import resource
from typing import Final

StrPath = str | os.PathLike[str]
Pid = int | str  # a process id, or "self"

PAGE: Final = resource.getpagesize()
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")  # the unit of the CPU times in /proc/PID/stat


def _path(root: StrPath, rel: str) -> str:
    return os.path.join(os.fspath(root), rel)


def read_text(root: StrPath, rel: str) -> str | None:
    """The text of ``root/rel``, or None when it cannot be read."""
    try:
        with open(_path(root, rel), errors="replace") as f:
            return f.read()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None


def read_ints(root: StrPath, rel: str) -> tuple[int, ...] | None:
    """A file of whitespace-separated integers (most of /proc/sys)."""
    text = read_text(root, rel)
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split())
    except ValueError:
        return None
    return values or None


def read_int(root: StrPath, rel: str) -> int | None:
    """The first integer of ``root/rel``."""
    values = read_ints(root, rel)
    return values[0] if values else None


def sysctl_path(key: str) -> str:
    """``net.core.somaxconn`` -> ``proc/sys/net/core/somaxconn`` (relative to a root)."""
    return "proc/sys/" + key.replace(".", "/")


def sysctl(key: str, root: StrPath = "/") -> tuple[int, ...] | None:
    """The integers of a sysctl, e.g. ``sysctl("net.ipv4.tcp_mem")``."""
    return read_ints(root, sysctl_path(key))


# --- one process -----------------------------------------------------------------------


def pids(root: StrPath = "/") -> list[int]:
    """Every process id in ``root/proc``, lowest first."""
    try:
        entries = os.listdir(_path(root, "proc"))
    except OSError:
        return []
    return sorted(int(e) for e in entries if e.isdigit())


def open_fds(pid: Pid = "self", root: StrPath = "/") -> int | None:
    """How many fds ``pid`` has open (the listing itself holds one while it runs).

    Costs milliseconds at 20,000 fds: not for a path that runs per connection.
    """
    try:
        return len(os.listdir(_path(root, f"proc/{pid}/fd")))
    except OSError:
        return None


def rss(pid: Pid = "self", root: StrPath = "/") -> int | None:
    """Resident set size of ``pid`` in bytes (``/proc/PID/statm``, as VmRSS)."""
    text = read_text(root, f"proc/{pid}/statm")
    try:
        return int(text.split()[1]) * PAGE if text else None
    except (IndexError, ValueError):
        return None


def rss_pss(pid: Pid = "self", root: StrPath = "/") -> tuple[int, int] | None:
    """(RSS, PSS) of ``pid`` in bytes from ``/proc/PID/smaps_rollup``.

    PSS shares each page among the processes that map it: forked workers share the
    interpreter's pages, so their PSS is what one more worker really costs.
    """
    text = read_text(root, f"proc/{pid}/smaps_rollup")
    if text is None:
        return None
    found = {"Rss:": 0, "Pss:": 0}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in found:
            found[name] = int(rest.split()[0]) * 1024
    return found["Rss:"], found["Pss:"]


def mappings(pid: Pid = "self", root: StrPath = "/") -> int | None:
    """The number of memory mappings of ``pid`` (lines of ``/proc/PID/maps``)."""
    text = read_text(root, f"proc/{pid}/maps")
    return None if text is None else len(text.splitlines())


def stat(pid: Pid = "self", root: StrPath = "/") -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (state) on: [0] state, [1] ppid, [11] utime,
    [12] stime, [19] start time (clock ticks since boot), as in proc(5) minus 3."""
    text = read_text(root, f"proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ")".
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: Pid = "self", root: StrPath = "/") -> float | None:
    """User + system CPU time of ``pid`` (all its threads), in seconds."""
    fields = stat(pid, root)
    if fields is None or len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def started(pid: Pid, root: StrPath = "/") -> int | None:
    """The start time of ``pid`` in clock ticks since boot: tells a reused pid apart."""
    fields = stat(pid, root)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def children(pid: Pid, root: StrPath = "/") -> list[int]:
    """The child processes of ``pid`` (of all its threads)."""
    try:
        tasks = os.listdir(_path(root, f"proc/{pid}/task"))
    except OSError:
        return []
    out: list[int] = []
    for task in tasks:
        text = read_text(root, f"proc/{pid}/task/{task}/children")
        out.extend(int(c) for c in (text or "").split())
    return out


def parse_limits_file(text: str) -> tuple[int, int] | None:
    """Soft and hard "Max open files" from a /proc/PID/limits text."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files") :].split()
            try:
                return _limit_value(fields[0]), _limit_value(fields[1])
            except (IndexError, ValueError):
                return None
    return None


def _limit_value(text: str) -> int:
    return resource.RLIM_INFINITY if text == "unlimited" else int(text)


def nofile(pid: Pid = "self", root: StrPath = "/") -> tuple[int, int] | None:
    """(soft, hard) RLIMIT_NOFILE of ``pid``, from ``/proc/PID/limits``."""
    return parse_limits_file(read_text(root, f"proc/{pid}/limits") or "")


# --- the machine -----------------------------------------------------------------------


def meminfo(root: StrPath = "/") -> dict[str, int]:
    """/proc/meminfo in bytes (counts without a unit, such as HugePages_Total, as they are)."""
    out: dict[str, int] = {}
    for line in (read_text(root, "proc/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def tcp_sockstat(root: StrPath = "/") -> dict[str, int]:
    """The ``TCP:`` line of /proc/net/sockstat: inuse, orphan, tw, alloc, mem (pages)."""
    for line in (read_text(root, "proc/net/sockstat") or "").splitlines():
        fields = line.split()
        if fields[:1] == ["TCP:"]:
            pairs = zip(fields[1::2], fields[2::2], strict=False)
            return {name: int(value) for name, value in pairs if value.isdigit()}
    return {}


def loadavg(root: StrPath = "/") -> list[float] | None:
    """The 1, 5 and 15 minute load averages."""
    text = read_text(root, "proc/loadavg")
    try:
        return [float(x) for x in text.split()[:3]] if text else None
    except ValueError:
        return None

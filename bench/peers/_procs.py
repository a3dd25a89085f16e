"""The processes of a server under test, from /proc: its tree, memory, CPU and fds."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from _common import rss_pss

CLK_TCK = os.sysconf("SC_CLK_TCK")
FD_MARGIN = 32  # spare fds per process when a peer is asked for what it can hold


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                children.setdefault(int(_stat(int(name))[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def started(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        return int(_stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Usage:
    rss: int = 0
    pss: int = 0
    cpu_s: float = 0.0
    processes: int = 0


def usage(pids: list[int]) -> Usage:
    u = Usage()
    for pid in pids:
        try:
            rss, pss = rss_pss(pid)
            fields = _stat(pid)
        except OSError:
            continue  # it exited between the listing and the read
        u.rss += rss
        u.pss += pss
        u.cpu_s += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        u.processes += 1
    return u


def nofile(pid: int) -> int:
    """The soft RLIMIT_NOFILE of ``pid`` (Node raises its own to the hard limit)."""
    with open(f"/proc/{pid}/limits") as f:
        return int(next(line for line in f if line.startswith("Max open files")).split()[3])


def fd_room(pid: int) -> int:
    """Connections ``pid`` can still accept: its fd limit - open fds - a margin."""
    return nofile(pid) - len(os.listdir(f"/proc/{pid}/fd")) - FD_MARGIN


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


class Reaper:
    """Remembers the processes of a tree it was shown, to kill what outlives the root."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}

    def look(self) -> list[int]:
        pids = tree(self.root)
        for pid in pids:
            start = started(pid)
            if start is not None:
                self.seen.setdefault(pid, start)
        return pids

    def kill_leftovers(self) -> list[int]:
        killed = []
        for pid, start in self.seen.items():
            if started(pid) == start:  # still the process we started, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

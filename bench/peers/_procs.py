"""The processes of a server under test, from /proc: its tree, memory, CPU and fds."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from manydoors.node import procfs

FD_MARGIN = 32  # spare fds per process when a peer is asked for what it can hold


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for pid in procfs.pids():
        fields = procfs.stat(pid)
        if fields is not None:  # else it exited between the listing and the read
            children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class Usage:
    rss: int = 0
    pss: int = 0
    cpu_s: float = 0.0
    processes: int = 0


def usage(pids: list[int]) -> Usage:
    u = Usage()
    for pid in pids:
        memory, cpu = procfs.rss_pss(pid), procfs.cpu_seconds(pid)
        if memory is None or cpu is None:
            continue  # it exited between the listing and the read
        u.rss += memory[0]
        u.pss += memory[1]
        u.cpu_s += cpu
        u.processes += 1
    return u


def nofile(pid: int) -> int:
    """The soft RLIMIT_NOFILE of ``pid`` (Node raises its own to the hard limit)."""
    limits = procfs.nofile(pid)
    if limits is None:
        raise ProcessLookupError(f"no /proc/{pid}/limits: the process is gone")
    return limits[0]


def fd_room(pid: int) -> int:
    """Connections ``pid`` can still accept: its fd limit - open fds - a margin."""
    return nofile(pid) - (procfs.open_fds(pid) or 0) - FD_MARGIN


def open_fds(pids: list[int]) -> int:
    return sum(procfs.open_fds(pid) or 0 for pid in pids)


class Reaper:
    """Remembers the processes of a tree it was shown, to kill what outlives the root."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}

    def look(self) -> list[int]:
        pids = tree(self.root)
        for pid in pids:
            start = procfs.started(pid)
            if start is not None:
                self.seen.setdefault(pid, start)
        return pids

    def kill_leftovers(self) -> list[int]:
        killed = []
        for pid, start in self.seen.items():
            if procfs.started(pid) == start:  # still the process we started, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

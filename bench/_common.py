"""Shared by the bench scripts: start/stop a server, read its stats, describe the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from manydoors.apiclient import get_json as get
from manydoors.launch import serving
from manydoors.loadgen.pusherclient import PusherApp
from manydoors.node import procfs

# What tests and benchmarks share lives in tests/ (redisfix, certfix).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support.certfix import self_signed as self_signed  # re-exported for the bench scripts

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def machine() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    mem = procfs.meminfo()["MemTotal"]
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "fd_limit": [soft, hard],
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any]) -> None:
        self.proc = proc
        self.info = info
        self.api = info["api"]
        self.port = info["services"]["chat"]["port"]

    def stats(self) -> dict[str, Any]:
        return dict(get(self.api + "/api/stats"))

    def target(self, connections: int, rate: int | None = None) -> list[str]:
        """The load generator's flags that aim ``connections`` at this server."""
        flags = ["--target", f"127.0.0.1:{self.port}", "--connections", str(connections)]
        return flags + (["--rate", str(rate)] if rate is not None else [])

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["services"][0]["workers"]]


@contextlib.contextmanager
def server(*args: str) -> Iterator[Server]:
    """``manydoors serve`` on free ports; always stopped (SIGTERM, then SIGKILL)."""
    with serving("--port", "0", "--api-port", "0", *args, stderr=subprocess.DEVNULL) as (p, i):
        yield Server(p, i)


def load(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "manydoors", "load", *args])


# The Pusher app the benchmarks serve (protocol = "pusher") and drive.
PUSHER_APP = PusherApp(key="bench-key", id="1001", secret="bench-secret")


def pusher_flags() -> tuple[list[str], list[str]]:
    """(server flags, load flags) of a ``pusher`` service serving PUSHER_APP.

    The server's flags name a config file holding the app (apps have no flags) and set
    the single service's protocol; the load's speak Pusher to that app.
    """
    app = PUSHER_APP
    path = os.path.join(tempfile.mkdtemp(prefix="manydoors-bench-"), "pusher.toml")
    with open(path, "w") as f:
        f.write(f'[[app]]\nid = "{app.id}"\nkey = "{app.key}"\nsecret = "{app.secret}"\n')
    server_flags = ["--config", path, "--protocol", "pusher"]
    assert app.id is not None and app.secret is not None
    load_flags = ["--pusher", "--app-key", app.key, "--app-id", app.id, "--app-secret", app.secret]
    return server_flags, load_flags


class LoadWatch:
    """``manydoors load ARGS`` whose lines are echoed (after ``tag``, if given);
    ``ramp_done`` is set at its "ramp done: N ready" line (every connection has its
    answer: held and subscribed). A subclass reads more of each line in ``seen``."""

    def __init__(self, *args: str, tag: str = "", quiet: bool = False) -> None:
        cmd = [sys.executable, "-m", "manydoors", "load", *args]
        out = subprocess.DEVNULL if quiet else None
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        self.prefix = f"[{tag}] " if tag else ""
        self.ramp_done = threading.Event()
        self.ready: int | None = None
        self.thread = threading.Thread(target=self.echo, daemon=True)
        self.thread.start()

    def echo(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            print(self.prefix + line, file=sys.stderr, flush=True)
            if line.startswith("load: ramp done: "):
                self.ready = int(line.split()[3].replace(",", ""))
                self.ramp_done.set()
            else:
                self.seen(line)

    def seen(self, line: str) -> None:
        """Any other line of the load generator's."""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(10)


def rss_pss(pid: int) -> tuple[int, int]:
    """RSS and PSS of a process under measurement: it must still be there."""
    found = procfs.rss_pss(pid)
    if found is None:
        raise ProcessLookupError(f"no /proc/{pid}/smaps_rollup: the process is gone")
    return found


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def source() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes."""
    git = ["git", "-C", HERE]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "../src"], capture_output=True, text=True
    )
    return {"commit": head.stdout.strip() or None, "src_dirty": bool(dirty.stdout.strip())}


def save(name: str, result: dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path

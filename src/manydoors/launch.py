"""Run ``manydoors serve`` as a child process (for the demo and the benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any


class NotStarted(RuntimeError):
    """The server exited or did not become ready in time."""


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (the server drains), then SIGKILL of that pid if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(
    *args: str, ready_timeout: float = 120, stop_timeout: float = 60, **popen: Any
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Start ``manydoors serve ARGS``; yield the process and its ready-file JSON; stop it."""
    ready = os.path.join(tempfile.mkdtemp(prefix="manydoors-"), "ready.json")
    cmd = [sys.executable, "-m", "manydoors", "serve", "--ready-file", ready, *args]
    proc = subprocess.Popen(cmd, **popen)
    try:
        deadline = time.monotonic() + ready_timeout
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NotStarted(f"the server did not start: {' '.join(args)}")
            time.sleep(0.05)
        with open(ready) as f:
            yield proc, json.load(f)
    finally:
        stop(proc, stop_timeout)

"""``manydoors serve`` as a subprocess on port 0, and ``manydoors load`` runs against it.

The ``serve`` fixture (tests/live/conftest.py) starts servers with ``launch`` and stops
every one in its finalizer, even when the test fails: SIGTERM first (the server
drains), SIGKILL of that pid if it does not exit.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

from manydoors.launch import stop
from support.client import Client

READY_TIMEOUT = 60.0


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any], log: Path) -> None:
        self.proc = proc
        self.info = info
        self.log = log
        self.api: str = info["api"]

    def port(self, service: str = "chat") -> int:
        return int(self.info["services"][service]["port"])

    def http(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        req = urllib.request.Request(self.api + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        ctype = "json" if raw[:1] in (b"{", b"[") else "text"
        return status, json.loads(raw) if ctype == "json" else raw.decode()

    def target(self, connections: int, service: str = "chat") -> list[str]:
        """The load generator's flags that aim ``connections`` at this server."""
        return ["--target", f"127.0.0.1:{self.port(service)}", "--connections", str(connections)]

    def broadcasts(self, count: int) -> list[str]:
        """The load generator's flags that publish ``count`` timed broadcasts here."""
        return ["--api", self.api, "--broadcasts", str(count)]

    def publish(self, **body: Any) -> dict[str, Any]:
        status, answer = self.http("POST", "/api/publish", body)
        assert status == 202, answer
        return dict(answer)

    def stats(self) -> dict[str, Any]:
        status, answer = self.http("GET", "/api/stats")
        assert status == 200
        return dict(answer)

    def worker_pids(self, service: str = "chat") -> list[int | None]:
        svc = next(s for s in self.stats()["services"] if s["name"] == service)
        return [w["pid"] for w in svc["workers"]]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        stop(self.proc, timeout)
        return self.proc.returncode


def manydoors_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "manydoors", *args]


CHAT_ENV: Final = {
    "MANYDOORS_PUBLISH": "all",
    "MANYDOORS_ALLOW_SEND": "true",
    "MANYDOORS_PRESENCE": "true",
}


def launch(
    directory: Path,
    n: int,
    *args: str,
    config: str | None = None,
    env: dict[str, str] | None = None,
    chat: bool = True,
    nofile: int | None = None,
) -> Server:
    """Start ``manydoors serve`` with these flags (or TOML text); return once it is ready.

    Its ready file, log and config are ``directory/{ready,server,config}{n}.*``. The
    caller stops the server. ``chat``: the default namespace is a chat, as every test
    written before namespaces expects (clients may publish, send and list presence),
    through the environment, so a test's own env and flags still win; a test of the
    rights themselves passes ``chat=False`` and gets the public defaults. ``nofile``:
    the server's RLIMIT_NOFILE (soft and hard), to meet its fd limit with few fds.
    """
    chat_env = dict(CHAT_ENV) if chat else {}
    if config is not None:  # allow_send is per service: a file with services says it itself
        chat_env.pop("MANYDOORS_ALLOW_SEND", None)
    env = {**chat_env, **(env or {})}
    ready = directory / f"ready{n}.json"
    log = directory / f"server{n}.log"
    cmd = manydoors_cmd("serve", "--ready-file", str(ready), *args)
    if config is not None:
        cfg = directory / f"config{n}.toml"
        cfg.write_text(config)
        cmd += ["--config", str(cfg)]
    else:
        cmd += ["--port", "0", "--api-port", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=None if nofile is None else partial(_nofile, nofile),
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server not ready:\n{log.read_text()}")
        time.sleep(0.02)
    return Server(proc, json.loads(ready.read_text()), log)


def _nofile(limit: int) -> None:  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def run_load(
    *args: str, report: Path | None = None, timeout: float = 240
) -> tuple[int, str, dict[str, Any]]:
    """``manydoors load ARGS``: its exit code, stderr, and the JSON report if asked for."""
    cmd = manydoors_cmd("load", *args)
    if report is not None:
        cmd += ["--report", str(report)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    data = json.loads(report.read_text()) if report is not None and report.exists() else {}
    return result.returncode, result.stderr, data


def small(serve: Callable[..., Server], *flags: str, workers: int = 1, **kwargs: Any) -> Server:
    """A server of ``workers`` workers sized for 1,000 connections (not the default 100k)."""
    return serve("--workers", str(workers), "--max-connections", "1000", *flags, **kwargs)


class ApiPublisher(threading.Thread):
    """Publishes {"n": 0}, {"n": 1}, ... to ``channel`` through the API until halted."""

    def __init__(self, server: Server, every: float, channel: str = "news") -> None:
        super().__init__(daemon=True)
        self.server = server
        self.every = every
        self.channel = channel
        self.seqs: list[int] = []  # the seq the API gave message n
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                answer = self.server.publish(channel=self.channel, data={"n": len(self.seqs)})
                self.seqs.append(answer["seq"])
                self.halt.wait(self.every)
        except BaseException as exc:  # reported by the test, not lost with the thread
            self.error = exc


def spread(
    connect: Callable[..., Client], port: int, per_worker: int, workers: int
) -> dict[int, list[Client]]:
    """Connect until ``per_worker`` clients sit on each of ``workers`` workers."""
    by_worker: dict[int, list[Client]] = {}
    for _ in range(400):
        client = connect(port)
        group = by_worker.setdefault(client.worker, [])
        if len(group) < per_worker:
            group.append(client)
        else:
            client.close()
        if len(by_worker) >= workers and all(len(g) >= per_worker for g in by_worker.values()):
            return by_worker
    raise AssertionError(f"could not spread clients over {workers} workers: {by_worker.keys()}")

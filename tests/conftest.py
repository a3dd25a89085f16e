"""Real servers for end-to-end tests: ``manydoors serve`` as a subprocess on port 0.

Every server a test starts is stopped by the fixture's finalizer, even when the test
fails: SIGTERM first (the server drains), SIGKILL of that pid if it does not exit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from manydoors.launch import stop

READY_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


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


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``manydoors serve`` with the given flags (and optional TOML text)."""
    started: list[Server] = []

    def start(*args: str, config: str | None = None, env: dict[str, str] | None = None) -> Server:
        n = len(started)
        ready = tmp_path / f"ready{n}.json"
        log = tmp_path / f"server{n}.log"
        cmd = manydoors_cmd("serve", "--ready-file", str(ready), *args)
        if config is not None:
            cfg = tmp_path / f"config{n}.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        else:
            cmd += ["--port", "0", "--api-port", "0"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"server not ready:\n{log.read_text()}")
            time.sleep(0.02)
        server = Server(proc, json.loads(ready.read_text()), log)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


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


def small(serve: Callable[..., Server], *flags: str, workers: int = 1, **kwargs: Any) -> Server:
    """A server of ``workers`` workers sized for 1,000 connections (not the default 100k)."""
    return serve("--workers", str(workers), "--max-connections", "1000", *flags, **kwargs)


class Client:
    """A blocking NDJSON client: what a person with ``nc`` does, with timeouts."""

    def __init__(self, port: int, host: str = "127.0.0.1", welcome: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.welcome: dict[str, Any] = self.recv() if welcome else {}

    @property
    def worker(self) -> int:
        return int(self.welcome["worker"])

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("server closed the connection")
        return dict(json.loads(line))

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send an op with an id and return its ok/error, failing on anything else first."""
        self.send(message)
        event = self.recv()
        assert event.get("id") == message["id"], event
        return event

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Events up to and including the first that matches ``predicate``."""
        seen = []
        while True:
            event = self.recv()
            seen.append(event)
            if predicate(event):
                return seen

    def closed(self) -> bool:
        """True once the server has closed the connection (after reading what is left)."""
        try:
            while self.file.readline():
                pass
        except (ConnectionResetError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def connect(port: int, **kwargs: Any) -> Client:
        client = Client(port, **kwargs)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


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

"""Real Redis for tests: a standalone ``redis-server`` and a three-node cluster.

The ``redis_server`` and ``redis_cluster`` fixtures (tests/live/conftest.py) start
these; bench/ uses ``RedisServer`` directly.

Every server is a subprocess on 127.0.0.1 with a port picked by binding port 0, no
persistence, and its files in a private temporary directory. Finalizers always stop
what they started. Readiness is polled with a deadline over a raw socket, so the
helpers do not depend on the client library they are there to test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest
import redis

from manydoors.launch import stop

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 5
CLUSTER_BUS_OFFSET = 10000
INSTALL_HINT = "apt-get install -y redis-server"


def redis_missing_reason() -> str | None:
    """Why real Redis tests cannot run here, or None when ``redis-server`` is installed."""
    if shutil.which("redis-server") is None:
        return f"redis-server is not installed ({INSTALL_HINT})"
    return None


def need_redis() -> None:
    """Skip the calling test without ``redis-server``; fail instead when running in CI."""
    reason = redis_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET <= 65535 and _port_is_free(port + CLUSTER_BUS_OFFSET):
            return port


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command over a fresh socket; the raw reply (a simple or bulk string)."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        if reply.startswith(b"$"):
            head, _, body = reply.partition(b"\r\n")
            size = int(head[1:])
            while len(body) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            return body[:size]
        return reply


def _answers_ping(port: int) -> bool:
    try:
        return _command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``start()`` again after ``stop()``/``kill()`` reuses the port.

    The first ``start()`` picks a free port (retrying with a new one if Redis cannot
    bind it) unless ``port`` is given.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        directory: Path | None = None,
    ) -> None:
        self.extra_args = list(extra_args)
        self._port = port
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="redisfix-")) if directory is None else directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("redis-server is not running")
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.dir / f"redis-{self.port}.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start redis-server and return once it answers PING."""
        if self.running():
            raise RuntimeError(f"redis-server already running as pid {self.pid}")
        if self._port is not None:
            self._launch(self._port)
            return self
        failure = ""
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            try:
                self._launch(port)
            except _BindFailed as exc:
                failure = str(exc)
                continue
            self._port = port
            return self
        raise AssertionError(f"redis-server did not start in {PORT_ATTEMPTS} attempts:\n{failure}")

    def _launch(self, port: int) -> None:
        cmd = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        log = self.dir / f"redis-{port}.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while not _answers_ping(port):
            if self.proc.poll() is not None:
                self.proc = None
                text = log.read_text(errors="replace")
                raise _BindFailed(f"redis-server on port {port} exited:\n{text}")
            if time.monotonic() > deadline:
                self.kill()
                text = log.read_text(errors="replace")
                raise AssertionError(f"redis-server on port {port} not ready:\n{text}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s; wait for it either way."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop(proc, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL right away: Redis crashes with no chance to say goodbye to clients."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def close(self) -> None:
        """Stop the server and remove its directory (if this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, **kwargs: object) -> redis.Redis:
        """A synchronous client for assertions; the caller closes it."""
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def __enter__(self) -> RedisServer:
        return self if self.running() else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _BindFailed(Exception):
    """redis-server exited during startup (most likely the port was taken meanwhile)."""


class RedisCluster:
    """Three master nodes with all 16384 slots, made by ``redis-cli --cluster create``."""

    def __init__(self, nodes: int = 3) -> None:
        self.size = nodes
        self.dir = Path(tempfile.mkdtemp(prefix="redisfix-cluster-"))
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> RedisCluster:
        """Start the nodes, join them, and wait until every node says ``cluster_state:ok``."""
        if self.nodes:
            raise RuntimeError("RedisCluster already started")
        try:
            self._start_all_nodes()
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all_nodes(self) -> None:
        failure = ""
        for _ in range(PORT_ATTEMPTS):
            try:
                self._start_nodes()
            except _BindFailed as exc:
                failure = str(exc)
                self._stop_nodes()
                continue
            return
        raise AssertionError(f"cluster nodes did not start in {PORT_ATTEMPTS} attempts:\n{failure}")

    def _start_nodes(self) -> None:
        for _ in range(self.size):
            port = _cluster_port()
            node = RedisServer(
                [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "2000",
                ],
                port=port,
                directory=self.dir,
            )  # fmt: skip
            self.nodes.append(node)
            node.start()

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        cmd = ["redis-cli", "--cluster", "create", *addresses]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(
                f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(self._node_ok(port) for port in self.ports):
            if time.monotonic() > deadline:
                states = {port: self._node_info(port) for port in self.ports}
                raise AssertionError(f"cluster not ok after {READY_TIMEOUT} s: {states}")
            time.sleep(0.02)

    @staticmethod
    def _node_info(port: int) -> str:
        try:
            return _command(port, "CLUSTER", "INFO").decode(errors="replace")
        except OSError as exc:
            return repr(exc)

    def _node_ok(self, port: int) -> bool:
        return "cluster_state:ok" in self._node_info(port)

    def _stop_nodes(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nodes = []
        for conf in self.dir.glob("nodes-*.conf"):
            conf.unlink()

    def stop(self) -> None:
        """Kill every node and remove the cluster's directory."""
        self._stop_nodes()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, **kwargs: object) -> redis.RedisCluster:
        """A synchronous cluster client for assertions; the caller closes it."""
        return _ClosingRedisCluster.from_url(self.url, **kwargs)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ClosingRedisCluster(redis.RedisCluster):
    """``close()`` also disconnects the node pools (redis-py 8.1 leaves sockets open)."""

    def close(self) -> None:
        if getattr(self, "nodes_manager", None) is not None:
            self.disconnect_connection_pools()
        super().close()

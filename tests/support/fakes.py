"""Fakes for the worker's parts: a transport and a broker link that record what they get.

With these a test builds a real ``Worker`` (no process, no socket, no loop running
its ``run``), accepts connections through its admission and feeds them bytes, as
uvloop would.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
from collections.abc import Callable, Coroutine
from typing import Any, cast

from manydoors.config import AuthConfig, HooksConfig, NamespaceConfig, ServiceConfig
from manydoors.namespaces import Namespaces
from manydoors.protocol.ipc import Kind
from manydoors.server.connection import Connection
from manydoors.server.stats import StatsTable
from manydoors.server.worker import Worker, WorkerSpec


class FakeTransport:
    """What a connection writes, and whether it was closed, paused or aborted."""

    def __init__(self, peer: tuple[str, int] = ("10.0.0.1", 40000)) -> None:
        self.peer = peer
        self.out: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.paused = False
        self.high: int | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 7000)}.get(name, default)

    def data(self) -> bytes:
        return b"".join(self.out)

    def events(self) -> list[dict[str, Any]]:
        """The NDJSON events written so far (TCP wire)."""
        return [json.loads(line) for line in self.data().splitlines() if line]

    def take(self) -> list[dict[str, Any]]:
        """The events written since the last take."""
        events = self.events()
        self.out.clear()
        return events


class FakeLink:
    """The worker's side of the broker link: frames sent, flush hooks run on demand."""

    def __init__(self) -> None:
        self.frames: list[tuple[Kind, str, bytes]] = []
        self.hooks: list[Callable[[], None]] = []

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None:
        self.frames.append((kind, key, payload))

    def at_flush(self, hook: Callable[[], None]) -> None:
        self.hooks.append(hook)

    def flush(self) -> None:
        hooks, self.hooks = self.hooks, []
        for hook in hooks:
            hook()

    def kinds(self) -> list[Kind]:
        return [kind for kind, _, _ in self.frames]


def make_worker(
    auth: AuthConfig | None = None,
    rows: int = 1,
    fd_limit: int = 1000,
    channels: NamespaceConfig | None = None,
    namespaces: tuple[NamespaceConfig, ...] = (),
    events: frozenset[str] = frozenset(),
    hooks: HooksConfig | None = None,
    **service: Any,
) -> tuple[Worker, FakeLink]:
    """A real Worker over a private stats table and a fake link.

    ``channels`` is the default namespace (defaults: clients may subscribe, not publish).
    """
    svc = ServiceConfig(**service)
    spaces = Namespaces(channels or NamespaceConfig(), namespaces)
    spec = WorkerSpec(
        svc,
        0,
        rows,
        fd_limit,
        10,
        1.0,
        auth or AuthConfig(),
        events=events,
        namespaces=spaces,
        hooks=hooks or HooksConfig(),
    )
    buffer = (ctypes.c_ubyte * (StatsTable.size(rows) * 8))()
    worker = Worker(spec, StatsTable(memoryview(buffer), rows))
    link = FakeLink()
    worker.sessions.link = worker.sessions.members.link = link
    return worker, link


class FakeBackend:
    """The backend of the proxy hooks, in place of the HTTP client: records each call
    as (hook, JSON body) and answers with ``answer(hook, body)``: (status, JSON-able
    body), or an exception to raise (OSError, TimeoutError), after ``delay`` seconds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.delay = 0.0
        self.answer: Callable[[str, dict[str, Any]], Any] = lambda hook, body: (200, {})
        self.closed = False

    async def post(self, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        hook = url.rsplit("/", 1)[1]
        got = json.loads(body)
        self.calls.append((hook, got))
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.answer(hook, got)
        if isinstance(answer, BaseException):
            raise answer
        status, out = answer
        return status, out if isinstance(out, bytes) else json.dumps(out).encode()

    async def close(self) -> None:
        self.closed = True


HOOKS = HooksConfig(
    connect_url="http://backend/connect",
    subscribe_url="http://backend/subscribe",
    publish_url="http://backend/publish",
    timeout=0.5,
)


def with_backend(worker: Worker) -> FakeBackend:
    """Put a fake backend behind the worker's proxies."""
    backend = FakeBackend()
    assert worker.sessions.proxies is not None, "make the worker with hooks=HOOKS"
    worker.sessions.proxies.client = backend
    return backend


async def settle(worker: Worker) -> None:
    """Wait until every call to the backend has been answered and acted on."""
    proxies = worker.sessions.proxies
    while proxies is not None and proxies.tasks:
        await asyncio.gather(*list(proxies.tasks))


OPEN = NamespaceConfig(publish="all", presence=True)  # a chat: everyone may publish and look


def connect(
    worker: Worker, peer: tuple[str, int] = ("10.0.0.1", 40000)
) -> tuple[Connection, FakeTransport]:
    """Accept one connection as uvloop would: the factory, then connection_made, then
    a loop iteration with nothing read from it (a welcome held for its first acks
    goes out unless the worker waits on the broker: server/welcome.py)."""
    conn, transport = accept(worker, peer)
    next_iteration(worker)
    return conn, transport


def next_iteration(worker: Worker) -> None:
    """What the worker's loop does at its next iteration: the held welcomes settle."""
    if worker.welcomes is not None:
        worker.welcomes.settle()


def accept(
    worker: Worker, peer: tuple[str, int] = ("10.0.0.1", 40000)
) -> tuple[Connection, FakeTransport]:
    """The factory and connection_made only: the loop iteration is the test's."""
    conn = cast(Connection, worker.admission.accept())
    transport = FakeTransport(peer)
    conn.connection_made(cast(asyncio.Transport, transport))
    return conn, transport


def sync_all(worker: Worker, link: FakeLink) -> None:
    """Answer the worker's SYNCs as the broker would: what waited on them goes out
    (acks, and the welcomes held with them: server/welcome.py)."""
    link.flush()
    while worker.sessions.waiting:
        worker.on_frame(link, Kind.SYNCED, "", b"")  # type: ignore[arg-type]


def counter(worker: Worker, name: str) -> int:
    """One counter of the worker's stats row."""
    return worker.counters.table.row(worker.spec.slot)[name]


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test function in a fresh event loop (closes use loop timers)."""

    def run() -> None:
        asyncio.run(test())

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run

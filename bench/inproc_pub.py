"""The per-message cost of a client pub, in one process (no sockets): worker and router.

    ./run bench inproc_pub [--messages 200000]

A real Worker (fake transport, fake link) takes pub lines through data_received, and a
Router over the default backplane takes PUB frames for a channel one link holds: the
two halves of a 1:1 message's CPU outside the kernel. Run it in two checkouts
(PYTHONPATH=<checkout>/src) to compare commits. Prints microseconds per message.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import sys
import time

from manydoors.broker.factory import make_broker
from manydoors.config import AuthConfig, Config, NamespaceConfig, ServiceConfig
from manydoors.namespaces import Namespaces
from manydoors.protocol.ipc import Kind
from manydoors.server.stats import StatsTable
from manydoors.server.worker import Worker, WorkerSpec


class Sink:
    """A transport and a link that take everything and keep nothing."""

    def write(self, data: bytes) -> None: ...
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.0.0.1", 1)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None: ...
    def send_frame(self, frame: bytes) -> None: ...
    def at_flush(self, hook: object) -> None: ...


def worker_us(messages: int) -> float:
    svc = ServiceConfig(max_messages_per_second=0, max_bytes_per_second=0)
    spaces = Namespaces(NamespaceConfig(publish="all"))
    spec = WorkerSpec(svc, 0, 1, 1000, 10, 1.0, AuthConfig(), namespaces=spaces)
    buffer = (ctypes.c_ubyte * (StatsTable.size(1) * 8))()
    worker = Worker(spec, StatsTable(memoryview(buffer), 1))
    worker.sessions.link = worker.sessions.members.link = Sink()  # type: ignore[assignment]
    conn = worker.admission.accept()
    conn.connection_made(Sink())  # type: ignore[arg-type]
    chunk = b'{"op":"pub","channel":"rate","data":{"n":1}}\n' * 100
    start = time.perf_counter()
    for _ in range(messages // 100):
        conn.data_received(chunk)  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / messages * 1e6


def router_us(messages: int) -> float:
    router = make_broker(Config())
    publisher, subscriber = Sink(), Sink()
    router.attach(publisher)  # type: ignore[arg-type]
    router.attach(subscriber)  # type: ignore[arg-type]
    router.on_frame(subscriber, Kind.SUB, "rate", b"")  # type: ignore[arg-type]
    payload = b'[null,{"n":1}]'
    start = time.perf_counter()
    for _ in range(messages):
        router.on_frame(publisher, Kind.PUB, "rate", payload)  # type: ignore[arg-type]
    return (time.perf_counter() - start) / messages * 1e6


async def measure(messages: int) -> tuple[float, float]:
    return worker_us(messages), router_us(messages)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=200_000)
    args = p.parse_args()
    worker, router = asyncio.run(measure(args.messages))
    print(f"worker pub {worker:.2f} us, router PUB frame {router:.2f} us", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A join storm: N users join one channel of a namespace with join_leave on.

    ./run bench join_storm [--users 10000] [--workers 2] [--concurrency 500]

Every subscriber hears every join after its own (and its own), so N joins cost about
N (N + 1) / 2 deliveries: this is the price of ``join_leave`` on a big channel, and why
it is off by default. The bench starts ``manydoors serve --join-leave`` (the default
namespace), opens N connections from this process (each sends hello and sub at once,
without ids, so every line after the welcome is a join), and waits until the lines
stop coming. It reports the time from the first connect to the last join received,
the joins delivered (and against N (N + 1) / 2), deliveries per second, and the
server's CPU (all its processes) for the storm. Writes bench/results/join_storm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from _common import machine, save, server, source
from manydoors.node import procfs


class Counter(asyncio.Protocol):
    """Counts the lines a connection receives (a chunk's newlines, no parsing)."""

    lines = 0  # all connections together
    last = 0.0  # when the last line arrived

    def __init__(self, hello: bytes) -> None:
        self.hello = hello

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.hello)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        Counter.lines += data.count(b"\n")
        Counter.last = time.monotonic()


def cpu_of(pids: list[int]) -> float:
    return sum(procfs.cpu_seconds(pid) or 0.0 for pid in pids)


async def storm(port: int, users: int, concurrency: int, quiet: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    transports: list[asyncio.BaseTransport] = []

    async def one(i: int) -> None:
        hello = b'{"op":"hello","user":"u%d"}\n{"op":"sub","channel":"storm"}\n' % i
        async with gate:
            transport, _ = await loop.create_connection(lambda: Counter(hello), "127.0.0.1", port)
            transports.append(transport)

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(users)))
    connected = time.monotonic() - start
    expected = users * (users + 1) // 2 + users  # joins, and a welcome each
    while True:  # until the lines stop (or all expected have come)
        seen = Counter.lines
        await asyncio.sleep(quiet)
        if Counter.lines == seen or Counter.lines >= expected:
            break
    for transport in transports:
        transport.close()
    joins = Counter.lines - users
    seconds = Counter.last - start
    return {
        "users": users,
        "connected_s": round(connected, 2),
        "time_to_last_join_s": round(seconds, 2),
        "joins_delivered": joins,
        "joins_expected": users * (users + 1) // 2,
        "deliveries_per_s": round(joins / seconds) if seconds > 0 else None,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=500, help="connects in flight")
    p.add_argument("--quiet", type=float, default=3.0, help="seconds without a line: done")
    p.add_argument("--name", default="join_storm")
    args = p.parse_args()
    flags = [
        "--join-leave",
        "--workers",
        str(args.workers),
        "--max-connections",
        str(args.users + 100),
        "--max-messages-per-second",
        "0",
        "--ping-interval",
        "0",
    ]
    with server(*flags) as srv:
        pids = [srv.proc.pid, *srv.worker_pids()]
        before = cpu_of(pids)
        figures = asyncio.run(storm(srv.port, args.users, args.concurrency, args.quiet))
        figures["server_cpu_s"] = round(cpu_of(pids) - before, 2)
        stats = srv.stats()
        figures["server_messages_out"] = stats["messages_out"]
    result = {"machine": machine(), "source": source(), "settings": vars(args), **figures}
    print(
        f"{args.users:,} users joined in {figures['time_to_last_join_s']} s: "
        f"{figures['joins_delivered']:,} join events delivered "
        f"(N(N+1)/2 = {figures['joins_expected']:,}), {figures['deliveries_per_s']:,}/s, "
        f"server CPU {figures['server_cpu_s']} s",
        file=sys.stderr,
    )
    print(f"saved {save(args.name, result)}", file=sys.stderr)
    return 0 if figures["joins_delivered"] >= figures["joins_expected"] * 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())

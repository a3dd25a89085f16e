"""A publish flood against one worker: how long its loop stalls, and the flood's pace.

    ./run bench link_flood [--subscribers 2000] [--messages 500] [--runs 3]

One worker; the load generator holds ``--subscribers`` connections subscribed to one
channel. A publisher connection writes ``--messages`` pubs in one write: the router
sends the deliveries back on the worker's broker link in one batch, which the worker
reads 256 KB at a time (issue 18: all of a read's deliveries were handled in one loop
callback). Meanwhile a probe connection pings every 2 ms and a new connection is
opened every 20 ms: the worst ping round trip is the worst loop stall the clients
saw, the worst time to a welcome is how long an accept waited. The flood's time is
from the publisher's write until the worker's messages_out has grown by every
delivery. Writes bench/results/link_flood.json (--results NAME: NAME.json).

Run it on another checkout with PYTHONPATH=<checkout>/src to compare commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from _common import LoadWatch, machine, save, server, source
from manydoors.node import procfs

PING_EVERY = 0.002
DOOR_EVERY = 0.02


def out_count(srv: Any) -> int:
    return int(srv.stats()["messages_out"])


def worker_cpu(srv: Any) -> float:
    """CPU seconds of the (one) worker so far: the flood's cost, whatever else runs."""
    return procfs.cpu_seconds(srv.worker_pids()[0]) or 0.0


async def flood_once(srv: Any, subscribers: int, messages: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = "127.0.0.1", srv.port
    probe_r, probe_w = await asyncio.open_connection(host, port)
    await probe_r.readline()  # welcome
    pub_r, pub_w = await asyncio.open_connection(host, port)
    await pub_r.readline()
    sent: dict[int, float] = {}
    rtts: list[tuple[float, float]] = []  # (when sent, round trip)
    doors: list[float] = []
    stop = asyncio.Event()

    async def pinger() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            sent[i] = loop.time()
            probe_w.write(b'{"op":"ping","id":%d}\n' % i)
            await asyncio.sleep(PING_EVERY)

    async def ponger() -> None:
        while True:
            line = await probe_r.readline()
            if not line:
                return
            got = json.loads(line)
            if got.get("ev") == "pong":
                t0 = sent.pop(got["id"])
                rtts.append((t0, loop.time() - t0))

    async def door() -> None:
        while not stop.is_set():
            t0 = loop.time()
            r, w = await asyncio.open_connection(host, port)
            await r.readline()
            doors.append(loop.time() - t0)
            w.close()
            await asyncio.sleep(DOOR_EVERY)

    tasks = [asyncio.ensure_future(f()) for f in (pinger, ponger, door)]
    await asyncio.sleep(0.5)  # quiet: the baseline round trip
    before = await asyncio.to_thread(out_count, srv)
    cpu_before = await asyncio.to_thread(worker_cpu, srv)
    load_before = procfs.loadavg()
    want = before + subscribers * messages
    lines = b"".join(b'{"op":"pub","channel":"flood","data":%d}\n' % i for i in range(messages))
    start = loop.time()
    pub_w.write(lines)
    while await asyncio.to_thread(out_count, srv) < want:
        if loop.time() - start > 300:
            raise RuntimeError("the flood did not end in 300 s")
        await asyncio.sleep(0.05)
    took = loop.time() - start
    cpu = await asyncio.to_thread(worker_cpu, srv) - cpu_before
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in (probe_w, pub_w):
        w.close()
    during = sorted(rtt for t0, rtt in rtts if start <= t0 <= start + took)
    quiet = sorted(rtt for t0, rtt in rtts if t0 < start)
    pending = [loop.time() - t0 for t0 in sent.values() if t0 >= start]  # never answered

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else None

    return {
        "flood_s": round(took, 2),
        "deliveries_per_s": round(subscribers * messages / took),
        # includes the probe's pings and the doors' accepts, a few hundred of each
        "worker_cpu_s_per_1m_deliveries": round(cpu / (subscribers * messages) * 1e6, 2),
        "load_average_1m": load_before[0] if load_before else None,
        "ping_ms_quiet_p50": pct(quiet, 0.5),
        "ping_ms_flood_p50": pct(during, 0.5),
        "ping_ms_flood_p99": pct(during, 0.99),
        "ping_ms_flood_max": pct(during, 1.0),
        "pings_during_flood": len(during),
        "pings_unanswered": len(pending),
        "welcome_ms_max": round(max(doors) * 1000, 1) if doors else None,
        "doors_opened": len(doors),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--subscribers", type=int, default=2000)
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--results", metavar="NAME", default="link_flood")
    args = p.parse_args()
    flags = [
        "--workers", "1",
        "--max-connections", str(args.subscribers + 1000),
        "--ping-interval", "0",
        "--max-messages-per-second", "0",
        "--max-bytes-per-second", "0",
        "--publish", "all",
        "--max-outbound-bytes", str(256 * 2**20),
    ]  # fmt: skip
    runs = []
    with server(*flags) as srv:
        gen = LoadWatch(
            *srv.target(args.subscribers, 5000), "--subscribe", "flood", "--hold", "3600"
        )
        try:
            if not gen.ramp_done.wait(120):
                raise RuntimeError("the subscribers were not all in after 120 s")
            for _ in range(args.runs):
                run = asyncio.run(flood_once(srv, args.subscribers, args.messages))
                print(json.dumps(run), file=sys.stderr)
                runs.append(run)
                time.sleep(1)
        finally:
            gen.stop()
    result = {
        "machine": machine(),
        "source": source(),
        "subscribers": args.subscribers,
        "messages": args.messages,
        "runs": runs,
        "worst_ping_ms": max(r["ping_ms_flood_max"] or 0 for r in runs),
        "worst_welcome_ms": max(r["welcome_ms_max"] or 0 for r in runs),
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save(args.results, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""User-space memory per idle connection (hello'd, subscribed to one channel).

    ./run bench memory [--connections 40000] [--workers 2] [--ws] [--tls] [--results NAME]

Measures each worker's RSS and PSS at start (the baseline), opens the connections with
the load generator (each says hello and subscribes), and divides the workers' RSS
growth by the connections they hold. Writes bench/results/memory.json (memory-ws,
memory-tls, memory-ws-tls with the flags; --results names it instead). --tls serves
with a fresh self-signed certificate and has the load generator connect over TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from _common import load, machine, rss_pss, save, self_signed, server, wait_until
from manydoors.node import procfs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=40_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ws", action="store_true", help="a websocket service, driven over WebSocket")
    p.add_argument("--tls", action="store_true", help="TLS (self-signed certificate)")
    p.add_argument("--results", metavar="NAME", help="bench/results/NAME.json")
    args = p.parse_args()
    n = args.connections
    proto = ["--protocol", "websocket"] if args.ws else []
    tls: list[str] = []
    if args.tls:
        cert, key = self_signed(tempfile.mkdtemp(prefix="manydoors-bench-"))
        tls = ["--tls-cert", cert, "--tls-key", key]
    # No heartbeat: a pong would count as a message in, and a TLS ramp outlasts the
    # default 25 s ping interval.
    flags = ["--workers", str(args.workers), "--max-connections", str(n), "--ping-interval", "0"]
    with server(*flags, *proto, *tls) as srv:
        pids = srv.worker_pids()
        base = {pid: rss_pss(pid) for pid in pids}
        maps = {pid: procfs.mappings(pid) or 0 for pid in pids}
        gen = load(
            *(["--ws"] if args.ws else []),
            *(["--tls"] if args.tls else []),
            *srv.target(n, 10_000),
            "--subscribe",
            "veg",
            "--hold",
            "30",
        )
        try:
            # hello + sub = 2 messages in per connection; then let the loop settle.
            wait_until(lambda: srv.stats()["messages_in"] >= 2 * n, 300, "all subscribed")
            stats = srv.stats()
            held = {w["pid"]: w["connections"] for w in stats["services"][0]["workers"]}
            after = {pid: rss_pss(pid) for pid in pids}
            maps_after = {pid: procfs.mappings(pid) or 0 for pid in pids}
        finally:
            gen.terminate()
            gen.wait()
    growth = sum(after[pid][0] - base[pid][0] for pid in pids)
    result = {
        "machine": machine(),
        "connections": sum(held.values()),
        "workers": len(pids),
        "baseline_rss_bytes": [base[pid][0] for pid in pids],
        "baseline_pss_bytes": [base[pid][1] for pid in pids],
        "per_connection_bytes": round(growth / max(1, sum(held.values())), 1),
        "per_worker": [
            {
                "pid": pid,
                "connections": held[pid],
                "rss_before": base[pid][0],
                "rss_after": after[pid][0],
                "per_connection": round((after[pid][0] - base[pid][0]) / max(1, held[pid]), 1),
                # Memory mappings (vm.max_map_count, 65530 by default, caps them)
                "maps_before": maps[pid],
                "maps_after": maps_after[pid],
            }
            for pid in pids
        ],
    }
    print(json.dumps(result, indent=1))
    result["protocol"] = "websocket" if args.ws else "tcp"
    result["tls"] = args.tls
    name = args.results or "-".join(
        ["memory", *(["ws"] if args.ws else []), *(["tls"] if args.tls else [])]
    )
    print(f"saved {save(name, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

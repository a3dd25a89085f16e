"""User-space memory per idle connection (hello'd, subscribed to one channel).

    ./run bench memory [--connections 40000] [--workers 2] [--ws | --pusher] [--tls]
                       [--results NAME]

Measures each worker's RSS and PSS at start (the baseline), opens the connections with
the load generator (each says hello and subscribes), and divides the workers' RSS
growth by the connections they hold. Writes bench/results/memory.json (memory-ws,
memory-tls, memory-ws-tls with the flags; --results names it instead). --tls serves
with a fresh self-signed certificate and has the load generator connect over TLS.

--pusher: a ``protocol = "pusher"`` service (one app), each connection speaking Pusher
protocol 7 and subscribed to one public channel (connection_established, then
pusher:subscribe and subscription_succeeded): memory-pusher.json. Its connections are
counted held once the load generator says every one was answered ("ramp done").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from _common import (
    LoadWatch,
    load,
    machine,
    pusher_flags,
    rss_pss,
    save,
    self_signed,
    server,
    source,
    wait_until,
)
from manydoors.node import procfs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=40_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ws", action="store_true", help="a websocket service, driven over WebSocket")
    p.add_argument(
        "--pusher", action="store_true", help="a pusher service, driven in Pusher protocol 7"
    )
    p.add_argument("--tls", action="store_true", help="TLS (self-signed certificate)")
    p.add_argument("--results", metavar="NAME", help="bench/results/NAME.json")
    args = p.parse_args()
    n = args.connections
    if args.ws and args.pusher:
        p.error("--ws or --pusher, not both")
    proto = ["--protocol", "websocket"] if args.ws else []
    pusher_load: list[str] = []
    if args.pusher:
        proto, pusher_load = pusher_flags()
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
        load_flags = [
            *(["--ws"] if args.ws else []),
            *pusher_load,
            *(["--tls"] if args.tls else []),
            *srv.target(n, 10_000),
            "--subscribe",
            "veg",
            "--hold",
            "30",
        ]
        watch = LoadWatch(*load_flags) if args.pusher else None
        gen = watch.proc if watch is not None else load(*load_flags)
        try:
            if watch is not None:
                # Every connection established and subscribed (or failed: see its errors).
                if not watch.ramp_done.wait(300):
                    raise RuntimeError("timed out waiting for the load's ramp")
                if watch.ready != n:
                    raise RuntimeError(f"{watch.ready} of {n} connections subscribed")
            else:
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
        "source": source(),
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
    result["protocol"] = "pusher" if args.pusher else "websocket" if args.ws else "tcp"
    result["tls"] = args.tls
    kind = ["pusher"] if args.pusher else ["ws"] if args.ws else []
    name = args.results or "-".join(["memory", *kind, *(["tls"] if args.tls else [])])
    print(f"saved {save(name, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One message to 100,000 subscribed connections: time until all have it, deliveries/s.

    ./run bench broadcast [--connections 100000] [--messages 3]

The load generator opens the connections (each says hello and subscribes to one
channel), then publishes each message through the API with its send time inside and
measures, per message, how many connections received it and the latency to each.
Writes bench/results/broadcast.json (and the load report beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _common import RESULTS, load, machine, save, server


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--messages", type=int, default=3)
    p.add_argument("--rate", type=int, default=20_000)
    args = p.parse_args()
    n = args.connections
    report_path = os.path.join(RESULTS, "broadcast-load.json")
    os.makedirs(RESULTS, exist_ok=True)
    with server("--max-connections", str(n)) as srv:
        gen = load(
            *srv.target(n, args.rate),
            "--subscribe",
            "veg",
            "--api",
            srv.api,
            "--broadcasts",
            str(args.messages),
            "--report",
            report_path,
        )
        code = gen.wait()
        stats = srv.stats()
    with open(report_path) as f:
        report = json.load(f)
    result = {
        "machine": machine(),
        "connections": report["connections"],
        "server_workers": len(stats["services"][0]["workers"]),
        "load_processes": report["plan"]["processes"],
        "ramp_per_second": report["rate_achieved"],
        "errors": report["errors"],
        "deliveries": report["deliveries"],
        "load_exit": code,
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save('broadcast', result)}", file=sys.stderr)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

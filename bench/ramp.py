"""The ramp alone, manydoors beside the floor, with the same C client on both sides.

    ./run bench ramp [--connections 150000] [--rate 30000] [--rounds 2]

Each round ramps ``--connections`` into the floor's C server (bench/floor: accept and a
welcome line), then into a fresh manydoors TCP service sized for the count, driven by
the floor's own client with ``--greet``: every connection says hello and subscribes to
one channel, as ``manydoors load --subscribe`` does, and is ready at the sub's ok. The
rounds alternate on this noisy machine; the kernel closes one run's sockets before the
next starts. Reported per round and as ratios: connections/s (last successful connect)
and server CPU per connection (utime + stime of the server's whole process tree from
rest to the last ready). Saved as bench/results/ramp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from _common import machine, save, server, source

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "floor"))
from _procs import Reaper, usage

import floor
from manydoors.node import procfs


def manydoors_ramp(n: int, rate: float) -> dict[str, Any]:
    with server("--max-connections", str(n), "--ping-interval", "0") as srv:
        reaper = Reaper(srv.proc.pid)
        return floor.ramp_manydoors(srv.port, n, rate, lambda: usage(reaper.look()).cpu_s)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=150_000)
    p.add_argument("--rate", type=float, default=30_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    inuse = procfs.tcp_sockstat().get("inuse", 0)
    rounds = []
    for _ in range(args.rounds):
        theirs = floor.run(args.connections, args.rate, 0)
        floor.settle(inuse)
        ours = manydoors_ramp(args.connections, args.rate)
        floor.settle(inuse)
        rounds.append(
            {
                "floor": {
                    "held": theirs["held"],
                    "ramp_per_second": theirs["ramp_per_second"],
                    "server_cpu_us_per_connection": theirs["server"]["cpu_us_per_connection"],
                },
                "manydoors": ours,
            }
        )
    for r in rounds:
        f, m = r["floor"], r["manydoors"]
        r["ratios"] = {
            k: round(m[k] / f[k], 3) if m.get(k) and f.get(k) else None
            for k in ("ramp_per_second", "server_cpu_us_per_connection")
        }
        print(
            f"floor {f['ramp_per_second']:,}/s {f['server_cpu_us_per_connection']} us;"
            f" manydoors {m['ramp_per_second']:,}/s {m['server_cpu_us_per_connection']} us,"
            f" held {m['held']:,}, errors {m['errors']}: ratios {r['ratios']}",
            file=sys.stderr,
        )
    result = {
        "machine": machine(),
        "source": source(),
        "settings": vars(args),
        "rounds": rounds,
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save('ramp', result)}", file=sys.stderr)
    ok = all(r["manydoors"]["held"] == args.connections for r in rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

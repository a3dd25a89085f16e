"""Accept rate with the load generator on the same machine.

    ./run bench accept [--connections 60000] [--workers 2] [--processes 4]

Samples the server's own ``accepted`` counter every 0.2 s while the load generator
opens connections as fast as it can (each says hello), and reports the best 1 s
window and the average from first to last accept. Writes bench/results/accept.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import load, machine, save, server


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=60_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rate", type=int, default=100_000)
    p.add_argument("--hello", action="store_true", help="each client says hello too")
    args = p.parse_args()
    n = args.connections
    with server("--workers", str(args.workers), "--max-connections", str(n)) as srv:
        gen = load(
            "--target",
            f"127.0.0.1:{srv.port}",
            "--connections",
            str(n),
            "--rate",
            str(args.rate),
            "--processes",
            str(args.processes),
            "--hold",
            "2",
            *([] if args.hello else ["--raw"]),
        )
        samples: list[tuple[float, int]] = []
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                samples.append((time.monotonic(), srv.stats()["accepted"]))
                if samples[-1][1] >= n:
                    break
                time.sleep(0.5)
        finally:
            gen.wait(120)
    first = next(t for t, a in samples if a > 0)
    last = next(t for t, a in samples if a >= samples[-1][1])
    best = 0.0
    for i, (t0, a0) in enumerate(samples):
        for t1, a1 in samples[i + 1 :]:
            if t1 - t0 >= 1.0:
                best = max(best, (a1 - a0) / (t1 - t0))
                break
    result = {
        "machine": machine(),
        "connections": samples[-1][1],
        "workers": args.workers,
        "load_processes": args.processes,
        "best_1s_per_second": round(best),
        "average_per_second": round(samples[-1][1] / max(1e-9, last - first)),
        "note": "client and server share the 2 cores; each client says hello",
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save('accept', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

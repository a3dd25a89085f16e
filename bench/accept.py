"""Accept rate with the load generator on the same machine.

    ./run bench accept [--connections 60000] [--workers 2] [--processes 4] [--repeat 3]
                       [--tls] [--results NAME]

Samples the server's own ``accepted`` counter every 0.1 s while the load generator
(``--raw``: connect and hold) opens connections as fast as it can. Per run: the best
1 s window, and the rate between 10 % and 90 % of the connections (which leaves out
start-up and the tail). Client and server share the machine's cores, so the figure
is for both sides together. Writes bench/results/accept.json (accept-tls.json with
--tls: a self-signed certificate, and a connection counts as accepted once its
handshake is done).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from _common import load, machine, save, self_signed, server
from manydoors.node import procfs


def one_run(args: argparse.Namespace, tls: list[str]) -> dict[str, float]:
    n = args.connections
    with server("--workers", str(args.workers), "--max-connections", str(n), *tls) as srv:
        pids = srv.worker_pids()
        cpu_before = sum(procfs.cpu_seconds(pid) or 0.0 for pid in pids)
        gen = load(
            *srv.target(n, args.rate),
            *(["--tls"] if tls else []),
            "--processes",
            str(args.processes),
            "--hold",
            "1",
            *([] if args.hello else ["--raw"]),
        )
        samples: list[tuple[float, int]] = []
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                samples.append((time.monotonic(), srv.stats()["accepted"]))
                if samples[-1][1] >= n:
                    break
                time.sleep(0.1)
            cpu = sum(procfs.cpu_seconds(pid) or 0.0 for pid in pids) - cpu_before
        finally:
            gen.wait(120)

    def at(share: float) -> float:
        return next(t for t, a in samples if a >= share * n)

    best = 0.0
    for i, (t0, a0) in enumerate(samples):
        later = [(t1, a1) for t1, a1 in samples[i + 1 :] if t1 - t0 >= 1.0]
        if later:
            t1, a1 = later[0]
            best = max(best, (a1 - a0) / (t1 - t0))
    middle = 0.8 * n / (at(0.9) - at(0.1))
    return {
        "best_1s": round(best),
        "middle_80pct": round(middle),
        # The workers' CPU (user + system) over the ramp, per connection accepted.
        "server_cpu_ms_per_connection": round(cpu * 1000 / max(1, samples[-1][1]), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=60_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rate", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--hello", action="store_true", help="each client says hello too")
    p.add_argument("--tls", action="store_true", help="TLS (self-signed certificate)")
    p.add_argument("--results", metavar="NAME", help="bench/results/NAME.json")
    args = p.parse_args()
    tls: list[str] = []
    if args.tls:
        cert, key = self_signed(tempfile.mkdtemp(prefix="manydoors-bench-"))
        tls = ["--tls-cert", cert, "--tls-key", key]
    runs = [one_run(args, tls) for _ in range(args.repeat)]
    result = {
        "machine": machine(),
        "connections": args.connections,
        "workers_asked": args.workers,
        "load_processes": args.processes,
        "hello": args.hello,
        "tls": args.tls,
        "runs": runs,
        "median_best_1s": statistics.median(r["best_1s"] for r in runs),
        "median_middle_80pct": statistics.median(r["middle_80pct"] for r in runs),
        "median_server_cpu_ms": statistics.median(r["server_cpu_ms_per_connection"] for r in runs),
    }
    print(json.dumps(result, indent=1))
    name = args.results or ("accept-tls" if args.tls else "accept")
    print(f"saved {save(name, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

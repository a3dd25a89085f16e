"""Server CPU while it holds idle connections (the sweep's cost, mostly).

    ./run bench idle_cpu [--connections 100000] [--seconds 10] [--results NAME]

Starts a server sized for the count with the heartbeat off (its pings would be work,
not idleness), has the load generator open the connections (hello + subscribe) and
hold them, waits for the ramp to end and 2 s more, then reads the CPU time (user +
system) of the server's process tree over ``--seconds``. Writes
bench/results/idle_cpu.json: ms of CPU per second, in all and per worker.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _common import machine, save, server, source

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
from _procs import Reaper, usage

from manydoors.launch import stop


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--results", metavar="NAME", default="idle_cpu")
    args = p.parse_args()
    n = args.connections
    with server("--max-connections", str(n), "--ping-interval", "0") as srv:
        cmd = [sys.executable, "-m", "manydoors", "load", *srv.target(n, 20_000)]
        cmd += ["--subscribe", "veg", "--hold", str(args.seconds + 60)]
        gen = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        try:
            assert gen.stderr is not None
            for line in gen.stderr:
                if b"ramp done" in line:
                    break
            time.sleep(2)
            pids = Reaper(srv.proc.pid).look()
            before, start = usage(pids), time.monotonic()
            time.sleep(args.seconds)
            after, took = usage(pids), time.monotonic() - start
            held = srv.stats()["connections"]
            workers = len(srv.worker_pids())
        finally:
            stop(gen, 60)
    ms_per_s = (after.cpu_s - before.cpu_s) / took * 1000
    result = {
        "machine": machine(),
        "source": source(),
        "connections": held,
        "seconds": round(took, 1),
        "processes": len(pids),
        "workers": workers,
        "cpu_ms_per_second": round(ms_per_s, 1),
    }
    print(result)
    save(args.results, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

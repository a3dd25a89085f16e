"""The heartbeat's server CPU: N idle connections held, each pinged every interval.

    ./run bench heartbeat [--connections 20000] [--interval 2] [--ws] [--window 20]

Holds N connections (hello and subscribe, then silent) on a 2-worker server with
``--ping-interval`` set short, so that pings and pongs are all it does; reads the
workers' CPU and the ``pings`` counter over a window and reports server CPU per ping
(the ping written and its pong read and handled). Writes
bench/results/heartbeat[-ws].json. The figure the doctor uses (PING_PONG_SECONDS in
doctor/advice.py) comes from here.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time

from _common import load, machine, save, server, source, wait_until
from manydoors.node import procfs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=20_000)
    p.add_argument("--interval", type=float, default=2.0, help="the server's ping_interval")
    p.add_argument("--window", type=float, default=20.0, help="seconds measured")
    p.add_argument("--ws", action="store_true", help="a websocket service")
    args = p.parse_args()
    n = args.connections
    flags = ["--workers", "2", "--max-connections", str(n + 1000)]
    flags += ["--ping-interval", f"{args.interval:g}", "--ping-timeout", "20"]
    flags += ["--protocol", "websocket"] if args.ws else []
    with server(*flags) as srv:
        hold = str(args.window + 60)
        extra = ["--ws"] if args.ws else []
        gen = load(*srv.target(n, 20_000), "--hold", hold, "--processes", "2", *extra)
        try:
            wait_until(lambda: srv.stats()["connections"] >= n, 60, f"{n:,} connections")
            time.sleep(2 * args.interval)  # every connection has been pinged at least once

            def cpu() -> float:
                return sum(procfs.cpu_seconds(pid) or 0.0 for pid in srv.worker_pids())

            s0, c0, t0 = srv.stats(), cpu(), time.monotonic()
            time.sleep(args.window)
            s1, c1, t1 = srv.stats(), cpu(), time.monotonic()
        finally:
            gen.send_signal(signal.SIGINT)
            try:
                gen.wait(30)
            except subprocess.TimeoutExpired:
                gen.kill()
    pings = s1["pings"] - s0["pings"]
    seconds = c1 - c0
    result = {
        "machine": machine(),
        "source": source(),
        "settings": vars(args),
        "connections": s1["connections"],
        "pings_per_second": round(pings / (t1 - t0)),
        "server_cpu_per_second": round(seconds / (t1 - t0), 4),
        "server_us_per_ping": round(seconds / max(1, pings) * 1e6, 2),
    }
    print(result)
    print("saved", save("heartbeat-ws" if args.ws else "heartbeat", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One connection subscribing to many channels: the time until every sub is acked.

    ./run bench many_channels [--channels 100000] [--timeout 90]

One worker with ``max_subscriptions`` above ``--channels``; one client writes all its
subs (each with an id) at once and reads the acks. Subscribing is O(1) a channel, so
100,000 take about a second; issue 18 found it had not finished after 90 s (the
connection's channels were a tuple, tested and copied on every sub). Prints the acks
received and the time; writes bench/results/many_channels.json (--results NAME).

Run it on another checkout with PYTHONPATH=<checkout>/src to compare commits.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

from _common import machine, save, server, source


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=100_000)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the acks")
    p.add_argument("--results", metavar="NAME", default="many_channels")
    args = p.parse_args()
    n = args.channels
    flags = [
        "--workers", "1",
        "--max-subscriptions", str(2 * n),
        "--max-messages-per-second", "0",
        "--max-bytes-per-second", "0",
    ]  # fmt: skip
    with server(*flags) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        reader = sock.makefile("rb")
        reader.readline()  # welcome
        subs = b"".join(b'{"op":"sub","channel":"c%d","id":%d}\n' % (i, i) for i in range(n))
        start = time.perf_counter()
        threading.Thread(target=sock.sendall, args=(subs,), daemon=True).start()
        sock.settimeout(args.timeout)
        acked = 0
        try:
            while acked < n and reader.readline():
                acked += 1
        except TimeoutError:
            pass
        seconds = time.perf_counter() - start
        held = srv.stats()["broker"]["channels"]
        sock.close()
    result = {
        "machine": machine(),
        "source": source(),
        "channels": n,
        "acked": acked,
        "seconds": round(seconds, 2),
        "broker_channels_at_the_end": held,
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save(args.results, result)}", file=sys.stderr)
    return 0 if acked == n else 1


if __name__ == "__main__":
    sys.exit(main())

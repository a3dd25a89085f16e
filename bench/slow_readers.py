"""Server memory while 10,000 clients never read and a publisher keeps publishing.

    ./run bench slow_readers [--clients 10000] [--seconds 30] [--rate 20]
                             [--message-bytes 4096] [--max-outbound-bytes 1048576]
                             [--policies disconnect,drop] [--workers 2] [--results NAME]

For each slow_policy, a fresh server (heartbeat off, so that only the slow-reader
rule closes anyone). Holder processes (at most 15,000 sockets each: RLIMIT_NOFILE)
open the slow clients: each sets SO_RCVBUF to 4 KiB, subscribes to "news" and never
reads again. One good reader, in this process, reads everything. A publisher thread
posts ``--message-bytes`` messages to "news" through the API at ``--rate`` per second
for ``--seconds``; then the run waits 5 s more (disconnect aborts a slow reader 2 s
after its bye).

Every 0.5 s: the RSS of every worker and of the supervisor (/proc/PID/statm), the
machine's TCP buffer memory (/proc/net/sockstat "mem", all sockets of the machine),
and the server's stats (connections, closed.slow, dropped, messages_out). Per
policy: peak RSS, RSS growth per slow client (peak minus the RSS once every client
has subscribed), the counts, and whether the good reader got every message. Writes
bench/results/slow_readers.json.

Where the queued bytes live: a server socket's kernel send buffer autotunes up to
net.ipv4.tcp_wmem's maximum (4 MiB here) before a single byte waits in user space,
so the kernel holds most of what a slow reader has not read, and max_outbound_bytes
only starts counting once that buffer is full, or once the machine's TCP memory hits
net.ipv4.tcp_mem (which this run, at 10,000 clients, does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import resource
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any, Final

from _common import machine, save, server
from manydoors.apiclient import post_json
from manydoors.node import procfs

PER_HOLDER: Final = 15_000  # sockets per holder process, under RLIMIT_NOFILE (20,000)
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SUB: Final = b'{"op":"sub","channel":"news","id":1}\n'


def hold(port: int, count: int, source: str, pipe: Pipe) -> None:
    """A holder process: ``count`` clients that subscribe, then never read."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # Own source address per holder: no 4-tuple runs out of ephemeral ports,
            # and earlier runs' TIME_WAIT on 127.0.0.1 does not get in the way.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(SUB)
            socks.append(sock)
        pipe.send(len(socks))
        pipe.recv()  # until told to stop
    finally:
        for sock in socks:
            sock.close()


class GoodReader(threading.Thread):
    """One client that reads everything: what it gets shows the others are not hurt."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(SUB)
        self.file = self.sock.makefile("rb")
        self.received = 0
        self.gaps = 0
        self.last_seq: int | None = None
        self.latency_max = 0.0
        self.closed = False

    def run(self) -> None:
        try:
            for line in self.file:
                event = json.loads(line)
                if event.get("ev") != "msg":
                    continue
                seq = event["seq"]
                if self.last_seq is not None and seq != self.last_seq + 1:
                    self.gaps += 1
                self.last_seq = seq
                self.received += 1
                self.latency_max = max(self.latency_max, time.time() - event["data"]["t"])
        except (OSError, ValueError):
            pass
        self.closed = True

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join(5)
        self.file.close()
        self.sock.close()


class Publisher(threading.Thread):
    def __init__(self, api: str, rate: float, seconds: float, size: int) -> None:
        super().__init__(daemon=True)
        self.url = api + "/api/publish"
        self.rate, self.seconds = rate, seconds
        self.pad = "x" * size
        self.published = 0
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set() and time.monotonic() - start < self.seconds:
            try:
                post_json(self.url, {"channel": "news", "data": {"t": time.time(), "p": self.pad}})
                self.published += 1
            except OSError:
                self.errors += 1
            due = start + self.published / self.rate
            self.halt.wait(max(0.0, due - time.monotonic()))


def tcp_mem() -> int:
    """Bytes of TCP buffer memory in use on the whole machine (/proc/net/sockstat)."""
    return procfs.tcp_sockstat().get("mem", 0) * procfs.PAGE


def sample(srv: Any, t0: float, workers: list[int]) -> dict[str, Any]:
    stats = srv.stats()
    return {
        "t": round(time.monotonic() - t0, 2),
        "workers_rss": sum(procfs.rss(pid) or 0 for pid in workers),
        "supervisor_rss": procfs.rss(srv.proc.pid) or 0,
        "tcp_mem": tcp_mem(),
        "connections": stats["connections"],
        "closed_slow": stats["closed"]["slow"],
        "dropped": stats["dropped"],
        "messages_out": stats["messages_out"],
    }


def one_policy(policy: str, index: int, args: argparse.Namespace) -> dict[str, Any]:
    n = args.clients
    flags = [
        *("--workers", str(args.workers), "--max-connections", str(n + 100)),
        *("--slow-policy", policy, "--max-outbound-bytes", str(args.max_outbound_bytes)),
        # Only the slow-reader rule may close anyone here.
        *("--ping-interval", "0", "--max-connections-per-ip", "0"),
    ]
    ctx = mp.get_context("spawn")
    with server(*flags) as srv:
        workers = srv.worker_pids()
        t0 = time.monotonic()
        samples = [sample(srv, t0, workers)]
        good = GoodReader(srv.port)
        good.start()
        holders: list[tuple[Any, Pipe]] = []
        try:
            for i, start in enumerate(range(0, n, PER_HOLDER)):
                mine, theirs = ctx.Pipe()
                source = f"127.0.{40 + index}.{i + 1}"
                count = min(PER_HOLDER, n - start)
                proc = ctx.Process(target=hold, args=(srv.port, count, source, theirs))
                proc.start()
                holders.append((proc, mine))
            held = sum(pipe.recv() for _, pipe in holders)
            while srv.stats()["messages_in"] < n + 1:  # every sub arrived
                time.sleep(0.2)
            subscribed = sample(srv, t0, workers)
            samples.append(subscribed)
            print(f"{policy}: {held:,} slow clients subscribed", file=sys.stderr)

            pub = Publisher(srv.api, args.rate, args.seconds, args.message_bytes)
            pub.start()
            settle_until = None
            while settle_until is None or time.monotonic() < settle_until:
                time.sleep(0.5)
                samples.append(sample(srv, t0, workers))
                if settle_until is None and not pub.is_alive():
                    settle_until = time.monotonic() + 5
                s = samples[-1]
                print(
                    f"{policy} t={s['t']:.1f} workers {s['workers_rss'] / 2**20:.0f} MiB "
                    f"tcp {s['tcp_mem'] / 2**20:.0f} MiB conns {s['connections']:,} "
                    f"slow {s['closed_slow']:,} dropped {s['dropped']:,}",
                    file=sys.stderr,
                )
            final = samples[-1]
            pub.halt.set()
            pub.join()
            good_received, good_gaps, good_alive = good.received, good.gaps, not good.closed
        finally:
            for _, pipe in holders:
                with contextlib.suppress(OSError):
                    pipe.send("stop")
            for proc, _ in holders:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            good.stop()
    peak = max(samples, key=lambda s: s["workers_rss"])
    growth = peak["workers_rss"] - subscribed["workers_rss"]
    return {
        "policy": policy,
        "slow_clients": held,
        "published": pub.published,
        "publish_errors": pub.errors,
        "bytes_published_per_client": pub.published * args.message_bytes,
        "workers_rss_start": samples[0]["workers_rss"],
        "workers_rss_subscribed": subscribed["workers_rss"],
        "workers_rss_peak": peak["workers_rss"],
        "workers_rss_end": final["workers_rss"],
        "rss_growth_per_slow_client": round(growth / held, 1),
        "supervisor_rss_peak": max(s["supervisor_rss"] for s in samples),
        "tcp_mem_subscribed": subscribed["tcp_mem"],
        "tcp_mem_peak": max(s["tcp_mem"] for s in samples),
        "closed_slow": final["closed_slow"],
        "dropped": final["dropped"],
        "connections_end": final["connections"],
        "good_reader": {
            "received": good_received,
            "of": pub.published,
            "gaps": good_gaps,
            "connected": good_alive,
            "latency_max_s": round(good.latency_max, 3),
        },
        "samples": samples,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rate", type=float, default=20, help="publishes per second")
    p.add_argument("--message-bytes", type=int, default=4096)
    p.add_argument("--max-outbound-bytes", type=int, default=1024 * 1024)
    p.add_argument("--policies", default="disconnect,drop")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default="slow_readers")
    args = p.parse_args()
    runs = [one_policy(policy, i, args) for i, policy in enumerate(args.policies.split(","))]
    result = {
        "machine": machine(),
        "tcp_wmem": list(procfs.sysctl("net.ipv4.tcp_wmem") or ()),
        "tcp_mem_pages": list(procfs.sysctl("net.ipv4.tcp_mem") or ()),
        "settings": {
            k: getattr(args, k)
            for k in ("clients", "seconds", "rate", "message_bytes", "max_outbound_bytes")
        }
        | {"workers": args.workers},
        "runs": runs,
    }
    summary = [{k: v for k, v in r.items() if k != "samples"} for r in runs]
    print(json.dumps(summary, indent=1))
    print(f"saved {save(args.results, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

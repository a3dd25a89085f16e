"""Soak: many connections held for minutes, with churn and steady publishing.

    ./run bench soak [--connections 100000] [--minutes 10] [--churn 500] [--lifetime 2]
                     [--publish-every 2] [--probes 100] [--sample-every 5] [--results soak]

A smoke run: ``./run bench soak --connections 5000 --minutes 1 --churn 200
--results soak-smoke``.

- **Held**: ``manydoors load`` opens ``--connections`` (hello + subscribe to "soak";
  as many load processes and loopback source IPs as its planner needs) and holds them
  past the end of the soak. They answer the server's heartbeat, which stays on.
- **Churn**: a driver process opens ``--churn`` connections every second (hello as a
  user of its own, subscribe to "soak") and closes each after ``--lifetime`` seconds:
  half with a FIN, half with a reset; a few close before reading their welcome. It
  binds 32 loopback source addresses in turn, so TIME_WAIT never exhausts a 4-tuple.
- **Publishing**: one message every ``--publish-every`` seconds to "soak" through the
  API: every held connection gets it.
- **Delivery check**: ``--probes`` subscribers in the driver process, held from
  before the load to the end, count every message of "soak" by seq: gaps,
  duplicates, and whether each got up to the last published seq.

Every ``--sample-every`` seconds: RSS and open fds of the supervisor and of every
worker (from /proc; pids re-read from /api/stats, so a restart would show), the
server's counters, the kernel's TCP sockets and slab. At the end: the least-squares
slope of workers' RSS and of fds over the soak past its warm-up (the first 10 %), per
minute and as a share of the level; whether fds minus connections is back to where
it started once the churn has stopped; and the counts. Exits 1 if a probe missed,
doubled or lost anything, fds leaked or a worker restarted. Writes
bench/results/soak.json (``--results`` for another name), the load report
(soak-load.json) and its log (soak-load.log) beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection as Pipe
from typing import Any, Final, cast

from _common import RESULTS, machine, save, server
from manydoors.apiclient import get_json, post_json
from manydoors.node import procfs

CHANNEL: Final = "soak"
HOLD_MARGIN: Final = 30  # seconds the load holds past the soak, so that it ends by itself
CHURN_SOURCES: Final = tuple(f"127.0.9.{i}" for i in range(1, 33))
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PONG: Final = b'{"op":"pong"}\n'


# --- the driver process: churn and probes ---------------------------------------------


class Probe(asyncio.Protocol):
    """A subscriber held for the whole soak; counts the channel's messages by seq."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.subscribed = False
        self.first: int | None = None
        self.last: int | None = None
        self.received = 0
        self.gaps = 0
        self.duplicates = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's: duck-typed
        transport.write(b'{"op":"sub","channel":"%s","id":1}\n' % CHANNEL.encode())

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            event = json.loads(line)
            kind = event.get("ev")
            if kind == "msg":
                seq = event["seq"]
                if self.last is None:
                    self.first = seq
                elif seq <= self.last:
                    self.duplicates += 1
                    continue
                elif seq != self.last + 1:
                    self.gaps += 1
                self.last = seq
                self.received += 1
            elif kind == "ok":
                self.subscribed = True
            elif kind == "ping" and self.transport is not None:
                self.transport.write(PONG)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Churner(asyncio.Protocol):
    """A short-lived connection: hello, subscribe, then closed by the driver."""

    def __init__(self, book: Counter[str]) -> None:
        self.book = book
        self.transport: asyncio.Transport | None = None
        self.welcomed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.book["opened"] += 1
        n = self.book["opened"]
        transport.write(
            b'{"op":"hello","user":"churn%d","id":1}\n{"op":"sub","channel":"%s","id":2}\n'
            % (n, CHANNEL.encode())
        )

    def data_received(self, data: bytes) -> None:
        if not self.welcomed and b'"welcome"' in data:
            self.welcomed = True
            self.book["welcomed"] += 1
        if b'"error"' in data:
            self.book["errors_from_server"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.book["closed"] += 1


async def drive(port: int, probes: int, churn: int, lifetime: float, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    held: list[Probe] = []
    for _ in range(probes):
        _, probe = await loop.create_connection(Probe, "127.0.0.1", port)
        held.append(probe)
    deadline = time.monotonic() + 60
    while not all(p.subscribed for p in held):
        if time.monotonic() > deadline:
            raise RuntimeError("the probes were not subscribed within 60 s")
        await asyncio.sleep(0.05)
    pipe.send({"probes_ready": len(held)})
    while not pipe.poll():  # "churn"
        await asyncio.sleep(0.05)
    pipe.recv()

    book: Counter[str] = Counter()
    live: list[tuple[float, Churner]] = []
    source = 0

    async def open_one(src: str, index: int) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        try:
            sock.bind((src, 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
            _, conn = await loop.create_connection(lambda: Churner(book), sock=sock)
        except OSError as exc:
            sock.close()
            book[f"connect_error_{exc.errno}"] += 1
            return
        if index % 20 == 0 and conn.transport is not None:
            conn.transport.abort()  # gone before it could read its welcome
            book["aborted_at_once"] += 1
            return
        live.append((time.monotonic() + lifetime, conn))

    tick = time.monotonic()
    while not pipe.poll():
        tick += 1.0
        # Close the ones whose time is up: half FIN, half reset.
        now = time.monotonic()
        while live and live[0][0] <= now:
            _, conn = live.pop(0)
            if conn.transport is not None:
                if book["closing"] % 2:
                    conn.transport.abort()
                else:
                    conn.transport.close()
                book["closing"] += 1
        opens = []
        for _ in range(churn):
            opens.append(open_one(CHURN_SOURCES[source % len(CHURN_SOURCES)], source))
            source += 1
        await asyncio.gather(*opens)
        pipe.send({"churn": dict(book), "probes": probe_summary(held)})
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
    pipe.recv()
    for _, conn in live:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(1)
    pipe.send({"churn": dict(book), "probes": probe_summary(held), "final": True})
    # Stay subscribed until the main process has read the last deliveries.
    while not pipe.poll():
        await asyncio.sleep(0.05)
        pipe.send({"probes": probe_summary(held)})
        await asyncio.sleep(0.5)
    for probe in held:
        if probe.transport is not None:
            probe.transport.close()


def probe_summary(held: list[Probe]) -> dict[str, Any]:
    return {
        "count": len(held),
        "lost": sum(p.lost for p in held),
        "gaps": sum(p.gaps for p in held),
        "duplicates": sum(p.duplicates for p in held),
        "first_min": min((p.first for p in held if p.first is not None), default=None),
        "last_min": min((p.last or 0 for p in held), default=None),
        "received_min": min((p.received for p in held), default=0),
        "received_max": max((p.received for p in held), default=0),
    }


def driver_main(port: int, probes: int, churn: int, lifetime: float, pipe: Pipe) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(drive(port, probes, churn, lifetime, pipe))


# --- sampling -------------------------------------------------------------------------


def kernel() -> dict[str, int]:
    tcp = procfs.tcp_sockstat()
    return {
        "tcp_inuse": tcp["inuse"],
        "tcp_tw": tcp["tw"],
        "tcp_mem_bytes": tcp["mem"] * procfs.PAGE,
        "slab_bytes": procfs.meminfo()["Slab"],
    }


def sample(api: str, supervisor: int, t0: float) -> dict[str, Any]:
    stats = get_json(api + "/api/stats", timeout=30)
    workers = [w["pid"] for s in stats["services"] for w in s["workers"] if w["pid"]]
    return {
        "t": round(time.monotonic() - t0, 1),
        "workers": workers,
        "workers_rss": sum(procfs.rss(pid) or 0 for pid in workers),
        "workers_fds": sum(procfs.open_fds(pid) or 0 for pid in workers),
        "supervisor_rss": procfs.rss(supervisor) or 0,
        "supervisor_fds": procfs.open_fds(supervisor) or 0,
        "connections": stats["connections"],
        "accepted": stats["accepted"],
        "messages_out": stats["messages_out"],
        "dropped": stats["dropped"],
        "closed": stats["closed"],
        "refused": stats["refused"],
        "errors": sum(stats["errors"].values()),
        "restarts": sum(w["restarts"] for s in stats["services"] for w in s["workers"]),
        **kernel(),
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


class Publisher(threading.Thread):
    def __init__(self, api: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url = api + "/api/publish"
        self.every = every
        self.seqs: list[int] = []
        self.errors: Counter[str] = Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set():
            try:
                answer = post_json(self.url, {"channel": CHANNEL, "data": {"soak": len(self.seqs)}})
                self.seqs.append(answer["seq"])
            except OSError as exc:
                self.errors[type(exc).__name__] += 1
            due = start + (len(self.seqs) + sum(self.errors.values())) * self.every
            self.halt.wait(max(0.0, due - time.monotonic()))


# --- the run --------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--churn", type=int, default=500, help="connects (and closes) per second")
    p.add_argument("--lifetime", type=float, default=2, help="seconds a churn connection lives")
    p.add_argument("--publish-every", type=float, default=2.0, help="seconds")
    p.add_argument("--probes", type=int, default=100)
    p.add_argument("--sample-every", type=float, default=5)
    p.add_argument("--rate", type=int, default=20_000, help="ramp of the held connections")
    p.add_argument("--results", default="soak")
    args = p.parse_args()
    n = args.connections
    seconds = args.minutes * 60
    report_path = os.path.join(RESULTS, f"{args.results}-load.json")
    os.makedirs(RESULTS, exist_ok=True)
    capacity = n + args.probes + int(args.churn * (args.lifetime + 2)) + 1000
    ctx = mp.get_context("spawn")
    samples: list[dict[str, Any]] = []
    driver_log: list[dict[str, Any]] = []
    log_path = os.path.join(RESULTS, f"{args.results}-load.log")
    with (
        server("--max-connections", str(capacity), "--drain-timeout", "60") as srv,
        open(log_path, "wb") as load_log,
    ):
        supervisor = srv.proc.pid
        t0 = time.monotonic()
        samples.append(sample(srv.api, supervisor, t0) | {"phase": "start"})
        mine, theirs = ctx.Pipe()
        driver = ctx.Process(
            target=driver_main, args=(srv.port, args.probes, args.churn, args.lifetime, theirs)
        )
        driver.start()
        gen = None
        publisher = Publisher(srv.api, args.publish_every)
        try:
            if not mine.poll(90):
                raise RuntimeError("the driver's probes did not subscribe")
            driver_log.append(mine.recv())
            # The load holds until well after the soak: it ends by itself, report written.
            flags = [
                *srv.target(n, args.rate),
                *("--subscribe", CHANNEL, "--api", srv.api, "--broadcasts", "2"),
                *("--hold", str(seconds + HOLD_MARGIN), "--delivery-timeout", "60"),
                *("--report", report_path),
            ]
            # Its progress line a second goes to a log beside the results, not here.
            gen = subprocess.Popen(
                [sys.executable, "-m", "manydoors", "load", *flags], stderr=load_log
            )
            # Held once all are in, or once the count stops growing (errors are in the
            # load report).
            seen, still = 0, 0
            while (now := srv.stats()["connections"]) < n + args.probes and still < 15:
                if gen.poll() is not None:
                    raise RuntimeError("the load generator ended before the soak")
                seen, still = now, still + 1 if now == seen else 0
                time.sleep(1)
            time.sleep(args.sample_every)  # the load's own broadcast rounds
            samples.append(sample(srv.api, supervisor, t0) | {"phase": "held"})
            soak_start = time.monotonic()
            soak_t = soak_start - t0
            mine.send("churn")
            publisher.start()
            print(f"soak: {n:,} held; churn {args.churn}/s for {args.minutes} min", file=sys.stderr)
            next_sample = soak_start
            while time.monotonic() - soak_start < seconds:
                while mine.poll():
                    driver_log.append(mine.recv())
                if time.monotonic() >= next_sample:
                    s = sample(srv.api, supervisor, t0) | {"phase": "soak"}
                    samples.append(s)
                    next_sample += args.sample_every
                    churned = driver_log[-1].get("churn", {}) if driver_log else {}
                    print(
                        f"soak t={s['t']:.0f} conns {s['connections']:,} workers "
                        f"{s['workers_rss'] / 2**20:.0f} MiB fds {s['workers_fds']:,} "
                        f"churned {churned.get('opened', 0):,} published {len(publisher.seqs)}",
                        file=sys.stderr,
                    )
                time.sleep(0.1)
            publisher.halt.set()
            publisher.join()
            mine.send("stop")
            final_driver = mine.recv()
            while not final_driver.get("final"):
                final_driver = mine.recv()
            driver_log.append(final_driver)
            # Every probe up to the last seq published, churn connections all gone.
            last = publisher.seqs[-1] if publisher.seqs else 0
            probes = final_driver["probes"]
            deadline = time.monotonic() + 60
            while probes["last_min"] < last and time.monotonic() < deadline and mine.poll(5):
                probes = mine.recv()["probes"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                after = sample(srv.api, supervisor, t0) | {"phase": "after"}
                if after["connections"] <= n + args.probes:
                    break
                time.sleep(1)
            samples.append(after)
            mine.send("done")
            driver.join(30)
            code = gen.wait(seconds + 600)
        finally:
            publisher.halt.set()
            if gen is not None and gen.poll() is None:
                gen.send_signal(signal.SIGINT)
                gen.wait(120)
            if driver.is_alive():
                with contextlib.suppress(OSError):
                    mine.send("stop")
                driver.join(10)
                if driver.is_alive():
                    driver.kill()
                    driver.join()
        final_stats = srv.stats()
    with open(report_path) as f:
        report = json.load(f)

    # Slopes leave out the warm-up: the churn pool filling, allocator arenas growing.
    warm = max(args.lifetime + 2 * args.sample_every, 0.1 * seconds)
    soak = [s for s in samples if s["phase"] == "soak" and s["t"] >= soak_t + warm]
    minute = 60.0
    rss_slope = slope([(s["t"], s["workers_rss"]) for s in soak]) * minute
    fds_slope = slope([(s["t"], s["workers_fds"]) for s in soak]) * minute
    sup_slope = slope([(s["t"], s["supervisor_rss"]) for s in soak]) * minute
    half = soak[len(soak) // 2 :]  # past the warm-up: allocator arenas, the churn pool
    rss_slope_2 = slope([(s["t"], s["workers_rss"]) for s in half]) * minute
    held, end = samples[1], samples[-1]
    mean_rss = sum(s["workers_rss"] for s in soak) / max(1, len(soak))
    result = {
        "machine": machine(),
        "settings": vars(args),
        "server_workers": len(final_stats["services"][0]["workers"]),
        "held": report["connections"],
        "load_errors": report["errors"],
        "load_deliveries": report["deliveries"],
        "load_exit": code,
        "churn": driver_log[-1].get("churn", {}),
        "published": len(publisher.seqs),
        "publish_errors": dict(publisher.errors),
        "probes": probes | {"expected_last": last},
        "slopes_per_minute": {
            "workers_rss_bytes": round(rss_slope),
            "workers_rss_share_of_mean": round(rss_slope / mean_rss, 5) if mean_rss else None,
            "workers_rss_bytes_second_half": round(rss_slope_2),
            "workers_fds": round(fds_slope, 2),
            "supervisor_rss_bytes": round(sup_slope),
        },
        "fds_beyond_connections": {
            "held": held["workers_fds"] - held["connections"],
            "after": end["workers_fds"] - end["connections"],
        },
        "workers_rss": {"held": held["workers_rss"], "after": end["workers_rss"]},
        "dropped": final_stats["dropped"],
        "closed": final_stats["closed"],
        "refused": final_stats["refused"],
        "errors": {k: v for k, v in final_stats["errors"].items() if v},
        "restarts": end["restarts"],
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print(f"saved {save(args.results, result)}", file=sys.stderr)
    ok = (
        probes["gaps"] == 0
        and probes["duplicates"] == 0
        and probes["lost"] == 0
        and probes["last_min"] == last
        and result["fds_beyond_connections"]["after"] <= result["fds_beyond_connections"]["held"]
        and end["restarts"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The 1M benchmark: a million connections held on this machine, then broadcast to.

    ./run bench c1m [--connections 1000000] [--rate 30000] [--hold 60] [--broadcasts 3]
                    [--ws | --pusher] [--no-floor | --floor-only | --floor-after]

Starts a server sized for the count and the load generator on this same machine,
ramps, holds, broadcasts, stops everything, and writes to bench/results/:
c1m.json (summary), c1m-load.json (the load report), c1m.png (its plot) and
c1m-stats.json (the server's final /api/stats); c1m-pusher* with --pusher. ``--name``
renames all four.

The server's CPU over the broadcasts is measured as ``bench/peers.py`` does: the load
generator publishes through a proxy that reads the CPU time of the server's process
tree at the first publish, and the load's line for the last message ends the count.

--pusher: a ``protocol = "pusher"`` service; every connection speaks Pusher protocol 7
and subscribes to one public channel, and each broadcast is an event triggered through
the Pusher REST API (``POST /apps/{id}/events``, signed), timed as the others.

The floor, in the same invocation (bench/floor): a C epoll server and a C client
(built with ``cc``), sized as manydoors and its load generator are (server processes
as the supervisor sizes its pool, client processes and source IPs from the load
generator's plan), asked for the same count at the same rate, the same number of
broadcasts. It runs before manydoors (``--floor-after``: after), never beside it, and
the next run starts once the kernel has closed the sockets of the first. c1m.json then
has a ``floor`` section and ``ratios``, manydoors/floor: held, ramp, server CPU per
connection, time to all, CPU per million deliveries, memory; the table is printed.
``--no-floor`` skips it; ``--floor-only`` runs only the floor (saved as NAME-floor.json).
The floor speaks neither WebSocket nor Pusher: with --ws or --pusher it is the same raw
TCP floor, and the ratio says what the protocol costs on top of the kernel.

A third run (TCP only; ``--no-c-client`` skips it): a fresh manydoors server ramped by
the floor's own C client, each connection saying hello and subscribing as the load
generator's do (``floor_client --greet``). Its ramp against the floor's is the servers'
ratio alone; in the first run the Python load generator takes about as much of the
same 2 cores per connection as the server. ``c_client`` in c1m.json, ``ratios.same_client``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

from _common import PUSHER_APP, RESULTS, get, machine, pusher_flags, save, server, source

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "floor"))
from _drive import STALL_S, Proxy, Readings, broadcast_cpu, run_load
from _procs import Reaper, usage

import floor
from manydoors.node import procfs

SAMPLE_EVERY = 3.0  # seconds between two readings of the peak (stats, RSS, slab)


def rss(pids: list[int]) -> int:
    """Summed RSS of ``pids`` (a process that exited counts 0)."""
    return sum(procfs.rss(pid) or 0 for pid in pids)


def manydoors_run(args: argparse.Namespace) -> dict[str, Any]:
    """The server and the load generator: ramp, hold, broadcast, stop; the summary."""
    n = args.connections
    paths = {
        k: os.path.join(RESULTS, f"{args.name}{k}") for k in ("-load.json", ".png", "-stats.json")
    }
    os.makedirs(RESULTS, exist_ok=True)
    before = procfs.meminfo()
    peak: dict[str, int] = {"server_rss": 0, "slab": 0, "connections": 0}
    proto = ["--protocol", "websocket"] if args.ws else []
    pusher_load: list[str] = []
    if args.pusher:
        proto, pusher_load = pusher_flags()
    flags = ["--max-connections", str(n), "--drain-timeout", "60", "--ping-interval"]
    with server(*flags, args.ping_interval, *proto) as srv:
        pids = srv.worker_pids()
        server_base = rss([*pids, srv.proc.pid])
        reaper = Reaper(srv.proc.pid)
        at_rest = usage(reaper.look())  # the server's CPU before the first connection
        readings = Readings(reaper.look, args.broadcasts)
        next_sample = 0.0

        def sample() -> None:  # called by run_load about once a second
            nonlocal next_sample
            if time.monotonic() < next_sample:
                return
            next_sample = time.monotonic() + SAMPLE_EVERY
            try:
                stats = srv.stats()
            except OSError as exc:  # a supervisor busy with a million closes: skip
                print(f"c1m: stats not answered ({exc}); going on", file=sys.stderr)
                return
            if stats["connections"] >= peak["connections"]:
                peak["connections"] = stats["connections"]
                peak["server_rss"] = rss([*pids, srv.proc.pid])
                peak["slab"] = procfs.meminfo()["Slab"]
            if "ramp_done" not in readings.at:
                # The workers' worst loop lag and broker wait so far (gauges: the worst
                # since start), up to the last sample of the ramp: not the broadcasts,
                # whose fan-out holds each loop for the whole delivery on 2 cores.
                workers = stats["services"][0]["workers"]
                for gauge in ("loop_lag_max_ms", "sync_wait_max_ms"):
                    peak[gauge] = max(w.get(gauge, 0) for w in workers)

        proxy = Proxy(srv.api, readings.published, PUSHER_APP if args.pusher else None)
        flags = [
            *(["--ws"] if args.ws else []),
            *pusher_load,
            *srv.target(n, args.rate),
            *("--subscribe", "veg", "--api", proxy.url),
            *("--broadcasts", str(args.broadcasts), "--hold", str(args.hold)),
            *("--delivery-timeout", "60", "--report", paths["-load.json"], "--plot", paths[".png"]),
        ]
        # Past this the load is interrupted (SIGINT: it stops and still reports).
        timeout = 180 + STALL_S + n / 500 + args.hold + args.broadcasts * 65
        started = time.time()
        try:
            run = run_load(flags, timeout, readings.ramp_done, readings.round_done, "load", sample)
        finally:
            proxy.close()
        final_stats = get(srv.api + "/api/stats", timeout=300)
        elapsed = time.time() - started
    with open(paths["-stats.json"], "w") as f:
        json.dump(final_stats, f, indent=1)
    with open(paths["-load.json"]) as f:
        report = json.load(f)
    held = report["connections"]["peak"]
    workers = len(final_stats["services"][0]["workers"])
    load_base = report["load_rss_start_bytes"]
    kernel = peak["slab"] - before["Slab"]
    result: dict[str, Any] = {
        "machine": machine(),
        "source": source(),
        "settings": {
            "connections": n,
            "rate": args.rate,
            "hold": args.hold,
            "broadcasts": args.broadcasts,
            "ws": args.ws,
            "protocol": "pusher" if args.pusher else "websocket" if args.ws else "tcp",
            "ping_interval": float(args.ping_interval),
        },
        "held": held,
        "connections": report["connections"],
        "errors": report["errors"],
        "ramp_per_second": report["rate_achieved"],
        "connect_ms": report["connect_ms"],
        "server": {
            "workers": workers,
            "rss_bytes_at_peak": peak["server_rss"],
            "ramp_loop_lag_max_ms": peak.get("loop_lag_max_ms"),
            "ramp_sync_wait_max_ms": peak.get("sync_wait_max_ms"),
            "rss_bytes_at_start": server_base,
            "user_bytes_per_connection": round((peak["server_rss"] - server_base) / max(1, held)),
        },
        "load": {
            "processes": report["plan"]["processes"],
            "rss_bytes": report["load_rss_bytes"],
            "rss_bytes_at_start": load_base,
            "user_bytes_per_connection": round(
                (report["load_rss_bytes"] - load_base) / max(1, held)
            ),
        },
        "kernel": {
            "slab_growth_bytes": kernel,
            "bytes_per_connection_pair": round(kernel / max(1, held)),
        },
        "deliveries": report["deliveries"],
        "elapsed_s": round(elapsed, 1),
        "load_exit": run.code,
        "server_refused": final_stats["refused"],
    }
    # Server CPU from rest until every connection is held and subscribed (accept,
    # welcome, hello, sub: what a reconnect storm costs), as bench/peers.py reports it.
    ready_at = readings.at.get("held") or readings.at.get("ramp_done")
    if ready_at and held:
        result["server"]["cpu_us_per_connection"] = round(
            (ready_at.cpu_s - at_rest.cpu_s) / held * 1e6, 1
        )
    cpu = broadcast_cpu(readings.at, report["deliveries"])
    if cpu:
        result["cpu"] = cpu
    notes = [f"load {run.stopped}"] if run.stopped else []
    if proxy.failed:
        notes.append(f"a publish call got no answer from the server: {proxy.failed}")
    if notes:
        result["notes"] = notes
    return result


def c_client_run(args: argparse.Namespace) -> dict[str, Any]:
    """A fresh manydoors server ramped by the floor's C client (hello + sub each).

    The same client as the floor's ramp, so the ratio of the two is the servers' alone:
    the Python load generator takes as much of the 2 cores per connection as the
    server does. Ramp only (no hold, no broadcast); {"error": ...} if it cannot run.
    """
    flags = ["--max-connections", str(args.connections), "--ping-interval", args.ping_interval]
    try:
        with server(*flags) as srv:
            reaper = Reaper(srv.proc.pid)
            return floor.ramp_manydoors(
                srv.port, args.connections, args.rate, lambda: usage(reaper.look()).cpu_s
            )
    except Exception as exc:  # it must not cost the runs before it
        traceback.print_exc()
        print(f"c1m: the C-client ramp did not run: {exc!r}", file=sys.stderr)
        return {"error": repr(exc)}


def same_client_rows(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Ratios and table rows of the ramp with the floor's client on both sides."""
    ratios = {
        key: round(ours[key] / theirs[key], 3) if ours.get(key) and theirs.get(key) else None
        for key in ("ramp_per_second", "server_cpu_us_per_connection")
    }
    ramp, cpu = "ramp_per_second", "server_cpu_us_per_connection"
    rows = [
        f"| ramp, floor's C client on both (connections/s) | {ours.get(ramp) or 0:,}"
        f" | {theirs.get(ramp) or 0:,} | {ratios[ramp]} |",
        f"| server CPU per connection, same client (us) | {ours.get(cpu)}"
        f" | {theirs.get(cpu)} | {ratios[cpu]} |",
    ]
    return ratios, "\n".join(rows)


def floor_run(args: argparse.Namespace) -> dict[str, Any]:
    """The C floor at the same count, rate and broadcasts; {"error": ...} if it cannot run."""
    try:
        return floor.run(args.connections, args.rate, args.broadcasts)
    except Exception as exc:  # the floor failing must not cost the manydoors run
        traceback.print_exc()
        print(f"c1m: the floor did not run: {exc!r}", file=sys.stderr)
        return {"error": repr(exc)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=1_000_000)
    p.add_argument(
        "--rate",
        type=int,
        help="connections asked per second (default 30,000; with --pusher 3,000: asked "
        "30,000 the Pusher ramp outran what 2 cores greet within the load generator's "
        "10 s connect timeout, and 127,386 of 1M got no answer, docs/benchmarks.md)",
    )
    p.add_argument("--hold", type=float, default=60)
    p.add_argument("--broadcasts", type=int, default=3)
    p.add_argument("--name", help="of the result files (default: c1m; with --pusher c1m-pusher)")
    p.add_argument("--ws", action="store_true", help="a websocket service, driven over WebSocket")
    p.add_argument(
        "--pusher",
        action="store_true",
        help="a pusher service, driven in Pusher protocol 7, broadcast to through its REST API",
    )
    p.add_argument(
        "--ping-interval",
        default="0",
        help="the server's heartbeat (default 0: off). At 1M its default 25 s is 40,000 "
        "pings/s and as many pongs: on 2 cores that starves the ramp (docs/benchmarks.md)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--no-floor", action="store_true", help="skip the C floor (bench/floor) and the ratios"
    )
    where.add_argument(
        "--floor-only", action="store_true", help="run only the C floor (saved as NAME-floor)"
    )
    where.add_argument(
        "--floor-after", action="store_true", help="run the floor after manydoors, not before"
    )
    p.add_argument(
        "--no-c-client",
        action="store_true",
        help="skip the third run: manydoors ramped by the floor's C client (TCP only)",
    )
    args = p.parse_args()
    if args.ws and args.pusher:
        p.error("--ws or --pusher, not both")
    if args.name is None:
        args.name = "c1m-pusher" if args.pusher else "c1m"
    if args.rate is None:
        args.rate = 3_000 if args.pusher else 30_000
    n = args.connections
    if args.floor_only:
        result = {"machine": machine(), "source": source(), **floor_run(args)}
        print(json.dumps(result, indent=1))
        print(f"saved {save(args.name + '-floor', result)}", file=sys.stderr)
        return 0 if result.get("held") == n and not result.get("errors") else 1
    inuse = procfs.tcp_sockstat().get("inuse", 0)
    found: dict[str, Any] | None = None
    if not args.no_floor and not args.floor_after:
        found = floor_run(args)
        floor.settle(inuse)
    result = manydoors_run(args)
    if not args.no_floor and args.floor_after:
        floor.settle(inuse)
        found = floor_run(args)
    if not (args.no_c_client or args.no_floor or args.ws or args.pusher):
        floor.settle(inuse)
        result["c_client"] = c_client_run(args)
    if found is not None:
        result["floor"] = found
        result["floor_order"] = "after" if args.floor_after else "before"
        if "error" not in found:
            ours, theirs = floor.figures(result), floor.figures(found)
            result["ratios"] = floor.ratios(ours, theirs)
            result["ratio_table"] = floor.ratio_table(ours, theirs)
            if "c_client" in result and "error" not in result["c_client"]:
                floor_ramp = {
                    "ramp_per_second": found.get("ramp_per_second"),
                    "server_cpu_us_per_connection": found["server"].get("cpu_us_per_connection"),
                }
                same, rows = same_client_rows(result["c_client"], floor_ramp)
                result["ratios"]["same_client"] = same
                result["ratio_table"] += "\n" + rows
    print(json.dumps(result, indent=1))
    if "ratio_table" in result:
        print(result["ratio_table"], file=sys.stderr)
    print(f"saved {save(args.name, result)}", file=sys.stderr)
    held = result["held"]
    return 0 if held == n and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

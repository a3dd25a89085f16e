"""manydoors against its peers, side by side, in one run.

    ./run bench peers [--connections 100000] [--peers NAME,NAME] [--rate 20000]
                      [--broadcasts 3] [--messages 50000] [--peer-workers N] [--no-cap]

Runs each server in turn on this machine (names: ``manydoors-tcp manydoors-ws
manydoors-tcp-1p asyncio uvloop websockets node-ws aiohttp floor``; the peers are in
``bench/peers/``; ``manydoors-tcp-1p`` is manydoors asked for what a single-process
peer is asked for, so that every column compares at equal count; ``floor`` is the C
reference of ``bench/floor``, server *and* client in C, see below), every one
with listen backlog 4096, no keepalive pings and no per-connection rate limits
(manydoors' are turned off), and for each:

1. reads the RSS, PSS and CPU time of all the server's processes at rest (the
   baseline) and how many connections its serving processes can hold: RLIMIT_NOFILE
   is per process, so a single-process peer is asked for only what its fd limit holds
   and its row says so (``--no-cap`` asks anyway: the connects past the limit then
   fail or stall, the load generator ends a ramp that has not moved for 60 s and holds
   what is open, and the row says where; the peer's API, in the same process, may then
   find no fd for the publish call, and the row says that too);
2. runs ``manydoors load`` with the same flags (every connection says hello and
   subscribes to one channel, then ``--broadcasts`` messages go through the server's
   HTTP publish call, each carrying its send time). The API URL the load generator
   gets is a proxy in this script: at the first publish, every connection held and
   subscribed, it reads the server's RSS and CPU, stamps the send time afresh (so the
   reading is not latency) and forwards the call; the load generator's line for the
   last message ends the CPU count of the broadcasts;
3. once the server has closed those connections, measures 1:1 throughput: one client
   publishes as fast as it can to a channel with one subscriber (as
   ``bench/publish_rate.py``), over TCP or WebSocket as the server speaks;
4. stops the server: SIGTERM, then SIGKILL of any process of its tree still there.

Figures: user-space memory per connection = growth of the RSS summed over all the
server's processes / connections held; accept rate and connect p99 from the load
report, and the server's CPU from rest until every connection is held and subscribed
(per connection: accept, hello, subscribe); per broadcast, time until the last
recipient had it, deliveries/s and p99 latency; 1:1 messages/s; server CPU seconds
(user + system, all processes) per million deliveries. Load generator and server
share the machine's cores. Writes bench/results/peers.json (``--name``) and prints
the Markdown table, with a last row for manydoors at 1,000,000 from the last ``./run
bench c1m`` (bench/results/c1m.json, a separate run) when there is one, and one for
the floor at 1,000,000 when that run had it.

The ``floor`` row is not driven by ``manydoors load``: ``bench/floor`` runs its C
epoll server (as many SO_REUSEPORT processes as manydoors gets workers) and its C
client (as many processes and source IPs as the load generator's plan), asked for the
same count, rate and broadcasts; a connection is ready at its welcome line (no hello,
no sub) and there is no 1:1 figure. With it in the run, the results get ``ratios``:
each manydoors row at the floor's count over the floor (held, ramp, server CPU per
connection, time to all, CPU per million deliveries, user space per connection),
printed as a table after the main one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from _common import RESULTS, machine, save, server, source
from manydoors.launch import stop
from manydoors.node import procfs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "floor"))
from _drive import STALL_S, Proxy, Readings, broadcast_cpu, one_to_one, run_load
from _procs import FD_MARGIN, Reaper, Usage, fd_room, nofile, open_fds, usage

import floor

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_DIR = os.path.join(HERE, "peers")
NODE_DIR = os.path.join(PEERS_DIR, "node_ws")
FD_RESERVE = 64  # fds a process keeps beside its connections (manydoors' default)


@dataclass(frozen=True)
class Peer:
    label: str
    ws: bool
    processes: str  # how it uses processes, for the table ({holders}: serving processes)
    script: str | None = None  # bench/peers/SCRIPT (None: manydoors itself)
    node: bool = False
    one_process_count: bool = False  # manydoors asked for what one process holds
    floor: bool = False  # bench/floor: C server and C client, not driven by manydoors load


_MANYDOORS = (
    "supervisor (broker, API), {holders} SO_REUSEPORT workers, fork server, resource tracker"
)
_SINGLE = "single process, {why}"
PEERS: dict[str, Peer] = {
    "manydoors-tcp": Peer("manydoors, TCP service", False, _MANYDOORS),
    "manydoors-ws": Peer("manydoors, WebSocket service", True, _MANYDOORS),
    "manydoors-tcp-1p": Peer(
        "manydoors, TCP service, at a single-process peer's count",
        False,
        _MANYDOORS,
        one_process_count=True,
    ),
    "asyncio": Peer(
        "asyncio streams, NDJSON",
        False,
        _SINGLE.format(why="asyncio has no multi-process mode"),
        "asyncio_streams.py",
    ),
    "uvloop": Peer(
        "uvloop asyncio.Protocol, NDJSON",
        False,
        _SINGLE.format(why="uvloop has no multi-process mode"),
        "uvloop_protocol.py",
    ),
    "websockets": Peer(
        "websockets 'broadcast()'",
        True,
        _SINGLE.format(why="no multi-process mode (its docs: a broker between processes)"),
        "websockets_server.py",
    ),
    "node-ws": Peer(
        "Node.js ws", True, "cluster: primary (API, relay) + {holders} workers", node=True
    ),
    "aiohttp": Peer(
        "aiohttp WebSocket",
        True,
        _SINGLE.format(why="gunicorn's aiohttp workers share no broadcast"),
        "aiohttp_server.py",
    ),
    "floor": Peer(
        "floor: C epoll server + C client (bench/floor)",
        False,
        "master + {holders} SO_REUSEPORT epoll workers",
        floor=True,
    ),
}
FLOOR_NOTE = (
    "the floor of this machine, not a peer: a C epoll server that accepts, writes a welcome "
    "line and on a broadcast one line to every connection, driven by a C client (bench/floor) "
    "instead of manydoors load: ready at the welcome (no hello, no sub), no 1:1"
)

# manydoors' limits for a public server are off: the peers have none, and the 1:1
# publisher would be throttled (max_messages_per_second) and the heartbeat would ping
# idle connections (the peers' keepalives are off too).
MANYDOORS_FLAGS = (
    "--publish",  # the 1:1 publisher is a client (clients may not publish by default)
    "all",
    "--max-messages-per-second",
    "0",
    "--max-bytes-per-second",
    "0",
    "--ping-interval",
    "0",
)


# --- a server under test ----------------------------------------------------------------


@dataclass
class Target:
    port: int
    api: str
    reaper: Reaper
    holders: list[int]  # the processes that hold the connections
    proc: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        return self.reaper.look()


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"the peer did not start (exit {proc.poll()})")
    return dict(json.loads(line))


def _stop(proc: subprocess.Popen[bytes], reaper: Reaper, timeout: float) -> None:
    reaper.look()
    stop(proc, timeout)  # SIGTERM, then SIGKILL of that pid
    time.sleep(0.5)  # children exit once their parent is gone: give them a moment
    killed = reaper.kill_leftovers()
    if killed:
        print(f"peers: killed leftover processes {killed}", file=sys.stderr)


def _node_ready() -> str | None:
    """Why the Node peer cannot run, or None; runs ``npm install`` once."""
    if not shutil.which("node") or not shutil.which("npm"):
        return "node/npm not installed (apt-get install -y nodejs npm)"
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        cmd = ["npm", "install", "--no-audit", "--no-fund", "--silent"]
        if subprocess.run(cmd, cwd=NODE_DIR, check=False).returncode != 0:
            return "npm install failed in bench/peers/node_ws"
    return None


@contextlib.contextmanager
def running(peer: Peer, n: int, workers: int, log: str) -> Iterator[Target]:
    """The server of ``peer`` on free ports; every process of it stopped afterwards."""
    if peer.script is None and not peer.node:
        if peer.one_process_count:  # at least what one process can hold (measure asks that)
            n = min(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_MARGIN)
        flags = ["--max-connections", str(n), *MANYDOORS_FLAGS]
        flags += ["--protocol", "websocket"] if peer.ws else []
        with server(*flags) as srv:
            target = Target(srv.port, srv.api, Reaper(srv.proc.pid), srv.worker_pids(), srv.proc)
            target.pids()
            try:
                yield target
            finally:
                target.pids()  # remember the tree before the context stops the server
        time.sleep(0.5)
        target.reaper.kill_leftovers()
        return
    if peer.node:
        cmd = ["node", os.path.join(NODE_DIR, "server.js"), "--workers", str(workers)]
    else:
        cmd = [sys.executable, os.path.join(PEERS_DIR, str(peer.script))]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--api-port", "0"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    reaper = Reaper(proc.pid)
    try:
        info = _read_ready(proc, 60)
        api = f"http://127.0.0.1:{info['api_port']}"
        target = Target(info["port"], api, reaper, list(info["workers"]), proc)
        target.pids()
        yield target
    finally:
        _stop(proc, reaper, 15)
        assert proc.stdout is not None
        proc.stdout.close()


# --- one server, all figures --------------------------------------------------------------


def measure(key: str, peer: Peer, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    n = args.connections
    per_process = os.sysconf("SC_OPEN_MAX") - FD_RESERVE
    workers = args.peer_workers or max(os.cpu_count() or 1, math.ceil(n * 1.05 / per_process))
    row: dict[str, Any] = {"peer": key, "server": peer.label, "ws": peer.ws, "notes": []}
    if peer.floor:
        floor.settle(args.tcp_inuse)  # the kernel has closed the last server's sockets
        found = floor.run(n, args.rate, args.broadcasts, server_procs=workers)
        return {**floor_row(found, peer.label), "peer": key}
    if peer.node:
        why = _node_ready()
        if why:
            row["error"] = why
            return row
    log = os.path.join(workdir, f"{key}.stderr")
    with running(peer, n, workers, log) as target:
        pids = target.pids()
        base = usage(pids)
        base_fds = open_fds(target.holders)
        room = min(fd_room(pid) for pid in target.holders)  # one process's, as for a peer
        manydoors = peer.script is None and not peer.node
        if peer.one_process_count:
            asked = min(n, room)
        else:
            asked = n if manydoors or args.no_cap else min(n, room * len(target.holders))
        row["processes"] = {
            "total": base.processes,
            "holding_connections": len(target.holders),
            "mode": peer.processes.format(holders=len(target.holders)),
        }
        row["baseline"] = {"rss_bytes": base.rss, "pss_bytes": base.pss}
        row["connections"] = {"asked": n, "requested": asked}
        limit = f"RLIMIT_NOFILE {nofile(target.holders[0]):,} per process"
        if peer.one_process_count:
            row["connections"]["capped_by"] = (
                f"as a single-process peer is, at most what one process holds under {limit} "
                f"({room:,}), so that every column compares at equal count "
                f"({len(target.holders)} workers serve it)"
            )
        elif asked < n:
            row["connections"]["capped_by"] = (
                f"what {len(target.holders)} serving process(es) hold under {limit}"
            )
        readings = Readings(target.pids, args.broadcasts)
        proxy = Proxy(target.api, readings.published)
        report_path = os.path.join(workdir, f"{key}-load.json")
        flags = [
            *(["--ws"] if peer.ws else []),
            *("--target", f"127.0.0.1:{target.port}", "--connections", str(asked)),
            *("--rate", str(args.rate), "--subscribe", "veg", "--api", proxy.url),
            *("--broadcasts", str(args.broadcasts), "--delivery-timeout", "60"),
            *("--report", report_path),
        ]
        timeout = 180 + STALL_S + asked / 500 + args.broadcasts * 65
        try:
            run = run_load(flags, timeout, readings.ramp_done, readings.round_done, key)
        finally:
            proxy.close()
        row["load_exit"] = run.code
        if run.stopped:
            row["notes"].append(f"load {run.stopped}")
        if proxy.failed:
            row["notes"].append(f"a publish call got no answer from the server: {proxy.failed}")
        if target.proc.poll() is not None:
            row["notes"].append(f"server exited ({target.proc.returncode}) during the load")
        report: dict[str, Any] = {}
        if os.path.exists(report_path):
            with open(report_path) as f:
                report = json.load(f)
        else:
            row["notes"].append(f"the load generator wrote no report: {(run.tail or ['-'])[-1]}")
        figures(row, report, base, readings.at, run.ready)
        if target.proc.poll() is None:
            row["one_to_one"] = one_to_one_at_rest(target, peer.ws, base_fds, args.messages)
        died = target.proc.poll() is not None
    if os.path.exists(log):
        with open(log, "rb") as errlog:
            text = errlog.read().decode("latin-1")
        if "Too many open files" in text or "EMFILE" in text:
            row["notes"].append("the server logged EMFILE (Too many open files)")
        if died:
            row["notes"].append(f"server exited ({target.proc.returncode}): {text[-500:]}")
    return row


def one_to_one_at_rest(target: Target, ws: bool, base_fds: int, n: int) -> dict[str, Any]:
    """1:1 throughput and its server CPU, once the load's connections are closed."""
    deadline = time.monotonic() + 120
    while open_fds(target.holders) > base_fds + 16 and time.monotonic() < deadline:
        time.sleep(0.5)
    before = usage(target.pids())
    try:
        rate = one_to_one(target.port, ws, n, 60 + n / 1000)
    except (OSError, RuntimeError, ValueError) as exc:
        return {"error": repr(exc)}
    after = usage(target.pids())
    if rate["received"]:
        rate["cpu_s"] = round(after.cpu_s - before.cpu_s, 2)
        rate["cpu_s_per_million"] = round(rate["cpu_s"] / rate["received"] * 1e6, 1)
    return rate


def figures(
    row: dict[str, Any],
    report: dict[str, Any],
    base: Usage,
    snaps: dict[str, Usage],
    ramp_ready: int | None = None,
) -> None:
    """The row's figures from the load report (else ``ramp_ready``: its "ramp done"
    line) and the server readings."""
    deliveries = report.get("deliveries", [])
    conns = report.get("connections", {})
    # Held: subscribed at the first broadcast; without one, ready when the load stopped.
    held = deliveries[0]["expected"] if deliveries else conns.get("ready", conns.get("peak"))
    held = held if held is not None else ramp_ready or 0
    row["connections"].update(
        {"held": held, "peak": conns.get("peak"), "final": conns.get("final")}
    )
    row["errors"] = report.get("errors", {})
    row["accept"] = {
        "rate_per_s": report.get("rate_achieved"),
        "connect_ms": report.get("connect_ms"),
    }
    row["broadcast"] = [
        {
            "n": d["n"],
            "expected": d["expected"],
            "received": d["received"],
            "time_to_all_ms": d["max_ms"],
            "per_second": d["per_second"],
            "p50_ms": d["p50_ms"],
            "p99_ms": d["p99_ms"],
        }
        for d in deliveries
    ]
    at = snaps.get("held") or snaps.get("ramp_done")
    if at and held:
        grown = at.rss - base.rss
        row["memory"] = {
            "rss_bytes": at.rss,
            "pss_bytes": at.pss,
            "rss_growth_bytes": grown,
            "per_connection_bytes": round(grown / held, 1),
            "pss_per_connection_bytes": round((at.pss - base.pss) / held, 1),
        }
        # The server's CPU from rest to all held: accepting, hello and subscribe. Load
        # and server share the cores, so this, not the rate alone, is what a server
        # spends per connection.
        row["accept"]["server_cpu_us_per_connection"] = round((at.cpu_s - base.cpu_s) / held * 1e6)
    cpu = broadcast_cpu(snaps, deliveries)
    if cpu:
        row["cpu"] = cpu
    stalled = report.get("stalled_at")
    if stalled:
        row["notes"].append(
            f"ramp stalled after {stalled['after_seconds']:.0f} s at open {stalled['open']:,} "
            f"ready {stalled['ready']:,} (nothing moved for {stalled['still_seconds']:.0f} s): "
            "the load held what was open" + (", broadcast to those ready" if deliveries else "")
        )
    if report.get("interrupted"):
        row["notes"].append("the load generator was interrupted: figures up to there")
    short = [f"{d['n']}: {d['received']:,}/{d['expected']:,}" for d in deliveries]
    if any(d["received"] < d["expected"] for d in deliveries):
        row["notes"].append("not every subscriber got every message (" + ", ".join(short) + ")")
    if row["errors"]:
        row["notes"].append(
            "load errors: " + ", ".join(f"{k} {v:,}" for k, v in row["errors"].items())
        )


def last_c1m() -> dict[str, Any] | None:
    """bench/results/c1m.json, the last ``./run bench c1m``'s summary, if there is one."""
    path = os.path.join(RESULTS, "c1m.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return dict(json.load(f))


def c1m_floor_row() -> dict[str, Any] | None:
    """The floor at c1m's count, from the last ``./run bench c1m``, if it ran the floor."""
    c1m = last_c1m()
    if c1m is None:
        return None
    found = c1m.get("floor")
    if not found or "error" in found:
        return None
    when = c1m["machine"]["date"]
    commit = (c1m.get("source") or {}).get("commit")
    when += f", commit {commit[:7]}" if commit else ""
    n = found["connections"]["target"]
    label = f"floor, {n:,} (from `./run bench c1m`, {when})"
    note = f"the same invocation as the c1m row: {FLOOR_NOTE}"
    return floor_row(found, label, note)


def c1m_row() -> dict[str, Any] | None:
    """manydoors at 1,000,000, from the last ``./run bench c1m`` (a separate run), if any."""
    c1m = last_c1m()
    if c1m is None:
        return None
    srv = c1m["server"]
    src = c1m.get("source") or {}  # c1m.json before the commit that added it: none
    commit = src.get("commit")
    when = c1m["machine"]["date"]
    if commit:
        when += f", commit {commit[:7]}" + (
            " with uncommitted src/ changes" if src["src_dirty"] else ""
        )
    label = "manydoors, TCP service, 1,000,000 (from `./run bench c1m`, " + when + ")"
    settings = c1m.get("settings")
    if settings:
        ping = settings.get("ping_interval")
        asked = (
            f"ramp asked {settings['rate']:,}/s, hold {settings['hold']:g} s, "
            f"{settings['broadcasts']} broadcasts, server limits on, heartbeat "
            + (f"every {ping:g} s" if ping else "off" if ping is not None else "on")
        )
    else:
        asked = "ramp asked 30,000/s and hold 60 s by default (c1m.json does not record them)"
    cpu = c1m.get("cpu")
    row: dict[str, Any] = {
        "peer": "c1m",
        "server": label,
        "ws": False,
        "source": "bench/results/c1m.json",
        "processes": {
            "total": None,  # c1m.json counts only the workers
            "holding_connections": srv["workers"],
            "mode": _MANYDOORS.format(holders=srv["workers"]),
        },
        "baseline": {"rss_bytes": srv["rss_bytes_at_start"]},
        "connections": {"asked": c1m["connections"]["target"]},
        "memory": {"per_connection_bytes": srv["user_bytes_per_connection"]},
        "notes": [
            f"a separate run, not this one, with c1m's settings: {asked}; baseline and "
            "growth are the RSS of the supervisor and workers; "
            + (
                "CPU as for the rows above; c1m measures no 1:1 rate"
                if cpu
                else "c1m measures no 1:1 rate, and this c1m.json no server CPU"
            )
        ],
    }
    # The summary carries the load report's figures under the same names but the rate.
    figures(row, {**c1m, "rate_achieved": c1m["ramp_per_second"]}, Usage(), {})
    if cpu:
        row["cpu"] = cpu  # measured as figures() does for a row of this run
    return row


def floor_row(found: dict[str, Any], label: str, note: str = FLOOR_NOTE) -> dict[str, Any]:
    """A row of the table from a ``floor.run`` result."""
    srv = found["server"]
    workers = srv["processes"] - 1
    n = found["connections"]["target"]
    row: dict[str, Any] = {
        "peer": "floor",
        "server": label,
        "ws": False,
        "processes": {
            "total": srv["processes"],
            "holding_connections": workers,
            "mode": PEERS["floor"].processes.format(holders=workers),
        },
        "baseline": {
            "rss_bytes": srv["rss_bytes_at_start"],
            "pss_bytes": srv["pss_bytes_at_start"],
        },
        "connections": {
            "asked": n,
            "requested": n,
            "held": found["held"],
            "peak": found["connections"]["peak"],
            "final": found["connections"]["final"],
        },
        "errors": found["errors"],
        "accept": {
            "rate_per_s": found["ramp_per_second"],
            "connect_ms": found["connect_ms"],
            "server_cpu_us_per_connection": srv["cpu_us_per_connection"],
        },
        "broadcast": [
            {
                "n": d["n"],
                "expected": d["expected"],
                "received": d["received"],
                "time_to_all_ms": d["max_ms"],
                "per_second": d["per_second"],
                "p50_ms": d["p50_ms"],
                "p99_ms": d["p99_ms"],
            }
            for d in found["deliveries"]
        ],
        "memory": {
            "rss_bytes": srv["rss_bytes_at_held"],
            "rss_growth_bytes": srv["rss_bytes_at_held"] - srv["rss_bytes_at_start"],
            "per_connection_bytes": srv["user_bytes_per_connection"],
        },
        "one_to_one": {},
        "notes": [note],
        "floor": found,
    }
    if "cpu" in found:
        row["cpu"] = found["cpu"]
    if found["errors"]:
        row["notes"].append(
            "errors: " + ", ".join(f"{k} {v:,}" for k, v in found["errors"].items())
        )
    if found.get("stalled"):
        row["notes"].append("the ramp stalled: held what was open")
    return row


def row_figures(row: dict[str, Any]) -> dict[str, Any]:
    """A row's figures as ``floor.figures`` names them (peers measure no load memory)."""
    accept, cpu = row.get("accept", {}), row.get("cpu", {})
    return {
        "held": row["connections"].get("held"),
        "ramp_per_second": accept.get("rate_per_s"),
        "server_cpu_us_per_connection": accept.get("server_cpu_us_per_connection"),
        "time_to_all_ms": [d["time_to_all_ms"] for d in row.get("broadcast", [])],
        "cpu_s_per_million_deliveries": cpu.get("per_million_deliveries_s"),
        "server_user_bytes_per_connection": row.get("memory", {}).get("per_connection_bytes"),
        "user_bytes_per_connection_pair": None,
        "kernel_bytes_per_connection_pair": None,
    }


def floor_ratios(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """manydoors/floor for every manydoors row held at the floor's count; and the tables."""
    base = next((r for r in rows if r.get("peer") == "floor" and "floor" in r), None)
    if base is None:
        return {}, ""
    out: dict[str, Any] = {}
    tables = []
    theirs = row_figures(base)
    for r in rows:
        if not str(r.get("peer", "")).startswith("manydoors") or "processes" not in r:
            continue
        if r["connections"].get("requested") != base["connections"]["requested"]:
            continue  # another count (manydoors-tcp-1p): not comparable
        ours = row_figures(r)
        out[r["peer"]] = floor.ratios(ours, theirs)
        table = floor.ratio_table(ours, theirs, r["peer"])
        tables.append(f"{r['server']} / floor:\n\n{table}")
    return out, "\n\n".join(tables)


# --- the table -----------------------------------------------------------------------------


def _span(values: list[Any], fmt: Callable[[Any], str], unit: str) -> str:
    """The range of the broadcasts' figures: "0.97-1.17 s"."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return (fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}") + unit


def _one_to_one(one: dict[str, Any]) -> str:
    if "error" in one or not one:
        return str(one.get("error", "-"))
    if one["received"] < one["messages"]:
        return f"incomplete: {one['received']:,}/{one['messages']:,} in {one['seconds']} s"
    return f"{one['per_second']:,}"


def _accept(accept: dict[str, Any]) -> str:
    if not accept.get("rate_per_s"):
        return "-"
    cpu = accept.get("server_cpu_us_per_connection")
    return f"{accept['rate_per_s']:,}" + (f" ({cpu} us)" if cpu is not None else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| server | processes | connections held / asked | baseline RSS | B per connection "
        "| accept /s (server CPU per connection) | connect p99 | broadcast: time to all "
        "| deliveries/s | delivery p99 | 1:1 msg/s | CPU s per 1M deliveries | notes |"
    )
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        if "error" in r and "processes" not in r:
            lines.append(f"| {r['server']} |" + " - |" * 11 + f" {r['error']} |")
            continue
        p, c, b = r["processes"], r["connections"], r.get("broadcast", [])
        procs = p["mode"] if p.get("total") is None else f"{p['total']}: {p['mode']}"
        held = f"{c.get('held', 0):,} / {c['asked']:,}"
        mem = r.get("memory", {}).get("per_connection_bytes")
        accept = r.get("accept", {})
        p99 = (accept.get("connect_ms") or {}).get("p99")
        one = r.get("one_to_one", {})
        cpu = r.get("cpu", {}).get("per_million_deliveries_s")
        notes = list(r["notes"])
        if "capped_by" in c:
            notes.insert(0, f"asked for {c['requested']:,}: {c['capped_by']}")
        cells = [
            r["server"],
            procs,
            held,
            f"{r['baseline']['rss_bytes'] / 1e6:,.1f} MB",
            f"{mem:,.0f}" if mem is not None else "-",
            _accept(accept),
            f"{p99} ms" if p99 is not None else "-",
            _span([d["time_to_all_ms"] for d in b], lambda v: f"{v / 1000:.2f}", " s"),
            _span([d["per_second"] for d in b], lambda v: f"{v:,}", ""),
            _span([d["p99_ms"] for d in b], lambda v: f"{v:,.0f}", " ms"),
            _one_to_one(one),
            f"{cpu:.2f}" if cpu is not None else "-",
            "; ".join(notes).replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description="manydoors against its peers, side by side")
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument(
        "--peers", default=",".join(PEERS), help="comma-separated, of: " + ", ".join(PEERS)
    )
    p.add_argument("--rate", type=int, default=20_000, help="connections/s asked of the ramp")
    p.add_argument("--broadcasts", type=int, default=3)
    p.add_argument("--messages", type=int, default=50_000, help="1:1 messages")
    p.add_argument(
        "--peer-workers",
        type=int,
        help="processes of a multi-process peer (node-ws); default: as manydoors sizes "
        "its pool, max(cores, connections x 1.05 / (fd limit - 64))",
    )
    p.add_argument(
        "--no-cap",
        action="store_true",
        help="ask every server for --connections even beyond what its processes' fd limits "
        "hold (the ramp then stalls and the row says where)",
    )
    p.add_argument("--name", default="peers", help="results file bench/results/NAME.json")
    args = p.parse_args()
    args.tcp_inuse = procfs.tcp_sockstat().get("inuse", 0)  # before any server here
    keys = [k.strip() for k in args.peers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PEERS]
    if unknown:
        p.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    result: dict[str, Any] = {
        "machine": machine(),
        "source": source(),
        "settings": {
            "connections": args.connections,
            "rate": args.rate,
            "broadcasts": args.broadcasts,
            "messages_1to1": args.messages,
            "peer_workers": args.peer_workers,
            "capped": not args.no_cap,
        },
        "rows": [],
    }
    extra = c1m_row()
    if extra:
        result["c1m_row"] = extra
    extras = [extra] if extra else []
    c1m_floor = c1m_floor_row()
    if c1m_floor:
        result["c1m_floor_row"] = c1m_floor
        extras.append(c1m_floor)
    with tempfile.TemporaryDirectory(prefix="manydoors-peers-") as workdir:
        for key in keys:
            print(f"peers: === {key} ===", file=sys.stderr, flush=True)
            try:
                row = measure(key, PEERS[key], args, workdir)
            except Exception as exc:  # one peer failing must not lose the others' rows
                row = {"peer": key, "server": PEERS[key].label, "error": repr(exc), "notes": []}
            result["rows"].append(row)
            result["markdown"] = markdown(result["rows"] + extras)
            result["ratios"], result["ratio_markdown"] = floor_ratios(result["rows"])
            save(args.name, result)
    print(result["markdown"])
    if result["ratio_markdown"]:
        print("\n" + result["ratio_markdown"])
    print(f"saved {os.path.join('bench', 'results', args.name + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 8: the load generator against a peer, Tsung, opening the same connections.

    ./run bench tsung [--connections 100000] [--rate 5000] [--hold 15] [--per-vm 18000]

Needs Tsung (``apt-get install -y tsung``). Each tool in turn, against a fresh
manydoors server sized for N (rate limits and heartbeat off, as ``bench/peers.py``):

1. Tsung 1.7 opens N raw TCP connections at ``--rate`` new users/s (Poisson
   arrivals, its default); each sends ``{"op":"hello","user":"u<id>"}`` and
   ``{"op":"sub","channel":"veg"}``, one line each, then thinks (holds) past the end
   of the run. An Erlang VM is one process, so it is held to RLIMIT_NOFILE: the
   client gets ``cpu="K"`` VMs of at most ``--per-vm`` users each (Tsung splits the
   users evenly), ``maxusers`` under the fd limit, and one source IP (127.0.2.x) per
   10,000 connections (one IP has ~28K ephemeral ports). Tsung starts its VMs
   through a remote shell (``-r``): a two-line script runs the command here instead
   of over ssh. Config, logs and Tsung's $HOME are in a temp dir.
2. ``manydoors load`` opens the same N at the same rate, with ``--subscribe veg``.

For both: the server's connection count is polled every 0.25 s; the connect rate is
the peak held / the time from the last poll with none to the first at the peak (the
same clock for both tools). At every poll the RSS (VmRSS) and CPU time of all the
tool's processes are summed; per connection = (peak RSS - the last reading with none
held) / held, and, leaving out the tool's own start-up, the growth from 10 % of the
peak to the peak / the connections added. Tsung's own view comes from its tsung.log
(dumped every second instead of 10): connect rate, mean and max connect time. ``--hold``
s after the peak (or 60 s without progress) the tool is stopped: SIGTERM, then SIGKILL,
by pid. This script makes itself a child subreaper, so the Erlang VMs (``erl
-detached``) and the epmd that Tsung starts stay in its process tree and are stopped
with it. Writes bench/results/tsung.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import machine, save, server
from manydoors.node import procfs

POLL_S = 0.25
STALL_S = 60.0
PR_SET_CHILD_SUBREAPER = 36
# As bench/peers.py: no per-connection rate limits, no heartbeat, the peers' backlog.
SERVER_FLAGS = (
    *("--max-messages-per-second", "0", "--max-bytes-per-second", "0"),
    *("--ping-interval", "0", "--backlog", "4096"),
)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--rate", type=int, default=5_000, help="new connections per second")
    p.add_argument("--hold", type=float, default=15, help="seconds held after the peak")
    p.add_argument("--per-vm", type=int, default=18_000, help="Tsung users per Erlang VM")
    p.add_argument("--tools", default="tsung,manydoors", help="run only these")
    p.add_argument("--results", metavar="NAME", default="tsung", help="bench/results/NAME.json")
    args = p.parse_args()
    if shutil.which("tsung") is None:
        print("tsung is not installed: apt-get install -y tsung", file=sys.stderr)
        return 2
    # Tsung's VMs daemonize (erl -detached); as a subreaper this process inherits them.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    work = tempfile.mkdtemp(prefix="manydoors-tsung-")
    runs = {"tsung": run_tsung, "manydoors": run_load}
    rows = [runs[name](args, work) for name in args.tools.split(",")]
    result = {
        "machine": machine(),
        "settings": {
            "connections": args.connections,
            "rate": args.rate,
            "hold_s": args.hold,
            "tsung_users_per_vm": args.per_vm,
            "server_flags": ["--max-connections", str(args.connections), *SERVER_FLAGS],
            "workdir": work,
        },
        "tools": rows,
    }
    print(f"saved {save(args.results, result)}", file=sys.stderr)
    print(table(rows))
    return 0


# --- processes -------------------------------------------------------------------------


def tree(root: int) -> list[int]:
    """``root`` and its descendants (the children files of all its threads)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(procfs.children(pid))
    return out


def usage(pids: list[int]) -> tuple[int, float]:
    """Summed RSS (bytes, as VmRSS) and CPU time (user + system, s) of ``pids``."""
    rss, cpu = 0, 0.0
    for pid in pids:
        seconds, resident = procfs.cpu_seconds(pid), procfs.rss(pid)
        if seconds is not None and resident is not None:  # else it exited meanwhile
            rss += resident
            cpu += seconds
    return rss, cpu


def stop_all(pids: Callable[[], list[int]], timeout: float = 20) -> None:
    """SIGTERM each once, SIGKILL what is left after ``timeout``; reap this subreaper's."""
    deadline = time.monotonic() + timeout
    termed: set[int] = set()
    while live := pids():
        for pid in live:
            if pid not in termed or time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM if pid not in termed else signal.SIGKILL)
                termed.add(pid)
        time.sleep(0.2)
        for pid in live:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


# --- one tool against one server -------------------------------------------------------


def measure(
    n: int,
    hold: float,
    held_now: Callable[[], int],
    pids: Callable[[], list[int]],
    alive: Callable[[], bool],
) -> tuple[dict[str, Any], list[list[float]]]:
    """Poll the server's count and the tool's RSS until ``hold`` s after the peak."""
    start = time.monotonic()
    timeline: list[list[float]] = []  # [t, held, tool RSS, tool CPU s]
    held = peak = base = 0
    cpu_zero = cpu_peak = 0.0
    t_zero = t_peak = start
    done: float | None = None  # when all were held, or the count stopped moving
    while alive() and (done is None or time.monotonic() - done < hold):
        now = time.monotonic()
        held, (mem, cpu) = held_now(), usage(pids())
        timeline.append([round(now - start, 2), held, mem, round(cpu, 2)])
        if held == 0:
            t_zero, base, cpu_zero = now, mem, cpu
        if held > peak:
            peak, t_peak, cpu_peak = held, now, cpu
        if done is None and (peak >= n or now - t_peak > STALL_S):  # t_peak starts at start
            done = now
        time.sleep(POLL_S)
    top = max((row[2] for row in timeline), default=0)
    figures = {
        "held_peak": peak,
        "held_end": held,
        "connect_rate": round(peak / (t_peak - t_zero)) if peak and t_peak > t_zero else None,
        "ramp_s": round(t_peak - t_zero, 2),
        "rss_start_bytes": base,
        "rss_peak_bytes": top,
        "rss_per_connection": round((top - base) / peak) if peak else None,
        "rss_total_per_connection": round(top / peak) if peak else None,
        "rss_slope_per_connection": _slope(timeline, peak),
        # CPU the ramp cost the tool (its processes, from the last poll with none held)
        "cpu_ms_per_connection": round(1000 * (cpu_peak - cpu_zero) / peak, 3) if peak else None,
    }
    return figures, timeline


def _slope(timeline: list[list[float]], peak: int) -> int | None:
    """RSS growth per connection from 10 % of the peak held to the peak: the tool's own
    start-up (processes spawned just before they connect) is left out."""
    first = next((row for row in timeline if row[1] >= peak / 10), None)
    top = max(timeline, key=lambda row: row[2], default=None)
    if first is None or top is None or top[1] <= first[1]:
        return None
    return round((top[2] - first[2]) / (top[1] - first[1]))


def mine(srv: Any) -> Callable[[], list[int]]:
    """This script's processes but itself and the server: the tool under test, orphans too."""
    server_tree = set(tree(srv.proc.pid))
    me = os.getpid()

    def pids() -> list[int]:
        live = []
        for pid in tree(me):
            if pid == me or pid in server_tree:
                continue
            if _zombie(pid):  # a daemonizing parent (erl -detached, epmd) orphaned here
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            else:
                live.append(pid)
        return live

    return pids


def _zombie(pid: int) -> bool:
    fields = procfs.stat(pid)
    return fields is None or fields[0] == "Z"  # gone counts as reaped


def _server_count(srv: Any) -> Callable[[], int]:
    return lambda: int(srv.stats()["connections"])


def _every_second(timeline: list[list[float]]) -> list[list[float]]:
    out: list[list[float]] = []
    for row in timeline:
        if not out or row[0] - out[-1][0] >= 1 or row is timeline[-1]:
            out.append(row)
    return out


TSUNG_XML = """<?xml version="1.0"?>
<!DOCTYPE tsung SYSTEM "/usr/share/tsung/tsung-1.0.dtd">
<tsung loglevel="warning" dumptraffic="false" version="1.0">
 <clients>
  <client host="localhost" cpu="{vms}" maxusers="{maxusers}">
{ips}
  </client>
 </clients>
 <servers><server host="127.0.0.1" port="{port}" type="tcp"/></servers>
 <load>
  <arrivalphase phase="1" duration="{duration}" unit="second">
   <users maxnumber="{n}" arrivalrate="{rate}" unit="second"/>
  </arrivalphase>
 </load>
 <sessions>
  <session probability="100" name="hold" type="ts_raw">
   <request subst="true"><raw data="{hello}" ack="no_ack"/></request>
   <request><raw data="{sub}" ack="no_ack"/></request>
   <thinktime value="{think}" random="false"/>
  </session>
 </sessions>
</tsung>
"""

# Tsung -r runs "CONNECTOR HOST COMMAND...": run the command here, not over ssh.
CONNECTOR = '#!/bin/sh\nshift\nexec /bin/sh -c "$*"\n'


def _xml_attr(line: str) -> str:
    return line.replace("&", "&amp;").replace('"', "&quot;").replace("\n", "&#10;")


def run_tsung(args: argparse.Namespace, work: str) -> dict[str, Any]:
    n, rate = args.connections, args.rate
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    vms = math.ceil(n / args.per_vm)
    # maxnumber ends the phase; the duration only bounds it, and Tsung's launchers may
    # fall well behind the asked rate.
    duration = math.ceil(n / rate) * 20 + 60
    home = os.path.join(work, "tsung")
    os.makedirs(home)
    connector = os.path.join(home, "local-rsh")
    with open(connector, "w") as f:
        f.write(CONNECTOR)
    os.chmod(connector, 0o755)
    ips = [f"127.0.2.{i}" for i in range(1, max(1, math.ceil(n / 10_000)) + 1)]
    with server("--max-connections", str(n), *SERVER_FLAGS) as srv:
        xml = TSUNG_XML.format(
            vms=vms,
            maxusers=fd_limit - 1_000,  # past it Tsung starts yet another VM, not EMFILE
            ips="\n".join(f'   <ip value="{ip}"/>' for ip in ips),
            port=srv.port,
            duration=duration,
            n=n,
            rate=rate,
            hello=_xml_attr('{"op":"hello","user":"u%%_tsung_userid%%"}\n'),
            sub=_xml_attr('{"op":"sub","channel":"veg"}\n'),
            think=duration + int(args.hold) + 300,  # past the run: this script stops it
        )
        config = os.path.join(home, "tsung.xml")
        with open(config, "w") as f:
            f.write(xml)
        # Ports and processes per VM (-p): each user is one Erlang process and one port.
        # Stats every second, not 10 (the controller's app env): its own connect rate.
        erl_flags = "+Q 65536 -tsung_controller dumpstats_interval 1000"
        env = {**os.environ, "HOME": home, "ERL_FLAGS": erl_flags}
        cmd = ["tsung", "-n", "-d", "4", "-p", "262144", "-i", f"md{os.getpid()}"]
        cmd += ["-r", connector, "-f", config, "-l", os.path.join(home, "log"), "start"]
        with open(os.path.join(home, "tsung.out"), "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        pids = mine(srv)
        print(f"tsung: {n:,} at {rate:,}/s, {vms} VMs, {len(ips)} IPs", file=sys.stderr)
        try:
            figures, timeline = measure(
                n, args.hold, _server_count(srv), pids, lambda: bool(pids())
            )
            figures["processes"] = len(pids())
        finally:
            stop_all(pids)
            proc.wait()
    logs = glob.glob(os.path.join(home, "log", "*", "tsung.log"))
    return {
        "tool": "tsung",
        "version": subprocess.run(["tsung", "-v"], capture_output=True, text=True).stdout.strip(),
        "vms": vms,
        "source_ips": len(ips),
        **figures,
        "tsung_log": tsung_log(logs[0]) if logs else None,
        "timeline": _every_second(timeline),
    }


def tsung_log(path: str) -> dict[str, Any]:
    """Tsung's own figures: connects, their rate and time (ms), peak connected, errors."""
    dumps: list[tuple[float, int]] = []  # (time of the dump, connects in its interval)
    connect: list[float] = []
    connected = 0
    errors: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if line.startswith("# stats: dump at "):
                dumps.append((float(parts[4]), 0))
            elif line.startswith("stats: connect ") and dumps:
                connect = [float(x) for x in parts[2:]]
                dumps[-1] = (dumps[-1][0], int(connect[0]))
            elif line.startswith("stats: connected "):
                connected = max(connected, int(parts[3]))
            elif line.startswith("stats: error"):
                errors[parts[1]] = int(parts[3])
    out: dict[str, Any] = {"connected_peak": connected, "errors": errors}
    if connect:
        # count mean stddev max min of the last interval, then the mean and count before it
        count, mean, _, top, _, mean_before, count_before = connect
        total = count + count_before
        out["connects"] = int(total)
        out["connect_mean_ms"] = round((count * mean + count_before * mean_before) / total, 3)
        out["connect_max_ms"] = top
        # Dumps are stamped in whole seconds: the rate is over the full intervals only,
        # the ones between the first and the last with connects.
        busy = [i for i, (_, c) in enumerate(dumps) if c]
        if len(busy) >= 3 and dumps[busy[-2]][0] > dumps[busy[0]][0]:
            span = dumps[busy[-2]][0] - dumps[busy[0]][0]
            out["connect_rate"] = round(sum(c for _, c in dumps[busy[0] + 1 : busy[-1]]) / span)
    return out


def run_load(args: argparse.Namespace, work: str) -> dict[str, Any]:
    n, rate = args.connections, args.rate
    report = os.path.join(work, "load.json")
    with server("--max-connections", str(n), *SERVER_FLAGS) as srv:
        flags = [*srv.target(n, rate), "--subscribe", "veg", "--report", report]
        # It holds longer than we watch, then SIGTERM ends it and it writes the report.
        flags += ["--hold", str(int(args.hold) + 600), "--stall-timeout", str(int(STALL_S))]
        with open(os.path.join(work, "load.err"), "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "manydoors", "load", *flags],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        print(f"manydoors load: {n:,} at {rate:,}/s", file=sys.stderr)
        try:
            figures, timeline = measure(
                n, args.hold, _server_count(srv), mine(srv), lambda: proc.poll() is None
            )
            figures["processes"] = len(mine(srv)())
        finally:
            # SIGTERM to the controller alone: it ends its agents and writes the report.
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(180)
            stop_all(mine(srv))
    with open(report) as f:
        rep = json.load(f)
    return {
        "tool": "manydoors load",
        **figures,
        "report": {
            "rate_achieved": rep["rate_achieved"],
            "connect_ms": rep["connect_ms"],
            "connections": rep["connections"],
            "errors": rep["errors"],
            "load_rss_start_bytes": rep["load_rss_start_bytes"],
            "load_rss_bytes": rep["load_rss_bytes"],
            "processes": rep["plan"]["processes"],
        },
        "timeline": _every_second(timeline),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| tool | held (server) | connect rate (server view) | tool's own figure | "
        "connect time | processes | RSS start -> peak | RSS per connection (10 %->peak) | "
        "CPU per connection |",
        "| --- | ---: | ---: | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        if r["tool"] == "tsung":
            log = r["tsung_log"] or {}
            own = f"{log.get('connect_rate', 0):,}/s (tsung.log)"
            when = f"mean {log.get('connect_mean_ms')} ms, max {log.get('connect_max_ms')} ms"
        else:
            rep = r["report"]
            own = f"rate_achieved {rep['rate_achieved']:,}/s"
            ms = rep["connect_ms"]
            when = f"p50 {ms['p50']} ms, p99 {ms['p99']} ms, max {ms['max']} ms"
        out.append(
            f"| {r['tool']} | {r['held_peak']:,} | {r['connect_rate'] or 0:,}/s | {own} | "
            f"{when} | {r['processes']} | {r['rss_start_bytes'] / 2**20:.0f} -> "
            f"{r['rss_peak_bytes'] / 2**20:.0f} MiB | {r['rss_per_connection'] or 0:,} B "
            f"({r['rss_slope_per_connection'] or 0:,} B) | "
            f"{r['cpu_ms_per_connection']} ms |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

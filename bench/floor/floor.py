"""The floor: a C reference server and client, run the way manydoors is run, for ratios.

    python bench/floor/floor.py [--connections 20000] [--rate 30000] [--broadcasts 3]
                                [--server-processes N] [--client-processes M] [--name floor]

``server.c`` is an epoll server that does the least a connection server can: N
processes on one SO_REUSEPORT port, each accepts (accept4, non-blocking), writes a
welcome line, and on a broadcast command writes one line to every connection.
``client.c`` is one load process: it binds its lanes' loopback source IPs with
IP_BIND_ADDRESS_NO_PORT, connects at its share of the rate with at most 512 connects
and welcomes outstanding (a window that narrows on slow answers, as the load
generator's), counts a connection ready at its welcome, and times every
broadcast line from the send time it carries. Both are built here with ``cc -O2``
(no dependency beyond libc) into bench/floor/build/.

``run()`` sizes both sides as manydoors sizes its own (server processes as the
supervisor sizes a pool, client processes and source-IP lanes from the load
generator's planner), ramps, broadcasts, stops every process it started (also on
failure), and returns the figures under the names ``bench/c1m.py`` uses. What it does
not do, and manydoors does: parse a hello and a sub per connection, route through a
broker, encode JSON, account limits. That is the point: the ratio manydoors/floor is
what all of that costs on this machine, in the same run.

Measured as for manydoors: server CPU from /proc (utime + stime of the whole process
tree) at rest, once all are ready, before the first broadcast and once the last is
received by all; user-space memory as RSS growth over connections held; kernel memory
as the growth of ``Slab``; the ramp as connects that succeeded / (last successful
connect - first attempt), the slowest process's, as the load generator reports it.
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
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peers"))
from _procs import Reaper, Usage, usage

from manydoors.loadgen.controller import percentiles, read_port_range
from manydoors.loadgen.planner import make_plan
from manydoors.node import procfs

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
CFLAGS = ["-O2", "-Wall", "-Wextra"]
SOURCES = {"server": "server.c", "client": "client.c"}
SLACK = 1.05  # as manydoors' pools (server/pools.py): 5 % spare fds over the connections
FD_RESERVE = 64  # as manydoors' fd_reserve per worker
PROGRESS_S = 0.25  # how often the clients report
Log = Callable[[str], None]


class FloorError(RuntimeError):
    """The floor could not run (no compiler, a build error, a process that died)."""


def _say(line: str) -> None:
    print(f"[floor] {line}", file=sys.stderr, flush=True)


# --- the build -------------------------------------------------------------------------


def compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise FloorError("no C compiler (cc) on PATH: apt-get install -y gcc")


def build(out: str = BUILD) -> dict[str, str]:
    """Compile the floor's server and client (again when a source is newer); their paths."""
    cc = compiler()
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, source in SOURCES.items():
        src, exe = os.path.join(HERE, source), os.path.join(out, f"floor_{name}")
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
            tmp = f"{exe}.{os.getpid()}.tmp"  # two builds at once each write their own
            done = subprocess.run([cc, *CFLAGS, "-o", tmp, src], capture_output=True, text=True)
            if done.returncode != 0 or done.stderr.strip():  # a warning is an error here
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise FloorError(f"{cc} {source}: {done.stderr.strip()}")
            os.replace(tmp, exe)
        paths[name] = exe
    return paths


def cc_version() -> str:
    done = subprocess.run([compiler(), "--version"], capture_output=True, text=True)
    return (done.stdout.splitlines() or ["?"])[0]


# --- sizing -----------------------------------------------------------------------------


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def server_processes(connections: int) -> int:
    """As manydoors sizes a pool: enough for the count with 5 % spare, at least a core each."""
    needed = math.ceil(connections * SLACK / (fd_limit() - FD_RESERVE))
    return max(needed, os.cpu_count() or 1, 1)


# --- the processes ------------------------------------------------------------------------


def _lines(stream: IO[bytes], on_line: Callable[[dict[str, Any]], None], tag: str) -> None:
    for raw in stream:
        try:
            on_line(json.loads(raw))
        except ValueError:
            _say(f"{tag}: {raw.decode(errors='replace').rstrip()}")


class Server:
    """The floor's server: its master, its workers' count lines, its commands."""

    def __init__(self, exe: str, processes: int, workdir: str, port: int = 0) -> None:
        cmd = [exe, "--workers", str(processes), "--port", str(port), "--backlog", "4096"]
        self.log = open(os.path.join(workdir, "server.stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log
        )
        self.reaper = Reaper(self.proc.pid)
        self.counts: dict[int, dict[str, Any]] = {}  # worker -> its last count line
        self.lock = threading.Lock()
        assert self.proc.stdout is not None
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            line = self.proc.stdout.readline() if ready else b""
            if not line:
                raise FloorError(f"floor_server did not start (exit {self.proc.poll()})")
            info = json.loads(line)
        except BaseException:
            self.reaper.look()
            self.proc.kill()
            self.proc.wait()
            self.reaper.kill_leftovers()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self.log.close()
            raise
        self.port: int = info["port"]
        self.workers: list[int] = info["workers"]
        self.reaper.look()
        self.thread = threading.Thread(
            target=_lines, args=(self.proc.stdout, self.on_line, "server"), daemon=True
        )
        self.thread.start()

    def on_line(self, msg: dict[str, Any]) -> None:
        with self.lock:
            self.counts[msg["worker"]] = msg

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def totals(self) -> dict[str, int]:
        keys = ("accepted", "refused", "welcome_failed", "closed", "sent", "failed", "open")
        with self.lock:
            return {k: sum(c[k] for c in self.counts.values()) for k in keys}

    def ask_counts(self, timeout: float = 10) -> dict[str, int]:
        """Every worker's counts, fresh."""
        with self.lock:
            self.counts.clear()
        self.send("s")
        deadline = time.monotonic() + timeout
        while len(self.counts) < len(self.workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.totals()

    def stop(self, timeout: float = 60) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the end of stdin: the workers print and exit
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        time.sleep(0.2)
        killed = self.reaper.kill_leftovers()
        if killed:
            _say(f"killed leftover server processes {killed}")
        self.log.close()


class Clients:
    """The floor's client processes, one plan agent each, their progress lines on one pipe."""

    def __init__(
        self,
        exe: str,
        port: int,
        connections: int,
        rate: float,
        processes: int | None,
        connect_timeout: float,
        workdir: str,
        greet: str | None = None,
        nice: int = 0,
        reconnect: str | None = None,
    ) -> None:
        self.plan = make_plan(
            connections, (("127.0.0.1", port),), read_port_range(), fd_limit(), None, processes
        )
        self.latest: dict[int, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.reports: list[str] = []
        self.log = open(os.path.join(workdir, "clients.stderr"), "wb")  # noqa: SIM115
        read_end, write_end = os.pipe()
        per_process = rate / len(self.plan.agents)
        try:
            for agent in self.plan.agents:
                report = os.path.join(workdir, f"client-{agent.index}.json")
                cmd = [exe, "--index", str(agent.index), "--target", f"127.0.0.1:{port}"]
                for lane in agent.lanes:
                    cmd += ["--lane", f"{lane.src}:{lane.count}"]
                cmd += ["--rate", f"{per_process:.3f}", "--report", report]
                cmd += ["--connect-timeout", str(connect_timeout)]
                cmd += ["--greet", greet] if greet is not None else []
                cmd += ["--reconnect", reconnect] if reconnect is not None else []
                if nice:
                    cmd = ["nice", "-n", str(nice), *cmd]
                self.procs.append(
                    subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=write_end, stderr=self.log)
                )
                self.reports.append(report)
        except BaseException:
            os.close(read_end)
            self.kill()
            self.log.close()
            raise
        finally:
            os.close(write_end)
        self.stream = os.fdopen(read_end, "rb")
        self.thread = threading.Thread(
            target=_lines, args=(self.stream, self.on_line, "client"), daemon=True
        )
        self.thread.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def on_line(self, msg: dict[str, Any]) -> None:
        with self.lock:
            self.latest[msg["client"]] = msg

    def send(self, command: str) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write(command.encode() + b"\n")
                proc.stdin.flush()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.latest.values())

    def total(self, key: str) -> int:
        return sum(int(s[key]) for s in self.snapshot())

    def received(self, n: int) -> int:
        return sum(s["received"][n - 1] for s in self.snapshot())

    def errors(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for s in self.snapshot():
            c.update(s["errors"])
        return c

    def all_reported(self) -> bool:
        return len(self.snapshot()) == len(self.procs)

    def dead(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is not None]

    def stop(self, timeout: float = 120) -> None:
        """Each writes its report and exits (closing its connections); stragglers killed."""
        self.send("stop")
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.thread.join(5)
        self.stream.close()
        self.log.close()

    def wait_started(self, timeout: float = 30) -> None:
        """Until every client process has reported once (FloorError if one died)."""
        deadline = time.monotonic() + timeout
        while not self.all_reported():
            if self.dead() or time.monotonic() > deadline:
                raise FloorError(f"floor clients did not start (exited: {self.dead()})")
            time.sleep(0.05)

    def end(self) -> None:
        """Stop (their reports written), then kill whatever is left, however stop went."""
        try:
            self.stop()
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()

    def histograms(self) -> tuple[Counter[int], dict[int, Counter[int]]]:
        connect: Counter[int] = Counter()
        latency: dict[int, Counter[int]] = {}
        for path in self.reports:
            if not os.path.exists(path):
                continue
            with open(path) as f:
                rep = json.load(f)
            connect.update({int(k): v for k, v in rep["connect_hist"].items()})
            for n, hist in rep["latency"].items():
                latency.setdefault(int(n), Counter()).update({int(k): v for k, v in hist.items()})
        return connect, latency


def _rss(pids: list[int]) -> int:
    return sum(procfs.rss(pid) or 0 for pid in pids)


# --- one run ---------------------------------------------------------------------------------


def run(
    connections: int,
    rate: float,
    broadcasts: int,
    *,
    server_procs: int | None = None,
    client_procs: int | None = None,
    connect_timeout: float = 10,
    delivery_timeout: float = 60,
    stall_timeout: float = 60,
    say: Log = _say,
) -> dict[str, Any]:
    """Ramp ``connections`` at ``rate``, broadcast ``broadcasts`` times, stop; the figures."""
    if broadcasts > 32:
        raise FloorError("at most 32 broadcasts (the client keeps a bit per message)")
    exes = build()
    server_procs = server_procs or server_processes(connections)
    started = time.time()
    slab_before = procfs.meminfo()["Slab"]
    with tempfile.TemporaryDirectory(prefix="manydoors-floor-") as workdir:
        server = Server(exes["server"], server_procs, workdir)
        clients: Clients | None = None
        try:
            server.ask_counts()  # every worker has answered: set up, at rest
            base = usage(server.reaper.look())
            clients = Clients(
                exes["client"],
                server.port,
                connections,
                rate,
                client_procs,
                connect_timeout,
                workdir,
            )
            say(
                f"{connections:,} connections, {server_procs} server processes, "
                f"{len(clients.procs)} client processes, rate {rate:,.0f}/s asked"
            )
            result = _drive(
                server, clients, base, connections, broadcasts, delivery_timeout, stall_timeout, say
            )
        finally:
            try:
                if clients is not None:
                    clients.end()
            finally:
                server.stop()
        assert clients is not None
        connect, latency = clients.histograms()
    result["connect_ms"] = percentiles(connect, 0.1)
    for d in result["deliveries"]:
        p = percentiles(latency.get(d["n"], Counter()), 1.0)
        secs = max((p["max"] or 0) + 1, 1) / 1000
        d.update({"p50_ms": p["p50"], "p99_ms": p["p99"], "max_ms": p["max"]})
        d["per_second"] = round(d["received"] / secs) if d["received"] else 0
    result["settings"].update({"rate": rate, "cc": cc_version(), "cflags": " ".join(CFLAGS)})
    result["elapsed_s"] = round(time.time() - started, 1)
    result["kernel"]["slab_before_bytes"] = slab_before
    slab = result["kernel"].pop("slab_at_held_bytes")
    result["kernel"]["slab_growth_bytes"] = slab - slab_before
    result["kernel"]["bytes_per_connection_pair"] = round(
        (slab - slab_before) / max(1, result["held"])
    )
    return result


def _drive(
    server: Server,
    clients: Clients,
    base: Usage,
    n: int,
    broadcasts: int,
    delivery_timeout: float,
    stall_timeout: float,
    say: Log,
) -> dict[str, Any]:
    clients.wait_started()
    load_base = _rss(clients.pids)
    clients.send("go")
    stalled = _ramp(clients, n, stall_timeout, say)
    held = clients.total("open")  # every one ready: the ramp waits out those in flight
    snaps = clients.snapshot()
    at_held = usage(server.reaper.look())
    slab_at_held = procfs.meminfo()["Slab"]
    load_rss = _rss(clients.pids)
    ramp_s = max(s["ramp_s"] for s in snaps)
    errors = clients.errors()
    ok = clients.total("attempted") - sum(v for k, v in errors.items() if k.startswith("E"))
    say(f"ramp done: {held:,} ready, {sum(errors.values()):,} errors")
    rounds = []
    at: dict[str, Usage] = {}
    for number in range(1, broadcasts + 1):
        time.sleep(PROGRESS_S + 0.1)  # fresh counts: "expected" is who is open now
        expected = clients.total("open")
        if number == 1:
            at["held"] = usage(server.reaper.look())
        t0 = time.time()
        server.send(f"b {number} {time.time_ns()}")
        end = time.monotonic() + delivery_timeout
        while clients.received(number) < expected and time.monotonic() < end:
            time.sleep(0.02)
        got = clients.received(number)
        took = time.time() - t0
        if number == broadcasts:
            at["broadcasts_done"] = usage(server.reaper.look())
        say(f"message {number}: {got:,}/{expected:,} received in {took:.2f} s")
        rounds.append({"n": number, "expected": expected, "received": got})
        rounds[-1]["seconds"] = round(took, 3)
    counts = server.ask_counts()
    result: dict[str, Any] = {
        "settings": {
            "connections": n,
            "server_processes": len(server.workers),
            "client_processes": len(clients.procs),
            "broadcasts": broadcasts,
            "max_in_flight_per_client": 512,
        },
        "held": held,
        "connections": {
            "target": n,
            "peak": clients.total("peak"),
            "ready": clients.total("ready"),
            "final": clients.total("open"),
        },
        "errors": dict(errors),
        "stalled": stalled,
        "ramp_per_second": round(ok / ramp_s) if ramp_s else None,
        "ramp_seconds": round(ramp_s, 3),
        "all_ready_seconds": round(max(s["ready_s"] for s in snaps), 3),
        "server": {
            "processes": len(server.workers) + 1,
            "rss_bytes_at_start": base.rss,
            "pss_bytes_at_start": base.pss,
            "rss_bytes_at_held": at_held.rss,
            "pss_bytes_at_held": at_held.pss,
            "user_bytes_per_connection": round((at_held.rss - base.rss) / max(1, held), 1),
            "cpu_us_per_connection": round((at_held.cpu_s - base.cpu_s) / max(1, held) * 1e6, 1),
            "counts": counts,
        },
        "load": {
            "processes": len(clients.procs),
            "rss_bytes_at_start": load_base,
            "rss_bytes": load_rss,
            "user_bytes_per_connection": round((load_rss - load_base) / max(1, held), 1),
        },
        "kernel": {"slab_at_held_bytes": slab_at_held},
        "deliveries": rounds,
        "duplicates": clients.total("duplicates"),
    }
    if "held" in at and "broadcasts_done" in at:
        delivered = sum(r["received"] for r in rounds)
        cpu = at["broadcasts_done"].cpu_s - at["held"].cpu_s
        result["cpu"] = {
            "broadcast_s": round(cpu, 2),
            "deliveries": delivered,
            "per_million_deliveries_s": round(cpu / delivered * 1e6, 2) if delivered else None,
        }
    return result


def _ramp(clients: Clients, n: int, stall_timeout: float, say: Log) -> bool:
    """Until every client is done (or the counts stop moving); True if it stalled."""
    moved = last_line = time.monotonic()
    last: tuple[int, ...] = ()
    prev_open, prev_t = 0, time.monotonic()
    while True:
        time.sleep(PROGRESS_S)
        snaps = clients.snapshot()
        if all(s["ramp_done"] for s in snaps) and len(snaps) == len(clients.procs):
            return False
        if clients.dead():
            raise FloorError(f"floor client processes died: {clients.dead()}")
        now = time.monotonic()
        opened, ready = clients.total("open"), clients.total("ready")
        errors = sum(clients.errors().values())
        if now - last_line >= 1:
            rate = (opened - prev_open) / (now - prev_t)
            say(f"ramp: open {opened:,}/{n:,} ready {ready:,} {rate:,.0f}/s errors {errors:,}")
            last_line, prev_open, prev_t = now, opened, now
        counts = (opened, ready, clients.total("attempted"), errors)
        if counts != last:
            last, moved = counts, now
        elif now - moved >= stall_timeout:
            say(f"ramp stalled: nothing moved for {stall_timeout:.0f} s; holding what is open")
            clients.send("end")
            end = time.monotonic() + 30
            while not all(s["ramp_done"] for s in clients.snapshot()) and time.monotonic() < end:
                time.sleep(PROGRESS_S)
            return True


def ramp_manydoors(
    port: int,
    connections: int,
    rate: float,
    server_cpu: Callable[[], float],
    *,
    channel: str = "veg",
    client_procs: int | None = None,
    connect_timeout: float = 10,
    stall_timeout: float = 60,
    say: Log = _say,
) -> dict[str, Any]:
    """The floor's client ramping a manydoors TCP service (hello + sub each): the ramp.

    The same C client as the floor's own ramp, so manydoors/floor for this ramp is the
    servers' ratio alone (a Python load generator on the same 2 cores takes as much CPU
    per connection as the server). ``server_cpu`` reads the server's CPU seconds.
    """
    exe = build()["client"]
    with tempfile.TemporaryDirectory(prefix="manydoors-floor-") as workdir:
        # At manydoors' workers' nice (worker_nice), as `manydoors load` runs by default:
        # clients and workers compete as equals, as the floor's client and server do.
        clients = Clients(
            exe,
            port,
            connections,
            rate,
            client_procs,
            connect_timeout,
            workdir,
            greet=channel,
            nice=10,
        )
        try:
            clients.wait_started()
            base = server_cpu()
            clients.send("go")
            stalled = _ramp(clients, connections, stall_timeout, say)
            cpu = server_cpu() - base
            snaps = clients.snapshot()
            held, errors = clients.total("open"), clients.errors()
            ramp_s = max(s["ramp_s"] for s in snaps)
            ok = clients.total("attempted") - sum(v for k, v in errors.items() if k.startswith("E"))
            say(f"ramp done: {held:,} ready, {sum(errors.values()):,} errors")
        finally:
            clients.end()
        connect, _ = clients.histograms()
    return {
        "client": "floor_client --greet (C)",
        "client_processes": len(clients.procs),
        "held": held,
        "ready": clients.total("ready"),
        "errors": dict(errors),
        "stalled": stalled,
        "ramp_per_second": round(ok / ramp_s) if ramp_s else None,
        "all_ready_seconds": round(max(s["ready_s"] for s in snaps), 3),
        "server_cpu_us_per_connection": round(cpu / max(1, held) * 1e6, 1),
        "connect_ms": percentiles(connect, 0.1),
    }


def storm(
    connections: int,
    rate: float,
    kind: str,
    outage: float,
    backoff: str = "0.5,30",
    *,
    server_procs: int | None = None,
    client_procs: int | None = None,
    back_timeout: float = 600,
    say: Log = _say,
) -> dict[str, Any]:
    """The floor's side of a reconnect storm (bench/storm.py): hold ``connections``, stop
    the server (``kind`` "kill": SIGKILL of its every process; "term": the end of its
    stdin, on which its workers exit and the kernel closes their sockets), start a new
    one on the same port ``outage`` seconds after the signal, and time until every
    client (``floor_client --reconnect BACKOFF``: jittered exponential backoff, as
    ``manydoors load --reconnect``) is connected and welcomed again."""
    exes = build()
    procs = server_procs or server_processes(connections)
    with tempfile.TemporaryDirectory(prefix="manydoors-floor-") as workdir:
        first = Server(exes["server"], procs, workdir)
        second: Server | None = None
        clients: Clients | None = None
        try:
            clients = Clients(
                exes["client"],
                first.port,
                connections,
                rate,
                client_procs,
                10,
                workdir,
                reconnect=backoff,
            )
            clients.wait_started()
            clients.send("go")
            _ramp(clients, connections, 60, say)
            held = clients.total("ready_now")
            say(f"storm: {kind}: stopping the floor server under {held:,} clients")
            signal_at = time.monotonic()
            if kind == "kill":
                for pid in first.reaper.look():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            first.stop()
            time.sleep(max(0.0, signal_at + outage - time.monotonic()))
            os.makedirs(os.path.join(workdir, "after"), exist_ok=True)
            second = Server(exes["server"], procs, os.path.join(workdir, "after"), first.port)
            up_at = time.monotonic()
            back_at = None
            while time.monotonic() - up_at < back_timeout:
                time.sleep(PROGRESS_S)
                if clients.total("ready_now") >= held:
                    back_at = time.monotonic()
                    break
            back = clients.total("ready_now")
            say(f"storm: {back:,} of {held:,} back")
            return {
                "kind": kind,
                "held": held,
                "back": back,
                "outage_s": round(up_at - signal_at, 2),
                "all_back_after_signal_s": round(back_at - signal_at, 2) if back_at else None,
                "all_back_after_ready_s": round(back_at - up_at, 2) if back_at else None,
                "drops": clients.total("drops"),
                "dials": clients.total("redials"),
                "reconnected": clients.total("returns"),
                "errors": dict(clients.errors()),
                "server_processes": procs,
                "client_processes": len(clients.procs),
            }
        finally:
            try:
                if clients is not None:
                    clients.end()
            finally:
                if second is not None:
                    second.stop()
                first.stop()


def settle(tcp_inuse_before: int, timeout: float = 120, say: Log = _say) -> float:
    """Wait until the kernel has closed the sockets of a run (TCP ``inuse`` back near where
    it was): the next run then starts from the same machine. Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        inuse = procfs.tcp_sockstat().get("inuse", 0)
        if inuse <= tcp_inuse_before + 1000:
            break
        time.sleep(1)
    waited = time.monotonic() - start
    if waited >= 1:
        say(f"waited {waited:.0f} s for the kernel to close the last run's sockets")
    return round(waited, 1)


# --- ratios ------------------------------------------------------------------------------------


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """The compared figures of a c1m-shaped result (manydoors' or the floor's)."""
    deliveries = result.get("deliveries") or []
    server, load = result.get("server", {}), result.get("load", {})
    kernel = result.get("kernel", {})
    held = result.get("held", (result.get("connections") or {}).get("peak"))
    user = None
    if None not in (server.get("user_bytes_per_connection"), load.get("user_bytes_per_connection")):
        user = server["user_bytes_per_connection"] + load["user_bytes_per_connection"]
    return {
        "held": held,
        "ramp_per_second": result.get("ramp_per_second"),
        "server_cpu_us_per_connection": server.get("cpu_us_per_connection"),
        "time_to_all_ms": [d.get("max_ms") for d in deliveries],
        "cpu_s_per_million_deliveries": (result.get("cpu") or {}).get("per_million_deliveries_s"),
        "server_user_bytes_per_connection": server.get("user_bytes_per_connection"),
        "user_bytes_per_connection_pair": user,
        # Not in the ratios: the run that goes second reuses slab the first one freed.
        "kernel_bytes_per_connection_pair": kernel.get("bytes_per_connection_pair"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(ours: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """manydoors / floor for each figure (from ``figures``): a ramp of 0.34 is a third of
    the floor's rate; a time to all of 1.05 is 5 % slower."""
    out: dict[str, Any] = {
        key: _ratio(ours[key], floor[key])
        for key in (
            "held",
            "ramp_per_second",
            "server_cpu_us_per_connection",
            "cpu_s_per_million_deliveries",
            "server_user_bytes_per_connection",
            "user_bytes_per_connection_pair",
        )
    }
    mine = [t for t in ours["time_to_all_ms"] if t is not None]
    theirs = [t for t in floor["time_to_all_ms"] if t is not None]
    out["time_to_all"] = _ratio(max(mine, default=None), max(theirs, default=None))
    out["time_to_all_each"] = [
        _ratio(a, b) for a, b in zip(ours["time_to_all_ms"], floor["time_to_all_ms"], strict=False)
    ]
    return out


RATIO_ROWS = (
    ("held", "held", lambda v: f"{v:,}"),
    ("ramp (connections/s)", "ramp_per_second", lambda v: f"{v:,}"),
    ("server CPU per connection, ramp (us)", "server_cpu_us_per_connection", lambda v: f"{v:,}"),
    ("broadcast: time to all (slowest, s)", "time_to_all", None),
    ("server CPU per 1M deliveries (s)", "cpu_s_per_million_deliveries", lambda v: f"{v}"),
    ("server user space per connection (B)", "server_user_bytes_per_connection", None),
    ("user space per connection, server + load (B)", "user_bytes_per_connection_pair", None),
    (
        "kernel slab per connection pair (B; no ratio: the second run reuses slab)",
        "kernel_bytes_per_connection_pair",
        None,
    ),
)


def ratio_table(ours: dict[str, Any], floor: dict[str, Any], label: str = "manydoors") -> str:
    """The Markdown table of two ``figures`` and their ratio."""
    r = ratios(ours, floor)
    lines = [f"| figure | {label} | floor (C) | {label}/floor |", "| --- | ---: | ---: | ---: |"]
    for title, key, fmt in RATIO_ROWS:
        if key == "time_to_all":
            a = max((t for t in ours["time_to_all_ms"] if t is not None), default=None)
            b = max((t for t in floor["time_to_all_ms"] if t is not None), default=None)
            cells = [f"{v / 1000:.2f}" if v is not None else "-" for v in (a, b)]
        else:
            if ours[key] is None and floor[key] is None:
                continue  # not measured by this bench
            show = fmt or (lambda v: f"{v:,.0f}")
            cells = [show(v) if v is not None else "-" for v in (ours[key], floor[key])]
        ratio = "-" if r.get(key) is None else r[key]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, BENCH)
    from _common import machine, save, source

    p = argparse.ArgumentParser(description="the C floor alone (c1m runs it beside manydoors)")
    p.add_argument("--connections", type=int, default=20_000)
    p.add_argument("--rate", type=int, default=30_000)
    p.add_argument("--broadcasts", type=int, default=3)
    p.add_argument("--server-processes", type=int)
    p.add_argument("--client-processes", type=int)
    p.add_argument("--name", default="floor", help="results file bench/results/NAME.json")
    args = p.parse_args()
    result = {
        "machine": machine(),
        "source": source(),
        **run(
            args.connections,
            args.rate,
            args.broadcasts,
            server_procs=args.server_processes,
            client_procs=args.client_processes,
        ),
    }
    print(json.dumps(result, indent=1))
    print(f"saved {save(args.name, result)}", file=sys.stderr)
    return 0 if result["held"] == args.connections and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

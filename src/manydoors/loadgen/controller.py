"""The load controller: plans, starts the load processes, ramps, holds, broadcasts, reports."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_pipes
from types import FrameType
from typing import Any, Final, TextIO, cast

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..apiclient import post_json
from ..node import procfs
from .agent import REPORT_EVERY, AgentOptions, agent_main
from .errors import explain
from .planner import Plan
from .pusherclient import PusherApp
from .pusherclient import publish as pusher_publish
from .reconnect import Backoff, merge

# Until every load process has reported once, the ramp is starting (forking, imports on
# a busy machine), not stalled: the stall clock allows it at least this long.
STARTUP_S: Final = 30.0
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    rate: float
    hold: float
    hello: bool
    subscribe: str | None
    api: str | None
    broadcasts: int
    delivery_timeout: float
    connect_timeout: float
    fd_limit: int
    source_ports: tuple[int, int] | None = None
    ws: bool = False
    tls: bool = False
    stall_timeout: float = 60.0  # a ramp whose counts do not move this long ends anyway
    pusher: PusherApp | None = None  # Pusher protocol 7; publish through its REST API
    reconnect: Backoff | None = None  # dial again after drops, resubscribe with since
    nice: int = 0  # added to each load process's nice value


def read_port_range(root: str = "/") -> tuple[int, int]:
    """The kernel's ephemeral port range (net.ipv4.ip_local_port_range)."""
    found = procfs.sysctl("net.ipv4.ip_local_port_range", root)
    if found is None or len(found) != 2:
        raise OSError(f"cannot read net.ipv4.ip_local_port_range under {root}")
    return found[0], found[1]


def machine_info() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cores": os.cpu_count(),
        "memory_bytes": procfs.meminfo().get("MemTotal", 0),
        "kernel": platform.release(),
        "fd_limit": {"soft": soft, "hard": hard},
        "port_range": list(read_port_range()),
    }


def describe_publish_error(exc: Exception) -> str:
    """One line for a failed publish: the HTTP status and the server's reason, or the errno."""
    if isinstance(exc, urllib.error.HTTPError):
        raw = b""
        try:
            raw = exc.read()
            body = json.loads(raw)
        except (OSError, ValueError, http.client.HTTPException):
            body = None  # a proxy's HTML page, Pusher's plain text, or nothing
        finally:
            exc.close()
        if isinstance(body, dict) and body.get("error"):
            # The API's errors read {"error": code, "reason": text}.
            reason = f": {body['reason']}" if body.get("reason") else ""
            return f"HTTP {exc.code} {body['error']}{reason}"
        text = raw[:200].decode(errors="replace").strip()
        if text and not text.startswith("<"):  # Pusher's REST API answers in plain text
            return f"HTTP {exc.code} {exc.reason}: {text}"
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, Exception):
        exc = exc.reason  # a failed connect: the OSError under it says which
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return f"{errno.errorcode[exc.errno]}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return "no answer in time (--delivery-timeout)"
    return f"{type(exc).__name__}: {exc}"


def percentiles(hist: Counter[int], scale: float) -> dict[str, float | None]:
    """p50/p90/p99/max of a bucketed histogram; ``scale`` turns buckets into ms.

    A bucket is reported by its upper edge: "p50 0.1 ms" means half took <= 0.1 ms.
    """
    total = sum(hist.values())
    if not total:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    out: dict[str, float | None] = {}
    marks = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)]
    seen = 0
    keys = sorted(hist)
    i = 0
    for bucket in keys:
        seen += hist[bucket]
        while i < len(marks) and seen >= marks[i][1] * total:
            out[marks[i][0]] = round((bucket + 1) * scale, 3)
            i += 1
    out["max"] = round((keys[-1] + 1) * scale, 3)
    return out


class Controller:
    def __init__(
        self, plan: Plan, opts: LoadOptions, out: TextIO | None = None, live: bool = False
    ) -> None:
        self.plan = plan
        self.live: Live | None = None
        if live:
            self.live = Live(console=Console(file=out or sys.stderr), refresh_per_second=4)
        self.opts = opts
        self.out = out or sys.stderr
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        self.latest: dict[int, dict[str, Any]] = {}
        self.timeline: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.last_line = -1.0
        self.stalled: dict[str, Any] | None = None  # where the ramp stood when it stalled
        self.signals: list[int] = []  # SIGINT/SIGTERM received: the first ends the run

    @property
    def interrupted(self) -> int:
        """The signal that ended the run early (0: none)."""
        return self.signals[0] if self.signals else 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only noted here: the loops below poll at most a second and look at it.
        self.signals.append(signum)

    def say(self, line: str) -> None:
        if self.live is not None:
            self.live.console.print(f"load: {line}", highlight=False)
        else:
            print(f"load: {line}", file=self.out, flush=True)

    def start(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["manydoors.loadgen.agent"])
        rate = self.opts.rate / len(self.plan.agents)
        agent_opts = AgentOptions(
            rate,
            self.opts.hello,
            self.opts.subscribe,
            self.opts.connect_timeout,
            self.opts.fd_limit,
            self.opts.source_ports,
            self.opts.ws,
            self.opts.tls,
            self.opts.pusher,
            self.opts.reconnect,
            self.opts.nice,
        )
        for agent in self.plan.agents:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=agent_main,
                args=(agent, agent_opts, theirs),
                name=f"manydoors-load-{agent.index}",
            )
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)

    def poll(self, timeout: float) -> None:
        """Take in every progress report that arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = cast(list[Pipe], wait_pipes(self.pipes, timeout=max(0.0, left)))
            for pipe in ready:
                try:
                    snap = pipe.recv()
                except EOFError:
                    continue
                self.latest[snap["agent"]] = snap
            if left <= 0 or self.interrupted:
                break

    def total(self, key: str) -> int:
        return sum(s[key] for s in self.latest.values())

    def errors(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for s in self.latest.values():
            c.update(s["errors"])
        return c

    def sample(self) -> dict[str, Any]:
        s = {
            "t": round(time.time() - self.t0, 3),
            "open": self.total("open"),
            "ready": self.total("ready"),
            "attempted": self.total("attempted"),
            "errors": sum(self.errors().values()),
            "rss_bytes": self.total("rss_bytes"),
        }
        self.timeline.append(s)
        return s

    def show(self, s: dict[str, Any], phase: str) -> None:
        """Progress: a live table on a terminal, one quiet line a second otherwise."""
        prev = self.timeline[-2] if len(self.timeline) > 1 else None
        rate = 0.0
        if prev and s["t"] > prev["t"]:
            rate = (s["open"] - prev["open"]) / (s["t"] - prev["t"])
        if self.live is None:
            if s["t"] - self.last_line >= 1:
                self.last_line = s["t"]
                down = ""
                if self.opts.reconnect is not None:
                    down = f" down {self.redialing():,}"
                self.say(
                    f"{phase}: open {s['open']:,}/{self.plan.connections:,} "
                    f"ready {s['ready']:,}{down} {rate:,.0f}/s errors {s['errors']:,} "
                    f"load rss {s['rss_bytes'] / 2**20:.0f} MiB"
                )
            return
        table = Table(title=f"manydoors load: {phase}", show_header=False)
        table.add_row("connected", f"{s['open']:,} / {self.plan.connections:,}")
        table.add_row("ready (hello'd, subscribed)", f"{s['ready']:,}")
        table.add_row("rate", f"{rate:,.0f}/s")
        table.add_row("load processes RSS", f"{s['rss_bytes'] / 2**20:,.0f} MiB")
        if self.opts.reconnect is not None:
            table.add_row("down (backing off or dialing again)", f"{self.redialing():,}")
        for name, count in self.errors().most_common():
            table.add_row(f"[red]{name}", f"{count:,}  {explain(name)}")
        self.live.update(table)

    def redialing(self) -> int:
        """--reconnect: connections down, waiting out their backoff or dialing again."""
        return sum(s["reconnect"]["pending"] for s in self.latest.values() if "reconnect" in s)

    def ramp(self) -> None:
        """Wait until every process has attempted its share and each connection its answer.

        A process is done once its connects and greetings have all succeeded or failed
        (it times them out). Should the counts still stop moving for stall_timeout, the
        processes are told to stop ramping, the run goes on to the hold with what is
        open, and the report says where the ramp stalled.
        """
        start = moved = time.monotonic()
        last: tuple[int, ...] = ()
        while not self.interrupted:
            self.poll(0.25)
            s = self.sample()
            self.show(s, "ramp")
            reported = len(self.latest)
            if reported == len(self.procs) and all(x["ramp_done"] for x in self.latest.values()):
                return
            if not all(p.is_alive() for p in self.procs):
                self.say("a load process died")
                return
            now = time.monotonic()
            counts = (reported, s["open"], s["ready"], s["attempted"], s["errors"])
            if counts != last:
                last, moved = counts, now
                continue
            limit = self.opts.stall_timeout
            if reported < len(self.procs):
                limit = max(limit, STARTUP_S)
            if now - moved >= limit:
                self.stall(s, now - start, now - moved)
                return

    def stall(self, s: dict[str, Any], seconds: float, still: float) -> None:
        """End a ramp that stopped moving: the processes hold what they have."""
        self.stalled = {
            "after_seconds": round(seconds, 3),
            "still_seconds": round(still, 3),
            **{k: s[k] for k in ("attempted", "open", "ready", "errors")},
        }
        self.say(
            f"ramp stalled: nothing moved for {still:.0f} s at open {s['open']:,} "
            f"ready {s['ready']:,} of {self.plan.connections:,} "
            f"(attempted {s['attempted']:,}, errors {s['errors']:,}); holding what is open"
        )
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("end_ramp")

    def publish(self, n: int) -> None:
        assert self.opts.api
        stamp = {"t": time.time(), "n": n}
        app = self.opts.pusher
        if app is not None:
            # An event's data is a string in Pusher's API: the stamp as JSON text.
            assert self.opts.subscribe
            data = json.dumps(stamp)
            timeout = self.opts.delivery_timeout
            pusher_publish(self.opts.api, app, self.opts.subscribe, data, timeout)
            return
        target: dict[str, Any] = (
            {"channel": self.opts.subscribe} if self.opts.subscribe else {"broadcast": True}
        )
        url = self.opts.api.rstrip("/") + "/api/publish"
        post_json(url, {**target, "data": stamp}, timeout=self.opts.delivery_timeout)

    def broadcast_round(self, n: int) -> dict[str, Any] | None:
        """Publish message ``n`` and count who got it; None if a signal came first."""
        self.poll(REPORT_EVERY + 0.1)  # fresh snapshots: "expected" is who is ready now
        if self.interrupted:
            return None
        expected = self.total("ready")
        t_pub = time.time()
        try:
            self.publish(n)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # One lost message must not lose the run's figures: record it and go on.
            error = describe_publish_error(exc)
            self.say(f"message {n}: publish failed: {error}")
            took = round(time.time() - t_pub, 3)
            return {
                "n": n,
                "expected": expected,
                "received": 0,
                "seconds": took,
                "error": error,
                "cut": False,
            }
        deadline = time.monotonic() + self.opts.delivery_timeout
        received = 0
        while time.monotonic() < deadline and not self.interrupted:
            self.poll(0.2)
            received = sum(s["received"].get(n, 0) for s in self.latest.values())
            if received >= expected:
                break
        took = time.time() - t_pub
        self.say(f"message {n}: {received:,}/{expected:,} received in {took:.2f} s")
        return {
            "n": n,
            "expected": expected,
            "received": received,
            "seconds": round(took, 3),
            "error": None,
            # Cut short by a signal: the final snapshots will know better what arrived.
            "cut": bool(self.interrupted) and received < expected,
        }

    def stop(self) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        finals: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 120
        # A second SIGINT/SIGTERM means: do not wait for the figures, end the processes.
        while (
            len(finals) < len(self.pipes) and time.monotonic() < deadline and len(self.signals) < 2
        ):
            for pipe in cast(list[Pipe], wait_pipes(self.pipes, timeout=1)):
                try:
                    snap = pipe.recv()
                except EOFError:
                    continue
                if snap["final"]:
                    finals[snap["agent"]] = snap
                self.latest[snap["agent"]] = snap
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return list(finals.values())

    def run(self) -> dict[str, Any]:
        """Ramp, broadcast, hold and report; SIGINT or SIGTERM cut it short, with a report."""
        # Signal handlers can only be set from the main thread (cli.main is there).
        handle = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS if handle}
        try:
            return self.run_phases()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def run_phases(self) -> dict[str, Any]:
        self.say(self.plan.describe())
        self.start()
        rounds: list[dict[str, Any]] = []
        if self.live is not None:
            self.live.start()
        try:
            self.ramp()
            if not self.interrupted:
                # The line a driving script waits for: from here on the load is held.
                self.say(f"ramp done: {self.total('ready'):,} ready")
            hold_until = time.monotonic() + self.opts.hold
            if self.opts.api and self.opts.broadcasts:
                for n in range(1, self.opts.broadcasts + 1):
                    if self.interrupted:
                        break
                    done = self.broadcast_round(n)
                    if done is not None:
                        rounds.append(done)
            while time.monotonic() < hold_until and not self.interrupted:
                self.poll(min(1.0, max(0.0, hold_until - time.monotonic())))
                self.show(self.sample(), "hold")
        finally:
            if self.live is not None:
                self.live.stop()
            if self.interrupted:
                self.say(f"{signal.Signals(self.interrupted).name}: stopping the load processes")
            finals = self.stop()
        # The ramp ends at the last successful connect of the slowest process.
        ramp_s = max((s["ramp_seconds"] for s in self.latest.values()), default=0.0)
        return self.report(finals, rounds, ramp_s)

    def report(
        self,
        finals: list[dict[str, Any]],
        rounds: list[dict[str, Any]],
        ramp_s: float,
    ) -> dict[str, Any]:
        """The JSON report. Counts come from the last snapshot of each process: its final
        one (taken as it stopped, before closing its connections) when it sent it."""
        connect: Counter[int] = Counter()
        latency: dict[int, Counter[int]] = {}
        arrived: Counter[int] = Counter()  # message -> recipients by the end of the run
        for f in finals:
            arrived.update({int(k): v for k, v in f["received"].items()})
            connect.update({int(k): v for k, v in f["connect_hist"].items()})
            for n, hist in f["latency"].items():
                latency.setdefault(int(n), Counter()).update({int(k): v for k, v in hist.items()})
        deliveries = []
        for r in rounds:
            p = percentiles(latency.get(r["n"], Counter()), 1.0)
            received = max(r["received"], arrived[r["n"]]) if r["cut"] else r["received"]
            # Delivered to all by the slowest recipient's latency (bucket: 1 ms).
            secs = max((p["max"] or 0) + 1, 1) / 1000 if received else r["seconds"]
            deliveries.append(
                {
                    "n": r["n"],
                    "expected": r["expected"],
                    "received": received,
                    "p50_ms": p["p50"],
                    "p99_ms": p["p99"],
                    "max_ms": p["max"],
                    # A publish that failed at once took no time and delivered nothing.
                    "per_second": round(received / secs) if secs > 0 else 0,
                    "error": r["error"],  # why the publish failed; None if it did not
                }
            )
        errors = self.errors()
        ok = self.total("attempted") - sum(v for k, v in errors.items() if k.startswith("E"))
        extra: dict[str, Any] = {}
        if self.opts.reconnect is not None:
            extra["reconnect"] = self.reconnect_report(finals, arrived)
        return {
            "machine": machine_info(),
            "plan": {
                "connections": self.plan.connections,
                "targets": [f"{h}:{p}" for h, p in self.plan.targets],
                "source_ips": len(self.plan.source_ips),
                "processes": len(self.plan.agents),
                "lanes": [asdict(lane) for a in self.plan.agents for lane in a.lanes],
            },
            "connections": {
                "target": self.plan.connections,
                "peak": self.total("peak"),
                "final": self.total("open"),
                "ready": self.total("ready"),
            },
            "stalled": self.stalled is not None,
            "stalled_at": self.stalled,
            "interrupted": bool(self.interrupted),
            "connect_ms": percentiles(connect, 0.1),
            "rate_achieved": round(ok / ramp_s) if ramp_s else None,
            "ramp_seconds": round(ramp_s, 3),
            "errors": dict(errors),
            "errors_explained": {k: explain(k) for k in errors},
            "duplicates": self.total("duplicates"),
            "deliveries": deliveries,
            "publish_failed": sum(1 for r in rounds if r["error"]),
            "load_rss_bytes": self.total("rss_bytes"),
            "load_rss_start_bytes": self.total("rss_start"),
            "timeline": self.timeline,
            # Raw histograms for plots: bucket -> count (connect: 0.1 ms, delivery: 1 ms).
            "histograms": {
                "connect_0.1ms": {str(k): v for k, v in sorted(connect.items())},
                "delivery_ms": {
                    str(n): {str(k): v for k, v in sorted(h.items())}
                    for n, h in sorted(latency.items())
                },
            },
            **extra,
        }

    def reconnect_report(
        self, finals: list[dict[str, Any]], arrived: Counter[int]
    ) -> dict[str, Any]:
        """--reconnect: drops, dials and returns, and what each message reached."""
        snaps = {s["agent"]: s for s in self.latest.values()}
        snaps.update({f["agent"]: f for f in finals})
        merged = merge([s["reconnect"] for s in snaps.values() if "reconnect" in s])
        byes: Counter[str] = Counter()
        for s in snaps.values():
            byes.update(s["closed"])
        backoff = self.opts.reconnect
        assert backoff is not None
        return {
            "backoff": {"base_s": backoff.base, "cap_s": backoff.cap, "jitter": "full"},
            "started_at": self.t0,  # wall clock of the timeline's t = 0
            **merged,
            "drops_explained": {k: explain(k) for k in merged["drops"]},
            "byes": dict(byes),  # the bye events received, by reason
            # message number -> connections that got it (each counted once per client)
            "received": {str(n): c for n, c in sorted(arrived.items())},
        }

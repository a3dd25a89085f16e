"""Reconnect storms: N clients held, the node restarted under them, every message once.

    ./run bench storm [--connections 100000] [--kill term,kill] [--ws] [--outage 5]
                      [--before 2] [--during 4] [--after 2] [--rate 20000] [--name storm]

One run per kind of restart in ``--kill`` (default both, in this order):

- ``term``: SIGTERM to the node's supervisor; it drains (every client gets ``bye
  shutdown`` and a close) and exits; a new node starts on the same ports.
- ``kill``: SIGKILL of the whole node at once (the supervisor, its workers from
  /api/stats, and every other process of its tree): clients see their connections
  reset or closed by the kernel, with no ``bye``; a new node starts on the same ports.

Each run: Redis, a publisher node and the node under test share that Redis (the Redis
broker keeps each channel's seq and history, so both survive the node; with the local
broker a restarted node starts its seqs from 1 and forgets its history, and nothing can
publish while the only node is down). ``manydoors load --reconnect`` opens N
connections to the node under test, each says hello and subscribes to a fresh channel;
``--before`` timed messages are published (through the publisher node's API) and
confirmed received by all; the node is stopped; ``--during`` messages are published
over ``--outage`` seconds while it is down; the node starts again on the same ports;
the clients come back on their own (jittered exponential backoff, hello, ``sub`` with
``since``); once all N are back, ``--after`` messages are published and delivered.

Reported per run: the outage (signal to new node ready), the time until all N were
back (from the signal and from the new node's ready; the load generator's exact time
of its last return), drops by reason, dials, errors, and per message how many clients
got it (each must be N) and its latency from publish (for the messages published
during the outage: until recovered from history); exactly-once holds when every
message reached N clients and no client saw a seq twice or skipped one. History
(``--history-size``, ``--history-ttl``) is sized to cover the whole run.

The floor (``bench/floor``) reconnecting the same N, after each run (``--no-floor``
skips it): the C server holding N connections of the C client with ``--reconnect`` (the
same backoff), stopped the same way (SIGKILL of its every process, or for ``term`` the
end of its stdin, on which its workers exit: it has no drain and no ``bye``), a new
one started on the same port after the same outage; the time until all N are welcomed
again. The run's ``floor`` section has those figures and ``ratios`` manydoors/floor.
The floor has no history and no messages: it times the reconnection alone.

Writes bench/results/storm.json (``--name``), and per run storm-<kind>-load.json (the
load report) and storm-<kind>.png (its plot: connections over time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from _common import HERE, RESULTS, LoadWatch, machine, save, server, source

sys.path.insert(0, os.path.join(HERE, "peers"))
sys.path.insert(0, os.path.join(HERE, "floor"))
from _procs import tree

import floor
from manydoors.apiclient import get_json, post_json
from manydoors.loadgen.controller import percentiles
from manydoors.node import procfs
from support.redisfix import RedisServer

HISTORY_TTL = 3600  # seconds: longer than any run
READY_S = 120.0  # a node's start
LOAD_LINE = re.compile(r"^load: (?:ramp|hold): open [\d,]+/[\d,]+ ready ([\d,]+) down ([\d,]+)")
ROUND_LINE = re.compile(r"^load: message (\d+): ")


class Node:
    """The node under test: ``manydoors serve`` on fixed ports once it has them."""

    def __init__(self, flags: list[str], log_dir: str) -> None:
        self.flags = flags
        self.log_dir = log_dir
        self.port = self.api_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = ""
        self.starts = 0

    def start(self) -> float:
        """Start on the node's ports (free ones the first time); the time it was ready."""
        ready = os.path.join(self.log_dir, f"ready-{self.starts}.json")
        log = os.path.join(self.log_dir, f"node-{self.starts}.log")
        self.starts += 1
        ports = ["--port", str(self.port), "--api-port", str(self.api_port)]
        cmd = [sys.executable, "-m", "manydoors", "serve", "--ready-file", ready, *ports]
        with open(log, "wb") as out:  # the child has its own copy of the fd
            self.proc = subprocess.Popen([*cmd, *self.flags], stderr=out)
        deadline = time.monotonic() + READY_S
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start: see {log}")
            time.sleep(0.02)
        at = time.time()
        with open(ready) as f:
            info = json.load(f)
        self.api = info["api"]
        self.port = info["services"]["chat"]["port"]
        self.api_port = int(self.api.rsplit(":", 1)[1])
        return at

    def stats(self) -> dict[str, Any]:
        return dict(get_json(self.api + "/api/stats", timeout=60))

    def term(self) -> None:
        """SIGTERM: the node drains (``gone`` waits for its end)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def gone(self) -> float:
        """Wait for the supervisor's exit (the end of its drain); the time it exited."""
        assert self.proc is not None
        self.proc.wait(300)
        return time.time()

    def kill(self) -> list[int]:
        """SIGKILL the supervisor, its workers and the rest of its tree, all at once."""
        assert self.proc is not None
        workers = [w["pid"] for s in self.stats()["services"] for w in s["workers"]]
        # The workers are in the tree (children of the fork server); asked of the API
        # too, should one have left it. All are alive now: no pid can have been reused.
        pids = sorted({*tree(self.proc.pid), *workers})
        killed = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        self.proc.wait(30)
        deadline = time.monotonic() + 30
        # Gone, or a zombie (its parent, the fork server, died too: nobody may reap it).
        while any((procfs.stat(pid) or ["Z"])[0] != "Z" for pid in killed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"killed processes still there: {killed}")
            time.sleep(0.02)
        return killed

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill()


class Load(LoadWatch):
    """``manydoors load --reconnect ...``: its lines echoed; ready, down and rounds read."""

    def __init__(self, flags: list[str], tag: str) -> None:
        self.down = -1
        self.rounds: set[int] = set()
        super().__init__("--reconnect", *flags, tag=tag, quiet=True)

    def seen(self, line: str) -> None:
        found = LOAD_LINE.match(line)
        if found:
            self.ready, self.down = (int(x.replace(",", "")) for x in found.groups())
        elif (round_line := ROUND_LINE.match(line)) is not None:
            self.rounds.add(int(round_line[1]))

    def wait(self, what: str, test: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the load generator exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def finish(self) -> int:
        """SIGINT: the load stops its processes and writes its report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.thread.join(10)
        return code


def publish(api: str, channel: str, n: int) -> dict[str, Any]:
    """Message ``n`` (stamped with its send time) through the publisher node's API."""
    return dict(
        post_json(
            api + "/api/publish", {"channel": channel, "data": {"t": time.time(), "n": n}}, 60
        )
    )


def floor_reconnect(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The C floor reconnecting the same N after the same restart ({"error"} if it fails)."""
    if args.no_floor:
        return {"skipped": "--no-floor"}
    try:
        floor.settle(args.tcp_inuse)  # the run before has closed its sockets
        return floor.storm(
            args.connections,
            args.rate,
            kind,
            args.outage,
            args.backoff,
            back_timeout=min(args.back_timeout, 300),
        )
    except Exception as exc:  # the floor failing must not cost the manydoors run
        print(f"storm: the floor did not run: {exc!r}", file=sys.stderr)
        return {"error": repr(exc)}


def storm(args: argparse.Namespace, kind: str, redis_url: str, tmp: str) -> dict[str, Any]:
    n = args.connections
    channel = f"storm-{kind}-{os.getpid()}-{int(time.time())}"  # fresh: seqs from 1
    history = ["--history-size", str(args.history_size), "--history-ttl", str(HISTORY_TTL)]
    broker = ["--broker", "redis", "--redis-url", redis_url, *history]
    proto = ["--protocol", "websocket"] if args.ws else []
    paths = {k: os.path.join(RESULTS, f"{args.name}-{kind}{k}") for k in ("-load.json", ".png")}
    node = Node(
        [
            *broker,
            *proto,
            *("--max-connections", str(n), "--drain-timeout", "60"),
            *("--ping-interval", args.ping_interval),
        ],
        tempfile.mkdtemp(prefix=f"storm-{kind}-", dir=tmp),
    )
    timeline: dict[str, float] = {}
    notes: list[str] = []
    load_before = os.getloadavg()[0]  # other work on the machine shows here
    published: dict[int, dict[str, Any]] = {}
    pub_flags = ["--workers", "1", "--max-connections", "100", *broker]
    with server(*pub_flags) as publisher:
        node.start()
        load = Load(
            [
                *("--target", f"127.0.0.1:{node.port}", "--connections", str(n)),
                *("--rate", str(args.rate), "--subscribe", channel, "--hold", "86400"),
                *("--api", publisher.api, "--broadcasts", str(args.before)),
                *("--delivery-timeout", "60", "--backoff", args.backoff),
                *("--report", paths["-load.json"], "--plot", paths[".png"]),
                *(["--ws"] if args.ws else []),
            ],
            kind,
        )
        try:
            load.wait("the ramp", load.ramp_done.is_set, 600 + n / 1000)
            load.wait("the messages before", lambda: len(load.rounds) >= args.before, 120)
            for k in range(1, args.before + 1):
                published[k] = {"phase": "before", "at": None}
            number = args.before
            timeline["signal"] = time.time()
            print(f"storm: {kind}: stopping the node under {n:,} clients", file=sys.stderr)
            if kind == "kill":
                killed = node.kill()
                timeline["gone"] = time.time()
                print(f"storm: SIGKILL to {len(killed)} processes", file=sys.stderr)
            else:
                node.term()
            # Publish during the outage: the first right away (with SIGTERM: while the
            # node drains), the rest spread over --outage seconds.
            for i in range(args.during):
                due = timeline["signal"] + i * args.outage / max(1, args.during)
                time.sleep(max(0.0, due - time.time()))
                number += 1
                answer = publish(publisher.api, channel, number)
                published[number] = {"phase": "during", "at": time.time(), "seq": answer["seq"]}
            if kind == "term":
                timeline["gone"] = node.gone()
            time.sleep(max(0.0, timeline["signal"] + args.outage - time.time()))
            timeline["up"] = node.start()
            outage = timeline["up"] - timeline["signal"]
            print(f"storm: the node is ready again after {outage:.1f} s", file=sys.stderr)
            try:
                load.wait(
                    f"all {n:,} back",
                    lambda: load.ready == n and load.down == 0,
                    args.back_timeout,
                )
            except RuntimeError as exc:  # the report says who is still down, and why
                print(f"storm: {exc}; going on", file=sys.stderr)
                notes.append(str(exc))
            before = node.stats()["messages_out"]
            for _ in range(args.after):
                number += 1
                answer = publish(publisher.api, channel, number)
                published[number] = {"phase": "after", "at": time.time(), "seq": answer["seq"]}
            # Delivered: the node wrote them to every client (they then read them).
            deadline = time.monotonic() + 120
            while node.stats()["messages_out"] < before + args.after * n:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            time.sleep(2)
            stats = node.stats()
        finally:
            code = load.finish()
            node.stop()
    with open(paths["-load.json"]) as f:
        report = json.load(f)
    result = summarize(args, kind, report, timeline, published, stats, code, node.log_dir)
    result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    theirs = result["floor"] = floor_reconnect(args, kind)
    result["ratios"] = {
        key: round(result[key] / theirs[key], 2) if result.get(key) and theirs.get(key) else None
        for key in ("all_back_after_signal_s", "all_back_after_ready_s")
    }
    return {**result, "notes": notes} if notes else result


def summarize(
    args: argparse.Namespace,
    kind: str,
    report: dict[str, Any],
    timeline: dict[str, float],
    published: dict[int, dict[str, Any]],
    stats: dict[str, Any],
    code: int,
    logs: str,
) -> dict[str, Any]:
    n = args.connections
    redial = report["reconnect"]
    last_back = redial["last_back_at"] or 0.0
    hists = report["histograms"]["delivery_ms"]
    messages = []
    for k, info in sorted(published.items()):
        hist = Counter({int(b): c for b, c in hists.get(str(k), {}).items()})
        p = percentiles(hist, 1.0)
        got = int(redial["received"].get(str(k), 0))
        messages.append({"n": k, **info, "received": got, "p50_ms": p["p50"], "max_ms": p["max"]})
    once = (
        all(m["received"] == n for m in messages)
        and report["duplicates"] == 0
        and not (redial["repeats"] or redial["gaps"] or redial["not_recovered"])
    )
    signal_at = timeline["signal"]
    return {
        "kind": kind,
        "outage_s": round(timeline["up"] - signal_at, 2),
        "node_gone_after_s": round(timeline["gone"] - signal_at, 2),
        "all_back_after_signal_s": round(last_back - signal_at, 2) if last_back else None,
        "all_back_after_ready_s": round(last_back - timeline["up"], 2) if last_back else None,
        # The storm's peak: the most clients back within one second (any second).
        "peak_back_per_second": peak_rate(redial["back_0.1s"]),
        "back_after_signal_s": returns(redial["back_0.1s"], signal_at),
        "connections": report["connections"],
        "drops": redial["drops"],
        "dials": redial["attempts"],
        "reconnected": redial["reconnected"],
        "still_down": redial["pending"],
        "errors": report["errors"],
        "byes": redial["byes"],
        "recovered_messages": redial["recovered_messages"],
        "gaps": redial["gaps"],
        "repeats": redial["repeats"],
        "unsequenced": redial["unsequenced"],  # seq 0: from a node cut off from Redis
        "not_recovered": redial["not_recovered"],
        "duplicates": report["duplicates"],
        "exactly_once": once,
        "messages": messages,
        "ramp_per_second": report["rate_achieved"],
        "load_rss_bytes_per_connection": round(
            (report["load_rss_bytes"] - report["load_rss_start_bytes"]) / max(1, n)
        ),
        "new_node": {
            "accepted": stats["accepted"],
            "refused": {k: v for k, v in stats["refused"].items() if v},
            "errors": {k: v for k, v in stats.get("errors", {}).items() if v},
        },
        "load_exit": code,
        "logs": logs,
    }


def returns(hist: dict[str, int], since: float) -> dict[str, float | None]:
    """p50/p90/p99/max of the clients' returns, in seconds after ``since`` (0.1 s buckets)."""
    start = int(since * 10)
    after = Counter({int(k) - start: v for k, v in hist.items() if int(k) >= start})
    # percentiles() reports a bucket by its upper edge, in the unit of ``scale``.
    return percentiles(after, 0.1)


def peak_rate(hist: dict[str, int]) -> int:
    """The most returns within any 1 s window (ten 0.1 s buckets)."""
    counts = {int(k): v for k, v in hist.items()}
    return max((sum(counts.get(k + i, 0) for i in range(10)) for k in counts), default=0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--kill", default="term,kill", help="restarts to run: term, kill or both")
    p.add_argument("--ws", action="store_true", help="a websocket service, clients over WebSocket")
    p.add_argument("--rate", type=int, default=20_000, help="the first ramp's connections/s")
    p.add_argument("--outage", type=float, default=5.0, help="seconds from the signal to restart")
    p.add_argument("--before", type=int, default=2, help="messages before the outage")
    p.add_argument("--during", type=int, default=4, help="messages during the outage")
    p.add_argument("--after", type=int, default=2, help="messages once all are back")
    p.add_argument("--backoff", default="0.5,30", help="the load's --backoff BASE,CAP")
    p.add_argument("--back-timeout", type=float, default=600, help="seconds to wait for all")
    p.add_argument("--history-size", type=int, default=1000)
    p.add_argument("--ping-interval", default="0", help="the node's heartbeat (as bench c1m)")
    p.add_argument("--name", default="storm")
    p.add_argument("--no-floor", action="store_true", help="skip the floor's reconnect run")
    args = p.parse_args()
    args.tcp_inuse = procfs.tcp_sockstat().get("inuse", 0)  # before the first run
    kinds = args.kill.split(",")
    if not set(kinds) <= {"term", "kill"}:
        p.error("--kill takes term, kill or term,kill")
    if args.before + args.during + args.after > min(60, args.history_size):
        p.error("at most 60 messages a run, and no more than --history-size")
    if args.before < 1 or args.during < 1:
        p.error("--before and --during must be at least 1 (a client resumes after a seq)")
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="manydoors-storm-")
    runs = []
    started = time.time()
    with RedisServer() as redis:
        for kind in kinds:
            runs.append(storm(args, kind, redis.url, tmp))
            print(json.dumps(runs[-1], indent=1))
    result = {
        "machine": machine(),
        "source": source(),
        "settings": {
            "connections": args.connections,
            "protocol": "websocket" if args.ws else "tcp",
            "rate": args.rate,
            "outage_s": args.outage,
            "messages": {"before": args.before, "during": args.during, "after": args.after},
            "backoff": args.backoff,
            "history_size": args.history_size,
            "ping_interval": args.ping_interval,
            "broker": "redis",
        },
        "runs": runs,
        "elapsed_s": round(time.time() - started, 1),
    }
    print(f"saved {save(args.name, result)}", file=sys.stderr)
    return 0 if all(r["exactly_once"] and not r["still_down"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Scale-out through Redis: one node (local broker), one node (Redis), two nodes + Redis.

    ./run bench scaleout [--connections 20000] [--messages 2000] [--samples 100]
                         [--latency-messages 30] [--latency-rate 1]
                         [--burst-messages 10000] [--idle 10] [--setups ABC] [--quick]

Every setup holds the same subscribers of one channel (the load generator opens them,
each says hello and subscribes; the bench process opens ``--samples`` of them itself):

- A: one node, local broker;
- B: one node, Redis broker;
- C: two nodes (127.0.0.2 and 127.0.0.3) sharing one Redis, half the subscribers on
  each; the publisher is a client of node 1, the sample subscribers are on node 2.

Per setup:

- latency: the publisher (a client connection, ``pub`` op) sends ``--latency-messages``
  messages at ``--latency-rate`` per second, each carrying its send time; the sample
  subscribers take receive time - send time (p50/p99 over all samples x messages);
- throughput: the publisher sends ``--messages`` messages as fast as the server acks
  them (a window of unacked ``pub`` ops) and the bench polls every node's
  ``messages_out`` until the sum has grown by messages x subscribers: deliveries/s;
- Redis CPU (B, C): utime + stime of the redis-server process (/proc/PID/stat, and
  INFO cpu as a cross-check) over the throughput phase, per million deliveries and
  per message published. That phase lasts minutes (the fan-out is the bottleneck), so
  an idle Redis's own cost (serverCron) is most of it; a burst phase then measures
  Redis's work alone: ``--idle`` seconds of idle Redis, then ``--burst-messages`` to
  a second channel with one subscriber per node (the same script and the same one
  push per node per message), as fast as acked; its CPU per message net of idle x
  messages per million deliveries is Redis's cost per million deliveries.

Exactly-once is checked twice: each sample subscriber sees every ``seq`` once with no
gap, and each node's ``messages_out`` grows by exactly messages x its subscribers
(and, with Redis, each node's ``received_from_redis`` by the messages published).
Client, load generator, servers and Redis share this machine's cores. Writes
bench/results/scaleout.json (``--quick``: scaleout-quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis
import uvloop

from _common import Server, machine, save, server
from manydoors.launch import stop
from manydoors.node import procfs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support.redisfix import RedisServer

CHANNEL = "scale"
BURST_CHANNEL = "scale-burst"  # one subscriber per node: Redis's own cost per message
FD_RESERVE = 64  # the server's default per-worker reserve
SLACK = 1.05  # the supervisor sizes pools with 5 % spare (SO_REUSEPORT is not even)
WINDOW = 64  # unacked pub ops in flight during the throughput phase
POLL = 0.05  # seconds between two stats polls while deliveries complete
STALL = 60.0  # seconds without progress in messages_out before a phase gives up


# --- Redis ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads): it must still be running."""
    seconds = procfs.cpu_seconds(pid)
    if seconds is None:
        raise ProcessLookupError(f"no /proc/{pid}/stat: the process is gone")
    return seconds


def redis_info_cpu(port: int) -> float:
    """used_cpu_user + used_cpu_sys as Redis reports them (microsecond resolution)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --- the bench's own connections ---------------------------------------------------------


class Event(msgspec.Struct):
    ev: str
    id: int | None = None
    seq: int | None = None
    code: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"")


class Stamp(msgspec.Struct):
    t: float
    k: int


_decode_event = msgspec.json.Decoder(Event).decode
_decode_stamp = msgspec.json.Decoder(Stamp).decode


class Client(asyncio.Protocol):
    """One NDJSON connection: a sample subscriber (checks seq, times stamps) or the publisher."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.acks: dict[int, asyncio.Future[None]] = {}
        self.errors: list[str] = []
        self.last_seq: int | None = None
        self.msgs = 0
        self.duplicates = 0  # a seq seen again (or going back)
        self.gaps = 0  # seqs skipped
        self.stamps: dict[int, float] = {}  # latency-phase message k -> latency (s)
        self.stamp_dups = 0
        self.closed = asyncio.get_running_loop().create_future()
        # publisher
        self.next_id = 10
        self.outstanding = 0
        self.room = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            self.on_line(line, now)

    def on_line(self, line: bytes, now: float) -> None:
        ev = _decode_event(line)
        if ev.ev == "msg":
            self.msgs += 1
            seq = ev.seq or 0
            if self.last_seq is not None:
                if seq <= self.last_seq:
                    self.duplicates += 1
                    return
                self.gaps += seq - self.last_seq - 1
            self.last_seq = seq
            data = bytes(ev.data)
            if data.startswith(b'{"t":'):
                stamp = _decode_stamp(data)
                if stamp.k in self.stamps:
                    self.stamp_dups += 1
                else:
                    self.stamps[stamp.k] = now - stamp.t
        elif ev.ev == "ok" and ev.id is not None:
            fut = self.acks.pop(ev.id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            elif ev.id >= 10:
                self.outstanding -= 1
                self.room.set()
        elif ev.ev == "error":
            self.errors.append(line.decode())
            self.outstanding -= 1  # a refused pub: the window must not shrink for good
            self.room.set()

    def send(self, obj: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(msgspec.json.encode(obj) + b"\n")

    async def request(self, obj: dict[str, Any]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks[obj["id"]] = fut
        self.send(obj)
        await asyncio.wait_for(fut, 60)

    async def publish(self, data: dict[str, Any], channel: str = CHANNEL) -> None:
        """A ``pub`` op; waits while ``WINDOW`` of them are unacked."""
        while self.outstanding >= WINDOW:
            self.room.clear()
            await self.room.wait()
        self.next_id += 1
        self.outstanding += 1
        self.send({"op": "pub", "channel": channel, "data": data, "id": self.next_id})

    async def drained(self) -> None:
        while self.outstanding > 0:
            self.room.clear()
            await self.room.wait()


async def connect(host: str, port: int) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, host, port)
    return client


async def subscriber(host: str, port: int, user: str, channel: str = CHANNEL) -> Client:
    c = await connect(host, port)
    await c.request({"op": "hello", "user": user, "id": 1})
    await c.request({"op": "sub", "channel": channel, "id": 2})
    return c


# --- a setup: nodes, load, phases ---------------------------------------------------------


class Node:
    def __init__(self, srv: Server, host: str, subscribers: int, load_share: int) -> None:
        self.srv = srv
        self.host = host
        self.subscribers = subscribers  # load share + this bench's samples on this node
        self.load_share = load_share

    def stats(self) -> dict[str, Any]:
        return self.srv.stats()

    def cpu(self) -> float:
        pids = [self.srv.proc.pid, *self.srv.worker_pids()]
        return sum(cpu_seconds(pid) for pid in pids)


def workers_for(connections: int, wanted: int) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(wanted, math.ceil(connections * SLACK / (hard - FD_RESERVE)))


def start_load(log: str, *args: str) -> subprocess.Popen[bytes]:
    """``manydoors load ARGS`` with its progress lines in ``log`` (shown if a setup fails)."""
    with open(log, "ab") as out:
        cmd = [sys.executable, "-m", "manydoors", "load", *args]
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def stop_load(gen: subprocess.Popen[bytes]) -> None:
    """SIGTERM the load controller (it tells its processes to stop), SIGKILL its pid if stuck."""
    stop(gen, 120)


def say(line: str) -> None:
    print(f"scaleout: {line}", file=sys.stderr, flush=True)


def run_setup(name: str, nodes: int, broker: str, args: argparse.Namespace) -> dict[str, Any]:
    hosts = ["127.0.0.2", "127.0.0.3"][:nodes]
    n, s = args.connections, args.samples
    shares = [n // nodes + (1 if i < n % nodes else 0) for i in range(nodes)]
    load_shares = [*shares[:-1], shares[-1] - s]  # the samples are on the last node
    load = procfs.loadavg()  # the machine is shared: say how busy it was
    say(f"setup {name}: {nodes} node(s), broker {broker}, subscribers {shares}, load {load}")
    with contextlib.ExitStack() as stack:
        rproc: RedisServer | None = None
        rport = 0
        broker_flags = ["--broker", "local"]
        if broker == "redis":
            rproc = stack.enter_context(RedisServer())
            rport = rproc.port
            broker_flags = ["--broker", rproc.url]
        workers = max(1, args.workers // nodes)
        node_list: list[Node] = []
        for host, share, load_share in zip(hosts, shares, load_shares, strict=True):
            cap = share + 100
            flags = ["--host", host, "--api-host", host, "--max-connections", str(cap)]
            flags += ["--workers", str(workers_for(cap, workers)), *broker_flags]
            # The publishers are clients that flood on purpose (clients may not publish by default).
            flags += ["--max-messages-per-second", "0", "--publish", "all"]
            srv = stack.enter_context(server(*flags))
            node_list.append(Node(srv, host, share, load_share))
        deadline = time.monotonic() + 30
        while any(nd.stats()["broker"]["status"] != "ok" for nd in node_list):
            if time.monotonic() > deadline:
                raise RuntimeError("a node's broker did not become ok")
            time.sleep(0.1)
        gens = []
        logdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="scaleout-load-"))
        for i, nd in enumerate(node_list):
            if nd.load_share <= 0:
                continue
            log = os.path.join(logdir, f"load-{i + 1}.log")
            flags = ["--target", f"{nd.host}:{nd.srv.port}"]
            flags += ["--connections", str(nd.load_share), "--rate", str(args.rate)]
            # Each node's load from its own source addresses; held until stopped.
            flags += ["--source-ips", f"127.0.{10 + i}.1-127.0.{10 + i}.40"]
            flags += ["--subscribe", CHANNEL, "--hold", "86400"]
            gen = start_load(log, *flags)
            stack.callback(stop_load, gen)
            gens.append(gen)
        try:
            result = uvloop.run(measure(node_list, gens, rproc, rport, args))
        except BaseException:
            for log in sorted(os.listdir(logdir)):
                with open(os.path.join(logdir, log)) as f:
                    say(f"{log} (last lines):\n" + "".join(f.readlines()[-15:]))
            raise
        result.update(
            {
                "setup": name,
                "loadavg_after": procfs.loadavg(),
                "nodes": nodes,
                "broker": broker,
                "subscribers_per_node": shares,
                "workers_per_node": [len(nd.stats()["services"][0]["workers"]) for nd in node_list],
            }
        )
        if rproc is not None:
            client = redis.Redis(host="127.0.0.1", port=rport, socket_timeout=5)
            try:
                result["redis_final"] = {
                    "pubsub_channels": len(client.pubsub_channels()),
                    "clients": client.info("clients")["connected_clients"],
                    "used_memory": client.info("memory")["used_memory"],
                }
            finally:
                client.close()
        return result


async def stats_all(nodes: list[Node]) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(None, nd.stats) for nd in nodes)))


async def wait_deliveries(
    nodes: list[Node],
    base: list[int],
    expected: list[int],
    started: float,
    on_poll: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[float, list[int]]:
    """Poll messages_out until every node has delivered ``expected`` more; (seconds, deltas).

    Gives up after ``STALL`` seconds without progress (lost messages) and returns what
    arrived by then; the caller compares. ``on_poll`` sees every stats snapshot.
    """
    last_total, last_change = -1, time.monotonic()
    while True:
        stats = await stats_all(nodes)
        now = time.time()
        if on_poll is not None:
            on_poll(stats)
        deltas = [st["messages_out"] - b for st, b in zip(stats, base, strict=True)]
        if all(d >= e for d, e in zip(deltas, expected, strict=True)):
            return now - started, deltas
        if sum(deltas) != last_total:
            last_total, last_change = sum(deltas), time.monotonic()
        elif time.monotonic() - last_change > STALL:
            say(f"no progress for {STALL:.0f} s: {deltas} of {expected} deliveries")
            return now - started, deltas
        await asyncio.sleep(POLL)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


async def measure(
    nodes: list[Node],
    gens: list[subprocess.Popen[bytes]],
    rproc: RedisServer | None,
    rport: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    first, last = nodes[0], nodes[-1]
    samples = [
        await subscriber(last.host, last.srv.port, f"sample{i}") for i in range(args.samples)
    ]
    pub = await connect(first.host, first.srv.port)
    burst_subs = []
    if rproc is not None:
        for i, nd in enumerate(nodes):
            burst_subs.append(await subscriber(nd.host, nd.srv.port, f"burst{i}", BURST_CHANNEL))
    expected_subs = [nd.subscribers for nd in nodes]
    total_subs = sum(expected_subs)
    out: dict[str, Any] = {}
    try:
        # Ready: every load connection subscribed (a probe reaches all subscribers).
        t_ramp = time.time()
        deadline = time.monotonic() + 600
        probes = 0
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("the load did not subscribe every connection in time")
            if any(g.poll() is not None for g in gens):
                raise RuntimeError("a load generator exited during the ramp")
            stats = await stats_all(nodes)
            held = [st["connections"] for st in stats]
            if all(h >= e for h, e in zip(held, expected_subs, strict=True)):
                base = [st["messages_out"] for st in stats]
                probes += 1
                await pub.publish({"probe": probes})
                deltas = await _probe(nodes, base, expected_subs)
                if deltas == expected_subs:
                    break
            await asyncio.sleep(1.0)
        out["ramp_seconds"] = round(time.time() - t_ramp, 1)
        out["probes"] = probes
        say(f"all {total_subs:,} subscribed in {out['ramp_seconds']} s ({probes} probe(s))")
        await pub.drained()
        await asyncio.sleep(1.0)  # let the probes' tail settle

        out["latency"] = await latency_phase(nodes, samples, pub, args)
        await asyncio.sleep(1.0)
        out["throughput"] = thr = await throughput_phase(nodes, pub, rproc, rport, args)
        if rproc is not None:
            await asyncio.sleep(1.0)
            out["redis_burst"] = burst = await burst_phase(
                pub, burst_subs, RedisMeter(rproc, rport), args
            )
            # Net of what an idle Redis costs over as long as the phase kept it busy.
            net = (
                thr["redis_cpu_seconds_info"]
                - burst["idle_cpu_per_s_info"] * thr["redis_busy_seconds"]
            )
            thr["redis_cpu_seconds_net_of_idle_info"] = round(net, 4)
            thr["redis_cpu_s_per_million_deliveries_net_of_idle_info"] = round(
                net / (thr["deliveries"] / 1e6), 4
            )
            # Redis's work per message does not depend on how many subscribers a node
            # holds (one push per node), so the burst's cost per message x messages per
            # million deliveries is Redis's cost per million deliveries here.
            per_msg = burst["cpu_us_per_message_net_info"] / 1e6
            thr["redis_cpu_s_per_million_deliveries_from_burst"] = round(
                per_msg * 1e6 / thr["subscribers"], 5
            )
        # Every sample must have seen every message once: probes + latency + throughput.
        want = probes + args.latency_messages + args.messages
        counts = [c.msgs for c in samples]
        out["samples_check"] = {
            "connections": len(samples),
            "node": len(nodes),
            "messages_each_expected": want,
            "messages_each_min": min(counts),
            "messages_each_max": max(counts),
            "duplicates": sum(c.duplicates + c.stamp_dups for c in samples),
            "gaps": sum(c.gaps for c in samples),
            "errors": [e for c in [pub, *samples] for e in c.errors][:10],
            "closed_early": sum(c.closed.done() for c in samples),
        }
    finally:
        for c in [pub, *samples, *burst_subs]:
            if c.transport is not None:
                c.transport.close()
    return out


async def _probe(nodes: list[Node], base: list[int], expected: list[int]) -> list[int]:
    deadline = time.monotonic() + 5
    while True:
        stats = await stats_all(nodes)
        deltas = [st["messages_out"] - b for st, b in zip(stats, base, strict=True)]
        if deltas == expected or time.monotonic() > deadline:
            return deltas
        await asyncio.sleep(0.1)


async def latency_phase(
    nodes: list[Node], samples: list[Client], pub: Client, args: argparse.Namespace
) -> dict[str, Any]:
    count, rate = args.latency_messages, args.latency_rate
    say(f"latency: {count} messages at {rate}/s")
    base = [st["messages_out"] for st in await stats_all(nodes)]
    t0 = time.monotonic()
    for k in range(count):
        await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        await pub.publish({"t": time.time(), "k": k})
    sent_at = time.time()
    expected = [count * nd.subscribers for nd in nodes]
    _, deltas = await wait_deliveries(nodes, base, expected, sent_at)
    deadline = time.monotonic() + 10
    while any(len(c.stamps) < count for c in samples) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lat = [v * 1000 for c in samples for v in c.stamps.values()]
    got = len(lat)
    res = {
        "messages": count,
        "rate_per_s": rate,
        "sample_subscribers": len(samples),
        "received": got,
        "expected": count * len(samples),
        "p50_ms": round(percentile(lat, 0.50), 2) if lat else None,
        "p90_ms": round(percentile(lat, 0.90), 2) if lat else None,
        "p99_ms": round(percentile(lat, 0.99), 2) if lat else None,
        "max_ms": round(max(lat), 2) if lat else None,
        "deliveries_per_node_expected": expected,
        "deliveries_per_node": deltas,
    }
    say(
        f"latency: {got:,}/{count * len(samples):,} samples, p50 {res['p50_ms']} ms, "
        f"p99 {res['p99_ms']} ms; deliveries {deltas} of {expected}"
    )
    return res


class RedisMeter:
    """Redis CPU: /proc/PID/stat (10 ms ticks) and INFO cpu (microseconds) together."""

    def __init__(self, proc: RedisServer, port: int) -> None:
        self.pid, self.port = proc.pid, port

    def read(self) -> tuple[float, float]:
        return cpu_seconds(self.pid), redis_info_cpu(self.port)


async def throughput_phase(
    nodes: list[Node],
    pub: Client,
    rproc: RedisServer | None,
    rport: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    m = args.messages
    meter = RedisMeter(rproc, rport) if rproc is not None else None
    say(f"throughput: {m:,} messages as fast as acked (window {WINDOW})")
    before = await stats_all(nodes)
    base = [st["messages_out"] for st in before]
    rbase = [st["broker"].get("received_from_redis", 0) for st in before]
    node_cpu0 = [nd.cpu() for nd in nodes]
    r0 = meter.read() if meter else (0.0, 0.0)
    redis_done: dict[str, Any] = {}

    def on_poll(stats: list[dict[str, Any]]) -> None:
        # Redis has nothing left to do once every node has read every message from it.
        if meter is None or redis_done:
            return
        got = [st["broker"]["received_from_redis"] - b for st, b in zip(stats, rbase, strict=True)]
        if all(g >= m for g in got):
            redis_done["cpu"] = meter.read()
            redis_done["seconds"] = time.time() - started

    started = time.time()
    for i in range(m):
        await pub.publish({"i": i})
    await pub.drained()
    published_s = time.time() - started
    expected = [m * nd.subscribers for nd in nodes]
    seconds, deltas = await wait_deliveries(nodes, base, expected, started, on_poll)
    r1 = meter.read() if meter else (0.0, 0.0)
    node_cpu1 = [nd.cpu() for nd in nodes]
    await asyncio.sleep(1.0)  # anything beyond the expected count is a duplicate
    after = await stats_all(nodes)
    late = [st["messages_out"] - b for st, b in zip(after, base, strict=True)]
    delivered = sum(deltas)
    res: dict[str, Any] = {
        "messages": m,
        "subscribers": sum(nd.subscribers for nd in nodes),
        "deliveries_expected": sum(expected),
        "deliveries": delivered,
        "deliveries_per_node_expected": expected,
        "deliveries_per_node": deltas,
        "deliveries_per_node_1s_later": late,
        "dropped_slow": sum(st["dropped"] for st in after) - sum(st["dropped"] for st in before),
        "seconds": round(seconds, 3),
        "publish_seconds": round(published_s, 3),
        "published_per_s": round(m / published_s),
        "deliveries_per_s": round(delivered / seconds),
        "node_cpu_seconds": [round(b - a, 2) for a, b in zip(node_cpu0, node_cpu1, strict=True)],
    }
    if meter is not None:
        # Redis's share is over until every node had every message from it ("busy");
        # the whole phase (until the last delivery) is given too.
        done = redis_done.get("cpu", r1)
        busy_s = redis_done.get("seconds", seconds)
        proc_cpu, info_cpu = done[0] - r0[0], done[1] - r0[1]
        millions = delivered / 1e6
        res.update(
            {
                "redis_busy_seconds": round(busy_s, 3),
                "redis_cpu_seconds": round(proc_cpu, 3),
                "redis_cpu_seconds_info": round(info_cpu, 4),
                "redis_cpu_seconds_whole_phase": round(r1[0] - r0[0], 3),
                "redis_cpu_seconds_whole_phase_info": round(r1[1] - r0[1], 4),
                "redis_cpu_s_per_million_deliveries": round(proc_cpu / millions, 4),
                "redis_cpu_s_per_million_deliveries_info": round(info_cpu / millions, 4),
                "redis_cpu_us_per_message": round(proc_cpu / m * 1e6, 1),
                "redis_cpu_us_per_message_info": round(info_cpu / m * 1e6, 1),
                "broker": [
                    {
                        "received_from_redis": a["broker"]["received_from_redis"]
                        - b["broker"]["received_from_redis"],
                        "sent_to_redis": a["broker"]["sent_to_redis"]
                        - b["broker"]["sent_to_redis"],
                        "status": a["broker"]["status"],
                        "reconnects": a["broker"]["reconnects"],
                        "delivered_locally_while_degraded": a["broker"][
                            "delivered_locally_while_degraded"
                        ],
                        "last_error": a["broker"]["last_error"],
                    }
                    for a, b in zip(after, before, strict=True)
                ],
            }
        )
    say(
        f"throughput: {delivered:,}/{sum(expected):,} deliveries in {seconds:.2f} s = "
        f"{res['deliveries_per_s']:,}/s; published in {published_s:.2f} s"
        + (
            f"; Redis CPU {res['redis_cpu_seconds_info']} s in {res['redis_busy_seconds']} s "
            f"({res['redis_cpu_s_per_million_deliveries_info']} s per 1M deliveries, "
            f"{res['redis_cpu_us_per_message_info']} us per message)"
            if meter
            else ""
        )
    )
    return res


async def burst_phase(
    pub: Client, subs: list[Client], meter: RedisMeter, args: argparse.Namespace
) -> dict[str, Any]:
    """Redis's own CPU per message: a channel with one subscriber per node, as fast as acked.

    The throughput phase lasts minutes because the fan-out is slow, so an idle Redis's
    own cost (serverCron: ~2 ms/s here) outweighs its work there; here the same script
    and the same pushes per message (one per node) run within a second or two.
    """
    k = args.burst_messages
    say(f"redis burst: idle {args.idle:.0f} s, then {k:,} messages to {len(subs)} subscriber(s)")
    a = meter.read()
    await asyncio.sleep(args.idle)
    b = meter.read()
    idle = ((b[0] - a[0]) / args.idle, (b[1] - a[1]) / args.idle)
    counts0 = [c.msgs for c in subs]
    dups0 = [c.duplicates + c.gaps for c in subs]
    r0 = meter.read()
    started = time.time()
    for i in range(k):
        await pub.publish({"b": i}, BURST_CHANNEL)
    await pub.drained()
    published = time.time() - started
    deadline = time.monotonic() + STALL
    while time.monotonic() < deadline:
        if all(c.msgs - c0 >= k for c, c0 in zip(subs, counts0, strict=True)):
            break
        await asyncio.sleep(0.01)
    r1 = meter.read()
    seconds = time.time() - started
    cpu = (r1[0] - r0[0], r1[1] - r0[1])
    net = (cpu[0] - idle[0] * seconds, cpu[1] - idle[1] * seconds)
    res = {
        "messages": k,
        "subscribers": len(subs),
        "received_per_subscriber": [c.msgs - c0 for c, c0 in zip(subs, counts0, strict=True)],
        "duplicates_or_gaps": sum(c.duplicates + c.gaps for c in subs) - sum(dups0),
        "seconds": round(seconds, 3),
        "publish_seconds": round(published, 3),
        "messages_per_s": round(k / seconds),
        "idle_seconds": args.idle,
        "idle_cpu_per_s": round(idle[0], 5),
        "idle_cpu_per_s_info": round(idle[1], 5),
        "cpu_seconds": round(cpu[0], 3),
        "cpu_seconds_info": round(cpu[1], 4),
        "cpu_us_per_message": round(cpu[0] / k * 1e6, 1),
        "cpu_us_per_message_info": round(cpu[1] / k * 1e6, 1),
        "cpu_us_per_message_net_info": round(net[1] / k * 1e6, 1),
    }
    say(
        f"redis burst: {k:,} messages in {seconds:.2f} s ({res['messages_per_s']:,}/s), "
        f"Redis CPU {cpu[1]:.4f} s = {res['cpu_us_per_message_info']} us per message "
        f"({res['cpu_us_per_message_net_info']} us net of idle {idle[1] * 1000:.2f} ms/s)"
    )
    return res


SETUPS = {
    "A": ("A: 1 node, local broker", 1, "local"),
    "B": ("B: 1 node, Redis broker", 1, "redis"),
    "C": ("C: 2 nodes + Redis", 2, "redis"),
}


def table(rows: list[dict[str, Any]]) -> str:
    """The summary in Markdown.

    Redis CPU per 1M deliveries, two ways: over the whole throughput phase
    (/proc/PID/stat; mostly an idle Redis's own cost, the phase lasts minutes), and
    from the burst (INFO cpu, net of idle) x messages per million deliveries.
    """
    out = [
        "| setup | latency p50 | latency p99 | deliveries/s "
        "| Redis CPU s / 1M deliveries, throughput phase | same, from the burst (net of idle) "
        "| Redis CPU per message: phase / burst (net) | all delivered once |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lat, thr = r["latency"], r["throughput"]
        phase = burst = per_msg = "-"
        if "redis_burst" in r:
            phase = f"{thr['redis_cpu_s_per_million_deliveries']:.4f} s"
            burst = f"{thr['redis_cpu_s_per_million_deliveries_from_burst']:.5f} s"
            per_msg = (
                f"{thr['redis_cpu_us_per_message']:.0f} us / "
                f"{r['redis_burst']['cpu_us_per_message_net_info']:.1f} us"
            )
        out.append(
            f"| {r['setup']} | {lat['p50_ms']} ms | {lat['p99_ms']} ms "
            f"| {thr['deliveries_per_s']:,} | {phase} | {burst} | {per_msg} "
            f"| {'yes' if r['exactly_once'] else 'NO'} |"
        )
    return "\n".join(out)


def exactly_once(r: dict[str, Any]) -> bool:
    thr, lat, chk = r["throughput"], r["latency"], r["samples_check"]
    return (
        thr["deliveries_per_node"] == thr["deliveries_per_node_expected"]
        and thr["deliveries_per_node_1s_later"] == thr["deliveries_per_node_expected"]
        and lat["deliveries_per_node"] == lat["deliveries_per_node_expected"]
        and chk["duplicates"] == 0
        and chk["gaps"] == 0
        and chk["messages_each_min"] == chk["messages_each_max"] == chk["messages_each_expected"]
        and all(b["received_from_redis"] == thr["messages"] for b in thr.get("broker", []))
        and (
            "redis_burst" not in r
            or (
                r["redis_burst"]["duplicates_or_gaps"] == 0
                and set(r["redis_burst"]["received_per_subscriber"])
                == {r["redis_burst"]["messages"]}
            )
        )
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=20_000, help="subscribers in total")
    p.add_argument("--messages", type=int, default=2_000, help="throughput phase")
    p.add_argument("--samples", type=int, default=100, help="subscribers timed by the bench")
    p.add_argument("--latency-messages", type=int, default=30)
    p.add_argument("--latency-rate", type=float, default=1.0, help="messages per second")
    p.add_argument("--burst-messages", type=int, default=10_000, help="Redis CPU per message")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle Redis measured")
    p.add_argument("--workers", type=int, default=2, help="in total, split over the nodes")
    p.add_argument("--rate", type=int, default=10_000, help="load generator connects/s")
    p.add_argument("--setups", default="ABC", help="which of A, B, C to run")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1,000 x 200, 20 samples")
    p.add_argument("--name", help="results file name (default scaleout / scaleout-quick)")
    args = p.parse_args()
    if args.quick:
        args.connections, args.messages, args.samples = 1_000, 200, 20
        args.latency_messages, args.latency_rate = 20, 10.0
        args.burst_messages, args.idle = 1_000, 2.0
    if args.samples >= args.connections // 2:
        p.error("--samples must be well under half of --connections")
    name = args.name or ("scaleout-quick" if args.quick else "scaleout")
    started = time.time()
    rows = []
    for key in args.setups:
        label, nodes, broker = SETUPS[key]
        r = run_setup(label, nodes, broker, args)
        r["exactly_once"] = exactly_once(r)
        rows.append(r)
    result = {
        "machine": machine(),
        "command": "./run bench scaleout " + " ".join(sys.argv[1:]),
        "connections": args.connections,
        "messages": args.messages,
        "samples": args.samples,
        "latency_messages": args.latency_messages,
        "latency_rate": args.latency_rate,
        "workers_total": args.workers,
        "window": WINDOW,
        "burst_messages": args.burst_messages,
        "seconds": round(time.time() - started, 1),
        "setups": rows,
    }
    print(json.dumps(result, indent=1))
    print(table(rows))
    print(f"saved {save(name, result)}", file=sys.stderr)
    return 0 if all(r["exactly_once"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

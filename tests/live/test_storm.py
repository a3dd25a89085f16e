"""A small reconnect storm: ``manydoors load --reconnect`` under a node that restarts.

The nodes share a Redis (the Redis broker keeps seqs and history across the restart);
a second node takes the publishes while the first is down. ``bench/storm.py`` is the
same at 100,000 connections, with SIGKILL too.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from support.redisfix import RedisServer, free_port
from support.server import Server, manydoors_cmd

N = 300
CHANNEL = "storm"
HELD = re.compile(r"^load: hold: open [\d,]+/[\d,]+ ready ([\d,]+) down ([\d,]+)")


def broker_lost_redis(node: Server) -> bool:
    """The node lost a Redis that never went away (a command failed: it reconnects or
    did). A recovery's Redis read each, all at once, once overflowed redis-py's pool."""
    broker = node.stats()["broker"]
    return bool(broker["last_error"]) or int(broker["reconnects"]) > 0


class Load:
    """``manydoors load`` in the background; its last ready/down counts and rounds read."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            manydoors_cmd("load", *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.counts = (-1, -1)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            found = HELD.match(line)
            if found:
                ready, down = found.groups()
                self.counts = (int(ready.replace(",", "")), int(down.replace(",", "")))

    def wait(self, what: str, test: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            tail = "\n".join(self.lines[-10:])
            assert self.proc.poll() is None, f"the load exited waiting for {what}:\n{tail}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{tail}"
            time.sleep(0.05)

    def said(self, start: str) -> bool:
        return any(line.startswith(start) for line in self.lines)

    def finish(self) -> int:
        """SIGINT: it stops its processes and writes its report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.thread.join(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def publish(server: Server, n: int) -> None:
    server.publish(channel=CHANNEL, data={"t": time.time(), "n": n})


def test_clients_come_back_after_a_restart_and_get_every_message_once(
    serve: Callable[..., Server], redis_server: RedisServer, tmp_path: Path
) -> None:
    shared = ["--broker", "redis", "--redis-url", redis_server.url, "--history-size", "100"]
    publisher = serve(*shared, "--workers", "1", "--max-connections", "100")
    # The same ports after the restart: a config file names them (flags would be port 0).
    config = f'[api]\nport = {free_port()}\n[[service]]\nname = "chat"\nport = {free_port()}\n'
    node_flags = [*shared, "--workers", "2", "--max-connections", "1000"]
    node = serve(*node_flags, config=config)
    report = tmp_path / "load.json"
    load = Load(
        *("--reconnect", "--backoff", "0.1,1", "--target", f"127.0.0.1:{node.port()}"),
        *("--connections", str(N), "--subscribe", CHANNEL, "--hold", "600"),
        *("--api", publisher.api, "--broadcasts", "1", "--report", str(report)),
    )
    try:
        load.wait("message 1", lambda: load.said("load: message 1: "))
        node.stop()  # SIGTERM: every client gets bye shutdown
        for n in (2, 3):  # while the node is down: only history has them
            publish(publisher, n)
        node = serve(*node_flags, config=config)
        load.wait(f"all {N} back", lambda: load.counts == (N, 0))
        out = node.stats()["messages_out"]
        publish(publisher, 4)
        deadline = time.monotonic() + 30
        while node.stats()["messages_out"] < out + N and time.monotonic() < deadline:
            time.sleep(0.05)
        lost_redis = broker_lost_redis(node)
    finally:
        code = load.finish()
    assert code == 128 + signal.SIGINT, "\n".join(load.lines[-20:])
    data = json.loads(report.read_text())
    redial = data["reconnect"]
    assert data["connections"] == {"target": N, "peak": N, "final": N, "ready": N}
    # Every client got its bye; one whose redial landed on a worker that had not begun
    # its drain yet (its SIGTERM comes a moment later on a busy machine) gets a second.
    assert set(redial["byes"]) == {"shutdown"} and redial["byes"]["shutdown"] >= N
    assert redial["reconnected"] == N and redial["pending"] == 0
    # Each held connection was closed once by the drain; its dials then met a refused
    # connect, a reset (the old node's queue), or no answer: how many of each varies.
    assert redial["drops"]["closed_by_server"] >= N
    assert redial["repeats"] == 0 and data["duplicates"] == 0 and data["errors"] == {}
    assert not lost_redis
    # Every message reached every client once: 2 and 3 from history, the others live.
    assert redial["received"] == {str(n): N for n in (1, 2, 3, 4)}
    assert (redial["gaps"], redial["repeats"], redial["not_recovered"]) == (0, 0, 0)
    assert data["duplicates"] == 0 and data["errors"] == {}
    assert redial["recovered_messages"] == 2 * N
    assert redial["last_back_at"] > redial["first_drop_at"] > redial["started_at"]


async def resubscribe(port: int, since: int, answers: Counter[tuple[bool, int]]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'{"op":"sub","channel":"%s","since":%d,"id":2}\n' % (CHANNEL.encode(), since))
    try:
        while True:
            ev = json.loads(await asyncio.wait_for(reader.readline(), 30))
            if ev.get("id") == 2:
                answers[(ev["recovered"], ev["seq"])] += 1
                return
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_burst_of_resubscriptions_all_recover_from_history(
    serve: Callable[..., Server], redis_server: RedisServer
) -> None:
    shared = ["--broker", "redis", "--redis-url", redis_server.url, "--history-size", "100"]
    publisher = serve(*shared, "--workers", "1", "--max-connections", "100")
    for n in range(6):
        publish(publisher, n)
    node = serve(*shared, "--workers", "1", "--max-connections", "1000")
    answers: Counter[tuple[bool, int]] = Counter()

    async def storm() -> None:  # what a restarted node meets: all come back at once
        await asyncio.gather(*(resubscribe(node.port(), 2, answers) for _ in range(N)))

    asyncio.run(storm())
    assert not broker_lost_redis(node)
    # Every one recovered (with a Redis read per recovery, all at once, those past the
    # pool's 100 connections failed, the node went degraded and answered false).
    assert answers == {(True, 6): N}

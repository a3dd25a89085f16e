"""A node cut off from Redis (a partition, or Redis down): what its clients can trust.

While a node cannot reach Redis it still delivers what is published on it to its own
subscribers. Those messages never take a seq that another message has (they carry
``seq`` 0: unsequenced), and afterwards every client that may have missed something
can tell: the channel's seqs jump over a hole, and a ``sub`` with ``since`` from
before the outage answers ``recovered: false``. A real redis-server is started per
test; the partition is a TCP proxy in front of it that the test cuts and heals.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.client import Client
from support.redisfix import RedisServer, need_redis
from support.server import Server
from support.wait import wait_for


class Partition:
    """A TCP proxy to Redis that can cut its clients off (and let them back)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.down = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.down:
                    near.close()
                    continue
                far = socket.create_connection(("127.0.0.1", self.upstream))
                self.open += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every connection through the proxy and refuse new ones."""
        with self.lock:
            self.down = True
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.open = []

    def heal(self) -> None:
        with self.lock:
            self.down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def partition(redis_server: RedisServer) -> Iterator[Partition]:
    proxy = Partition(redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def node(serve: Callable[..., Server], url: str, index: int) -> Server:
    return serve(
        "--broker", url, "--host", f"127.0.0.{2 + index}", "--workers", "2",
        "--max-connections", "1000", "--max-messages-per-second", "0",
    )  # fmt: skip


def subscriber(clients: Callable[..., Client], server: Server, channel: str = "veg") -> Client:
    client = clients(server.port(), host=server.info["services"]["chat"]["host"])
    assert client.call({"op": "sub", "channel": channel, "id": "s"})["ev"] == "ok"
    return client


def status(server: Server) -> str:
    return str(server.stats()["broker"]["status"])


def recover(clients: Callable[..., Client], server: Server, since: int) -> dict[str, Any]:
    """What a client reconnecting to ``server`` with ``since`` is told (its ok)."""
    client = clients(server.port(), host=server.info["services"]["chat"]["host"])
    client.send({"op": "sub", "channel": "veg", "since": since, "id": "r"})
    ok = client.recv()
    assert ok["ev"] == "ok" and ok["id"] == "r", ok
    return ok


def history_seqs(server: Server) -> dict[int, Any]:
    code, page = server.http("GET", "/api/history?channel=veg&limit=1000")
    assert code == 200, page
    return {m["seq"]: m["data"] for m in page["messages"]}


def test_a_node_cut_off_from_redis_never_gives_its_publishes_a_seq_of_another_message(
    serve, clients, redis_server, partition
):
    a = node(serve, partition.url, 0)  # reaches Redis through the proxy
    b = node(serve, redis_server.url, 1)
    on_a, on_b = subscriber(clients, a), subscriber(clients, b)
    for i in (1, 2):
        assert b.publish(channel="veg", data=i)["seq"] == i
    for client in (on_a, on_b):
        assert [e["seq"] for e in (client.recv(), client.recv())] == [1, 2]

    partition.cut()
    wait_for(lambda: status(a) == "degraded", what="node a cut off")
    assert a.publish(channel="veg", data="cut off")["degraded"] is True
    assert b.publish(channel="veg", data=3)["seq"] == 3  # b still reaches Redis
    cut_off = on_a.recv()
    assert cut_off["data"] == "cut off"
    assert [(e["seq"], e["data"]) for e in [on_b.recv()]] == [(3, 3)]

    partition.heal()
    wait_for(lambda: status(a) == "ok", timeout=20, what="node a back")
    after = b.publish(channel="veg", data="after")["seq"]
    assert on_a.until(lambda e: e["data"] == "after")[-1]["seq"] == after
    got = on_b.recv()
    assert (got["seq"], got["data"]) == (after, "after")

    # No seq names two messages: the unsequenced one is not any message's.
    stored = history_seqs(b)
    assert stored == {1: 1, 2: 2, 3: 3, after: "after"}
    assert cut_off["seq"] not in stored
    assert cut_off["seq"] == 0  # unsequenced (docs/protocol.md)
    # Every client that may have missed something can tell: on b, "cut off" was never
    # delivered, so its seqs jump and its recovery is not complete; on a, the client
    # that got it, whose last seq was 2, is not told it has everything either.
    assert after > 4
    for server, since in ((a, 2), (b, 2), (a, 3), (b, 3)):
        ok = recover(clients, server, since)
        assert ok["recovered"] is False and ok["seq"] == after, (server, since, ok)
    assert recover(clients, a, after)["recovered"] is True  # from there on, all is known
    code, page = a.http("GET", "/api/history?channel=veg&since=2")
    assert code == 200 and page["recovered"] is False


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A redis-server whose seqs and history survive a restart (AOF, fsync always)."""
    need_redis()
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


def test_when_redis_is_down_each_nodes_clients_can_tell_they_missed_the_others_messages(
    serve, clients, persistent_redis
):
    a, b = (node(serve, persistent_redis.url, i) for i in (0, 1))
    on_a, on_b = subscriber(clients, a), subscriber(clients, b)
    a.publish(channel="veg", data=1)
    for client in (on_a, on_b):
        assert client.recv()["seq"] == 1

    persistent_redis.stop()
    for server in (a, b):
        wait_for(lambda s=server: status(s) == "degraded", what="degraded")
    a.publish(channel="veg", data="on a")
    b.publish(channel="veg", data="on b")
    got_a, got_b = on_a.recv(), on_b.recv()
    assert (got_a["data"], got_b["data"]) == ("on a", "on b")
    assert got_a["seq"] == got_b["seq"] == 0  # neither takes a seq: nobody could number them

    persistent_redis.start()
    for server in (a, b):
        wait_for(lambda s=server: status(s) == "ok", timeout=20, what="back")
    after = a.publish(channel="veg", data="after")["seq"]
    # Each stayed-connected client missed the other node's message: its next seq jumps.
    for client in (on_a, on_b):
        assert client.recv() == {
            "ev": "msg", "channel": "veg", "seq": after, "from": None, "data": "after",
        }  # fmt: skip
    assert after > 2
    # And a client of either node that reconnects from seq 1 is told it cannot recover.
    for server in (a, b):
        ok = recover(clients, server, 1)
        assert ok["recovered"] is False and ok["seq"] == after, ok
    assert set(history_seqs(a).values()) == {1, "after"}

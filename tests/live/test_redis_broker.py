"""Several nodes sharing a real Redis (started by the test) form one logical server."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from support.client import Client
from support.redisfix import RedisCluster, RedisServer, need_redis
from support.server import Server, manydoors_cmd
from support.wait import wait_for

Nodes = Callable[[int], list[Server]]


def start_nodes(serve: Callable[..., Server], url: str, count: int) -> list[Server]:
    """``count`` nodes on 127.0.0.2, 127.0.0.3, ...: separate servers, one Redis."""
    return [
        serve(
            "--broker", url, "--host", f"127.0.0.{2 + i}", "--workers", "2",
            "--max-connections", "1000", "--max-messages-per-second", "0",
        )
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture
def nodes(serve: Callable[..., Server], redis_server: RedisServer) -> Iterator[Nodes]:
    need_redis()
    yield lambda count: start_nodes(serve, redis_server.url, count)


def connect(clients: Callable[..., Client], node: Server) -> Client:
    return clients(node.port(), host=node.info["services"]["chat"]["host"])


def joined(client: Client, user: str | None = None, channel: str | None = None) -> Client:
    if user is not None:
        assert client.call({"op": "hello", "user": user, "id": "h"})["ev"] == "ok"
    if channel is not None:
        assert client.call({"op": "sub", "channel": channel, "id": "s"})["ev"] == "ok"
    return client


def broker(node: Server) -> dict[str, Any]:
    return dict(node.stats()["broker"])


def data_until(client: Client, end: object) -> list[dict[str, Any]]:
    return client.until(lambda e: e.get("data") == end)


def test_channel_messages_reach_every_subscriber_on_every_node_once(nodes, clients):
    servers = nodes(3)
    subscribers = [joined(connect(clients, s), channel="veg") for s in servers for _ in range(2)]
    publisher = connect(clients, servers[0])

    assert servers[1].publish(channel="veg", data=1)["seq"] == 1  # every node sees seq 1
    assert servers[2].publish(channel="veg", data=2)["nodes"] == 3  # all three subscribe
    publisher.call({"op": "pub", "channel": "veg", "data": 3, "id": 1})
    publisher.send({"op": "pub", "channel": "veg", "data": "end"})  # same path: comes last

    for client in subscribers:
        events = data_until(client, "end")
        assert [(e["seq"], e["data"]) for e in events] == [(1, 1), (2, 2), (3, 3), (4, "end")]


def test_user_messages_and_broadcasts_reach_every_node_exactly_once(nodes, clients):
    servers = nodes(3)
    ann = [joined(connect(clients, servers[i]), user="ann") for i in (0, 2)]
    others = [joined(connect(clients, s), user=f"x{i}") for i, s in enumerate(servers)]
    sender = others[1]

    sender.call({"op": "send", "user": "ann", "data": "hi", "id": 1})
    sender.send({"op": "send", "user": "ann", "data": "end"})
    for client in ann:
        assert [e["data"] for e in data_until(client, "end")] == ["hi", "end"]

    servers[0].publish(broadcast=True, data="b1")
    servers[2].publish(broadcast=True, data="b2")
    for client in [*ann, *others]:
        events = data_until(client, "b2")
        assert [(e["ev"], e["data"]) for e in events] == [("broadcast", "b1"), ("broadcast", "b2")]
        assert events[1]["seq"] == events[0]["seq"] + 1


def test_a_unicast_to_a_user_on_one_node_never_reaches_another_node(nodes, clients, redis_server):
    a, b = nodes(2)
    ann = joined(connect(clients, a), user="ann")
    bob = joined(connect(clients, b), user="bob")
    before = [broker(a)["received_from_redis"], broker(b)["received_from_redis"]]

    b.publish(user="ann", data="to ann")  # published on B, for a user held by A only
    assert ann.recv()["data"] == "to ann"
    bob.call({"op": "send", "user": "ann", "data": "again", "id": 1})
    assert ann.recv()["data"] == "again"

    after = [broker(a)["received_from_redis"], broker(b)["received_from_redis"]]
    assert after[0] - before[0] == 2  # A got both from Redis ...
    assert after[1] == before[1]  # ... B's process received neither
    with redis_server.client() as r:
        assert r.pubsub_numsub("md:u{ann}", "md:u{bob}") == [(b"md:u{ann}", 1), (b"md:u{bob}", 1)]


def test_a_node_subscribes_to_a_channel_only_while_it_has_subscribers(nodes, clients, redis_server):
    a, b = nodes(2)
    sub = joined(connect(clients, a), channel="veg")
    with redis_server.client() as r:
        assert r.pubsub_numsub("md:c{veg}") == [(b"md:c{veg}", 1)]
        before = broker(b)["received_from_redis"]
        b.publish(channel="veg", data=1)
        assert sub.recv()["data"] == 1
        assert broker(b)["received_from_redis"] == before
        sub.call({"op": "unsub", "channel": "veg", "id": 1})
        wait_for(lambda: r.pubsub_numsub("md:c{veg}") == [(b"md:c{veg}", 0)], what="unsubscribe")


def test_presence_counts_users_on_every_node(nodes, clients):
    servers = nodes(3)
    joined(connect(clients, servers[0]), user="ann", channel="veg")
    joined(connect(clients, servers[1]), user="ann", channel="veg")
    joined(connect(clients, servers[1]), user="bob", channel="veg")
    joined(connect(clients, servers[2]), channel="veg")  # no hello: anonymous
    asker = connect(clients, servers[2])

    answer = asker.call({"op": "presence", "channel": "veg", "id": 1})
    assert answer == {
        "ev": "presence",
        "channel": "veg",
        "users": {"ann": 2, "bob": 1},
        "anonymous": 1,
        "id": 1,
    }
    status, body = servers[0].http("GET", "/api/presence?channel=veg")
    assert status == 200 and body["users"] == {"ann": 2, "bob": 1} and not body["partial"]


def test_seqs_are_monotonic_per_channel_across_nodes(nodes, clients):
    a, b, c = nodes(3)
    sub = joined(connect(clients, c), channel="veg")
    for i in range(20):
        assert (a if i % 2 else b).publish(channel="veg", data=i)["seq"] == i + 1
    assert [e["seq"] for e in data_until(sub, 19)] == list(range(1, 21))


@pytest.mark.parametrize("rejoin", [0, 1], ids=["same-node", "other-node"])
def test_a_reconnecting_client_recovers_what_it_missed_from_history(nodes, clients, rejoin):
    servers = nodes(2)
    keeper = joined(connect(clients, servers[0]), channel="veg")  # node 0 keeps the channel
    first = joined(connect(clients, servers[0]), channel="veg")
    for i in (1, 2):
        servers[1].publish(channel="veg", data=i)
    assert [e["seq"] for e in data_until(first, 2)] == [1, 2]
    first.close()
    for i in (3, 4, 5):
        servers[1].publish(channel="veg", data=i)
    assert [e["seq"] for e in data_until(keeper, 5)] == [1, 2, 3, 4, 5]

    # Node 1 holds no subscriber of veg: it reads the missed lines from Redis.
    again = connect(clients, servers[rejoin])
    again.send({"op": "sub", "channel": "veg", "since": 2, "id": 7})
    assert again.recv() == {"ev": "ok", "id": 7, "recovered": True, "seq": 5, "missed": 3}
    assert [(e["seq"], e["data"]) for e in (again.recv() for _ in range(3))] == [
        (3, 3),
        (4, 4),
        (5, 5),
    ]
    servers[0].publish(channel="veg", data="end")
    assert [e["data"] for e in data_until(again, "end")] == ["end"]


def test_recovery_says_recovered_false_when_the_gap_left_the_history(serve, clients, redis_server):
    need_redis()
    node = serve("--broker", redis_server.url, "--history-size", "3")
    for i in range(10):
        node.publish(channel="veg", data=i)
    client = clients(node.port())
    client.send({"op": "sub", "channel": "veg", "since": 2, "id": 1})
    assert client.recv() == {"ev": "ok", "id": 1, "recovered": False, "seq": 10, "missed": 0}
    node.publish(channel="veg", data="live")
    assert client.recv()["seq"] == 11


class Stream(threading.Thread):
    """Publishes 0, 1, 2, ... to a channel from one client until stopped."""

    def __init__(self, client: Client, channel: str) -> None:
        super().__init__(daemon=True)
        self.client, self.channel = client, channel
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.002):
            self.client.send({"op": "pub", "channel": self.channel, "data": self.sent})
            self.sent += 1

    def stop(self) -> int:
        self.halt.set()
        self.join()
        self.client.send({"op": "pub", "channel": self.channel, "data": "end"})  # comes last
        return self.sent


def test_redis_killed_and_restarted_mid_stream(nodes, clients, redis_server):
    a, b = nodes(2)
    on_a = joined(connect(clients, a), user="ann", channel="veg")
    on_b = joined(connect(clients, b), user="bob", channel="veg")
    watch_a = joined(connect(clients, a), channel="stream")
    watch_b = joined(connect(clients, b), channel="stream")
    a.publish(channel="veg", data="before")
    for client in (on_a, on_b):
        assert client.recv()["data"] == "before"
    stream = Stream(connect(clients, a), "stream")
    stream.start()
    wait_for(lambda: stream.sent > 50, what="the stream to flow")

    redis_server.kill()
    for node in (a, b):
        wait_for(lambda n=node: n.http("GET", "/healthz")[1]["broker"] == "degraded", what="down")
        status, health = node.http("GET", "/healthz")
        assert status == 200 and health["status"] == "degraded"  # still serving its clients
    assert "manydoors_broker_degraded 1.0" in a.http("GET", "/metrics")[1]
    reply = a.publish(channel="veg", data="during")
    assert reply["degraded"] is True
    assert on_a.recv()["data"] == "during"  # delivered on its own node

    redis_server.start()
    for node in (a, b):
        wait_for(lambda n=node: broker(n)["status"] == "ok", timeout=20, what="resubscribed")
        assert broker(node)["reconnects"] >= 1
    resumed = stream.sent
    wait_for(lambda: stream.sent > resumed + 50, what="the stream to go on")
    sent = stream.stop()
    # The publishing node's subscriber lost nothing (through Redis, or locally while it
    # was away; a message Redis published just before dying may come twice); the other
    # node's got everything published once both nodes were back.
    got_a = {e["data"] for e in data_until(watch_a, "end")}
    got_b = {e["data"] for e in data_until(watch_b, "end")}
    assert got_a >= set(range(sent))
    assert got_b >= set(range(resumed, sent))
    # Everything was resubscribed: channels, users and broadcast, on both nodes.
    b.publish(channel="veg", data="after")
    a.publish(user="bob", data="dm")
    b.publish(broadcast=True, data="all")
    assert [e["data"] for e in data_until(on_a, "all")] == ["after", "all"]
    assert [e["data"] for e in data_until(on_b, "all")] == ["after", "dm", "all"]
    assert a.proc.poll() is None and b.proc.poll() is None
    assert "manydoors_broker_degraded 0.0" in a.http("GET", "/metrics")[1]


def test_a_node_that_cannot_reach_redis_at_start_says_so(tmp_path):
    need_redis()
    with RedisServer() as spare:
        url = spare.url
    cmd = manydoors_cmd("serve", "--broker", url, "--port", "0", "--api-port", "0")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "redis broker: cannot reach" in done.stderr and url in done.stderr


def test_sharded_pubsub_on_a_redis_cluster(serve, clients, redis_cluster: RedisCluster):
    a, b = start_nodes(serve, redis_cluster.url, 2)
    assert broker(a)["cluster"] is True
    on_a = joined(connect(clients, a), user="ann", channel="veg")
    on_b = joined(connect(clients, b), user="bob", channel="veg")
    for i in range(1, 4):
        assert (a if i % 2 else b).publish(channel="veg", data=i)["seq"] == i
    on_a.send({"op": "send", "user": "bob", "data": "dm"})
    wait_for(lambda: broker(b)["received_from_redis"] >= 4, what="the dm")
    a.publish(broadcast=True, data="all")
    assert [e["data"] for e in data_until(on_b, "all")] == [1, 2, 3, "dm", "all"]
    assert [e["data"] for e in data_until(on_a, "all")] == [1, 2, 3, "all"]
    assert on_b.call({"op": "presence", "channel": "veg", "id": 2})["users"] == {
        "ann": 1,
        "bob": 1,
    }
    again = connect(clients, b)
    again.send({"op": "sub", "channel": "veg", "since": 1, "id": 3})
    assert again.recv()["recovered"] is True
    assert [again.recv()["seq"] for _ in range(2)] == [2, 3]
    # Both nodes subscribe to the channel's shard channel, on the one shard that owns it.
    counts = []
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as r:
            counts.append(int(r.execute_command("PUBSUB", "SHARDNUMSUB", "md:c{veg}")[1]))
    assert sorted(counts) == [0, 0, 2]


def test_publishing_goes_on_when_redis_forgets_the_publish_script(nodes, clients, redis_server):
    (node,) = nodes(1)
    sub = joined(connect(clients, node), channel="veg")
    assert node.publish(channel="veg", data=1)["seq"] == 1
    with redis_server.client() as r:
        r.script_flush()
    assert node.publish(channel="veg", data=2)["seq"] == 2  # NOSCRIPT: loaded and sent again
    assert [e["seq"] for e in data_until(sub, 2)] == [1, 2]
    assert broker(node)["status"] == "ok" and broker(node)["reconnects"] == 0

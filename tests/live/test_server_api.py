"""The server API end to end: disconnect, unsubscribe, history, channel lists, publishes
to several channels and leaving the sender out, on one node (two workers) and on two
nodes sharing a real Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from support.client import Client
from support.redisfix import RedisServer, need_redis
from support.server import Server, spread
from support.wait import wait_for

KEY = "k" * 24  # the API key of these servers
Connect = Callable[..., Client]


def node(serve: Callable[..., Server], *flags: str, host: str = "127.0.0.1") -> Server:
    return serve(
        "--workers", "2", "--max-connections", "1000", "--host", host, *flags,
        env={"MANYDOORS_API_KEY": KEY},
    )  # fmt: skip


def nodes(serve: Callable[..., Server], redis: RedisServer, count: int) -> list[Server]:
    """``count`` nodes on 127.0.0.2, 127.0.0.3, ... sharing one Redis."""
    return [node(serve, "--broker", redis.url, host=f"127.0.0.{2 + i}") for i in range(count)]


def api(server: Server, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return server.http(method, path, body, key=KEY)


def accepted(server: Server, path: str, **body: Any) -> dict[str, Any]:
    status, answer = api(server, "POST", path, body)
    assert status == 202, answer
    assert answer.pop("accepted") is True
    return dict(answer)


def publish(server: Server, **body: Any) -> dict[str, Any]:
    return accepted(server, "/api/publish", **body)


def connect(clients: Connect, server: Server) -> Client:
    return clients(server.port(), host=server.info["services"]["chat"]["host"])


def joined(client: Client, user: str | None = None, *channels: str) -> Client:
    if user is not None:
        assert client.call({"op": "hello", "user": user, "id": "h"}) == {"ev": "ok", "id": "h"}
    for channel in channels:
        assert client.call({"op": "sub", "channel": channel, "id": "s"}) == {"ev": "ok", "id": "s"}
    return client


def alive(client: Client) -> bool:
    return client.call({"op": "ping", "id": "alive"}) == {"ev": "pong", "id": "alive"}


def data_until(client: Client, end: object) -> list[Any]:
    return [e.get("data") for e in client.until(lambda e: e.get("data") == end)]


def closed_count(server: Server) -> int:
    return int(server.stats()["closed"]["disconnected"])


# --- one node ---------------------------------------------------------------------------


def test_every_new_endpoint_needs_the_api_key(serve):
    server = node(serve)
    for method, path, body in (
        ("POST", "/api/disconnect", {"user": "ann"}),
        ("POST", "/api/unsubscribe", {"user": "ann", "channel": "veg"}),
        ("GET", "/api/history?channel=veg", None),
        ("GET", "/api/channels", None),
    ):
        status, answer = server.http(method, path, body)
        assert (status, answer["error"]) == (401, "unauthorized"), path
        assert api(server, method, path, body)[0] in (200, 202), path


def test_a_disconnect_closes_every_connection_of_the_user_with_its_reason(serve, clients):
    server = node(serve)
    groups = spread(clients, server.port(), per_worker=2, workers=2)
    (on_a, on_b) = groups.values()
    ann = [joined(on_a[0], "ann"), joined(on_b[0], "ann")]  # one on each worker
    bob = joined(on_a[1], "bob")
    assert accepted(server, "/api/disconnect", user="ann", reason="banned") == {"workers": 2}
    for client in ann:
        assert client.recv() == {"ev": "bye", "reason": "banned"}
        assert client.closed()
    assert alive(bob)
    wait_for(lambda: closed_count(server) == 2, what="the closes counted")
    assert 'manydoors_closed_total{reason="disconnected"} 2.0' in api(server, "GET", "/metrics")[1]

    again = joined(on_b[1], "ann")
    assert accepted(server, "/api/disconnect", user="ann") == {"workers": 1}
    assert again.recv() == {"ev": "bye", "reason": "disconnected"}  # the default reason
    assert accepted(server, "/api/disconnect", user="nobody") == {"workers": 0}


def test_a_disconnect_reason_must_be_a_short_name(serve):
    server = node(serve)
    for body in (
        {"user": "ann", "reason": "two words"},
        {"user": "ann", "reason": "x" * 65},
        {"user": "ann", "reason": ""},
        {"user": "ann", "why": "x"},
        {"reason": "x"},
    ):
        status, answer = api(server, "POST", "/api/disconnect", body)
        assert (status, answer["error"]) == (400, "bad_field"), body


def test_an_unsubscribe_takes_the_user_out_of_the_channel_and_tells_each_connection(serve, clients):
    server = node(serve)
    (on_a, on_b) = spread(clients, server.port(), per_worker=2, workers=2).values()
    ann = [joined(on_a[0], "ann", "veg", "fruit"), joined(on_b[0], "ann", "veg")]
    bob = joined(on_b[1], "bob", "veg")
    answer = accepted(server, "/api/unsubscribe", user="ann", channel="veg")
    assert answer == {"workers": 2}
    for client in ann:
        assert client.recv() == {"ev": "unsubscribed", "channel": "veg"}
    publish(server, channel="veg", data="after")
    publish(server, channel="fruit", data="fruit")
    assert data_until(bob, "after") == ["after"]
    assert data_until(ann[0], "fruit") == ["fruit"]  # still in fruit, never got "after"
    assert alive(ann[1])
    status, answer = api(server, "POST", "/api/unsubscribe", {"user": "ann"})
    assert (status, answer["error"]) == (400, "bad_field")


def test_history_pages_through_a_channels_recent_messages(serve, clients):
    server = node(serve, "--history-size", "5")
    for i in range(8):
        publish(server, channel="veg", data=i, **{"from": "ops"})
    status, page = api(server, "GET", "/api/history?channel=veg")
    assert status == 200
    assert (page["channel"], page["seq"], page["more"]) == ("veg", 8, False)
    assert "recovered" not in page
    assert page["messages"][0] == {
        "ev": "msg",
        "channel": "veg",
        "seq": 4,
        "from": "ops",
        "data": 3,
    }
    assert [m["seq"] for m in page["messages"]] == [4, 5, 6, 7, 8]

    _, first = api(server, "GET", "/api/history?channel=veg&since=4&limit=2")
    assert ([m["seq"] for m in first["messages"]], first["more"], first["recovered"]) == (
        [5, 6],
        True,
        True,
    )
    _, gone = api(server, "GET", "/api/history?channel=veg&since=1")
    assert gone["recovered"] is False and len(gone["messages"]) == 5
    _, never = api(server, "GET", "/api/history?channel=none&since=0")
    assert never == {"channel": "none", "seq": 0, "recovered": True, "more": False, "messages": []}
    for query in ("", "channel=veg&since=-1", "channel=veg&limit=x", "channel=" + quote("a\x01")):
        status, answer = api(server, "GET", "/api/history?" + query)
        assert status == 400 and answer["error"] in ("missing_field", "bad_field"), query


def test_channels_are_listed_with_their_subscribers_by_name(serve, clients):
    server = node(serve)
    (on_a, on_b) = spread(clients, server.port(), per_worker=3, workers=2).values()
    joined(on_a[0], None, "veg", "news:sport")
    joined(on_a[1], None, "veg")
    joined(on_b[0], None, "veg", "news:arts")
    joined(on_b[1], None, "fruit")
    status, answer = api(server, "GET", "/api/channels")
    assert status == 200
    assert answer == {
        "channels": {"fruit": 1, "news:arts": 1, "news:sport": 1, "veg": 3},
        "truncated": False,
        "partial": False,
    }
    assert list(answer["channels"]) == ["fruit", "news:arts", "news:sport", "veg"]
    _, news = api(server, "GET", "/api/channels?prefix=" + quote("news:"))
    assert news["channels"] == {"news:arts": 1, "news:sport": 1}
    _, cut = api(server, "GET", "/api/channels?limit=2")
    assert (cut["channels"], cut["truncated"]) == ({"fruit": 1, "news:arts": 1}, True)
    assert api(server, "GET", "/api/channels?limit=-3")[0] == 400


def test_a_publish_to_several_channels_leaves_the_sender_out(serve, clients):
    server = node(serve)
    (on_a, on_b) = spread(clients, server.port(), per_worker=2, workers=2).values()
    sender = joined(on_a[0], "ann", "veg", "fruit")
    same_worker = joined(on_a[1], None, "veg")
    other_worker = joined(on_b[0], None, "veg", "fruit")
    me = sender.welcome["conn"]
    answer = accepted(
        server, "/api/publish", channels=["veg", "fruit", "empty"], data="x", exclude=me
    )
    assert answer == {
        "channels": [
            {"channel": "veg", "seq": 1, "workers": 2},
            {"channel": "fruit", "seq": 1, "workers": 2},
            {"channel": "empty", "seq": 1, "workers": 0},
        ]
    }
    publish(server, channel="veg", data="end")  # not excluded: everyone gets it
    assert data_until(sender, "end") == ["end"]
    assert data_until(same_worker, "end") == ["x", "end"]
    events = other_worker.until(lambda e: e.get("data") == "end")
    assert [(e["channel"], e["data"]) for e in events] == [
        ("veg", "x"),
        ("fruit", "x"),
        ("veg", "end"),
    ]

    publish(server, user="ann", data="dm", exclude=me)
    publish(server, broadcast=True, data="all", exclude=me)
    publish(server, user="ann", data="dm-end")
    assert data_until(sender, "dm-end") == ["dm-end"]
    assert data_until(same_worker, "all") == ["all"]


def test_bad_multi_channel_publishes_and_exclusions_are_refused(serve):
    server = node(serve)
    for body, code in (
        ({"channels": ["a", "a"], "data": 1}, "bad_field"),
        ({"channels": [], "data": 1}, "bad_field"),
        ({"channels": [f"c{i}" for i in range(101)], "data": 1}, "bad_field"),
        ({"channels": ["a"], "channel": "b", "data": 1}, "bad_target"),
        ({"channel": "a", "data": 1, "exclude": "abc"}, "bad_field"),
        ({"channel": "a", "data": 1, "exclude": "1-" + "9" * 20}, "bad_field"),
    ):
        status, answer = api(server, "POST", "/api/publish", body)
        assert (status, answer["error"]) == (400, code), body


# --- two nodes sharing Redis --------------------------------------------------------------


def test_disconnect_and_unsubscribe_reach_the_user_on_every_node(serve, clients, redis_server):
    need_redis()
    a, b = nodes(serve, redis_server, 2)
    ann_a = joined(connect(clients, a), "ann", "veg")
    ann_b = joined(connect(clients, b), "ann", "veg")
    bob = joined(connect(clients, b), "bob", "veg")

    assert accepted(a, "/api/unsubscribe", user="ann", channel="veg") == {"nodes": 2}
    for client in (ann_a, ann_b):
        assert client.recv() == {"ev": "unsubscribed", "channel": "veg"}
    publish(a, channel="veg", data="after")
    assert data_until(bob, "after") == ["after"]

    assert accepted(b, "/api/disconnect", user="ann", reason="kicked") == {"nodes": 2}
    for client in (ann_a, ann_b):
        assert client.recv() == {"ev": "bye", "reason": "kicked"}
        assert client.closed()
    assert alive(bob)
    wait_for(lambda: closed_count(a) == 1 and closed_count(b) == 1, what="both nodes counted")


def test_history_and_channels_span_the_nodes(serve, clients, redis_server):
    need_redis()
    a, b = nodes(serve, redis_server, 2)
    for i in range(3):
        publish(a, channel="veg", data=i)
    # B holds no subscriber of veg: it reads the history from Redis.
    _, page = api(b, "GET", "/api/history?channel=veg&since=1")
    assert (page["seq"], page["recovered"]) == (3, True)
    assert [m["data"] for m in page["messages"]] == [1, 2]

    joined(connect(clients, a), None, "veg", "news:a")
    joined(connect(clients, b), None, "veg", "zoo")
    joined(connect(clients, b), None, "veg")
    for server in (a, b):
        _, answer = api(server, "GET", "/api/channels")
        assert answer == {
            "channels": {"news:a": 1, "veg": 3, "zoo": 1},
            "truncated": False,
            "partial": False,
        }
    _, cut = api(a, "GET", "/api/channels?limit=2")
    assert (cut["channels"], cut["truncated"]) == ({"news:a": 1, "veg": 3}, True)
    _, only = api(b, "GET", "/api/channels?prefix=z")
    assert only["channels"] == {"zoo": 1}


def test_the_sender_is_left_out_on_whichever_node_it_is(serve, clients, redis_server):
    need_redis()
    a, b = nodes(serve, redis_server, 2)
    sender = joined(connect(clients, b), "ann", "veg", "fruit")
    on_a = joined(connect(clients, a), None, "veg", "fruit")
    on_b = joined(connect(clients, b), None, "veg")
    me = sender.welcome["conn"]
    answer = accepted(a, "/api/publish", channels=["veg", "fruit"], data="x", exclude=me)
    assert answer == {
        "channels": [
            {"channel": "veg", "seq": 1, "nodes": 2},
            {"channel": "fruit", "seq": 1, "nodes": 2},
        ]
    }
    publish(a, user="ann", data="dm", exclude=me)
    publish(a, broadcast=True, data="all", exclude=me)
    publish(b, channel="veg", data="end")
    assert data_until(sender, "end") == ["end"]
    assert data_until(on_a, "end") == ["x", "x", "all", "end"]
    assert data_until(on_b, "end") == ["x", "all", "end"]
    # The history keeps the message for everyone, the sender's reconnection included.
    _, page = api(b, "GET", "/api/history?channel=fruit")
    assert [m["data"] for m in page["messages"]] == ["x"]

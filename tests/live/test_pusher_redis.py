"""Pusher apps on several nodes sharing a real Redis: one logical Pusher server.

Raw protocol 7 over the ``websockets`` client: presence members, client events and
cache channels cross nodes through the same backplane as the native protocol.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from support.redisfix import RedisServer, need_redis
from support.server import Server

CONFIG = """
[api]
port = 0
[[service]]
name = "pusher"
protocol = "pusher"
host = "{host}"
port = 0
workers = 2
max_connections = 1000
[[app]]
id = "1001"
key = "app-key"
secret = "app-secret"
enable_client_events = true
"""


class Pusher:
    """One raw Pusher client."""

    def __init__(self, node: Server, stack: ExitStack) -> None:
        svc = node.info["services"]["pusher"]
        url = f"ws://{svc['host']}:{svc['port']}/app/app-key?protocol=7"
        self.ws: ClientConnection = stack.enter_context(connect(url, open_timeout=5))
        first = self.recv()
        assert first["event"] == "pusher:connection_established"
        self.sid = json.loads(first["data"])["socket_id"]

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return dict(json.loads(self.ws.recv(timeout)))

    def until(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            got = self.recv(timeout)
            if got["event"] == event:
                return got

    def send(self, event: str, data: Any, channel: str | None = None) -> None:
        body = {"event": event, "data": data, **({"channel": channel} if channel else {})}
        self.ws.send(json.dumps(body))

    def subscribe(self, channel: str, channel_data: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            text = f"{self.sid}:{channel}" + (f":{channel_data}" if channel_data else "")
            sig = hmac.new(b"app-secret", text.encode(), hashlib.sha256).hexdigest()
            data["auth"] = f"app-key:{sig}"
        if channel_data is not None:
            data["channel_data"] = channel_data
        self.send("pusher:subscribe", data)
        return self.until("pusher_internal:subscription_succeeded")


Pushers = Callable[[Server], Pusher]


@pytest.fixture
def two_nodes(serve: Callable[..., Server], redis_server: RedisServer) -> list[Server]:
    need_redis()
    configs = [CONFIG.format(host=f"127.0.0.{2 + i}") for i in range(2)]
    return [serve("--broker", redis_server.url, config=c, chat=False) for c in configs]


@pytest.fixture
def pushers() -> Iterator[Pushers]:
    """Open Pusher clients; every one is closed after the test."""
    with ExitStack() as stack:
        yield lambda node: Pusher(node, stack)


def test_presence_members_cross_nodes(two_nodes: list[Server], pushers: Pushers) -> None:
    a, b = pushers(two_nodes[0]), pushers(two_nodes[1])
    got = a.subscribe("presence-room", json.dumps({"user_id": "ann", "user_info": {"n": 1}}))
    assert json.loads(got["data"])["presence"]["ids"] == ["ann"]
    got = b.subscribe("presence-room", json.dumps({"user_id": "bob", "user_info": None}))
    presence = json.loads(got["data"])["presence"]
    assert sorted(presence["ids"]) == ["ann", "bob"] and presence["count"] == 2
    assert presence["hash"]["ann"] == {"n": 1}
    added = a.until("pusher_internal:member_added")
    assert json.loads(added["data"]) == {"user_id": "bob", "user_info": None}
    b.ws.close()
    removed = a.until("pusher_internal:member_removed")
    assert json.loads(removed["data"]) == {"user_id": "bob"}


def test_client_events_cross_nodes_and_skip_the_sender(
    two_nodes: list[Server], pushers: Pushers
) -> None:
    a, b = pushers(two_nodes[0]), pushers(two_nodes[1])
    a2 = pushers(two_nodes[0])
    for peer in (a, b, a2):
        peer.subscribe("private-chat")
    a.send("client-typing", {"who": "a"}, channel="private-chat")
    for peer in (b, a2):
        got = peer.until("client-typing")
        assert got == {"event": "client-typing", "channel": "private-chat", "data": {"who": "a"}}
    a.send("pusher:ping", {})
    assert a.until("pusher:pong")  # and nothing of its own event came before it


def test_a_cache_channel_replays_its_last_event_on_another_node(
    two_nodes: list[Server], pushers: Pushers
) -> None:
    a, b = pushers(two_nodes[0]), pushers(two_nodes[1])
    a.send("pusher:subscribe", {"channel": "cache-prices"})
    assert a.recv()["event"] == "pusher_internal:subscription_succeeded"
    assert a.recv()["event"] == "pusher:cache_miss"
    watcher = pushers(two_nodes[1])
    for peer in (a, watcher):
        peer.subscribe("private-cache-feed")
    a.send("client-price", {"p": 1}, channel="private-cache-feed")
    a.send("client-price", {"p": 2}, channel="private-cache-feed")
    assert watcher.until("client-price")["data"] == {"p": 1}
    assert watcher.until("client-price")["data"] == {"p": 2}  # published: now it is the last
    b.subscribe("private-cache-feed")
    assert b.recv() == {"event": "client-price", "channel": "private-cache-feed", "data": {"p": 2}}

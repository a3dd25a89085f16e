"""Pusher's REST API and webhooks with the real server libraries: the PyPI ``pusher``
(trigger, trigger_batch, channels_info, channel_info, users_info,
terminate_user_connections, validate_webhook) and, once, the npm ``pusher``.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from support.pusherfix import APP, NODE_DIR, OTHER, start_client, subscribe
from support.wait import wait_for


def test_trigger_to_several_channels_and_trigger_batch(pusher_node, pusher_backend, peers):
    peer = start_client(peers, pusher_node, pusher_backend, "alice")
    for channel in ("news", "private-orders", "presence-room"):
        subscribe(peer, channel)
    library = APP.library(pusher_node.api)
    assert library.trigger(["news", "private-orders", "presence-room"], "many", {"n": 1}) == {}
    batch = [
        {"channel": "news", "name": "first", "data": {"n": 1}},
        {"channel": "private-orders", "name": "second", "data": "text"},
        {"channel": "presence-room", "name": "third", "data": {"n": 3}},
    ]
    assert library.trigger_batch(batch) in ({}, {"batch": [{}, {}, {}]})
    for channel in ("news", "private-orders", "presence-room"):
        assert peer.wait("event", channel=channel, event="many")["data"] == {"n": 1}
    assert peer.wait("event", channel="news", event="first")["data"] == {"n": 1}
    assert peer.wait("event", channel="private-orders", event="second")["data"] == "text"
    assert peer.wait("event", channel="presence-room", event="third")["data"] == {"n": 3}


def test_channels_channel_and_users_info(pusher_node, pusher_backend, peers):
    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    bob_again = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer in (alice, bob, bob_again):
        subscribe(peer, "presence-room")
        subscribe(peer, "news")
    subscribe(alice, "private-orders")
    other = start_client(peers, pusher_node, pusher_backend, app=OTHER)
    subscribe(other, "other-only")
    library = APP.library(pusher_node.api)

    everything = library.channels_info()["channels"]
    assert set(everything) == {"presence-room", "news", "private-orders"}, everything
    presence = library.channels_info(prefix_filter="presence-", attributes=["user_count"])
    assert presence["channels"] == {"presence-room": {"user_count": 2}}, presence

    news = library.channel_info("news", attributes=["subscription_count"])
    assert news["occupied"] is True and news["subscription_count"] == 3, news
    room = library.channel_info("presence-room", attributes=["user_count"])
    assert room["occupied"] is True and room["user_count"] == 2, room
    assert library.channel_info("empty")["occupied"] is False

    users = library.users_info("presence-room")["users"]
    assert sorted(u["id"] for u in users) == ["alice", "bob"]

    bob.send("disconnect")
    bob_again.send("disconnect")
    wait_for(
        lambda: library.users_info("presence-room")["users"] == [{"id": "alice"}],
        what="bob gone from the presence channel",
    )
    wait_for(
        lambda: (
            library.channel_info("news", attributes=["subscription_count"])["subscription_count"]
            == 1
        ),
        what="news down to one subscriber",
    )


def test_terminate_user_connections_closes_every_connection_of_that_user(
    pusher_node, pusher_backend, peers
):
    alices = [start_client(peers, pusher_node, pusher_backend, "alice") for _ in range(3)]
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer in (*alices, bob):
        peer.send("signin")
        peer.wait("message", event="pusher:signin_success")
    library = APP.library(pusher_node.api)
    assert library.terminate_user_connections("alice") == {}
    for peer in alices:
        left = peer.wait("state", previous="connected")
        assert left["current"] == "disconnected", peer.describe()
    subscribe(bob, "news")
    library.trigger("news", "after", {})
    bob.wait("event", event="after")
    assert bob.find("state")[-1]["current"] == "connected"


def test_webhooks_are_signed_as_validate_webhook_expects(pusher_node, pusher_backend, peers):
    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer in (alice, bob):
        subscribe(peer, "presence-hooks")
    subscribe(alice, "cache-hooks-empty")
    alice.send("trigger", channel="presence-hooks", event="client-wave", data={"hi": 1})
    bob.wait("event", event="client-wave")
    bob.send("disconnect")
    alice.wait("member_removed", channel="presence-hooks")
    alice.send("disconnect")
    library = APP.library()

    def events() -> list[dict[str, Any]]:
        seen = []
        for headers, body in list(pusher_backend.webhooks):
            assert headers.get("X-Pusher-Key") == APP.key, headers
            payload = library.validate_webhook(
                key=headers["X-Pusher-Key"], signature=headers["X-Pusher-Signature"], body=body
            )
            assert payload is not None, (headers, body)  # signature, key and time_ms all good
            seen.extend(payload["events"])
        return seen

    wanted = {
        ("channel_occupied", "presence-hooks"),
        ("member_added", "presence-hooks"),
        ("client_event", "presence-hooks"),
        ("member_removed", "presence-hooks"),
        ("channel_vacated", "presence-hooks"),
        ("cache_miss", "cache-hooks-empty"),
    }

    def all_seen() -> bool:
        return wanted <= {(e["name"], e.get("channel")) for e in events()}

    wait_for(all_seen, 15, f"webhooks {wanted}")
    by_name = {(e["name"], e.get("user_id")): e for e in events()}
    assert ("member_added", "bob") in by_name and ("member_removed", "bob") in by_name
    client_event = next(e for e in events() if e["name"] == "client_event")
    assert client_event["event"] == "client-wave" and client_event["user_id"] == "alice"
    data = client_event["data"]  # Pusher sends it as the JSON string
    assert (json.loads(data) if isinstance(data, str) else data) == {"hi": 1}
    assert client_event["socket_id"] == alice.find("state", current="connected")[0]["socket_id"]
    # A body signed with another secret is refused by the same library call.
    headers, body = pusher_backend.webhooks[0]
    assert OTHER.library().validate_webhook(APP.key, headers["X-Pusher-Signature"], body) is None


def test_npm_pusher_server_library_triggers_once(pusher_node, pusher_backend, peers):
    peer = start_client(peers, pusher_node, pusher_backend)
    subscribe(peer, "news")
    host, port = pusher_node.api.removeprefix("http://").rsplit(":", 1)
    config = {
        "appId": APP.id,
        "key": APP.key,
        "secret": APP.secret,
        "host": host,
        "port": int(port),
        "channel": "news",
        "event": "from-node",
        "data": {"lib": "pusher-http-node"},
    }
    done = subprocess.run(
        ["node", str(NODE_DIR / "pusher_server.js"), json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=NODE_DIR,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    answer = json.loads(done.stdout)
    assert answer["trigger"]["status"] == 200, answer
    assert answer["info"]["status"] == 200, answer
    assert answer["info"]["body"]["occupied"] is True
    assert answer["info"]["body"]["subscription_count"] == 1, answer
    assert peer.wait("event", event="from-node")["data"] == {"lib": "pusher-http-node"}

"""Bad input to a Pusher service: each gets Pusher's error, and the other connections
(and the connection itself, when Pusher keeps it) carry on.

Clients are pusher-js (Node), pysher and, where a library would refuse to send the bad
thing, the Python ``websockets`` client speaking the protocol by hand.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import SimpleNamespace
from typing import Any

import pytest

from support.pusherfix import (
    APP,
    SMALL,
    SMALL_MEMBERS,
    App,
    client_config,
    pysher_client,
    start_client,
    subscribe,
)
from support.server import Server
from support.wait import wait_for

TOO_BIG = "x" * (11 * 1024)  # over the 10 KB of an event's data (Pusher's limit)


def url(node: Server, key: str = APP.key, query: str = "protocol=7&client=js&version=8.6.0"):
    return f"ws://127.0.0.1:{node.port('pusher')}/app/{key}?{query}"


def still_connected(peer) -> bool:
    return bool(peer.find("state")) and peer.find("state")[-1]["current"] == "connected"


def send(ws: Any, event: str, data: dict[str, Any]) -> None:
    ws.send(json.dumps({"event": event, "data": data}))


# --- unknown app ------------------------------------------------------------------------


def test_unknown_app_key_gets_4001_and_pusher_js_does_not_retry(pusher_node, pusher_backend, peers):
    good = start_client(peers, pusher_node, pusher_backend)
    subscribe(good, "news")
    stranger = App("9999", "no-such-key", "nothing")
    bad = peers.start(
        "pusher_client.js", client_config(pusher_node.port("pusher"), pusher_backend, app=stranger)
    )
    bad.wait("state", current="disconnected")
    assert 4001 in bad.error_codes(), bad.describe()
    assert not bad.find("state", current="connected")
    # The other connection carries on.
    APP.library(pusher_node.api).trigger("news", "still", {"ok": True})
    assert good.wait("event", event="still")["data"] == {"ok": True}
    # No retry: pusher-js went from connecting (in its constructor) to disconnected.
    assert [s["current"] for s in bad.find("state")] == ["disconnected"], bad.describe()


def test_unknown_app_and_bad_versions_on_the_wire(pusher_node):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    for key, query, code in (
        ("no-such-key", "protocol=7", 4001),
        (APP.key, "protocol=3", 4007),
        (APP.key, "client=js", 4008),
    ):
        with connect(url(pusher_node, key, query), open_timeout=10) as ws:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["event"] == "pusher:error", frame
            data = frame["data"] if isinstance(frame["data"], dict) else json.loads(frame["data"])
            assert data["code"] == code, (query, frame)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == code, (query, ws.close_code)
    # pysher says protocol=6: accepted, as by Pusher.
    with connect(url(pusher_node, APP.key, "protocol=6&client=Pysher"), open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["event"] == "pusher:connection_established"


# --- channel auth -----------------------------------------------------------------------


def test_bad_auth_strings_get_subscription_errors_and_the_connection_stays(pusher_node):
    from websockets.sync.client import connect

    with connect(url(pusher_node), open_timeout=10) as ws:
        socket_id = json.loads(json.loads(ws.recv(timeout=10))["data"])["socket_id"]
        good = APP.library().authenticate("private-ok", socket_id)["auth"]
        wrong_secret = App(APP.id, APP.key, "guessed").library()
        presence = {"user_id": "mallory", "user_info": {}}
        signed = APP.library().authenticate("presence-room", socket_id, presence)
        cases = {
            "private-a": "garbage",  # not key:signature
            "private-b": f"other-key:{good.split(':')[1]}",  # another app's key
            "private-c": wrong_secret.authenticate("private-c", socket_id)["auth"],
            "private-d": good,  # signed for another channel
            "private-e": None,  # no auth at all
        }
        for channel, auth in cases.items():
            send(ws, "pusher:subscribe", {"channel": channel, "auth": auth})
        # channel_data other than the signed one (another user in the same room).
        forged = json.dumps({"user_id": "admin", "user_info": {}})
        room = {"channel": "presence-room", "auth": signed["auth"], "channel_data": forged}
        send(ws, "pusher:subscribe", room)
        send(ws, "pusher:subscribe", {"channel": "private-ok", "auth": good})
        refused: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while "private-ok" not in refused and time.monotonic() < deadline:
            frame = json.loads(ws.recv(timeout=10))
            if frame["event"] in ("pusher:subscription_error", "pusher:error"):
                refused.setdefault(frame.get("channel"), frame)
            elif frame["event"] == "pusher_internal:subscription_succeeded":
                refused.setdefault(frame["channel"], "subscribed")
        assert refused.pop("private-ok") == "subscribed"
        assert set(refused) == {*cases, "presence-room"}, refused
        # Channel by channel, as pusher-js needs to tell the app (a connection-wide
        # pusher:error leaves the channel pending for ever).
        for channel, frame in refused.items():
            assert frame["event"] == "pusher:subscription_error", frame
            data = json.loads(frame["data"]) if isinstance(frame["data"], str) else frame["data"]
            assert data["status"] in (401, 403), (channel, frame)


def test_forged_auth_from_the_endpoint_through_pusher_js_and_pysher(
    pusher_node, pusher_backend, peers
):
    pytest.importorskip("pysher")
    pusher_backend.forge.add("private-forged")
    peer = start_client(peers, pusher_node, pusher_backend)
    subscribe(peer, "news")
    peer.send("subscribe", channel="private-forged")
    error = peer.wait("subscription_error", channel="private-forged")
    assert error["data"].get("status") in (401, 403), error

    # pysher, given a bad auth string directly.
    client = pysher_client(pusher_node.port("pusher"))
    seen = client.seen
    got: list[Any] = []
    try:
        client.connect()
        wait_for(lambda: client.connection.state == "connected", what="pysher connected")
        client.subscribe("private-x", auth=f"{APP.key}:{'0' * 64}")
        news = client.subscribe("news")
        news.bind("after", got.append)
        error = wait_for(
            lambda: [
                d for e, c, d in seen if e == "pusher:subscription_error" and c == "private-x"
            ],
            what="pysher's subscription error",
        )[0]
        assert json.loads(error)["status"] in (401, 403), error
        APP.library(pusher_node.api).trigger("news", "after", {"n": 1})
        wait_for(lambda: got, what="pysher to receive on news after the error")
        assert client.connection.state == "connected"
    finally:
        client.disconnect(timeout=5)
    APP.library(pusher_node.api).trigger("news", "after", {"n": 2})
    assert peer.wait("event", event="after", where=lambda e: e["data"] == {"n": 2})
    assert still_connected(peer)


# --- the REST API: wrong signature, stale timestamp, oversized event ---------------------


def test_rest_wrong_signature_and_stale_timestamp_get_401(
    pusher_node, pusher_backend, peers, monkeypatch
):
    import pusher
    import pusher.http

    peer = start_client(peers, pusher_node, pusher_backend)
    subscribe(peer, "news")
    forger = App(APP.id, APP.key, "guessed").library(pusher_node.api)
    with pytest.raises(pusher.errors.PusherBadAuth) as wrong:
        forger.trigger("news", "forged", {})
    assert "signature" in str(wrong.value).lower(), wrong.value
    stranger = App(APP.id, "no-such-key", APP.secret).library(pusher_node.api)
    with pytest.raises((pusher.errors.PusherBadAuth, pusher.errors.PusherBadRequest)):
        stranger.trigger("news", "forged", {})
    # A request signed 700 s ago (Pusher allows 600 s).
    real_time = time.time
    with monkeypatch.context() as m:
        # Only the library's clock: its module's ``time`` name.
        m.setattr(pusher.http, "time", SimpleNamespace(time=lambda: real_time() - 700))
        with pytest.raises(pusher.errors.PusherBadAuth) as stale:
            APP.library(pusher_node.api).trigger("news", "stale", {})
    assert "timestamp" in str(stale.value).lower(), stale.value
    APP.library(pusher_node.api).trigger("news", "fine", {})
    peer.wait("event", event="fine")
    assert not peer.find("event", event="forged") and not peer.find("event", event="stale")


def test_oversized_events_are_refused_over_rest_and_from_clients(
    pusher_node, pusher_backend, peers
):
    import pusher

    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer in (alice, bob):
        subscribe(peer, "private-chat")
    library = APP.library(pusher_node.api)
    # 11 KB passes the library's own check (30 KB for trigger) and reaches the server.
    with pytest.raises((pusher.errors.PusherBadRequest, pusher.errors.PusherBadStatus)) as big:
        library.trigger("private-chat", "huge", TOO_BIG)
    assert "413" in str(big.value) or isinstance(big.value, pusher.errors.PusherBadRequest)
    alice.send("trigger", channel="private-chat", event="client-huge", data=TOO_BIG)
    alice.wait("message", event="pusher:error")
    alice.send("trigger", channel="private-chat", event="client-small", data={"n": 1})
    assert bob.wait("event", event="client-small")["data"] == {"n": 1}
    assert not bob.find("event", event="client-huge") and not bob.find("event", event="huge")
    assert still_connected(alice) and still_connected(bob)


# --- client events where they are not allowed --------------------------------------------


def test_client_event_on_a_public_channel_is_rejected(pusher_node, pusher_backend, peers):
    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer in (alice, bob):
        subscribe(peer, "news")
        subscribe(peer, "private-chat")
    alice.send("trigger", channel="news", event="client-shout", data={"n": 1})
    error = alice.wait("message", event="pusher:error")
    assert "client" in error["data"]["message"].lower(), error
    # Carries on: her next client event on a private channel goes through.
    alice.send("trigger", channel="private-chat", event="client-hello", data={"n": 2})
    bob.wait("event", event="client-hello")
    assert not bob.find("event", event="client-shout")
    assert still_connected(alice) and still_connected(bob)


def test_client_events_of_an_app_that_disables_them_are_rejected(
    pusher_node, pusher_backend, peers
):
    alice = start_client(peers, pusher_node, pusher_backend, "alice", SMALL)  # events off
    bob = start_client(peers, pusher_node, pusher_backend, "bob", SMALL)
    for peer in (alice, bob):
        subscribe(peer, "private-chat")
    alice.send("trigger", channel="private-chat", event="client-hello", data={})
    alice.wait("message", event="pusher:error")
    SMALL.library(pusher_node.api).trigger("private-chat", "server", {})
    bob.wait("event", event="server")
    assert not bob.find("event", event="client-hello")
    assert still_connected(alice)


# --- a member flood ---------------------------------------------------------------------


def test_member_flood_past_max_presence_members(pusher_node, pusher_backend, peers):
    watcher = start_client(peers, pusher_node, pusher_backend, "watcher", SMALL)
    subscribe(watcher, "presence-crowd")

    def check(outcomes: dict[str, str]) -> None:  # while the joined ones are still there
        joined = [user for user, outcome in outcomes.items() if outcome == "joined"]
        assert len(joined) == SMALL_MEMBERS - 1, outcomes  # the watcher is the first member
        refused = {u: o for u, o in outcomes.items() if o != "joined"}
        assert all(o.startswith("error") for o in refused.values()), refused
        watcher.wait("member_added", where=lambda r: r["member"]["id"] == joined[-1])
        added = [r["member"]["id"] for r in watcher.find("member_added")]
        assert sorted(added) == sorted(joined), (added, watcher.find("member_removed"), outcomes)
        info = SMALL.library(pusher_node.api).users_info("presence-crowd")
        assert sorted(u["id"] for u in info["users"]) == sorted(["watcher", *joined])
        SMALL.library(pusher_node.api).trigger("presence-crowd", "still", {})
        watcher.wait("event", event="still")

    asyncio.run(flood(pusher_node, "presence-crowd", 12, check))
    assert still_connected(watcher)


async def flood(
    node: Server, channel: str, count: int, check: Callable[[dict[str, str]], None]
) -> None:
    """``count`` users join ``channel`` at once; ``check`` (in a thread) gets each one's
    outcome, "joined" or "error ...", while all of them are still connected."""
    from websockets.asyncio.client import connect

    async def join(user: str, stack: AsyncExitStack) -> str:
        ws = await stack.enter_async_context(connect(url(node, SMALL.key), open_timeout=10))
        socket_id = json.loads(json.loads(await ws.recv())["data"])["socket_id"]
        data = {"user_id": user, "user_info": {}}
        auth = SMALL.library().authenticate(channel, socket_id, data)
        await ws.send(
            json.dumps({"event": "pusher:subscribe", "data": {"channel": channel, **auth}})
        )
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await ws.recv())
                if frame["event"] == "pusher_internal:subscription_succeeded":
                    outcome = "joined"
                    break
                if frame["event"] in ("pusher:subscription_error", "pusher:error"):
                    outcome = f"error {frame['data']}"
                    break
        # A refused one keeps its connection: a public channel still works.
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "news"}}))
        async with asyncio.timeout(10):
            while json.loads(await ws.recv()).get("channel") != "news":
                pass
        return outcome

    users = [f"u{i}" for i in range(count)]
    async with AsyncExitStack() as stack:
        results = await asyncio.gather(*(join(u, stack) for u in users))
        await asyncio.to_thread(check, dict(zip(users, results, strict=True)))

"""The Pusher protocol with the real client libraries: pusher-js (Node and Chromium),
Laravel Echo, pysher. Events come in through the PyPI ``pusher`` server library; the
private and presence channels are signed by the test backend with its ``authenticate``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from support.nodefix import need_node
from support.pusherfix import (
    APP,
    OTHER,
    PusherBackend,
    client_config,
    pysher_client,
    start_client,
    subscribe,
    user_info,
)
from support.server import Server
from support.wait import wait_for

SOCKET_ID = re.compile(r"\d+\.\d+")


def test_pusher_js_connects_with_a_pusher_socket_id_and_activity_timeout(
    pusher_node, pusher_backend, peers
):
    config = client_config(pusher_node.port("pusher"), pusher_backend)
    peer = peers.start("pusher_client.js", config)
    socket_id = peer.connected()
    assert SOCKET_ID.fullmatch(socket_id), socket_id
    # pusher-js took the server's activity_timeout (seconds; it keeps the least of it
    # and its own 120 s).
    connected = peer.find("state", current="connected")[0]
    assert 1000 <= connected["activity_timeout"] <= 120_000, connected
    # The server library accepts it as a socket id (it validates the form).
    APP.library(pusher_node.api).authenticate("private-x", socket_id)


def test_connection_established_on_the_wire(pusher_node):
    # What pysher and pusher-js both parse: data is a JSON string (pysher json.loads it).
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{pusher_node.port('pusher')}/app/{APP.key}?protocol=7&client=js"
    with connect(url, open_timeout=10) as ws:
        frame = json.loads(ws.recv(timeout=10))
        assert frame["event"] == "pusher:connection_established", frame
        data = json.loads(frame["data"])
        assert SOCKET_ID.fullmatch(data["socket_id"]), data
        assert isinstance(data["activity_timeout"], int) and data["activity_timeout"] > 0
        ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        assert json.loads(ws.recv(timeout=10))["event"] == "pusher:pong"


def test_public_event_from_the_python_library_reaches_pusher_js_of_that_app_only(
    pusher_node, pusher_backend, peers
):
    mine = start_client(peers, pusher_node, pusher_backend)
    theirs = start_client(peers, pusher_node, pusher_backend, app=OTHER)
    subscribe(mine, "news")
    subscribe(theirs, "news")
    APP.library(pusher_node.api).trigger("news", "breaking", {"headline": "mine"})
    OTHER.library(pusher_node.api).trigger("news", "breaking", {"headline": "theirs"})
    APP.library(pusher_node.api).trigger("news", "plain", "just a string")
    assert mine.wait("event", event="breaking")["data"] == {"headline": "mine"}
    assert mine.wait("event", event="plain")["data"] == "just a string"
    assert theirs.wait("event", event="breaking")["data"] == {"headline": "theirs"}
    # Each app's channel "news" is its own: the other app's event never crossed over.
    APP.library(pusher_node.api).trigger("news", "last", {})
    OTHER.library(pusher_node.api).trigger("news", "last", {})
    mine.wait("event", event="last")
    theirs.wait("event", event="last")
    assert [e["data"] for e in mine.find("event", event="breaking")] == [{"headline": "mine"}]
    assert [e["data"] for e in theirs.find("event", event="breaking")] == [{"headline": "theirs"}]


def test_an_event_triggered_with_a_socket_id_skips_that_connection(
    pusher_node, pusher_backend, peers
):
    sender = start_client(peers, pusher_node, pusher_backend)
    other = start_client(peers, pusher_node, pusher_backend)
    subscribe(sender, "news")
    subscribe(other, "news")
    socket_id = sender.find("state", current="connected")[0]["socket_id"]
    library = APP.library(pusher_node.api)
    library.trigger("news", "echo", {"n": 1}, socket_id=socket_id)
    library.trigger("news", "after", {"n": 2})
    other.wait("event", event="echo")
    sender.wait("event", event="after")
    assert not sender.find("event", event="echo")


def test_private_channel_is_signed_by_the_backend_and_a_forged_auth_is_refused(
    pusher_node, pusher_backend, peers
):
    peer = start_client(peers, pusher_node, pusher_backend, "alice")
    socket_id = peer.find("state", current="connected")[0]["socket_id"]
    subscribe(peer, "private-orders")
    assert ("/pusher/auth", {"socket_id": socket_id, "channel_name": "private-orders"}) in (
        pusher_backend.auth_calls
    )
    pusher_backend.forge.add("private-forged")
    peer.send("subscribe", channel="private-forged")
    error = peer.wait("subscription_error", channel="private-forged")
    assert error["data"]["status"] in (401, 403), error
    assert not peer.find("subscribed", channel="private-forged")
    # The connection carries on: still connected, still receiving.
    APP.library(pusher_node.api).trigger(["private-orders", "private-forged"], "paid", {"n": 7})
    assert peer.wait("event", channel="private-orders", event="paid")["data"] == {"n": 7}
    assert not peer.find("event", channel="private-forged")
    assert [s["current"] for s in peer.find("state")][-1] == "connected"


def test_encrypted_channel_is_passed_through_end_to_end(pusher_node, pusher_backend, peers):
    peer = start_client(peers, pusher_node, pusher_backend, "alice")
    subscribe(peer, "private-encrypted-vault")
    APP.library(pusher_node.api).trigger("private-encrypted-vault", "secret", {"code": 42})
    # pusher-js decrypted it with the shared secret from the backend ...
    assert peer.wait("event", event="secret")["data"] == {"code": 42}
    # ... from the library's ciphertext, which the node passed through untouched.
    wire = peer.wait("message", event="secret")["data"]
    assert set(wire) == {"ciphertext", "nonce"} and "42" not in json.dumps(wire), wire


def test_client_events_reach_the_others_not_the_sender_with_user_id_on_presence(
    pusher_node, pusher_backend, peers
):
    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer in (alice, bob):
        subscribe(peer, "private-chat")
        subscribe(peer, "presence-chat")
    alice.send("trigger", channel="private-chat", event="client-typing", data={"on": True})
    alice.send("trigger", channel="presence-chat", event="client-typing", data={"on": False})
    got = bob.wait("message", channel="private-chat", event="client-typing")
    assert got["data"] == {"on": True}
    on_presence = bob.wait("message", channel="presence-chat", event="client-typing")
    assert on_presence["data"] == {"on": False}
    assert on_presence["user_id"] == "alice", on_presence
    # Not echoed: alice receives the event triggered after hers, never her own.
    APP.library(pusher_node.api).trigger(["private-chat", "presence-chat"], "marker", {})
    alice.wait("event", channel="private-chat", event="marker")
    alice.wait("event", channel="presence-chat", event="marker")
    assert not alice.find("message", event="client-typing")


def test_presence_members_through_pusher_js(pusher_node, pusher_backend, peers):
    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    first = subscribe(alice, "presence-room")["members"]
    assert first["count"] == 1
    assert first["me"] == {"id": "alice", "info": user_info("alice")}
    assert first["hash"] == {"alice": user_info("alice")}
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    second = subscribe(bob, "presence-room")["members"]
    assert second["count"] == 2
    assert second["hash"] == {"alice": user_info("alice"), "bob": user_info("bob")}
    added = alice.wait("member_added", channel="presence-room")
    assert added["member"] == {"id": "bob", "info": user_info("bob")}
    # A user's second connection is not a new member.
    bob_again = start_client(peers, pusher_node, pusher_backend, "bob")
    assert subscribe(bob_again, "presence-room")["members"]["count"] == 2
    bob.send("disconnect")
    bob_again.send("unsubscribe", channel="presence-room")
    removed = alice.wait("member_removed", channel="presence-room")
    assert removed["member"] == {"id": "bob", "info": user_info("bob")}
    assert len(alice.find("member_added")) == 1 and len(alice.find("member_removed")) == 1


def test_signin_events_to_a_user_and_terminating_their_connections(
    pusher_node, pusher_backend, peers
):
    alice = start_client(peers, pusher_node, pusher_backend, "alice")
    bob = start_client(peers, pusher_node, pusher_backend, "bob")
    for peer, user in ((alice, "alice"), (bob, "bob")):
        peer.send("signin")
        peer.wait("message", event="pusher:signin_success")
        # pusher-js joins the user's channel itself (pusher.user, not pusher.channels).
        peer.wait(
            "message",
            event="pusher_internal:subscription_succeeded",
            channel=f"#server-to-user-{user}",
        )
    library = APP.library(pusher_node.api)
    library.send_to_user("alice", "note", {"for": "alice"})
    assert alice.wait("user_event", event="note")["data"] == {"for": "alice"}
    library.terminate_user_connections("alice")
    left = alice.wait("state", previous="connected")
    library.send_to_user("bob", "note", {"for": "bob"})
    assert bob.wait("user_event", event="note")["data"] == {"for": "bob"}
    assert len(alice.find("user_event")) == 1
    # Terminated means gone: a 4000-4099 close, which pusher-js does not retry (with
    # 4100-4299 it would reconnect and sign the user in again).
    assert any(4000 <= code < 4100 for code in alice.error_codes()), alice.describe()
    assert left["current"] == "disconnected", alice.describe()


def test_cache_channel_replays_the_last_event_or_says_cache_miss(
    pusher_node, pusher_backend, peers
):
    library = APP.library(pusher_node.api)
    library.trigger("cache-prices", "price", {"eur": 1})
    library.trigger("cache-prices", "price", {"eur": 2})
    peer = start_client(peers, pusher_node, pusher_backend)
    subscribe(peer, "cache-prices")
    assert peer.wait("event", channel="cache-prices", event="price")["data"] == {"eur": 2}
    subscribe(peer, "cache-empty")
    peer.wait("event", channel="cache-empty", event="pusher:cache_miss")
    library.trigger("cache-prices", "price", {"eur": 3})
    peer.wait("event", channel="cache-prices", where=lambda e: e["data"] == {"eur": 3})
    assert [e["data"] for e in peer.find("event", event="price")] == [{"eur": 2}, {"eur": 3}]


# --- Laravel Echo ------------------------------------------------------------------------


def start_echo(peers, node: Server, backend: PusherBackend, user: str):
    config = client_config(node.port("pusher"), backend, user)
    config["authEndpoint"] = backend.url + "/broadcasting/auth"
    peer = peers.start("echo_client.mjs", config)
    peer.connected()
    return peer


def test_laravel_echo_private_and_presence_channels(pusher_node, pusher_backend, peers):
    alice = start_echo(peers, pusher_node, pusher_backend, "alice")
    alice.send("private", channel="orders", listen=["OrderShipped", ".order.placed"])
    alice.send("join", channel="room")
    alice.wait("subscribed", channel="orders")
    here = alice.wait("here", channel="room")
    assert here["members"] == [user_info("alice")]
    bob = start_echo(peers, pusher_node, pusher_backend, "bob")
    bob.send("join", channel="room")
    assert sorted(bob.wait("here", channel="room")["members"], key=str) == [
        user_info("alice"),
        user_info("bob"),
    ]
    assert alice.wait("joining", channel="room")["member"] == user_info("bob")
    assert {path for path, _ in pusher_backend.auth_calls} == {"/broadcasting/auth"}
    assert {form["channel_name"] for _, form in pusher_backend.auth_calls} == {
        "private-orders",
        "presence-room",
    }

    library = APP.library(pusher_node.api)
    library.trigger("private-orders", "App\\Events\\OrderShipped", {"order": 1})
    library.trigger("private-orders", "order.placed", {"order": 2})
    assert alice.wait("listen", event="OrderShipped")["data"] == {"order": 1}
    assert alice.wait("listen", event=".order.placed")["data"] == {"order": 2}

    bob.send("whisper", channel="room", event="typing", data={"who": "bob"})
    assert alice.wait("whisper", channel="room")["data"] == {"who": "bob"}
    bob.send("disconnect")
    assert alice.wait("leaving", channel="room")["member"] == user_info("bob")
    assert not bob.find("whisper")


# --- pysher ------------------------------------------------------------------------------


@pytest.fixture
def pysher(pusher_node, pusher_backend) -> Iterator[Any]:
    pytest.importorskip("pysher")
    client = pysher_client(
        pusher_node.port("pusher"),
        auth_endpoint=pusher_backend.url + "/pusher/auth",
        auth_endpoint_headers={"X-User": "pysher"},
        user_data={"user_id": "pysher", "user_info": user_info("pysher")},
    )
    client.connect()
    try:
        yield client
    finally:
        client.disconnect(timeout=5)


def test_pysher_protocol_6_public_private_and_presence(pusher_node, pysher):
    seen = pysher.seen
    wait_for(lambda: pysher.connection.state == "connected", what="pysher connected")
    socket_id = pysher.connection.socket_id
    assert SOCKET_ID.fullmatch(socket_id), socket_id
    # pysher pings at once (data "") and wants a pong.
    wait_for(lambda: any(e == "pusher:pong" for e, _, _ in seen), what="a pong for pysher")
    got: list[tuple[str, Any]] = []
    names = ("news", "private-orders", "presence-room")
    for name in names:
        channel = pysher.subscribe(name)
        channel.bind("update", lambda data, n=name: got.append((n, data)))

    def subscribed() -> set[str | None]:
        return {c for e, c, _ in seen if e == "pusher_internal:subscription_succeeded"}

    wait_for(lambda: subscribed() == set(names), what="pysher in 3 channels")
    APP.library(pusher_node.api).trigger(list(names), "update", {"v": 1})
    wait_for(lambda: len(got) == 3, what="3 events at pysher")
    assert sorted(name for name, _ in got) == sorted(names)
    # pysher hands the data over as the JSON string it came in.
    assert all(json.loads(data) == {"v": 1} for _, data in got)
    members = APP.library(pusher_node.api).users_info("presence-room")
    assert members == {"users": [{"id": "pysher"}]}


# --- pusher-js in headless Chromium --------------------------------------------------------

# Runs in the backend's page, which loaded pusher-js's web build from node_modules.
BROWSER_CLIENT = """
const [key, port] = arguments;
window.__seen = [];
const note = (record) => window.__seen.push(record);
const pusher = new Pusher(key, {
  wsHost: "127.0.0.1", wsPort: port, forceTLS: false, enabledTransports: ["ws"],
  cluster: "mt1",
  channelAuthorization: {endpoint: "/pusher/auth", transport: "ajax",
                         headers: {"X-User": "chromium"}},
});
pusher.connection.bind("state_change", (s) =>
  note({type: "state", current: s.current, socket_id: pusher.connection.socket_id}));
for (const name of ["news", "private-orders", "presence-room"]) {
  const channel = pusher.subscribe(name);
  channel.bind("pusher:subscription_succeeded", () => note({type: "subscribed", channel: name}));
  channel.bind("pusher:subscription_error", (e) => note({type: "error", channel: name, e}));
  channel.bind("update", (data) => note({type: "event", channel: name, data}));
}
window.__pusher = pusher;
"""


def test_pusher_js_in_chromium(pusher_node, pusher_backend, browser):
    need_node(node=None)  # the page loads pusher-js's web build from tests/node/node_modules
    browser.get(pusher_backend.url + "/page")
    browser.execute_script(BROWSER_CLIENT, APP.key, pusher_node.port("pusher"))

    def seen(kind: str) -> list[dict[str, Any]]:
        return [r for r in browser.execute_script("return window.__seen") if r["type"] == kind]

    wait_for(lambda: len(seen("subscribed")) == 3, 15, "Chromium subscribed to 3 channels")
    socket_id = next(s for s in seen("state") if s["current"] == "connected")["socket_id"]
    assert SOCKET_ID.fullmatch(socket_id), socket_id
    APP.library(pusher_node.api).trigger(
        ["news", "private-orders", "presence-room"], "update", {"to": "chromium"}
    )
    wait_for(lambda: len(seen("event")) == 3, 15, "3 events in Chromium")
    assert all(e["data"] == {"to": "chromium"} for e in seen("event"))
    assert not seen("error")
    browser.execute_script("window.__pusher.disconnect()")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

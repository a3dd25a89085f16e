"""Pusher's REST API and webhooks on a real node (a ``pusher`` service of two workers),
driven by the PyPI ``pusher`` server library; the webhooks received by the test's
backend are checked with its ``validate_webhook``.

The WebSocket side here is a few lines of Pusher protocol over ``websockets`` (the
subscribers whose counts the API reports); the real client libraries are in
test_pusher_clients.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pusher.errors import PusherBadAuth, PusherBadRequest, PusherBadStatus
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from support.pusherfix import APP, OTHER, App, PusherBackend, user_info
from support.server import Server
from support.wait import wait_for


class Socket:
    """One Pusher connection: subscribe (signed by the library), events in and out."""

    def __init__(self, node: Server, app: App = APP) -> None:
        self.node, self.app = node, app
        url = f"ws://127.0.0.1:{node.port('pusher')}/app/{app.key}?protocol=7&client=py"
        self.stack = contextlib.ExitStack()  # websockets wants connect() as a context
        self.ws: ClientConnection = self.stack.enter_context(connect(url, open_timeout=10))
        established = self.expect("pusher:connection_established")
        self.socket_id = json.loads(established["data"])["socket_id"]

    def send(self, event: str, data: Any, channel: str | None = None) -> None:
        message: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            message["channel"] = channel
        self.ws.send(json.dumps(message))

    def expect(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next message named ``event`` (others before it are passed over)."""
        while True:
            message = json.loads(self.ws.recv(timeout))
            if message["event"] == event:
                return dict(message)

    def subscribe(self, channel: str, user: str | None = None) -> None:
        data: dict[str, Any] = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            member = {"user_id": user, "user_info": user_info(user or "")} if user else None
            data.update(self.app.library().authenticate(channel, self.socket_id, member))
        self.send("pusher:subscribe", data)
        self.expect("pusher_internal:subscription_succeeded")

    def signin(self, user: str) -> None:
        signed = self.app.library().authenticate_user(self.socket_id, {"id": user})
        self.send("pusher:signin", signed)
        self.expect("pusher:signin_success")

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def sockets(pusher_node: Server) -> Iterator[list[Socket]]:
    opened: list[Socket] = []
    yield opened
    for socket in opened:
        socket.close()


def open_socket(node: Server, sockets: list[Socket], app: App = APP) -> Socket:
    socket = Socket(node, app)
    sockets.append(socket)
    return socket


def test_counts_and_members_of_subscribers_on_both_workers(
    pusher_node: Server, sockets: list[Socket]
) -> None:
    lib = APP.library(pusher_node.api)
    alice_1, alice_2, bob, reader = (open_socket(pusher_node, sockets) for _ in range(4))
    for socket, user in ((alice_1, "alice"), (alice_2, "alice"), (bob, "bob")):
        socket.subscribe("presence-room", user)
    reader.subscribe("news")
    other = open_socket(pusher_node, sockets, OTHER)
    other.subscribe("news")  # the same name in another app: not counted here

    assert lib.channels_info() == {"channels": {"news": {}, "presence-room": {}}}
    answer = lib.channels_info("presence-", ["user_count"])
    assert answer == {"channels": {"presence-room": {"user_count": 2}}}
    answer = lib.channel_info("presence-room", ["user_count", "subscription_count"])
    assert answer == {"occupied": True, "user_count": 2, "subscription_count": 3}
    assert lib.channel_info("news", ["subscription_count"]) == {
        "occupied": True,
        "subscription_count": 1,
    }
    assert lib.channel_info("empty") == {"occupied": False}
    assert lib.users_info("presence-room") == {"users": [{"id": "alice"}, {"id": "bob"}]}
    with pytest.raises(PusherBadRequest, match="presence"):
        lib.users_info("news")


def test_trigger_batch_and_a_socket_id_left_out(pusher_node: Server, sockets: list[Socket]) -> None:
    lib = APP.library(pusher_node.api)
    sender, reader = open_socket(pusher_node, sockets), open_socket(pusher_node, sockets)
    for socket in (sender, reader):
        socket.subscribe("news")
        socket.subscribe("sport")
    lib.trigger("news", "echo", {"n": 1}, socket_id=sender.socket_id)
    lib.trigger_batch(
        [
            {"channel": "news", "name": "headline", "data": {"n": 2}},
            {"channel": "sport", "name": "score", "data": "3-1"},
        ]
    )
    assert reader.expect("echo")["data"] == '{"n": 1}'
    headline = sender.expect("headline")  # the echo before it was never sent to the sender
    assert (headline["channel"], headline["data"]) == ("news", '{"n": 2}')
    for socket in (sender, reader):
        assert socket.expect("score")["data"] == "3-1"


def test_send_to_user_and_terminate_user_connections(
    pusher_node: Server, sockets: list[Socket]
) -> None:
    lib = APP.library(pusher_node.api)
    alice = open_socket(pusher_node, sockets)
    alice.signin("alice")
    alice.subscribe("#server-to-user-alice")
    lib.send_to_user("alice", "note", {"hi": True})
    assert alice.expect("note")["channel"] == "#server-to-user-alice"
    assert lib.terminate_user_connections("alice") == {}
    with pytest.raises(ConnectionClosed) as closed:
        alice.expect("never", timeout=10)
    assert closed.value.rcvd is not None and 4000 <= closed.value.rcvd.code < 4100


def test_bad_requests_get_pusher_s_status_and_the_reason(pusher_node: Server) -> None:
    wrong = App(APP.id, APP.key, "not-the-secret").library(pusher_node.api)
    with pytest.raises(PusherBadAuth, match="auth_signature does not match"):
        wrong.trigger("news", "x", {})
    with pytest.raises(PusherBadStatus, match="404"):
        App("9999", APP.key, APP.secret).library(pusher_node.api).channels_info()
    with pytest.raises(PusherBadStatus, match="413"):
        APP.library(pusher_node.api).trigger("news", "big", "x" * 10241)  # 10 KB is the limit


# --- webhooks ---------------------------------------------------------------------------------


def received(backend: PusherBackend) -> list[dict[str, Any]]:
    """Every event of every webhook so far, each body checked with validate_webhook."""
    events = []
    for headers, body in list(backend.webhooks):
        checked = APP.library().validate_webhook(
            headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body
        )
        assert checked is not None, f"validate_webhook refused {body!r}"
        events.extend(checked["events"])
    return events


def wait_event(backend: PusherBackend, **fields: Any) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        hits = [e for e in received(backend) if all(e.get(k) == v for k, v in fields.items())]
        return hits[0] if hits else None

    return wait_for(find, 15, f"a webhook {fields}")  # type: ignore[no-any-return]


def test_webhooks_of_channels_members_client_events_and_cache_misses(
    pusher_node: Server, pusher_backend: PusherBackend, sockets: list[Socket]
) -> None:
    alice, bob = open_socket(pusher_node, sockets), open_socket(pusher_node, sockets)
    alice.subscribe("presence-room", "alice")
    bob.subscribe("presence-room", "bob")
    wait_event(pusher_backend, name="channel_occupied", channel="presence-room")
    wait_event(pusher_backend, name="member_added", channel="presence-room", user_id="alice")
    wait_event(pusher_backend, name="member_added", channel="presence-room", user_id="bob")
    alice.send("client-typing", {"on": True}, "presence-room")
    event = wait_event(pusher_backend, name="client_event", channel="presence-room")
    assert event["event"] == "client-typing"
    assert event["socket_id"] == alice.socket_id and event["user_id"] == "alice"
    assert json.loads(event["data"]) == {"on": True}  # a string, as Pusher sends it
    bob.send("pusher:subscribe", {"channel": "cache-prices"})
    bob.expect("pusher:cache_miss")
    wait_event(pusher_backend, name="cache_miss", channel="cache-prices")
    alice.close()
    wait_event(pusher_backend, name="member_removed", channel="presence-room", user_id="alice")
    bob.close()
    wait_event(pusher_backend, name="channel_vacated", channel="presence-room")
    # Only the app with a webhook_url sends any, and only its own channels' events.
    assert {h["X-Pusher-Key"] for h, _ in pusher_backend.webhooks} == {APP.key}
    hooks = pusher_node.stats()["pusher_webhooks"]["apps"]
    assert [a["app"] for a in hooks] == [APP.id] and hooks[0]["delivered"] >= 7


def test_webhooks_wait_for_a_backend_that_is_down_and_arrive_when_it_is_back(
    pusher_node: Server, pusher_backend: PusherBackend, sockets: list[Socket]
) -> None:
    pusher_backend.down()
    try:
        open_socket(pusher_node, sockets).subscribe("while-down")

        def retried() -> bool:
            apps = pusher_node.stats()["pusher_webhooks"]["apps"]
            return bool(apps[0]["retried"] >= 1)

        wait_for(retried, 15, "a failed attempt")
    finally:
        pusher_backend.up()  # the same port
    wait_event(pusher_backend, name="channel_occupied", channel="while-down")

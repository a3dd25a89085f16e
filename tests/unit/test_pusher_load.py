"""The load generator's Pusher side: protocol 7 frames in and out, and signed REST calls.

The server's frames here are made by the server's own encoders (``manydoors.pusher.frames``)
and the REST signatures are checked by its verifier (``signing.check_request``) and
against the PyPI ``pusher`` library's, so both sides agree on one wire.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from manydoors.loadgen import cli as load_cli
from manydoors.loadgen import pusherclient
from manydoors.loadgen.agent import Agent, AgentOptions, LoadConn, WsLoadConn
from manydoors.loadgen.controller import describe_publish_error
from manydoors.loadgen.errors import explain
from manydoors.loadgen.planner import AgentPlan, Lane
from manydoors.loadgen.pusherclient import PusherApp
from manydoors.protocol.websocket import encode_text
from manydoors.pusher import frames, signing

APP = PusherApp("app-key", "1001", "app-secret")
UPGRADED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"


def established(socket_id: str = "123.456") -> bytes:
    return frames.text(
        "pusher:connection_established", {"socket_id": socket_id, "activity_timeout": 120}
    )


def event(n: int, t: float, channel: str = "bench") -> bytes:
    """An event triggered through the REST API, as the server frames it for a client."""
    data = json.dumps({"t": t, "n": n})
    return encode_text(frames.published("load", channel, frames.api_data(data)))


class Sent:
    """The far end of a load connection's socket: the frames the agent sent on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    def frames(self) -> list[Any]:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        # The agent masks with an all-zero key: the payload reads as it is.
        out = []
        while data:
            n = data[1] & 0x7F
            head = 2 + (2 if n == 126 else 0) + 4
            if n == 126:
                n = int.from_bytes(data[2:4], "big")
            out.append(json.loads(data[head : head + n]))
            data = data[head + n :]
        return out


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Sent]]:
    ours, theirs = socket.socketpair()
    yield ours, Sent(theirs)
    ours.close()
    theirs.close()


def make_agent(subscribe: str | None = "bench", app: PusherApp = APP) -> Agent:
    opts = AgentOptions(
        rate=1000,
        hello=False,
        subscribe=subscribe,
        connect_timeout=10,
        fd_limit=1024,
        ws=True,
        pusher=app,
    )
    plan = AgentPlan(0, (Lane("127.0.0.1", "127.0.0.1", 1, 1),), 0)
    return Agent(plan, opts, pipe=None)  # type: ignore[arg-type]  # no pipe needed here


def connected(agent: Agent, sock: socket.socket) -> WsLoadConn:
    """A connection as the ramp leaves it: upgraded, waiting for the server's answer."""
    conn = WsLoadConn(sock, time.perf_counter())
    agent.conns.add(conn)
    agent.open_now += 1
    agent.waiting[conn] = 7
    agent.received_data(conn, UPGRADED)
    assert conn.upgraded
    return conn


def test_greeting_is_an_upgrade_to_the_apps_path_with_protocol_7():
    greeting = make_agent().greeting(0)
    assert greeting.startswith(b"GET /app/app-key?protocol=7&client=manydoors-load&version=1 ")
    assert b"Upgrade: websocket\r\n" in greeting
    assert greeting.endswith(b"\r\n\r\n")  # nothing behind it: the server speaks first


def test_established_then_subscribe_then_ready(pair):
    agent = make_agent()
    sock, sent = pair
    conn = connected(agent, sock)
    assert sent.frames() == []
    agent.received_data(conn, established())
    assert sent.frames() == [{"event": "pusher:subscribe", "data": {"channel": "bench"}}]
    assert not conn.ready and conn in agent.waiting
    agent.received_data(conn, frames.subscribed("bench"))
    assert conn.ready and agent.ready == 1 and conn not in agent.waiting
    agent.received_data(conn, frames.subscribed("bench"))  # counted once
    assert agent.ready == 1 and agent.errors == {}


def test_without_a_channel_ready_on_connection_established(pair):
    agent = make_agent(subscribe=None)
    sock, sent = pair
    conn = connected(agent, sock)
    agent.received_data(conn, established())
    assert conn.ready and agent.ready == 1 and sent.frames() == []


def test_a_private_channel_is_subscribed_with_the_auth_for_its_socket_id(pair):
    agent = make_agent(subscribe="private-bench")
    sock, sent = pair
    conn = connected(agent, sock)
    agent.received_data(conn, established("42.7"))
    (sub,) = sent.frames()
    auth = sub["data"]["auth"]
    expected = signing.channel_auth("app-key", "app-secret", "42.7", "private-bench", None)
    assert signing.check_auth(auth, expected)
    assert sub["data"]["channel"] == "private-bench"


def test_pings_get_pongs_frames_split_anywhere(pair):
    agent = make_agent()
    sock, sent = pair
    conn = connected(agent, sock)
    stream = frames.PING + frames.PING
    for i in range(len(stream)):  # byte by byte
        agent.received_data(conn, stream[i : i + 1])
    pong = {"event": "pusher:pong", "data": {}}
    assert sent.frames() == [pong, pong]
    assert agent.errors == {}


def test_events_are_counted_and_timed_once_per_connection(pair):
    agent = make_agent()
    sock, _ = pair
    conn = connected(agent, sock)
    agent.received_data(conn, established() + frames.subscribed("bench"))
    sent_at = time.time() - 0.25
    agent.received_data(conn, event(1, sent_at) + event(2, time.time()))
    agent.received_data(conn, event(1, sent_at))  # again: a duplicate
    assert agent.received == {1: 1, 2: 1} and agent.duplicates == 1
    (bucket,) = agent.latency[1]
    assert 250 <= bucket < 1000  # ms
    # An event without a stamp counts as message 0; the protocol's own events do not count.
    other = encode_text(frames.published("other", "bench", frames.api_data("hello")))
    agent.received_data(conn, other + frames.text("pusher:cache_miss", {}, "bench"))
    assert agent.received == {0: 1, 1: 1, 2: 1} and agent.errors == {}


def test_errors_are_counted_by_pusher_code_and_free_the_ramp_slot(pair):
    agent = make_agent()
    sock, _ = pair
    conn = connected(agent, sock)
    agent.received_data(conn, frames.error("Application does not exist", frames.APP_UNKNOWN))
    assert agent.errors == {"pusher 4001: Application does not exist": 1}
    assert conn not in agent.waiting
    assert "4001" in explain("pusher 4001: Application does not exist")


def test_a_refused_subscription_counts_once_though_both_names_come(pair):
    agent = make_agent()
    sock, _ = pair
    conn = connected(agent, sock)
    agent.received_data(conn, established())
    agent.received_data(conn, frames.subscription_error("bench", "Invalid signature", 401))
    assert agent.errors == {"subscription_error 401: Invalid signature": 1}
    assert conn not in agent.waiting and not conn.ready
    assert "auth" in explain("subscription_error 401: Invalid signature")


def test_a_frame_that_is_not_a_pusher_event_is_a_bad_line(pair):
    agent = make_agent()
    sock, _ = pair
    conn = connected(agent, sock)
    agent.received_data(conn, encode_text(b"not json") + encode_text(b'{"no":"event"}'))
    agent.received_data(conn, encode_text(b'{"event":"x","data":"\\u12"}'))
    assert agent.errors == {"bad_line": 3}


def test_an_upgrade_refused_is_counted_by_its_status(pair):
    agent = make_agent()
    sock, _ = pair
    conn = LoadConn.__new__(WsLoadConn)
    WsLoadConn.__init__(conn, sock, time.perf_counter())
    closed: list[str | None] = []
    agent.close = lambda c, error: closed.append(error)  # type: ignore[method-assign]
    agent.received_data(conn, b'HTTP/1.1 404 Not Found\r\n\r\n{"event":"pusher:error"}')
    assert agent.errors == {"upgrade refused: HTTP/1.1 404 Not Found": 1}
    assert closed == [None]
    assert "pusher" in explain("upgrade refused: HTTP/1.1 404 Not Found")


def test_the_pong_and_subscribe_are_masked_text_frames():
    # A client's frames are masked (zero key): payload length byte has the mask bit.
    assert pusherclient.PONG[1] & 0x80
    assert pusherclient.PONG[6:] == b'{"event":"pusher:pong","data":{}}'
    sub = pusherclient.subscribe("bench")
    assert json.loads(sub[6:]) == {"event": "pusher:subscribe", "data": {"channel": "bench"}}
    assert sub[:2] == bytes((0x81, 0x80 | (len(sub) - 6)))


# --- the REST API -----------------------------------------------------------------------------


def test_signed_requests_pass_the_servers_check():
    body = pusherclient.event_body("bench", '{"t": 1.5, "n": 1}')
    path = pusherclient.events_path(APP)
    now = time.time()
    query = pusherclient.signed_query("POST", path, body, APP, now)
    params = dict(p.split("=", 1) for p in query.split("&"))
    signing.check_request("POST", path, params, body, "app-key", "app-secret", now)
    with pytest.raises(signing.SignatureError, match="body_md5"):
        signing.check_request("POST", path, params, body + b" ", "app-key", "app-secret", now)
    with pytest.raises(signing.SignatureError, match="auth_signature"):
        signing.check_request("POST", path, params, body, "app-key", "other", now)
    assert json.loads(body) == {"name": "load", "channels": ["bench"], "data": '{"t": 1.5, "n": 1}'}


def test_signed_requests_match_the_pusher_server_library(monkeypatch):
    pusher = pytest.importorskip("pusher")
    from pusher.http import POST, Request

    client = pusher.Pusher(app_id="1001", key="app-key", secret="app-secret")
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.4)
    req = Request(client._pusher_client, POST, "/apps/1001/events", {"name": "load"})
    ours = pusherclient.signed_query("POST", req.path, req.body, APP, 1_800_000_000.4)
    assert dict(p.split("=", 1) for p in ours.split("&")) == req.query_params


class FakeResponse(io.BytesIO):
    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_publish_posts_the_stamp_as_a_string_to_the_apps_events(monkeypatch):
    seen: list[urllib.request.Request] = []

    def urlopen(req: urllib.request.Request, timeout: float) -> FakeResponse:
        seen.append(req)
        return FakeResponse(b"{}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert pusherclient.publish("http://h:7080/", APP, "bench", '{"n": 1}', 5) == b"{}"
    (req,) = seen
    url, query = req.full_url.split("?")
    assert url == "http://h:7080/apps/1001/events" and req.get_method() == "POST"
    params = dict(p.split("=", 1) for p in query.split("&"))
    assert isinstance(req.data, bytes)
    signing.check_request(
        "POST", "/apps/1001/events", params, req.data, "app-key", "app-secret", time.time()
    )
    assert json.loads(req.data)["data"] == '{"n": 1}'


def test_a_refused_publish_says_what_pushers_api_answered():
    exc = urllib.error.HTTPError(
        "http://h/apps/1/events",
        401,
        "Unauthorized",
        {},  # type: ignore[arg-type]
        io.BytesIO(b"auth_timestamp is more than 600 s from the server's time\n"),
    )
    assert describe_publish_error(exc) == (
        "HTTP 401 Unauthorized: auth_timestamp is more than 600 s from the server's time"
    )


def test_event_data_decodes_from_a_string_or_an_object():
    assert pusherclient.inner(msgspec.Raw(b'"{\\"a\\":1}"')) == '{"a":1}'
    assert pusherclient.inner(msgspec.Raw(b"{}")) == b"{}"
    assert pusherclient.socket_id(msgspec.Raw(b'"{\\"socket_id\\":\\"1.2\\"}"')) == "1.2"
    assert pusherclient.error_name(msgspec.Raw(b'{"code":null,"message":"x"}')) == "pusher error: x"
    assert pusherclient.error_name(msgspec.Raw(b"[1]")) == "pusher_error"


# --- the flags --------------------------------------------------------------------------------


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    load_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["load", *argv])


@pytest.mark.parametrize(
    ("argv", "wrong"),
    [
        (["--pusher"], "--pusher needs --app-key"),
        (["--app-key", "k"], "--app-key goes with --pusher"),
        (["--pusher", "--app-key", "k", "--raw"], "do not go together"),
        (["--pusher", "--app-key", "k", "--broadcasts", "1"], "needs --app-id, --app-secret"),
        (["--pusher", "--app-key", "k", "--subscribe", "private-x"], "needs --app-secret"),
        (["--pusher", "--app-key", "k", "--subscribe", "presence-x"], "not supported"),
    ],
)
def test_pusher_flags_that_do_not_go_together(argv, wrong):
    found = load_cli.pusher_app(flags(*argv))
    assert isinstance(found, str) and wrong in found


def test_pusher_secret_from_the_servers_environment_variable(monkeypatch):
    monkeypatch.setenv("MANYDOORS_APP_1001_SECRET", "from-env")
    argv = ["--pusher", "--app-key", "k", "--app-id", "1001", "--subscribe", "bench"]
    found = load_cli.pusher_app(flags(*argv, "--broadcasts", "2"))
    assert found == PusherApp("k", "1001", "from-env")
    assert load_cli.pusher_app(flags("--subscribe", "x")) is None

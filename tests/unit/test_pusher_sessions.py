"""The Pusher wire in a real Worker over fake transports and a fake broker link.

Each test upgrades connections as a client would (a masked WebSocket client), sends
Pusher events and reads the frames the worker writes back, and the frames it sends
the broker. The broker's answers (SYNCED, PRESENCE_DONE, RECOVERED, deliveries) are
fed to the worker by hand, as the router would send them.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import hmac
import json
import re
import struct
from typing import Any, cast

import msgspec
import pytest

from manydoors.config import AppConfig, NamespaceConfig, ServiceConfig
from manydoors.namespaces import Namespaces
from manydoors.protocol.ipc import JOIN_HEAD, RECOVERED_HEAD, TOKEN, Kind
from manydoors.protocol.messages import join_line, msg_line
from manydoors.pusher import frames, names
from manydoors.pusher.sessions import PusherSessions
from manydoors.server.connection import Connection
from manydoors.server.limits import CountTable
from manydoors.server.stats import StatsTable
from manydoors.server.worker import Worker, WorkerSpec
from support.fakes import FakeLink, FakeTransport, in_loop

APP = AppConfig(id="1001", key="app-key", secret="app-secret", enable_client_events=True)
QUIET = AppConfig(id="1002", key="quiet-key", secret="quiet-secret", max_presence_members=2)
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def make_pusher(**service: Any) -> tuple[Worker, FakeLink]:
    svc = ServiceConfig(protocol="pusher", **service)
    spec = WorkerSpec(
        svc, 0, 1, 1000, 10, 1.0, namespaces=Namespaces(NamespaceConfig()), apps=(APP, QUIET)
    )
    buffer = (ctypes.c_ubyte * (StatsTable.size(1) * 8))()
    worker = Worker(spec, StatsTable(memoryview(buffer), 1))
    link = FakeLink()
    worker.sessions.link = worker.sessions.members.link = link
    return worker, link


def client_frame(payload: bytes) -> bytes:
    """A masked text frame (the all-zero mask leaves the payload as it is)."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x81, 0xFE, n)
    return head + b"\0\0\0\0" + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        op, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        out.append((op, data[pos : pos + n]))
        pos += n
    return out


class Peer:
    """One upgraded client connection."""

    def __init__(self, worker: Worker, key: str = "app-key", query: str = "?protocol=7"):
        self.conn = cast(Connection, worker.admission.accept())
        self.transport = FakeTransport()
        self.conn.connection_made(cast(asyncio.Transport, self.transport))
        self.conn.data_received(UPGRADE.format(path=f"/app/{key}{query}").encode())
        head, _, rest = self.transport.data().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        self.transport.out[:] = [rest]
        self.sid = ""
        got = self.take()
        if got and got[0]["event"] == "pusher:connection_established":
            self.sid = json.loads(got[0]["data"])["socket_id"]
        self.first = got

    def send(self, event: str, data: Any, channel: str | None = None) -> None:
        body: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            body["channel"] = channel
        self.conn.data_received(client_frame(json.dumps(body).encode()))

    def take(self) -> list[dict[str, Any]]:
        """The Pusher events written since the last take (a close frame as 'close')."""
        got: list[dict[str, Any]] = []
        for op, payload in server_frames(self.transport.data()):
            if op == 8:
                got.append({"event": "close", "code": int.from_bytes(payload[:2], "big")})
            else:
                got.append(json.loads(payload))
        self.transport.out.clear()
        return got

    def auth(self, channel: str, data: str | None = None, secret: str = "app-secret") -> str:
        text = f"{self.sid}:{channel}" if data is None else f"{self.sid}:{channel}:{data}"
        return "app-key:" + hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sync(worker: Worker, link: FakeLink) -> None:
    """The broker applied what the worker sent: run the flush hooks, answer SYNC."""
    link.flush()
    while worker.sessions.waiting:
        worker.sessions.synced()


def answer_presence(worker: Worker, link: FakeLink, members: dict[str, int]) -> None:
    """Answer every PRESENCE question as the router would (an answered one is gone)."""
    body = msgspec.json.encode({"users": members, "anonymous": 0})
    for kind, channel, payload in link.frames:
        if kind == Kind.PRESENCE:
            worker.on_frame(cast(Any, link), Kind.PRESENCE_DONE, channel, payload + body)


def answer_joins(worker: Worker, link: FakeLink, room: bool = True) -> None:
    """Answer every JOIN_ASK as the router would (``room``: let the member in)."""
    for kind, channel, payload in list(link.frames):
        if kind == Kind.JOIN_ASK:
            head = payload[: TOKEN.size] + (b"\x01" if room else b"\x00")
            worker.on_frame(cast(Any, link), Kind.JOINED, channel, head)


def member(user_id: str, info: Any) -> tuple[str, str]:
    """(channel_data, member key) of a presence member."""
    data = json.dumps({"user_id": user_id, "user_info": info})
    return data, frames.member_key(user_id, msgspec.Raw(json.dumps(info).encode()))


@in_loop
async def test_connection_established_carries_a_pusher_socket_id() -> None:
    worker, _ = make_pusher(ping_interval=30)
    peer = Peer(worker)
    assert peer.first[0]["event"] == "pusher:connection_established"
    data = json.loads(peer.first[0]["data"])
    assert re.fullmatch(r"\d+\.\d+", data["socket_id"])
    assert data["activity_timeout"] == 30
    peer.send("pusher:ping", {})
    assert peer.take() == [{"event": "pusher:pong", "data": {}}]


@pytest.mark.parametrize(
    ("key", "query", "code"),
    [
        ("nope", "?protocol=7", frames.APP_UNKNOWN),
        ("app-key", "", frames.NO_VERSION),
        ("app-key", "?protocol=8", frames.UNSUPPORTED_VERSION),
        ("app-key", "?protocol=x", frames.BAD_VERSION),
        ("app-key/more", "?protocol=7", frames.PATH_NOT_FOUND),
    ],
)
def test_a_bad_upgrade_gets_pushers_error_and_close_code(key: str, query: str, code: int) -> None:
    async def run() -> None:
        worker, _ = make_pusher()
        peer = Peer(worker, key, query)
        assert [e["event"] for e in peer.first] == ["pusher:error", "close"]
        assert peer.first[0]["data"]["code"] == code
        assert peer.first[1]["code"] == code
        assert peer.transport.closed
        assert not worker.hub.conns

    asyncio.run(run())


@in_loop
async def test_protocol_6_is_accepted_as_pusher_does() -> None:
    worker, _ = make_pusher()
    assert Peer(worker, query="?protocol=6&client=python").sid


@in_loop
async def test_subscription_succeeded_waits_for_the_broker() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    peer.send("pusher:subscribe", {"channel": "news"})
    assert (Kind.SUB, names.channel("1001", "news"), b"") in link.frames
    assert peer.take() == []  # not before the broker has applied the SUB
    sync(worker, link)
    assert peer.take() == [
        {"event": "pusher_internal:subscription_succeeded", "channel": "news", "data": "{}"}
    ]


@in_loop
async def test_a_private_channel_needs_the_apps_signature() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    peer.send(
        "pusher:subscribe", {"channel": "private-a", "auth": peer.auth("private-a", secret="x")}
    )
    got = peer.take()
    assert [e["event"] for e in got] == [
        "pusher:subscription_error",
        "pusher_internal:subscription_error",
    ]
    assert json.loads(got[0]["data"])["status"] == 401
    assert not worker.hub.channels
    peer.send("pusher:subscribe", {"channel": "private-a", "auth": peer.auth("private-a")})
    sync(worker, link)
    assert peer.take()[0]["event"] == "pusher_internal:subscription_succeeded"


@in_loop
async def test_invalid_channel_names_are_refused() -> None:
    worker, _ = make_pusher()
    peer = Peer(worker)
    for name in ("a b", "x" * 165, "", "café"):
        peer.send("pusher:subscribe", {"channel": name})
        assert peer.take()[0]["event"] == "pusher:subscription_error"
    assert not worker.hub.channels


@in_loop
async def test_presence_members_join_and_leave_once_per_member() -> None:
    worker, link = make_pusher()
    a, b = Peer(worker), Peer(worker)
    data, key = member("u1", {"name": "Ann"})
    node = names.channel("1001", "presence-room")
    for peer in (a, b):  # one member on two connections
        auth = peer.auth("presence-room", data)
        peer.send(
            "pusher:subscribe", {"channel": "presence-room", "auth": auth, "channel_data": data}
        )
    asks = [f for f in link.frames if f[0] == Kind.JOIN_ASK]
    assert len(asks) == 2 and asks[0][2].endswith(key.encode())  # the router seats members
    answer_joins(worker, link)
    joins = [f for f in link.frames if f[0] == Kind.JOIN]
    assert joins == [(Kind.JOIN, node, key.encode())]
    sync(worker, link)
    answer_presence(worker, link, {key: 2})
    got = a.take()[0]
    assert got["event"] == "pusher_internal:subscription_succeeded"
    presence = json.loads(got["data"])["presence"]
    assert presence == {"ids": ["u1"], "hash": {"u1": {"name": "Ann"}}, "count": 1}
    a.send("pusher:unsubscribe", {"channel": "presence-room"})
    assert not [f for f in link.frames if f[0] == Kind.LEAVE]  # b is still u1 there
    b.conn.connection_lost(None)
    assert [f for f in link.frames if f[0] == Kind.LEAVE] == [(Kind.LEAVE, node, key.encode())]


@in_loop
async def test_member_added_goes_to_the_others_only() -> None:
    worker, link = make_pusher()
    a, b = Peer(worker), Peer(worker)
    node = names.channel("1001", "presence-room")
    for peer, user in ((a, "u1"), (b, "u2")):
        data, _ = member(user, None)
        auth = peer.auth("presence-room", data)
        peer.send(
            "pusher:subscribe", {"channel": "presence-room", "auth": auth, "channel_data": data}
        )
    answer_joins(worker, link)
    a.take(), b.take()
    _, key2 = member("u2", None)
    worker.on_frame(cast(Any, link), Kind.DELIVER_CHANNEL, node, join_line(node, key2, True))
    assert a.take() == [
        {
            "event": "pusher_internal:member_added",
            "channel": "presence-room",
            "data": json.dumps({"user_id": "u2", "user_info": None}, separators=(",", ":")),
        }
    ]
    assert b.take() == []


@in_loop
async def test_a_full_presence_channel_refuses_one_more_member_unannounced() -> None:
    worker, link = make_pusher()
    peer = Peer(worker, key="quiet-key")  # QUIET: max_presence_members 2
    data, _ = member("u3", None)
    auth = peer.auth("presence-room", data, secret="quiet-secret").replace("app-key", "quiet-key")
    peer.send("pusher:subscribe", {"channel": "presence-room", "auth": auth, "channel_data": data})
    (ask,) = [f for f in link.frames if f[0] == Kind.JOIN_ASK]
    assert JOIN_HEAD.unpack_from(ask[2])[1] == QUIET.max_presence_members
    answer_joins(worker, link, room=False)
    got = peer.take()
    assert got[0]["event"] == "pusher:subscription_error"
    assert "max_presence_members" in json.loads(got[0]["data"])["error"]
    assert not worker.hub.channels
    assert not [f for f in link.frames if f[0] in (Kind.JOIN, Kind.SUB)]  # never announced


@in_loop
async def test_a_member_seated_after_its_connection_closed_is_given_back() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    data, key = member("u1", None)
    auth = peer.auth("presence-room", data)
    peer.send("pusher:subscribe", {"channel": "presence-room", "auth": auth, "channel_data": data})
    peer.conn.connection_lost(None)
    answer_joins(worker, link)
    node = names.channel("1001", "presence-room")
    assert (Kind.LEAVE, node, key.encode()) in link.frames


@in_loop
async def test_client_events_are_relayed_but_not_echoed() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    peer.send("client-typing", {"x": 1}, channel="news")  # a public channel
    assert peer.take()[0]["data"]["message"].startswith("client events are only for private")
    peer.send("pusher:subscribe", {"channel": "private-a", "auth": peer.auth("private-a")})
    peer.send("client-typing", {"x": 1}, channel="private-a")
    (frame,) = [f for f in link.frames if f[0] == Kind.PUB_EXCEPT]
    _, node, payload = frame
    assert node == names.channel("1001", "private-a")
    head, _, envelope = payload.partition(b" ")
    assert head.decode() == peer.sid.replace(".", "-")  # the sender is left out
    _, body = json.loads(envelope)
    assert body == {"event": "client-typing", "channel": "private-a", "data": {"x": 1}}


@in_loop
async def test_client_events_over_the_rate_get_4301() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    peer.send("pusher:subscribe", {"channel": "private-a", "auth": peer.auth("private-a")})
    sync(worker, link)
    peer.take()
    for _ in range(APP.max_client_events_per_second + 1):
        peer.send("client-x", {}, channel="private-a")
    sent = [f for f in link.frames if f[0] == Kind.PUB_EXCEPT]
    got = peer.take()
    # A second boundary may fall in between: then all went through.
    if len(sent) == APP.max_client_events_per_second:
        assert got[-1]["data"]["code"] == frames.RATE_LIMITED
    assert not peer.transport.closed


@in_loop
async def test_cache_channel_replays_the_last_event_or_says_cache_miss() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    node = names.channel("1001", "cache-x")
    peer.send("pusher:subscribe", {"channel": "cache-x"})
    (_, _, ask) = next(f for f in link.frames if f[0] == Kind.RECOVER)
    req = TOKEN.unpack_from(ask)[0]
    body = frames.published("ev", "cache-x", frames.api_data("last"))
    line = msg_line(node, 7, None, msgspec.Raw(body))
    worker.on_frame(cast(Any, link), Kind.RECOVERED, node, RECOVERED_HEAD.pack(req, 0, 7) + line)
    assert [(e["event"], e.get("data")) for e in peer.take()] == [
        ("pusher_internal:subscription_succeeded", "{}"),
        ("ev", "last"),
    ]
    other = Peer(worker)
    other.send("pusher:subscribe", {"channel": "cache-y"})
    (_, _, ask) = [f for f in link.frames if f[0] == Kind.RECOVER][-1]
    req = TOKEN.unpack_from(ask)[0]
    node_y = names.channel("1001", "cache-y")
    worker.on_frame(cast(Any, link), Kind.RECOVERED, node_y, RECOVERED_HEAD.pack(req, 1, 0))
    assert [e["event"] for e in other.take()] == [
        "pusher_internal:subscription_succeeded",
        "pusher:cache_miss",
    ]


@in_loop
async def test_signin_names_the_user_and_a_bad_one_closes_with_4009() -> None:
    worker, link = make_pusher()
    peer = Peer(worker)
    user_data = json.dumps({"id": "42", "name": "Ann"})
    text = f"{peer.sid}::user::{user_data}"
    auth = "app-key:" + hmac.new(b"app-secret", text.encode(), hashlib.sha256).hexdigest()
    peer.send("pusher:signin", {"user_data": user_data, "auth": auth})
    assert (Kind.USER_ON, names.user("1001", "42"), b"") in link.frames
    sync(worker, link)
    assert peer.take()[0]["event"] == "pusher:signin_success"
    peer.send("pusher:subscribe", {"channel": "#server-to-user-42"})
    sync(worker, link)
    assert peer.take()[0]["event"] == "pusher_internal:subscription_succeeded"
    peer.send("pusher:subscribe", {"channel": "#server-to-user-43"})
    assert peer.take()[0]["event"] == "pusher:subscription_error"
    other = Peer(worker)
    other.send("pusher:signin", {"user_data": user_data, "auth": auth})  # not its socket id
    got = other.take()
    assert got[-1] == {"event": "close", "code": frames.UNAUTHORIZED}


@in_loop
async def test_bad_json_is_an_error_and_the_connection_stays() -> None:
    worker, _ = make_pusher()
    peer = Peer(worker)
    peer.conn.data_received(client_frame(b"{nope"))
    peer.send("pusher:subscribe", "not an object")
    peer.send("pusher:nonsense", {})
    got = peer.take()
    assert [e["event"] for e in got] == ["pusher:error"] * 3
    assert not peer.transport.closed


@in_loop
async def test_the_apps_are_isolated() -> None:
    worker, _ = make_pusher()
    a, b = Peer(worker), Peer(worker, key="quiet-key")
    a.send("pusher:subscribe", {"channel": "news"})
    b.send("pusher:subscribe", {"channel": "news"})
    assert set(worker.hub.channels) == {
        names.channel("1001", "news"),
        names.channel("1002", "news"),
    }


@in_loop
async def test_an_apps_quota_refuses_with_4004() -> None:
    worker, _ = make_pusher()
    sessions = cast(PusherSessions, worker.sessions)
    buffer = (ctypes.c_ubyte * CountTable.size(4, 1))()
    sessions.quotas = CountTable(memoryview(buffer), 4, 1)
    limited = AppConfig(id="1001", key="app-key", secret="s", max_connections=1)
    worker.admission.conn_class.apps = {"app-key": limited}  # type: ignore[union-attr]
    first = Peer(worker)
    assert first.sid
    second = Peer(worker)
    assert second.first[-1] == {"event": "close", "code": frames.OVER_QUOTA}
    first.conn.connection_lost(None)
    assert Peer(worker).sid

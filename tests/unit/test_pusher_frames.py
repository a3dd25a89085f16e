"""The Pusher wire and names (no I/O): node event lines in, Pusher frames out."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from manydoors.broker.history import LAST, missed
from manydoors.config import AppConfig
from manydoors.protocol.messages import (
    PING,
    Welcome,
    bye_line,
    encode,
    error_line,
    join_line,
    msg_line,
    ok_line,
)
from manydoors.pusher import frames, names
from manydoors.pusher.connection import route

WIRE = frames.wire(25.0)


def events(data: bytes) -> list[Any]:
    """The JSON (or close code) of each frame in ``data``."""
    out: list[Any] = []
    pos = 0
    while pos < len(data):
        op, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        payload = data[pos : pos + n]
        out.append(int.from_bytes(payload[:2], "big") if op == 8 else json.loads(payload))
        pos += n
    return out


def test_welcome_becomes_connection_established_with_a_dotted_socket_id() -> None:
    (got,) = events(WIRE.frame(encode(Welcome("123-456", "svc", 0))))
    assert got["event"] == "pusher:connection_established"
    assert json.loads(got["data"]) == {"socket_id": "123.456", "activity_timeout": 25}


def test_a_published_frame_is_sent_as_published() -> None:
    body = frames.published("ev", "news", frames.api_data('{"a":1}'))
    line = msg_line(names.channel("1", "news"), 3, None, msgspec.Raw(body))
    assert events(WIRE.frame(line)) == [{"event": "ev", "channel": "news", "data": '{"a":1}'}]


def test_join_and_leave_become_member_added_and_removed() -> None:
    node = names.channel("1", "presence-r")
    key = frames.member_key("7", msgspec.Raw(b'{"n":"A"}'))
    (added,) = events(WIRE.frame(join_line(node, key, True)))
    assert added["event"] == "pusher_internal:member_added"
    assert added["channel"] == "presence-r"
    assert json.loads(added["data"]) == {"user_id": "7", "user_info": {"n": "A"}}
    (removed,) = events(WIRE.frame(join_line(node, key, False)))
    assert removed["event"] == "pusher_internal:member_removed"
    assert json.loads(removed["data"]) == {"user_id": "7"}
    assert frames.joined_member(join_line(node, key, True)) == key
    assert frames.joined_member(join_line(node, key, False)) is None


@pytest.mark.parametrize(
    ("reason", "code"),
    [("shutdown", 4200), ("ping_timeout", 4201), ("slow", 4100), ("unauthorized", 4009)],
)
def test_a_goodbye_is_an_error_and_a_close_with_pushers_code(reason: str, code: int) -> None:
    error, close = events(WIRE.goodbye(reason))
    assert error == {"event": "pusher:error", "data": {"code": code, "message": reason}}
    assert close == code


def test_errors_map_to_pusher_codes_and_native_acks_are_not_sent() -> None:
    (got,) = events(WIRE.frame(error_line("rate_limited", "slow down")))
    assert got["data"] == {"code": 4301, "message": "slow down"}
    (got,) = events(WIRE.frame(error_line("bad_json", "nope")))
    assert got["data"]["code"] is None
    assert WIRE.frame(ok_line(1)) == b""
    assert WIRE.frame(bye_line("x"))  # a bye always says why
    assert events(WIRE.frame(PING)) == [{"event": "pusher:ping", "data": {}}]


def test_node_names_keep_apps_apart_and_out_of_native_reach() -> None:
    node = names.channel("1001", "private-a")
    assert names.split(node) == ("1001", "private-a")
    assert names.outer(node) == "private-a"
    assert names.split("news:sports") is None
    assert names.channel("1001", "a") != names.channel("1002", "a")
    assert not node.isprintable()  # a native name is printable: it cannot be this


@pytest.mark.parametrize(
    ("name", "history", "join_leave"),
    [
        ("news", 0, False),
        ("presence-r", 0, True),
        ("cache-x", 1, False),
        ("private-cache-x", 1, False),
        ("presence-cache-x", 1, True),
        ("private-encrypted-cache-x", 1, False),
    ],
)
def test_each_kind_of_channel_has_its_namespace(name: str, history: int, join_leave: bool) -> None:
    ns = names.namespace(names.channel("1", name))
    assert (ns.history_size, ns.join_leave) == (history, join_leave)


def test_channel_names_as_pusher_validates_them() -> None:
    assert names.valid("private-a_b-c=d@e,f.g;h")
    assert names.valid("#server-to-user-42")
    assert not names.valid("a b")
    assert not names.valid("#other")
    assert not names.valid("x" * 165)


def test_route_finds_the_app_or_says_why_not() -> None:
    app = AppConfig(id="1", key="k", secret="s")
    apps = {"k": app}
    assert route(b"/app/k?protocol=7&client=js&version=8.4.0", apps) is app
    assert route(b"/app/k?protocol=5", apps) is app
    assert route(b"/app/zz?protocol=7", apps) == (4001, "App key zz does not exist")
    assert route(b"/other", apps)[0] == 4005  # type: ignore[index]
    assert route(b"/app/k", apps)[0] == 4008  # type: ignore[index]


def test_client_event_data_may_be_an_object_or_a_json_string() -> None:
    got = frames.data_of(msgspec.Raw(b'{"channel":"a"}'), frames.SubscribeData)
    assert got.channel == "a"
    got = frames.data_of(msgspec.Raw(b'"{\\"channel\\":\\"b\\"}"'), frames.SubscribeData)
    assert got.channel == "b"
    with pytest.raises(frames.FrameError):
        frames.data_of(msgspec.Raw(b"[1]"), frames.SubscribeData)


def test_a_cache_recovery_gets_the_last_line_alone() -> None:
    entries = [(4, b"four\n"), (5, b"five\n")]
    assert missed(LAST, 5, entries) == [b"five\n"]
    assert missed(LAST, 0, []) == []  # nothing published: a cache miss
    assert missed(LAST, 9, entries) is None  # the last one is gone (expired)

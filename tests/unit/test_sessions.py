"""Client ops through a real Worker's sessions, over fake transports and a fake link."""

from __future__ import annotations

import json
import time

from manydoors.config import AuthConfig
from manydoors.protocol.ipc import RECOVER_HEAD, RECOVERED_HEAD, TOKEN, Kind
from support.fakes import OPEN, connect, counter, in_loop, make_worker


def line(op: dict[str, object]) -> bytes:
    return json.dumps(op).encode() + b"\n"


def test_welcome_names_the_connection_the_service_and_the_worker() -> None:
    worker, _ = make_worker()
    conn, tr = connect(worker)
    (welcome,) = tr.take()
    assert welcome == {
        "ev": "welcome",
        "conn": worker.admission.ids.name(conn, 1),  # "<pid>-<token>": see connids.py
        "service": "chat",
        "worker": 0,
    }
    assert counter(worker, "accepted") == 1 and counter(worker, "connections") == 1


def test_hello_and_sub_are_acked_only_after_the_broker_has_synced() -> None:
    worker, link = make_worker()
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "user": "alice", "id": 1}))
    conn.data_received(line({"op": "sub", "channel": "veg", "id": 2}))
    assert link.frames == [(Kind.USER_ON, "alice", b""), (Kind.SUB, "veg", b"")]
    assert tr.take() == []  # nothing acked before the SYNC round trip
    link.flush()  # the link's write: one SYNC covers both acks
    assert link.kinds()[-1] == Kind.SYNC
    worker.on_frame(link, Kind.SYNCED, "", b"")  # type: ignore[arg-type]
    assert tr.take() == [{"ev": "ok", "id": 1}, {"ev": "ok", "id": 2}]
    assert len(tr.out) == 0


def test_a_second_subscriber_needs_no_broker_round_trip() -> None:
    worker, link = make_worker()
    first, _ = connect(worker)
    second, tr = connect(worker)
    first.data_received(line({"op": "sub", "channel": "veg", "id": "f"}))
    link.flush()
    worker.on_frame(link, Kind.SYNCED, "", b"")  # type: ignore[arg-type]
    tr.take()
    second.data_received(line({"op": "sub", "channel": "veg", "id": "s"}))
    assert [k for k in link.kinds() if k == Kind.SUB] == [Kind.SUB]  # only the first
    assert tr.take() == [{"ev": "ok", "id": "s"}]


def test_pub_and_send_go_to_the_broker_with_the_sender() -> None:
    worker, link = make_worker(channels=OPEN, allow_send=True)
    conn, tr = connect(worker)
    conn.data_received(line({"op": "hello", "user": "bob"}))
    conn.data_received(line({"op": "pub", "channel": "veg", "data": {"x": 1}, "id": 3}))
    conn.data_received(line({"op": "send", "user": "carol", "data": "hi", "id": 4}))
    pub = next(f for f in link.frames if f[0] == Kind.PUB)
    send = next(f for f in link.frames if f[0] == Kind.SEND)
    assert pub[1] == "veg" and json.loads(pub[2]) == ["bob", {"x": 1}]
    assert send[1] == "carol" and json.loads(send[2]) == ["bob", "hi"]
    assert tr.events()[-2:] == [{"ev": "ok", "id": 3}, {"ev": "ok", "id": 4}]
    assert counter(worker, "messages_in") == 3


def test_a_private_channel_is_forbidden_without_a_token() -> None:
    worker, link = make_worker()
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "sub", "channel": "$vip", "id": 1}))
    conn.data_received(line({"op": "pub", "channel": "$vip", "data": 1, "id": 2}))
    events = tr.take()
    assert [e["code"] for e in events] == ["forbidden", "forbidden"]
    assert "needs auth mode token" in events[0]["reason"]
    assert link.frames == []
    assert counter(worker, "error_forbidden") == 2


@in_loop
async def test_bad_messages_get_errors_and_too_many_in_a_row_close() -> None:
    worker, _ = make_worker(max_bad_messages=3)
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(b"not json\n")
    conn.data_received(b'{"op":"dance"}\n')
    assert [e["code"] for e in tr.take()] == ["bad_json", "unknown_op"]
    conn.data_received(b'{"op":"ping"}\n')  # a good one forgives the strikes
    assert tr.take() == [{"ev": "pong"}]
    conn.data_received(b"[]\n{}\n[1]\n")
    events = tr.take()
    assert [e.get("code") for e in events] == ["not_object", "missing_field", "not_object", None]
    assert events[-1] == {"ev": "bye", "reason": "bad_input"}
    assert tr.closed and counter(worker, "closed_bad_input") == 1


def test_a_line_over_max_message_bytes_is_refused_and_the_next_is_read() -> None:
    worker, _ = make_worker(max_message_bytes=64)
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(b'{"op":"ping","id":"' + b"x" * 100 + b'"}\n{"op":"ping","id":1}\n')
    events = tr.take()
    assert events[0]["code"] == "too_long" and "64 bytes" in events[0]["reason"]
    assert events[1] == {"ev": "pong", "id": 1}


def test_over_the_message_rate_a_client_is_refused_until_the_next_tick() -> None:
    worker, _ = make_worker(max_messages_per_second=2, ping_interval=0, read_timeout=0)
    # one tick is a quarter of the shortest timeout (hello_timeout 5 s): 1.25 s, 2 msgs
    assert worker.clock.msgs_per_tick == 2
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(b'{"op":"ping","id":1}\n{"op":"ping","id":2}\n{"op":"ping","id":3}\n')
    events = tr.take()
    assert events[:2] == [{"ev": "pong", "id": 1}, {"ev": "pong", "id": 2}]
    assert events[2]["code"] == "rate_limited" and events[2]["id"] == 3
    worker.clock.sweep()
    conn.data_received(b'{"op":"ping","id":4}\n')
    assert tr.take() == [{"ev": "pong", "id": 4}]


def test_a_connection_may_be_in_at_most_max_subscriptions_channels() -> None:
    worker, _ = make_worker(max_subscriptions=2)
    conn, tr = connect(worker)
    for ch in ("a", "b", "c"):
        conn.data_received(line({"op": "sub", "channel": ch}))
    (error,) = [e for e in tr.events() if e["ev"] == "error"]
    assert error["code"] == "too_many_subscriptions"
    assert set(worker.hub.channels) == {"a", "b"}


def test_release_tells_the_broker_what_the_worker_lost() -> None:
    worker, link = make_worker()
    conn, _ = connect(worker)
    conn.data_received(line({"op": "hello", "user": "dan"}))
    conn.data_received(line({"op": "sub", "channel": "x"}))
    link.frames.clear()
    conn.connection_lost(None)
    assert link.frames == [(Kind.UNSUB, "x", b""), (Kind.USER_OFF, "dan", b"")]
    assert not worker.hub.conns and not worker.hub.channels and not worker.hub.users
    assert counter(worker, "connections") == 0 and worker.admission.admitted == 0


def test_sub_with_since_joins_once_the_broker_has_sent_what_was_missed() -> None:
    worker, link = make_worker()
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "sub", "channel": "news", "since": 3, "id": 9}))
    assert link.kinds() == [Kind.SUB, Kind.RECOVER]
    req, since = RECOVER_HEAD.unpack(link.frames[1][2])
    assert since == 3
    assert "news" not in worker.hub.channels and tr.take() == []
    missed = b'{"ev":"msg","channel":"news","seq":4,"from":null,"data":1}\n'
    worker.on_frame(link, Kind.RECOVERED, "news", RECOVERED_HEAD.pack(req, 1, 4) + missed)  # type: ignore[arg-type]
    events = tr.take()
    assert events[0] == {"ev": "ok", "id": 9, "recovered": True, "seq": 4, "missed": 1}
    assert events[1]["seq"] == 4
    assert conn in worker.hub.channels["news"]
    assert counter(worker, "messages_out") == 1


def test_presence_asks_the_broker_and_answers_with_what_it_gathered() -> None:
    worker, link = make_worker(channels=OPEN)
    alice, tr = connect(worker)
    anon, _ = connect(worker)
    alice.data_received(line({"op": "hello", "user": "alice"}))
    for conn in (alice, anon):
        conn.data_received(line({"op": "sub", "channel": "room"}))
    assert json.loads(worker.sessions.presence_part("room")) == [{"alice": 1}, 1]
    tr.take()
    alice.data_received(line({"op": "presence", "channel": "room", "id": 5}))
    kind, key, payload = link.frames[-1]
    assert (kind, key) == (Kind.PRESENCE, "room")
    answer = TOKEN.pack(TOKEN.unpack(payload)[0]) + b'{"users":{"alice":2},"anonymous":1}'
    worker.on_frame(link, Kind.PRESENCE_DONE, "room", answer)  # type: ignore[arg-type]
    assert tr.take() == [
        {"ev": "presence", "channel": "room", "users": {"alice": 2}, "anonymous": 1, "id": 5}
    ]


@in_loop
async def test_with_tokens_ops_before_hello_are_refused_and_a_bad_token_closes() -> None:
    auth = AuthConfig(mode="token", secret="s" * 32)
    worker, _ = make_worker(auth=auth)
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "sub", "channel": "x", "id": 1}))
    assert tr.take()[0]["code"] == "unauthorized"
    conn.data_received(line({"op": "hello", "token": "nope", "id": 2}))
    events = tr.take()
    assert events[0]["code"] == "unauthorized" and events[0]["id"] == 2
    assert events[1] == {"ev": "bye", "reason": "unauthorized"}
    assert tr.closed


def test_the_longest_wait_for_the_broker_is_kept_in_ms() -> None:
    worker, link = make_worker()
    conn, _ = connect(worker)
    conn.data_received(line({"op": "hello", "user": "alice", "id": 1}))
    link.flush()  # the SYNC goes out
    time.sleep(0.03)
    worker.on_frame(link, Kind.SYNCED, "", b"")  # type: ignore[arg-type]
    assert 30 <= counter(worker, "sync_wait_max_ms") < 1000

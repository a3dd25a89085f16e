"""The server API's commands in a real Worker (fake transports and link): disconnect,
unsubscribe, channel counts, deliveries that leave one connection out, connection ids."""

from __future__ import annotations

import json
import re
from typing import Any

from manydoors.protocol.ipc import EXCLUDE, RECOVER_HEAD, RECOVERED_HEAD, TOKEN, Kind, exclude_head
from manydoors.server.connection import Connection
from manydoors.server.connids import ConnIds
from manydoors.server.worker import Worker
from support.fakes import FakeLink, FakeTransport, connect, counter, in_loop, make_worker, sync_all

LINE = b'{"ev":"msg","channel":"veg","seq":1,"from":null,"data":"dal"}\n'


def line(op: dict[str, object]) -> bytes:
    return json.dumps(op).encode() + b"\n"


def frame(worker: Worker, link: FakeLink, kind: Kind, key: str, payload: bytes) -> None:
    worker.on_frame(link, kind, key, payload)  # type: ignore[arg-type]


def joined(
    worker: Worker, user: str | None = None, *channels: str
) -> tuple[Connection, FakeTransport]:
    conn, tr = connect(worker)
    if user is not None:
        conn.data_received(line({"op": "hello", "user": user}))
    for channel in channels:
        conn.data_received(line({"op": "sub", "channel": channel}))
    return conn, tr


def conn_id(tr: FakeTransport) -> str:
    welcome: dict[str, Any] = tr.events()[0]
    assert welcome["ev"] == "welcome"
    return str(welcome["conn"])


# --- disconnect --------------------------------------------------------------------------


@in_loop
async def test_a_disconnect_says_bye_with_its_reason_to_every_connection_of_the_user() -> None:
    worker, link = make_worker()
    ann = [joined(worker, "ann") for _ in range(2)]
    _, bob = joined(worker, "bob")
    sync_all(worker, link)
    for _, tr in [*ann, (None, bob)]:
        tr.take()
    frame(worker, link, Kind.DISCONNECT, "ann", b"banned")
    for conn, tr in ann:
        assert tr.take() == [{"ev": "bye", "reason": "banned"}]
        assert tr.closed and conn.transport is None
    assert bob.take() == [] and not bob.closed
    assert counter(worker, "closed_disconnected") == 2
    for conn, _ in ann:  # the loop tells the connections they are gone: released as usual
        conn.connection_lost(None)
    assert set(worker.hub.users) == {"bob"}
    frame(worker, link, Kind.DISCONNECT, "ann", b"banned")  # nobody left: nothing happens
    assert counter(worker, "closed_disconnected") == 2


@in_loop
async def test_a_websocket_disconnect_ends_with_a_policy_close_frame() -> None:
    worker, link = make_worker(protocol="websocket")
    conn, tr = connect(worker)
    conn.data_received(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    worker.sessions.handle(conn, line({"op": "hello", "user": "ann"}))
    tr.out.clear()
    frame(worker, link, Kind.DISCONNECT, "ann", b"kicked")
    data = tr.data()
    assert b'{"ev":"bye","reason":"kicked"}' in data
    assert data.endswith(b"\x88\x08\x03\xf0kicked")  # close frame: 1008 and the reason
    assert tr.closed


# --- unsubscribe -------------------------------------------------------------------------


def test_an_unsubscribe_takes_every_connection_of_the_user_out_and_tells_it() -> None:
    worker, link = make_worker()
    ann_a, tr_a = joined(worker, "ann", "veg", "fruit")
    ann_b, tr_b = joined(worker, "ann", "veg")
    _, tr_c = joined(worker, "ann", "fruit")  # ann, but not in veg
    _, bob = joined(worker, "bob", "veg")
    sync_all(worker, link)
    for tr in (tr_a, tr_b, tr_c, bob):
        tr.take()
    link.frames.clear()
    frame(worker, link, Kind.UNSUBSCRIBE, "ann", b"veg")
    for tr in (tr_a, tr_b):
        assert tr.take() == [{"ev": "unsubscribed", "channel": "veg"}]
    assert tr_c.take() == []
    assert ann_a.channels == "fruit" and ann_b.channels == ()
    assert link.frames == []  # bob still holds veg on this worker: the broker keeps it
    frame(worker, link, Kind.DELIVER_CHANNEL, "veg", LINE)
    assert bob.take() == [json.loads(LINE)] and tr_a.take() == tr_b.take() == []
    frame(worker, link, Kind.UNSUBSCRIBE, "bob", b"veg")
    assert link.frames == [(Kind.UNSUB, "veg", b"")]  # the worker's last one: it tells


def test_an_unsubscribe_while_the_history_is_on_its_way_acks_and_never_joins() -> None:
    worker, link = make_worker()
    conn, tr = joined(worker, "ann")
    conn.data_received(line({"op": "sub", "channel": "news", "since": 3, "id": 9}))
    tr.take()
    req, _ = RECOVER_HEAD.unpack(link.frames[-1][2])
    frame(worker, link, Kind.UNSUBSCRIBE, "ann", b"news")
    assert tr.take() == [{"ev": "ok", "id": 9}, {"ev": "unsubscribed", "channel": "news"}]
    frame(worker, link, Kind.RECOVERED, "news", RECOVERED_HEAD.pack(req, 1, 3))
    assert tr.take() == [] and "news" not in worker.hub.channels
    assert link.frames[-1] == (Kind.UNSUB, "news", b"")


# --- channel counts ----------------------------------------------------------------------


def test_channel_counts_answer_for_the_names_asked_that_the_worker_holds() -> None:
    worker, link = make_worker()
    joined(worker, None, "veg", "fruit")
    joined(worker, None, "veg")
    joined(worker, None, "news")
    link.frames.clear()
    ask = TOKEN.pack(42) + json.dumps(["fruit", "veg", "gone"]).encode()
    frame(worker, link, Kind.CHANNELS_ASK, "", ask)
    [(kind, key, payload)] = link.frames
    assert (kind, key, TOKEN.unpack_from(payload)) == (Kind.CHANNELS_PART, "", (42,))
    assert json.loads(payload[TOKEN.size :]) == {"fruit": 1, "veg": 2}


# --- deliveries that leave one connection out -------------------------------------------


def test_a_channel_delivery_leaves_out_exactly_the_connection_its_id_names() -> None:
    worker, link = make_worker()
    subs = [joined(worker, None, "veg") for _ in range(3)]
    sync_all(worker, link)
    ids = [conn_id(tr) for _, tr in subs]
    for _, tr in subs:
        tr.out.clear()
    head = exclude_head(ids[1])
    assert head is not None
    frame(worker, link, Kind.DELIVER_CHANNEL_EXCEPT, "veg", head + LINE)
    assert [tr.out for _, tr in subs] == [[LINE], [], [LINE]]
    assert subs[0][1].out[0] is subs[2][1].out[0]  # still one bytes object for all
    assert counter(worker, "messages_out") == 2


def test_an_id_of_another_worker_leaves_nobody_out_here() -> None:
    worker, link = make_worker()
    subs = [joined(worker, None, "veg") for _ in range(2)]
    sync_all(worker, link)
    pid, token = EXCLUDE.unpack(exclude_head(conn_id(subs[0][1])) or b"")
    for _, tr in subs:
        tr.out.clear()
    frame(worker, link, Kind.DELIVER_CHANNEL_EXCEPT, "veg", EXCLUDE.pack(pid + 1, token) + LINE)
    assert [tr.out for _, tr in subs] == [[LINE], [LINE]]


def test_user_and_all_deliveries_leave_one_out_too() -> None:
    worker, link = make_worker()
    ann = [joined(worker, "ann") for _ in range(2)]
    _, bob = joined(worker, "bob")
    sync_all(worker, link)
    head = exclude_head(conn_id(ann[0][1]))
    assert head is not None
    for _, tr in [*ann, (None, bob)]:
        tr.take()
    frame(worker, link, Kind.DELIVER_USER_EXCEPT, "ann", head + b'{"ev":"dm"}\n')
    frame(worker, link, Kind.DELIVER_ALL_EXCEPT, "", head + b'{"ev":"broadcast"}\n')
    assert ann[0][1].take() == []
    assert ann[1][1].take() == [{"ev": "dm"}, {"ev": "broadcast"}]
    assert bob.take() == [{"ev": "broadcast"}]


# --- connection ids ----------------------------------------------------------------------


def test_connection_ids_name_the_object_without_showing_its_address() -> None:
    ids = ConnIds(4321)
    objects = [object() for _ in range(2000)]
    names = [ids.name(obj, n) for n, obj in enumerate(objects, 1)]
    assert all(re.fullmatch(r"4321-[0-9]{1,20}", name) for name in names)
    assert len(set(names)) == len(names)
    for obj, name in zip(objects, names, strict=True):
        token = int(name.split("-")[1])
        assert ids.address(token) == id(obj)
        assert token != id(obj) and token >> 4 != id(obj) >> 4
    # The same object later (its address reused by a new connection): another id.
    assert ids.name(objects[0], 1) != ids.name(objects[0], 2)
    assert ids.address(int(ids.name(objects[0], 2).split("-")[1])) == id(objects[0])
    # Another worker's key: the same object gets an unrelated id.
    assert ConnIds(4321).name(objects[0], 1) != names[0]


def test_an_exclude_head_takes_only_the_form_of_a_connection_id() -> None:
    assert exclude_head("12-34") == EXCLUDE.pack(12, 34)
    for bad in ("", "12", "12-", "-34", "a-1", "1-a", "1-2-3", "\uff11-2", "1-" + "9" * 21):
        assert exclude_head(bad) is None, bad

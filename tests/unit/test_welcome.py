"""A welcome held with the first acks (server/welcome.py): one write, nothing ahead of it."""

from __future__ import annotations

import json

from manydoors.server.worker import Worker
from support.fakes import (
    FakeLink,
    FakeTransport,
    accept,
    connect,
    in_loop,
    make_worker,
    next_iteration,
    sync_all,
)


def line(op: dict[str, object]) -> bytes:
    return json.dumps(op).encode() + b"\n"


# What a client that speaks first sends right behind its connect.
HELLO_AND_SUB = line({"op": "hello", "user": "bob", "id": 1}) + line(
    {"op": "sub", "channel": "veg", "id": 2}
)


def waiting_worker() -> tuple[Worker, FakeLink]:
    """A worker with an interest frame not yet sent (a hello of a new user)."""
    worker, link = make_worker()
    first, _ = connect(worker)
    first.data_received(line({"op": "hello", "user": "alice", "id": 1}))
    assert worker.sessions.dirty
    return worker, link


def writes(tr: FakeTransport) -> list[list[str]]:
    """Each write's events, by name (ev, or ev:id)."""
    out = []
    for data in tr.out:
        events = [json.loads(x) for x in data.splitlines()]
        out.append([e["ev"] + (f":{e['id']}" if "id" in e else "") for e in events])
    return out


def test_a_connection_that_speaks_first_gets_welcome_and_acks_in_one_write() -> None:
    worker, link = waiting_worker()
    conn, tr = connect(worker)
    assert tr.out == []  # the welcome waits for the broker's round trip
    conn.data_received(HELLO_AND_SUB)
    assert tr.out == []
    sync_all(worker, link)
    assert writes(tr) == [["welcome", "ok:1", "ok:2"]]
    conn.data_received(line({"op": "ping", "id": 3}))
    assert writes(tr)[1:] == [["pong:3"]]  # released: straight through from here on


def test_what_is_written_before_the_round_trip_waits_behind_the_welcome() -> None:
    worker, link = waiting_worker()
    conn, tr = connect(worker)
    conn.data_received(line({"op": "ping", "id": "p"}) + b"not json\n")
    assert tr.out == []
    sync_all(worker, link)
    assert writes(tr) == [["welcome", "pong:p", "error"]]


def test_a_worker_with_nothing_waiting_writes_the_welcome_at_once() -> None:
    worker, link = make_worker()
    conn, tr = connect(worker)
    assert writes(tr) == [["welcome"]]
    conn.data_received(line({"op": "hello", "user": "bob", "id": 1}))
    sync_all(worker, link)
    assert writes(tr) == [["welcome"], ["ok:1"]]


@in_loop
async def test_a_bye_while_the_welcome_waits_goes_out_behind_it_and_closes() -> None:
    worker, link = make_worker(max_bad_messages=2)
    first, _ = connect(worker)
    first.data_received(line({"op": "hello", "user": "alice", "id": 1}))
    conn, tr = connect(worker)
    conn.data_received(b"[]\n[]\n")  # two bad messages in a row: bye
    assert tr.closed
    assert writes(tr) == [["welcome", "error", "error", "bye"]]
    sync_all(worker, link)  # the release finds the connection closed: nothing more
    assert len(tr.out) == 1


def test_a_connection_lost_while_its_welcome_waits_gets_no_write() -> None:
    worker, link = waiting_worker()
    conn, tr = connect(worker)
    conn.data_received(line({"op": "hello", "user": "bob", "id": 1}))
    conn.connection_lost(ConnectionResetError())
    tr.closed = True  # the fake asserts on a write after close
    sync_all(worker, link)
    assert tr.out == []


def test_a_client_that_speaks_first_to_an_idle_worker_gets_one_write() -> None:
    # uvloop makes a burst's connections before it reads them: the welcome waits one
    # loop iteration, in which the hello is read, then waits for its acks.
    worker, link = make_worker()
    conn, tr = accept(worker)
    assert tr.out == []
    conn.data_received(HELLO_AND_SUB)
    next_iteration(worker)
    assert tr.out == []
    sync_all(worker, link)
    assert writes(tr) == [["welcome", "ok:1", "ok:2"]]


def test_a_silent_client_of_an_idle_worker_gets_its_welcome_an_iteration_later() -> None:
    worker, _ = make_worker()
    conn, tr = accept(worker)
    assert tr.out == []
    next_iteration(worker)
    assert writes(tr) == [["welcome"]]
    conn.data_received(line({"op": "ping", "id": 1}))
    assert writes(tr) == [["welcome"], ["pong:1"]]


def test_a_websocket_reply_in_the_upgrades_read_goes_behind_the_held_welcome() -> None:
    # The upgrade, a ping and a close in one read: the 101 first, then the welcome,
    # the pong and the close frame, in that order, none lost when the transport closes.
    worker, _ = make_worker(protocol="websocket")
    conn, tr = accept(worker)
    mask = b"\x01\x02\x03\x04"
    ping = bytes((0x89, 0x80 | 2)) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"hi"))
    close = bytes((0x88, 0x80)) + mask
    conn.data_received(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + ping
        + close
    )
    data = b"".join(tr.out)
    assert data.startswith(b"HTTP/1.1 101 ")
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body[:2] == b"\x81" + bytes((len(body) - 8,))  # the welcome's text frame
    assert b'"ev":"welcome"' in body
    assert body.endswith(b"\x8a\x02hi\x88\x00")  # then the pong, then the close
    assert tr.closed

"""A Worker built in-process: broker frames in, fan-out of the same bytes out."""

from __future__ import annotations

import json

from manydoors.protocol.ipc import Kind
from manydoors.protocol.websocket import encode_line
from support.fakes import connect, counter, make_worker, next_iteration

LINE = b'{"ev":"msg","channel":"veg","seq":1,"from":null,"data":"dal"}\n'


def test_a_delivery_writes_one_bytes_object_to_every_subscriber_only() -> None:
    worker, link = make_worker()
    subs = [connect(worker) for _ in range(3)]
    _, other = connect(worker)
    for conn, tr in subs:
        conn.data_received(b'{"op":"sub","channel":"veg"}\n')
        tr.out.clear()
    other.out.clear()
    worker.on_frame(link, Kind.DELIVER_CHANNEL, "veg", LINE)  # type: ignore[arg-type]
    written = [tr.out for _, tr in subs]
    assert all(out == [LINE] for out in written)
    assert len({id(out[0]) for out in written}) == 1  # the very same object
    assert other.out == []
    assert counter(worker, "messages_out") == 3


def test_deliveries_to_a_user_and_to_all() -> None:
    worker, link = make_worker()
    alice, tr_a = connect(worker)
    _, tr_b = connect(worker)
    alice.data_received(b'{"op":"hello","user":"alice"}\n')
    tr_a.out.clear()
    tr_b.out.clear()
    worker.on_frame(link, Kind.DELIVER_USER, "alice", b'{"ev":"dm"}\n')  # type: ignore[arg-type]
    worker.on_frame(link, Kind.DELIVER_ALL, "", b'{"ev":"broadcast"}\n')  # type: ignore[arg-type]
    assert tr_a.events() == [{"ev": "dm"}, {"ev": "broadcast"}]
    assert tr_b.events() == [{"ev": "broadcast"}]


def test_a_slow_reader_misses_a_fan_out_and_it_is_counted() -> None:
    worker, link = make_worker(slow_policy="drop")
    slow, tr = connect(worker)
    _, ok = connect(worker)
    slow.pause_writing()
    tr.out.clear()
    ok.out.clear()
    worker.on_frame(link, Kind.DELIVER_ALL, "", LINE)  # type: ignore[arg-type]
    assert tr.out == [] and ok.out == [LINE]
    assert counter(worker, "dropped") == 1


def test_a_websocket_worker_frames_a_delivery_once_as_a_text_frame() -> None:
    worker, link = make_worker(protocol="websocket")
    transports = []
    for _ in range(2):
        conn, tr = connect(worker)
        conn.data_received(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        next_iteration(worker)  # the welcome, held for an iteration, goes out
        tr.out.clear()
        transports.append(tr)
    worker.on_frame(link, Kind.DELIVER_ALL, "", LINE)  # type: ignore[arg-type]
    first, second = (tr.out[0] for tr in transports)
    assert first == encode_line(LINE) and first is second


def test_a_sample_lists_connections_as_five_tuples() -> None:
    worker, link = make_worker()
    conn, _ = connect(worker, ("10.1.2.3", 5555))
    conn.data_received(b'{"op":"hello","user":"eve"}\n{"op":"sub","channel":"a"}\n')
    worker.on_frame(link, Kind.SAMPLE, "5", b"")  # type: ignore[arg-type]
    kind, _, payload = link.frames[-1]
    assert kind == Kind.SAMPLED
    assert json.loads(payload) == [
        {
            "tuple": ["tcp", "10.1.2.3", 5555, "127.0.0.1", 7000],
            "service": "chat",
            "protocol": "tcp",
            "worker": 0,
            "user": "eve",
            "channels": ["a"],
        }
    ]

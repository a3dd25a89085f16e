"""The worker's clock over fake transports: ticks, deadlines, rate buckets, heartbeat."""

from __future__ import annotations

import json

from manydoors.config import AuthConfig, ServiceConfig
from manydoors.server.clock import tick_seconds
from manydoors.server.deadlines import Deadlines
from support.fakes import connect, counter, in_loop, make_worker


def test_a_tick_is_a_quarter_of_the_shortest_timeout_and_at_most_a_second() -> None:
    assert tick_seconds(ServiceConfig()) == 1.0
    assert tick_seconds(ServiceConfig(read_timeout=2, ping_interval=0)) == 0.5
    assert tick_seconds(ServiceConfig(hello_timeout=0.01, read_timeout=0)) == 0.01


@in_loop
async def test_a_quiet_connection_is_pinged_once_then_closed_without_an_answer() -> None:
    worker, _ = make_worker(ping_interval=4, ping_timeout=4, read_timeout=0)
    clock = worker.clock
    assert (clock.tick_s, clock.ping_ticks, clock.pong_ticks, clock.scan_ticks) == (1.0, 4, 4, 1)
    _, tr = connect(worker)
    tr.take()
    pings = []
    for _ in range(7):
        clock.sweep()
        pings.append(tr.data().count(b'{"ev":"ping"}'))
    assert pings == [0, 0, 0, 1, 1, 1, 1]  # one ping, after 4 quiet ticks
    assert not tr.closed
    clock.sweep()  # ping_timeout after the ping
    assert tr.events()[-1] == {"ev": "bye", "reason": "ping_timeout"} and tr.closed
    assert counter(worker, "pings") == 1 and counter(worker, "closed_ping_timeout") == 1


def test_a_pong_keeps_a_connection_alive() -> None:
    worker, _ = make_worker(ping_interval=4, ping_timeout=4, read_timeout=0)
    conn, tr = connect(worker)
    for _ in range(20):
        worker.clock.sweep()
        if tr.data().endswith(b'{"ev":"ping"}\n'):
            conn.data_received(b'{"op":"pong"}\n')
            tr.out.clear()
    assert not tr.closed and counter(worker, "pings") >= 4


@in_loop
async def test_a_message_begun_and_not_finished_in_read_timeout_closes() -> None:
    worker, _ = make_worker(read_timeout=4, ping_interval=0)
    conn, tr = connect(worker)
    _, idle_tr = connect(worker)
    conn.data_received(b'{"op":"pi')
    for _ in range(5):
        worker.clock.sweep()
    events = tr.events()
    assert events[-2]["code"] == "read_timeout" and events[-1]["reason"] == "read_timeout"
    assert tr.closed and not idle_tr.closed  # an idle connection is not reading


def test_over_the_byte_rate_reading_pauses_until_the_next_tick() -> None:
    worker, _ = make_worker(max_bytes_per_second=2048, max_message_bytes=1024)
    conn, tr = connect(worker)
    per_tick = worker.clock.bytes_per_tick
    conn.data_received(b" " * (per_tick + 1))
    assert tr.paused and counter(worker, "throttled") == 1
    worker.clock.sweep()
    assert not tr.paused and conn.got == 0


@in_loop
async def test_with_tokens_a_connection_without_a_valid_hello_is_closed_in_time() -> None:
    worker, _ = make_worker(auth=AuthConfig(mode="token", secret="k" * 32), hello_timeout=2)
    _, tr = connect(worker)
    clock = worker.clock
    for _ in range(clock.hello_ticks - 1):
        clock.sweep()
    assert not tr.closed
    clock.sweep()
    assert tr.events()[-1] == {"ev": "bye", "reason": "hello_timeout"}
    assert counter(worker, "closed_hello_timeout") == 1


@in_loop
async def test_a_websocket_handshake_not_finished_in_read_timeout_gets_408() -> None:
    worker, _ = make_worker(protocol="websocket", read_timeout=2)
    conn, tr = connect(worker)
    conn.data_received(b"GET / HTTP/1.1\r\n")
    for _ in range(worker.clock.read_ticks):
        worker.clock.sweep()
    head, _, body = tr.data().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout")
    assert json.loads(body)["code"] == "read_timeout"
    assert counter(worker, "closed_read_timeout") == 1


def test_deadlines_group_connections_by_tick_and_come_due_in_order() -> None:
    deadlines = Deadlines()
    a, b, c = object(), object(), object()
    deadlines.add(5, a)  # type: ignore[arg-type]
    deadlines.add(5, b)  # type: ignore[arg-type]
    deadlines.add(7, c)  # type: ignore[arg-type]
    assert len(deadlines.queue) == 2  # one entry per tick, not per connection
    assert list(deadlines.due(4)) == []
    assert list(deadlines.due(6)) == [a, b]
    assert list(deadlines.due(9)) == [c]
    assert not deadlines.queue

"""Admission over fake transports: counting, refusals, closes, per-IP and per-user limits."""

from __future__ import annotations

import asyncio
import ctypes
from typing import cast

from manydoors.server.admission import Refusal
from manydoors.server.limits import shared_bytes, tables
from support.fakes import FakeTransport, connect, counter, in_loop, make_worker


def refused(worker: object, peer: tuple[str, int] = ("10.0.0.9", 1)) -> FakeTransport:
    """Accept through the factory when it refuses: the Refusal answers and closes."""
    protocol = worker.admission.accept()  # type: ignore[attr-defined]
    assert isinstance(protocol, Refusal)
    transport = FakeTransport(peer)
    protocol.connection_made(cast(asyncio.Transport, transport))
    return transport


def test_a_worker_at_its_fd_cap_refuses_with_a_reason_and_counts_it() -> None:
    worker, _ = make_worker()
    worker.admission.cap = 2
    connect(worker)
    connect(worker)
    tr = refused(worker)
    (event,) = tr.events()
    assert event["code"] == "server_full" and "fd limit" in event["reason"]
    assert tr.closed
    assert counter(worker, "refused_worker_full") == 1
    assert counter(worker, "error_server_full") == 1
    assert counter(worker, "connections") == 2


def test_the_service_wide_max_connections_is_read_from_every_row() -> None:
    worker, _ = make_worker(rows=2, max_connections=3)
    # another worker of the service holds two connections (its row of the table)
    table = worker.counters.table
    table.mv[table.index(0, 1)] = 2
    connect(worker)
    tr = refused(worker)
    assert "max_connections (3)" in tr.events()[0]["reason"]
    assert counter(worker, "refused_server_full") == 1


def test_a_draining_worker_refuses_without_counting_a_refusal() -> None:
    worker, _ = make_worker()
    worker.admission.stopping = True
    tr = refused(worker)
    assert tr.events()[0]["code"] == "server_full"
    assert counter(worker, "refused_server_full") == 0


def test_a_websocket_refusal_before_the_upgrade_is_an_http_answer() -> None:
    worker, _ = make_worker(protocol="websocket")
    worker.admission.cap = 0
    tr = refused(worker)
    assert tr.data().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b'"code":"server_full"' in tr.data()


def shared_counts(worker: object, rows: int = 1) -> None:
    buffer = (ctypes.c_ubyte * shared_bytes(rows))()
    ip, user = tables(memoryview(buffer), rows, 0)
    adm = worker.admission  # type: ignore[attr-defined]
    adm.ip_counts = ip
    adm.user_counts = user if adm.per_user else None


@in_loop
async def test_max_connections_per_ip_refuses_the_next_and_frees_on_close() -> None:
    worker, _ = make_worker(max_connections_per_ip=2, host="0.0.0.0")
    shared_counts(worker)
    first, _ = connect(worker, ("192.0.2.1", 1))
    connect(worker, ("192.0.2.1", 2))
    third, tr = connect(worker, ("192.0.2.1", 3))
    assert tr.events()[0]["code"] == "too_many_connections" and tr.closed
    assert counter(worker, "refused_per_ip") == 1
    third.connection_lost(None)  # the refused one ends: it was never counted
    connect(worker, ("192.0.2.2", 1))  # another address is not held to that count
    first.connection_lost(None)
    _, tr = connect(worker, ("192.0.2.1", 4))
    assert tr.events()[0]["ev"] == "welcome"


@in_loop
async def test_a_service_bound_to_loopback_does_not_look_at_peer_addresses() -> None:
    # Only loopback peers can reach it, and they are not held to the limit: the
    # address is not even read (a fake peer from elsewhere shows it).
    worker, _ = make_worker(max_connections_per_ip=1, host="127.0.0.1")
    shared_counts(worker)
    for port in range(3):
        _, tr = connect(worker, ("192.0.2.1", port))
        assert tr.events()[0]["ev"] == "welcome"
    limited, _ = make_worker(max_connections_per_ip=1, host="127.0.0.1", limit_loopback=True)
    shared_counts(limited)
    connect(limited, ("127.0.0.1", 1))
    _, tr = connect(limited, ("127.0.0.1", 2))
    assert tr.events()[0]["code"] == "too_many_connections"


def test_loopback_peers_are_not_held_to_the_per_ip_limit_unless_asked() -> None:
    worker, _ = make_worker(max_connections_per_ip=1, host="0.0.0.0")
    shared_counts(worker)
    for port in range(3):
        _, tr = connect(worker, ("127.0.0.1", port))
        assert tr.events()[0]["ev"] == "welcome"


@in_loop
async def test_close_says_error_and_bye_then_aborts_after_the_grace() -> None:
    worker, _ = make_worker()
    conn, tr = connect(worker)
    tr.take()
    worker.admission.fail(conn, "read_timeout", "too slow", "read_timeout")
    assert tr.take() == [
        {"ev": "error", "code": "read_timeout", "reason": "too slow"},
        {"ev": "bye", "reason": "read_timeout"},
    ]
    assert tr.closed and not tr.aborted and conn.transport is None
    worker.admission.close(conn, "slow")  # closing twice does nothing
    assert counter(worker, "closed_read_timeout") == 1 and counter(worker, "closed_slow") == 0


@in_loop
async def test_a_websocket_bye_ends_with_a_close_frame() -> None:
    worker, _ = make_worker(protocol="websocket")
    conn, tr = connect(worker)
    conn.data_received(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert tr.out[0].startswith(b"HTTP/1.1 101")
    tr.out.clear()
    worker.admission.close(conn, "slow")
    data = tr.data()
    assert data.startswith(b"\x81") and b'"bye"' in data
    assert data.endswith(b"\x88\x06\x03\xf0slow")  # close 1008 "slow"
    assert worker.wire.goodbye("shutdown").endswith(b"\x88\x0a\x03\xe9shutdown")  # 1001


@in_loop
async def test_a_slow_reader_is_closed_after_the_write_that_found_it() -> None:
    worker, _ = make_worker()
    conn, tr = connect(worker)
    conn.pause_writing()
    assert conn in worker.admission.slow and not tr.closed  # not inside the write
    await asyncio.sleep(0)
    assert tr.closed and counter(worker, "closed_slow") == 1


def test_with_the_drop_policy_a_slow_reader_stays_and_resumes() -> None:
    worker, _ = make_worker(slow_policy="drop")
    conn, tr = connect(worker)
    conn.pause_writing()
    conn.resume_writing()
    assert not worker.admission.slow and not tr.closed


def test_a_lost_connection_is_counted_by_why() -> None:
    worker, _ = make_worker()
    for exc in (ConnectionResetError(), TimeoutError(), OSError("other")):
        conn, _ = connect(worker)
        conn.connection_lost(exc)
    assert [counter(worker, f"lost_{r}") for r in ("reset", "timed_out", "error")] == [1, 1, 1]
    conn, _ = connect(worker)
    conn.transport = None  # one we closed ourselves
    conn.connection_lost(ConnectionResetError())
    assert counter(worker, "lost_reset") == 1

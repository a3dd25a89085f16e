"""One connection in very many channels: each sub, unsub and ack costs O(1) (issue 18).

A connection's channels are a tuple while they are few (smaller than a set) and a set
beyond ``hub.SMALL``: with tuples alone, 100,000 subs on one connection took minutes
(each test and each growth copied the tuple), and their acks, joined by adding bytes,
took as long again.
"""

from __future__ import annotations

import time

from manydoors.protocol.ipc import Kind
from manydoors.server.hub import SHRINK, SMALL, Hub, channels_of
from support.fakes import connect, make_worker

N = 100_000
# About 1 s here once linear (2 cores, 2026-12); quadratic, 100,000 took minutes.
BUDGET_S = 20.0
CHUNK = 2_000  # lines per read, and how often the budget is checked


class Member:
    __slots__ = ("channels", "user")

    def __init__(self) -> None:
        self.user: str | None = None
        self.channels: str | tuple[str, ...] | set[str] = ()


def feed(conn: object, lines: list[bytes], started: float, what: str) -> None:
    """Hand ``lines`` to the connection a read at a time, within the budget."""
    for i in range(0, len(lines), CHUNK):
        conn.data_received(b"".join(lines[i : i + CHUNK]))  # type: ignore[attr-defined]
        spent = time.perf_counter() - started
        assert spent < BUDGET_S, f"{what}: only {i + CHUNK:,} of {len(lines):,} in {spent:.1f} s"


def test_one_connection_subscribes_to_100000_channels_in_linear_time() -> None:
    worker, link = make_worker(
        max_subscriptions=200_000, max_messages_per_second=0, max_bytes_per_second=0
    )
    conn, tr = connect(worker)
    tr.take()
    started = time.perf_counter()
    subs = [b'{"op":"sub","channel":"c%d","id":%d}\n' % (i, i) for i in range(N)]
    feed(conn, subs, started, "subs")
    link.flush()  # one SYNC for all of them
    worker.on_frame(link, Kind.SYNCED, "", b"")  # type: ignore[arg-type]
    spent = time.perf_counter() - started
    assert spent < BUDGET_S, f"acks: {spent:.1f} s"
    acks = tr.data().split(b"\n")[:-1]
    assert len(acks) == N and acks[0] == b'{"ev":"ok","id":0}'
    assert acks[-1] == b'{"ev":"ok","id":%d}' % (N - 1)
    assert len(worker.hub.channels) == N and len(channels_of(conn)) == N
    assert sum(1 for kind, _, _ in link.frames if kind == Kind.SUB) == N
    # Subscribing again to one of them is a plain ok, not a second SUB.
    conn.data_received(b'{"op":"sub","channel":"c7","id":"again"}\n')
    assert len(worker.hub.channels) == N and tr.events()[-1] == {"ev": "ok", "id": "again"}

    tr.take()
    link.frames.clear()
    started = time.perf_counter()
    unsubs = [b'{"op":"unsub","channel":"c%d","id":%d}\n' % (i, i) for i in range(0, N, 2)]
    feed(conn, unsubs, started, "unsubs")
    assert len(tr.take()) == N // 2
    assert len(worker.hub.channels) == N // 2 and len(channels_of(conn)) == N // 2
    assert [kind for kind, _, _ in link.frames] == [Kind.UNSUB] * (N // 2)

    # Closing forgets the other half at once: one UNSUB each.
    link.frames.clear()
    started = time.perf_counter()
    conn.connection_lost(None)
    assert time.perf_counter() - started < BUDGET_S
    assert worker.hub.channels == {} and conn.channels == ()
    assert sorted(key for _, key, _ in link.frames) == sorted(f"c{i}" for i in range(1, N, 2))


def test_the_limit_still_holds_when_the_channels_are_a_set() -> None:
    worker, _ = make_worker(max_subscriptions=SMALL + 3)
    conn, tr = connect(worker)
    tr.take()
    for i in range(SMALL + 4):
        conn.data_received(b'{"op":"sub","channel":"c%d","id":%d}\n' % (i, i))
    assert isinstance(conn.channels, set) and len(conn.channels) == SMALL + 3
    assert tr.events()[-1]["code"] == "too_many_subscriptions"


def test_few_channels_stay_a_tuple_many_become_a_set_and_back() -> None:
    hub: Hub[Member] = Hub()
    conn = Member()
    hub.add(conn)
    assert hub.subscribe(conn, "c0") and conn.channels == "c0"  # one: the name itself
    for i in range(1, SMALL):
        hub.subscribe(conn, f"c{i}")
    assert conn.channels == tuple(f"c{i}" for i in range(SMALL))  # in order
    assert hub.subscribe(conn, "c8") and conn.channels == {f"c{i}" for i in range(SMALL + 1)}
    assert not hub.subscribe(conn, "c8") and not hub.subscribe(conn, "c0")  # held already
    assert "c3" in channels_of(conn) and "c99" not in channels_of(conn)
    # Shrinking: still a set down to SHRINK + 1 (no flapping at SMALL), then a tuple.
    for i in range(SMALL, SHRINK, -1):
        assert hub.unsubscribe(conn, f"c{i}")
        assert isinstance(conn.channels, set)
    assert hub.unsubscribe(conn, f"c{SHRINK}")
    assert isinstance(conn.channels, tuple) and sorted(conn.channels) == [
        f"c{i}" for i in range(SHRINK)
    ]
    assert not hub.unsubscribe(conn, "c99")
    for i in range(SHRINK - 1):
        hub.unsubscribe(conn, f"c{i}")
    assert conn.channels == f"c{SHRINK - 1}"
    assert hub.unsubscribe(conn, f"c{SHRINK - 1}") and conn.channels == ()
    assert hub.channels == {}


def test_a_connection_in_a_set_of_channels_is_forgotten_from_each() -> None:
    hub: Hub[Member] = Hub()
    a, b = Member(), Member()
    hub.add(a)
    hub.add(b)
    for i in range(SMALL * 3):
        hub.subscribe(a, f"c{i}")
    hub.subscribe(b, "c5")
    lost, gone = hub.remove(a)
    assert sorted(lost) == sorted(f"c{i}" for i in range(SMALL * 3) if i != 5)
    assert gone is None and a.channels == () and hub.channels == {"c5": {b}}


def test_census_counts_a_channels_users_and_anonymous_subscribers() -> None:
    hub: Hub[Member] = Hub()
    members = [Member() for _ in range(4)]
    for m, user in zip(members, ["ann", "ann", "bob", None], strict=True):
        hub.add(m)
        if user is not None:
            hub.set_user(m, user)
        hub.subscribe(m, "room")
    assert hub.census("room") == ({"ann": 2, "bob": 1}, 1)
    assert hub.census("empty") == ({}, 0)

"""The node's view for the API over fake pools: real stats tables, slots without processes,
a fake broker, fake links, and a fake /proc for the workers' memory."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from manydoors.broker.base import Broker, BrokerStats
from manydoors.config import ServiceConfig
from manydoors.node import procfs
from manydoors.node.link import Link
from manydoors.protocol.ipc import Kind
from manydoors.protocol.messages import ERROR_CODES
from manydoors.server import nodestats
from manydoors.server.nodestats import NodeStats
from manydoors.server.pools import Pool, Slot
from manydoors.server.stats import CLOSED, COL, LOST, REFUSED, StatsTable

FD_LIMIT = 20_000


class FakeBroker:
    """What NodeStats asks of the broker: its figures."""

    def __init__(self, stats: Any = None) -> None:
        self.figures = stats or BrokerStats(
            kind="local",
            status="ok",
            channels=3,
            users=2,
            published=17,
            history_channels=1,
            bad_frames=0,
        )

    @property
    def status(self) -> str:
        return self.figures.status if isinstance(self.figures, BrokerStats) else "ok"

    def stats(self) -> Any:
        return self.figures


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class FakeTransport:
    def __init__(self, queued: int) -> None:
        self.queued = queued

    def get_write_buffer_size(self) -> int:
        return self.queued


class FakeLink:
    """A worker link: records the frames sent; answers a SAMPLE through ``answer``."""

    def __init__(self, queued: int | None = None) -> None:
        self.transport = FakeTransport(queued) if queued is not None else None
        self.sent: list[tuple[Kind, str]] = []
        self.answer: Callable[[FakeLink, str], None] | None = None

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None:
        self.sent.append((kind, key))
        if self.answer is not None:
            self.answer(self, key)


@pytest.fixture
def sockets() -> Iterator[Callable[[], socket.socket]]:
    """Sockets for slots (NodeStats never touches them), closed after the test."""
    made: list[socket.socket] = []

    def make() -> socket.socket:
        a, b = socket.socketpair()
        made.extend((a, b))
        return a

    yield make
    for sock in made:
        sock.close()


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """procfs.rss reads a fake /proc under tmp_path: pid N has N pages resident."""
    for pid in (101, 102, 201):
        statm = tmp_path / f"proc/{pid}/statm"
        statm.parent.mkdir(parents=True)
        statm.write_text(f"9000 {pid} 10 1 0 100 0\n")
    monkeypatch.setattr(procfs, "rss", functools.partial(procfs.rss, root=tmp_path))
    return tmp_path


def make_pool(
    make_sock: Callable[[], socket.socket],
    name: str = "chat",
    slots: int = 2,
    port: int = 7000,
    **service: Any,
) -> Pool:
    svc = ServiceConfig(name=name, port=port, **service)
    buffer = (ctypes.c_ubyte * (StatsTable.size(slots) * 8))()
    table = StatsTable(memoryview(buffer), slots)
    return Pool(svc, port, [Slot(i, make_sock()) for i in range(slots)], table, buffer)


def put(pool: Pool, row: int, **counters: int) -> None:
    for name, value in counters.items():
        pool.table.mv[pool.table.index(COL[name], row)] = value


def make_stats(pools: list[Pool], broker: Any = None, stopping: bool = False) -> NodeStats:
    return NodeStats(pools, cast(Broker, broker or FakeBroker()), FD_LIMIT, lambda: stopping)


# --- the stats JSON ------------------------------------------------------------------------


def test_stats_has_every_key_and_every_reason_even_at_zero(sockets: Any) -> None:
    stats = make_stats([make_pool(sockets)]).stats()
    assert set(stats) == {
        "connections",
        "accepted",
        "refused",
        "messages_in",
        "messages_out",
        "dropped",
        "throttled",
        "pings",
        "closed",
        "lost",
        "errors",
        "hooks",
        "broker",
        "uptime_s",
        "services",
    }
    assert stats["hooks"] == {
        h: {"ok": 0, "refused": 0, "unavailable": 0} for h in ("connect", "subscribe", "publish")
    }
    assert stats["refused"] == dict.fromkeys(REFUSED, 0)
    assert stats["closed"] == dict.fromkeys(CLOSED, 0)
    assert stats["lost"] == dict.fromkeys(LOST, 0)
    assert stats["errors"] == dict.fromkeys(ERROR_CODES, 0)
    assert stats["connections"] == stats["accepted"] == 0


def test_stats_sums_every_worker_of_every_pool(sockets: Any) -> None:
    chat = make_pool(sockets, "chat", slots=2, port=7000)
    feed = make_pool(sockets, "feed", slots=1, port=7001)
    put(chat, 0, connections=10, accepted=12, messages_in=5, refused_per_ip=1, closed_slow=1)
    put(chat, 1, connections=7, accepted=9, messages_out=40, lost_reset=2, error_bad_json=3)
    put(feed, 0, connections=3, accepted=3, dropped=6, throttled=1, pings=8, refused_server_full=4)
    stats = make_stats([chat, feed]).stats()
    assert stats["connections"] == 20
    assert stats["accepted"] == 24
    assert (stats["messages_in"], stats["messages_out"]) == (5, 40)
    assert (stats["dropped"], stats["throttled"], stats["pings"]) == (6, 1, 8)
    assert stats["refused"] == {**dict.fromkeys(REFUSED, 0), "per_ip": 1, "server_full": 4}
    assert stats["closed"] == {**dict.fromkeys(CLOSED, 0), "slow": 1}
    assert stats["lost"] == {**dict.fromkeys(LOST, 0), "reset": 2}
    assert stats["errors"] == {**dict.fromkeys(ERROR_CODES, 0), "bad_json": 3}
    by_name = {s["name"]: s for s in stats["services"]}
    assert by_name["chat"]["connections"] == 17
    assert by_name["feed"]["connections"] == 3


def test_stats_keeps_the_counters_of_dead_workers(sockets: Any) -> None:
    pool = make_pool(sockets, slots=2)
    put(pool, 0, connections=4, accepted=4)
    put(pool, 1, connections=1, accepted=2, closed_read_timeout=1)
    # A worker died: its row went to retired (its connections, a gauge, went to 0).
    pool.retired.update(accepted=50, closed_read_timeout=5, lost_timed_out=2, error_forbidden=1)
    pool.retired["connections"] = 0
    stats = make_stats([pool]).stats()
    assert stats["connections"] == 5
    assert stats["accepted"] == 56
    assert stats["closed"]["read_timeout"] == 6
    assert stats["lost"]["timed_out"] == 2
    assert stats["errors"]["forbidden"] == 1
    assert stats["services"][0]["connections"] == 5


def test_stats_retired_counters_count_only_for_their_own_service(sockets: Any) -> None:
    chat = make_pool(sockets, "chat", slots=1, port=7000)
    feed = make_pool(sockets, "feed", slots=1, port=7001)
    chat.retired.update(accepted=9)
    stats = make_stats([chat, feed]).stats()
    assert stats["accepted"] == 9
    assert feed.retired == Counter()  # reading does not write the pools' counters
    assert chat.retired == Counter(accepted=9)


def test_stats_lists_each_service_with_its_address_and_settings(
    sockets: Any, tmp_path: Path
) -> None:
    chat = make_pool(sockets, "chat", slots=1, port=7000, max_connections=5000)
    secure = make_pool(
        sockets,
        "secure",
        slots=1,
        port=7443,
        protocol="websocket",
        tls_cert=str(tmp_path / "c.pem"),
        tls_key=str(tmp_path / "k.pem"),
    )
    services = make_stats([chat, secure]).stats()["services"]
    assert [s["name"] for s in services] == ["chat", "secure"]
    assert {k: v for k, v in services[0].items() if k != "workers"} == {
        "name": "chat",
        "host": "127.0.0.1",
        "port": 7000,
        "protocol": "tcp",
        "tls": False,
        "max_connections": 5000,
        "connections": 0,
    }
    assert (services[1]["protocol"], services[1]["tls"], services[1]["port"]) == (
        "websocket",
        True,
        7443,
    )


def test_stats_port_is_the_pools_bound_port_not_the_configured_one(sockets: Any) -> None:
    pool = make_pool(sockets, slots=1, port=0)  # port 0: the kernel picks
    pool = Pool(pool.service, 43210, pool.slots, pool.table, pool.buffer)
    assert make_stats([pool]).stats()["services"][0]["port"] == 43210


def test_stats_workers_rows_of_live_and_dead_workers(sockets: Any, fake_proc: Path) -> None:
    pool = make_pool(sockets, slots=3)
    pool.slots[0].process = cast(Any, FakeProcess(101))
    pool.slots[0].base_fds = 12
    pool.slots[0].restarts = 2
    pool.slots[1].process = cast(Any, FakeProcess(102))
    pool.slots[1].base_fds = 10
    # slot 2: its worker died and was not restarted yet.
    put(pool, 0, connections=100, loop_lag_max_ms=7, sync_wait_max_ms=3)
    put(pool, 1, connections=5)
    workers = make_stats([pool]).stats()["services"][0]["workers"]
    assert workers == [
        {
            "slot": 0,
            "pid": 101,
            "connections": 100,
            "fds": 112,
            "fd_limit": FD_LIMIT,
            "rss_bytes": 101 * procfs.PAGE,
            "restarts": 2,
            "loop_lag_max_ms": 7,
            "sync_wait_max_ms": 3,
        },
        {
            "slot": 1,
            "pid": 102,
            "connections": 5,
            "fds": 15,
            "fd_limit": FD_LIMIT,
            "rss_bytes": 102 * procfs.PAGE,
            "restarts": 0,
            "loop_lag_max_ms": 0,
            "sync_wait_max_ms": 0,
        },
        {
            "slot": 2,
            "pid": None,
            "connections": 0,
            "fds": None,
            "fd_limit": FD_LIMIT,
            "rss_bytes": None,
            "restarts": 0,
            "loop_lag_max_ms": 0,
            "sync_wait_max_ms": 0,
        },
    ]


def test_stats_rss_of_a_worker_gone_from_proc_is_none(sockets: Any, fake_proc: Path) -> None:
    pool = make_pool(sockets, slots=1)
    pool.slots[0].process = cast(Any, FakeProcess(999))  # exited since the last look
    (worker,) = make_stats([pool]).stats()["services"][0]["workers"]
    assert worker["pid"] == 999
    assert worker["rss_bytes"] is None


def test_stats_broker_figures_are_plain_json_from_a_struct_or_a_dict(sockets: Any) -> None:
    broker = FakeBroker()
    stats = make_stats([make_pool(sockets)], broker).stats()
    assert stats["broker"] == {
        "kind": "local",
        "status": "ok",
        "channels": 3,
        "users": 2,
        "published": 17,
        "history_channels": 1,
        "bad_frames": 0,
    }
    as_dict = make_stats([make_pool(sockets)], FakeBroker({"kind": "x", "n": 1})).stats()
    assert as_dict["broker"] == {"kind": "x", "n": 1}


def test_stats_is_json(sockets: Any, fake_proc: Path) -> None:
    pool = make_pool(sockets, slots=2)
    pool.slots[0].process = cast(Any, FakeProcess(101))
    put(pool, 0, connections=1, error_too_long=1)
    stats = make_stats([pool]).stats()
    assert json.loads(json.dumps(stats)) == stats


def test_stats_uptime_counts_from_the_start(sockets: Any) -> None:
    view = make_stats([make_pool(sockets)])
    view.started = time.time() - 100
    assert 100 <= view.stats()["uptime_s"] < 200


def test_pools_bound_after_the_view_was_made_show_up(sockets: Any) -> None:
    pools: list[Pool] = []
    view = make_stats(pools)
    assert view.stats()["services"] == []
    assert view.workers() == (0, 0)
    pools.append(make_pool(sockets, "late", slots=2))
    assert [s["name"] for s in view.stats()["services"]] == ["late"]
    assert view.services() == {"late"}
    assert view.workers() == (0, 2)


# --- health and queues -----------------------------------------------------------------------


def test_workers_counts_alive_and_expected_over_every_pool(sockets: Any) -> None:
    chat = make_pool(sockets, "chat", slots=3, port=7000)
    feed = make_pool(sockets, "feed", slots=2, port=7001)
    chat.slots[0].process = cast(Any, FakeProcess(1))
    chat.slots[2].process = cast(Any, FakeProcess(2))
    feed.slots[1].process = cast(Any, FakeProcess(3))
    assert make_stats([chat, feed]).workers() == (3, 5)


def test_services_are_the_pools_names(sockets: Any) -> None:
    pools = [make_pool(sockets, "chat", port=7000), make_pool(sockets, "feed", port=7001)]
    assert make_stats(pools).services() == {"chat", "feed"}


def test_stopping_asks_the_supervisor_each_time(sockets: Any) -> None:
    state = {"stopping": False}
    view = NodeStats([], cast(Broker, FakeBroker()), FD_LIMIT, lambda: state["stopping"])
    assert view.stopping is False
    state["stopping"] = True
    assert view.stopping is True


def test_queued_to_workers_sums_the_links_write_buffers(sockets: Any) -> None:
    chat = make_pool(sockets, "chat", slots=3, port=7000)
    feed = make_pool(sockets, "feed", slots=1, port=7001)
    chat.slots[0].link = cast(Link, FakeLink(queued=100))
    chat.slots[1].link = cast(Link, FakeLink(queued=None))  # closed: no transport
    # chat.slots[2]: no link (its worker is starting)
    feed.slots[0].link = cast(Link, FakeLink(queued=2500))
    assert make_stats([chat, feed]).queued_to_workers() == 2600


def test_queued_to_workers_is_zero_without_links(sockets: Any) -> None:
    assert make_stats([make_pool(sockets)]).queued_to_workers() == 0


# --- a sample of connections -----------------------------------------------------------------


def rows(who: str, n: int) -> bytes:
    return json.dumps([{"id": f"{who}-{i}"} for i in range(n)]).encode()


def answering(view: NodeStats, who: str, later: bool = True) -> FakeLink:
    """A link whose worker answers a SAMPLE with as many connections as asked."""
    link = FakeLink(queued=0)

    def answer(link: FakeLink, key: str) -> None:
        payload = rows(who, int(key))
        if later:
            asyncio.get_running_loop().call_soon(view.sampled, cast(Link, link), payload)
        else:
            view.sampled(cast(Link, link), payload)

    link.answer = answer
    return link


def test_connections_asks_every_worker_for_its_share_and_caps_at_limit(sockets: Any) -> None:
    pool = make_pool(sockets, slots=3)
    view = make_stats([pool])
    links = [answering(view, f"w{i}") for i in range(3)]
    for slot, link in zip(pool.slots, links, strict=True):
        slot.link = cast(Link, link)

    got = asyncio.run(view.connections(None, 7))
    assert [link.sent for link in links] == [[(Kind.SAMPLE, "3")]] * 3  # ceil(7 / 3)
    assert len(got) == 7
    assert {row["id"].split("-")[0] for row in got} == {"w0", "w1", "w2"}
    assert view.samples == {}


def test_connections_asks_at_least_one_of_each_worker(sockets: Any) -> None:
    pool = make_pool(sockets, slots=2)
    view = make_stats([pool])
    for slot in pool.slots:
        slot.link = cast(Link, answering(view, f"w{slot.index}"))
    got = asyncio.run(view.connections(None, 1))
    assert [cast(FakeLink, s.link).sent for s in pool.slots] == [[(Kind.SAMPLE, "1")]] * 2
    assert len(got) == 1


def test_connections_of_one_service_asks_only_its_workers(sockets: Any) -> None:
    chat = make_pool(sockets, "chat", slots=1, port=7000)
    feed = make_pool(sockets, "feed", slots=1, port=7001)
    view = make_stats([chat, feed])
    chat.slots[0].link = cast(Link, answering(view, "chat"))
    feed.slots[0].link = cast(Link, answering(view, "feed"))
    got = asyncio.run(view.connections("feed", 10))
    assert cast(FakeLink, chat.slots[0].link).sent == []
    assert [row["id"] for row in got] == [f"feed-{i}" for i in range(10)]


def test_connections_without_workers_or_with_a_limit_below_one_is_empty(sockets: Any) -> None:
    pool = make_pool(sockets, slots=1)
    view = make_stats([pool])
    assert asyncio.run(view.connections(None, 10)) == []  # no link yet
    pool.slots[0].link = cast(Link, answering(view, "w"))
    assert asyncio.run(view.connections("other", 10)) == []
    assert asyncio.run(view.connections(None, 0)) == []
    assert cast(FakeLink, pool.slots[0].link).sent == []


def test_connections_answers_without_a_busy_worker_and_forgets_its_question(
    sockets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodestats, "SAMPLE_TIMEOUT", 0.0)
    pool = make_pool(sockets, slots=2)
    view = make_stats([pool])
    quick = answering(view, "quick", later=False)
    busy = FakeLink(queued=0)  # never answers
    pool.slots[0].link, pool.slots[1].link = cast(Link, quick), cast(Link, busy)

    got = asyncio.run(view.connections(None, 4))
    assert [row["id"] for row in got] == ["quick-0", "quick-1"]
    assert busy.sent == [(Kind.SAMPLE, "2")]
    assert view.samples == {}  # the next request asks the busy worker again


def test_connections_skips_a_worker_whose_last_question_is_still_out(sockets: Any) -> None:
    pool = make_pool(sockets, slots=2)
    view = make_stats([pool])
    slow = FakeLink(queued=0)
    quick = answering(view, "quick")
    pool.slots[0].link, pool.slots[1].link = cast(Link, slow), cast(Link, quick)

    async def main() -> list[dict[str, Any]]:
        out_there: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        view.samples[cast(Link, slow)] = out_there
        got = await view.connections(None, 4)
        assert view.samples == {cast(Link, slow): out_there}  # still waiting for it
        return got

    got = asyncio.run(main())
    assert slow.sent == []
    assert [row["id"] for row in got] == ["quick-0", "quick-1"]


def test_connections_when_every_worker_is_still_busy_is_empty(sockets: Any) -> None:
    pool = make_pool(sockets, slots=1)
    view = make_stats([pool])
    link = FakeLink(queued=0)
    pool.slots[0].link = cast(Link, link)

    async def main() -> list[dict[str, Any]]:
        view.samples[cast(Link, link)] = asyncio.get_running_loop().create_future()
        return await view.connections(None, 4)

    assert asyncio.run(main()) == []
    assert link.sent == []


def test_sampled_ignores_an_answer_nobody_asked_for_or_already_given(sockets: Any) -> None:
    view = make_stats([])
    link = cast(Link, FakeLink())
    view.sampled(link, b"[]")  # not asked: nothing happens
    assert view.samples == {}

    async def main() -> None:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiter.cancel()  # the request gave up
        view.samples[link] = waiter
        view.sampled(link, b"[]")
        assert waiter.cancelled()
        assert view.samples == {}

    asyncio.run(main())

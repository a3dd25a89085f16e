"""A Redis node cut off from Redis: unsequenced deliveries, and the holes taken after.

No Redis here: the backplane is fed its topics' payloads by hand, and a fake client
records the hole scripts (tests/live/test_redis_outage.py runs it against redis-server).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from msgspec import Raw

from manydoors.broker.base import HistoryPage, Published
from manydoors.broker.catchup import ChannelState, stored
from manydoors.broker.keys import HOLE, SEQ_TTL, channel_topic
from manydoors.broker.outbox import Outgoing
from manydoors.protocol.ipc import EXCLUDE, Kind
from manydoors.protocol.messages import broadcast_line, dm_line, msg_line
from unit.test_broker_api import CONN, kinds, redis_node
from unit.test_router import run


def seqs(frames: list[tuple[int, str, bytes]]) -> list[int]:
    return [msgspec.json.decode(payload)["seq"] for _, _, payload in frames]


def test_while_redis_is_away_a_publish_is_delivered_unsequenced_and_remembered() -> None:
    asyncio.run(unsequenced())


async def unsequenced() -> None:
    backplane, router, (a,) = redis_node("a")
    router.channels["veg"] = {a}
    router.users["ann"] = a
    backplane.state["veg"] = ChannelState(last=7, ready=True)  # seq 7 names a message
    assert backplane.degraded
    fut: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
    batch: list[Outgoing] = [
        ("c", "veg", msg_line("veg", 0, None, Raw(b"1")), None),
        ("c", "veg", msg_line("veg", 0, None, Raw(b"2")), fut),
        ("b", "", broadcast_line(0, None, Raw(b"3")), None),
        ("u", "ann", dm_line(None, Raw(b"4")), None),
    ]
    backplane.deliver_locally(batch)
    got = kinds(a)
    assert [kind for kind, _, _ in got] == [
        Kind.DELIVER_CHANNEL,
        Kind.DELIVER_CHANNEL,
        Kind.DELIVER_ALL,
        Kind.DELIVER_USER,
    ]
    assert seqs(got[:3]) == [0, 0, 0]  # never 7 again, never 8: nobody numbered them
    assert fut.result() == Published(degraded=True, workers=1)
    assert backplane.state["veg"].last == 7 and not backplane.history.entries("veg", 0.0)
    assert backplane.outage.channels == {"veg"} and backplane.outage.broadcast
    assert router.stats().delivered_locally_while_degraded == 4


def test_an_excluding_publish_while_redis_is_away_is_unsequenced_too() -> None:
    backplane, router, (a,) = redis_node("a")
    router.channels["veg"] = {a}
    backplane.state["veg"] = ChannelState(last=7, ready=True)
    answer = run(backplane.publish_channel("veg", None, Raw(b"1"), CONN))
    assert answer == Published(degraded=True, workers=1)
    [(kind, _, payload)] = kinds(a)
    assert kind == Kind.DELIVER_CHANNEL_EXCEPT
    assert msgspec.json.decode(payload[EXCLUDE.size :])["seq"] == 0
    assert backplane.outage.channels == {"veg"}


def test_a_hole_moves_the_channel_past_its_seq_and_delivers_nothing() -> None:
    async def main() -> None:
        backplane, router, (a,) = redis_node("a")
        router.channels["veg"] = {a}
        st = backplane.state["veg"] = ChannelState(last=7, ready=True)
        waiting = asyncio.get_running_loop().create_future()
        st.waiters.append((8, waiting))  # a recovery waits for live delivery to reach 8
        backplane._on_message(b"md:c{veg}", b"h8 ")
        assert st.last == 8 and waiting.done() and not st.waiters
        # Subscribing again (not ready): buffered in order with the messages.
        st.ready = False
        line = b'{"ev":"msg","channel":"veg","seq":10,"from":null,"data":1}\n'
        backplane._on_message(b"md:c{veg}", b"h9 ")
        backplane._on_message(b"md:c{veg}", b"m10 " + line)
        st.ready = True
        backplane._flush_channel("veg", st)
        assert kinds(a) == [(Kind.DELIVER_CHANNEL, "veg", line)]
        assert st.last == 10 and list(backplane.history.entries("veg", 0.0)) == [(10, line)]
        backplane._on_message(b"md:c{veg}", b"h5 ")  # an old one changes nothing
        assert st.last == 10

    asyncio.run(main())


def test_a_hole_in_a_redis_history_list_is_in_no_read() -> None:
    line = b'{"ev":"msg","channel":"veg","seq":%d,"from":null,"data":1}\n'

    class FakeRedis:
        async def eval(self, *args: Any) -> list[Any]:
            return [b"9", [line % 6, line % 7, HOLE, line % 9]]

    seq, entries = run(stored(FakeRedis(), "veg"))
    assert (seq, entries) == (9, [(6, line % 6), (7, line % 7), (9, line % 9)])
    assert HistoryPage.of("veg", seq, entries, 7, 10).recovered is False  # across the hole
    assert HistoryPage.of("veg", seq, entries, 5, 10).recovered is False
    assert HistoryPage.of("veg", seq, entries, 8, 10).recovered is True  # after it


class FakePipeline:
    def __init__(self, owner: FakeCluster) -> None:
        self.owner = owner
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    async def execute(self) -> list[int]:
        if self.owner.fail:
            self.owner.fail -= 1
            raise ConnectionError("Redis went away again")
        self.owner.sent += self.commands
        return list(range(len(self.commands)))


class FakeCluster:
    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.sent: list[tuple[Any, ...]] = []

    def pipeline(self, transaction: bool) -> FakePipeline:
        return FakePipeline(self)


def test_a_hole_is_taken_in_each_channel_delivered_unsequenced_and_kept_while_redis_fails():
    backplane, _, _ = redis_node("a")
    backplane.redis = FakeCluster(fail=1)
    outage = backplane.outage
    outage.channels |= {"veg", "fr{uit}"}
    outage.broadcast = True
    with pytest.raises(ConnectionError):
        run(outage.take_holes())
    assert outage.pending and outage.channels == {"veg", "fr{uit}"} and outage.broadcast
    run(outage.take_holes())
    assert not outage.pending and outage.holes == 3
    size, ttl = backplane.history.size, int(backplane.history.ttl)
    fruit = channel_topic("fr{uit}").encode()  # hex-encoded in its tag
    sent = backplane.redis.sent
    assert [args[3:] for args in sent] == [
        (fruit + b":s", fruit + b":h", fruit, size, ttl, SEQ_TTL),
        (b"md:c{veg}:s", b"md:c{veg}:h", b"md:c{veg}", size, ttl, SEQ_TTL),
        (b"md:b{all}:s", b"md:b{all}:h", b"md:b{all}", 0, ttl, SEQ_TTL),
    ]
    assert all(args[0] == "EVAL" and args[2] == 2 and "'publish'" in args[1] for args in sent)

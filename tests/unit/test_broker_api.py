"""The server API's side of the broker, with fake worker links (no processes, no Redis):
commands, history pages, channel lists, multi-channel publishes and exclusions, and the
Redis backplane's reading of what comes on its topics."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest
from msgspec import Raw

from manydoors.broker import router as router_module
from manydoors.broker.base import ChannelList, HistoryPage, Published
from manydoors.broker.catchup import ChannelState
from manydoors.broker.redis import RedisBackplane
from manydoors.broker.router import Answers, Router
from manydoors.protocol.ipc import EXCLUDE, TOKEN, Kind, exclude_head
from unit.test_router import FakeLink, node, run, tell

CONN = "4321-987654321"
HEAD = EXCLUDE.pack(4321, 987654321)


def kinds(link: FakeLink) -> list[tuple[int, str, bytes]]:
    return link.decoded()


def page_json(page: HistoryPage) -> dict[str, Any]:
    return dict(msgspec.json.decode(msgspec.json.encode(page)))


# --- commands go to the links holding the user -------------------------------------------


def test_a_disconnect_goes_to_the_links_holding_the_user_only() -> None:
    router, (a, b, c) = node("a", "b", "c")
    tell(router, a, Kind.USER_ON, "ann")
    tell(router, b, Kind.USER_ON, "ann")
    tell(router, c, Kind.USER_ON, "bob")
    assert run(router.disconnect("ann", "banned")) == Published(workers=2)
    for link in (a, b):
        assert kinds(link) == [(Kind.DISCONNECT, "ann", b"banned")]
    assert c.frames == []
    assert run(router.disconnect("nobody", "x")) == Published(workers=0)


def test_an_unsubscribe_carries_the_channel_to_the_links_holding_the_user() -> None:
    router, (a, b) = node("a", "b")
    tell(router, b, Kind.USER_ON, "ann")
    assert run(router.unsubscribe("ann", "veg")) == Published(workers=1)
    assert a.frames == [] and kinds(b) == [(Kind.UNSUBSCRIBE, "ann", b"veg")]
    assert msgspec.to_builtins(Published(workers=1)) == {"workers": 1}


# --- publishing to several channels, leaving one connection out --------------------------


def test_a_publish_to_several_channels_numbers_each_and_answers_in_order() -> None:
    router, (a, b) = node("a", "b")
    tell(router, a, Kind.SUB, "veg")
    tell(router, b, Kind.SUB, "fruit")
    run(router.publish_channel("fruit", None, Raw(b"0")))
    done = run(router.publish_channels(["veg", "fruit", "none"], "ops", Raw(b'"x"')))
    assert done == [
        Published(seq=1, workers=1),
        Published(seq=2, workers=1),
        Published(seq=1, workers=0),
    ]
    assert router.published == 4
    assert [(k, key) for k, key, _ in kinds(a)] == [(Kind.DELIVER_CHANNEL, "veg")]


def test_an_excluding_publish_sends_one_frame_with_the_id_to_every_link() -> None:
    router, (a, b, c) = node("a", "b", "c")
    for link in (a, b):
        tell(router, link, Kind.SUB, "veg")
    assert run(router.publish_channel("veg", None, Raw(b"1"), CONN)) == Published(seq=1, workers=2)
    assert c.frames == [] and a.frames[0] is b.frames[0]
    [(kind, key, payload)] = kinds(a)
    assert (kind, key, payload[: EXCLUDE.size]) == (Kind.DELIVER_CHANNEL_EXCEPT, "veg", HEAD)
    line = payload[EXCLUDE.size :]
    assert msgspec.json.decode(line)["seq"] == 1
    # The history keeps the plain line: a recovering client gets it, whoever it is.
    page = run(router.read_history("veg", 0, 10))
    assert page.messages == [Raw(line.rstrip(b"\n"))]


def test_user_and_broadcast_exclusions_use_their_own_frames() -> None:
    router, (a,) = node("a")
    tell(router, a, Kind.USER_ON, "ann")
    run(router.publish_user("ann", None, Raw(b"1"), CONN))
    run(router.broadcast(None, Raw(b"2"), CONN))
    got = [(kind, key, payload[: EXCLUDE.size]) for kind, key, payload in kinds(a)]
    assert got == [(Kind.DELIVER_USER_EXCEPT, "ann", HEAD), (Kind.DELIVER_ALL_EXCEPT, "", HEAD)]


def test_an_id_that_is_no_connection_id_leaves_nobody_out() -> None:
    router, (a,) = node("a")
    tell(router, a, Kind.SUB, "veg")
    run(router.publish_channel("veg", None, Raw(b"1"), "not-an-id"))
    assert [k for k, _, _ in kinds(a)] == [Kind.DELIVER_CHANNEL]


# --- history -----------------------------------------------------------------------------


def published(router: Router, channel: str, count: int) -> None:
    for i in range(count):
        run(router.publish_channel(channel, None, Raw(str(i).encode())))


def seqs(page: HistoryPage) -> list[int]:
    return [msgspec.json.decode(m)["seq"] for m in page.messages]


def test_history_without_since_is_the_last_messages_oldest_first() -> None:
    router, _ = node("a", history=5)
    published(router, "veg", 8)
    page = run(router.read_history("veg", None, 3))
    assert (page.seq, seqs(page), page.more, page.recovered) == (8, [6, 7, 8], True, None)
    answer = page_json(page)
    assert list(answer) == ["channel", "seq", "more", "messages"]
    assert answer["messages"][0] == {
        "ev": "msg",
        "channel": "veg",
        "seq": 6,
        "from": None,
        "data": 5,
    }
    assert seqs(run(router.read_history("veg", None, 100))) == [4, 5, 6, 7, 8]


def test_history_since_pages_forward_and_says_when_it_covers_the_gap() -> None:
    router, _ = node("a", history=5)
    published(router, "veg", 8)
    first = run(router.read_history("veg", 4, 2))
    assert (seqs(first), first.more, first.recovered) == ([5, 6], True, True)
    rest = run(router.read_history("veg", 6, 2))
    assert (seqs(rest), rest.more, rest.recovered) == ([7, 8], False, True)
    assert page_json(rest)["recovered"] is True
    gone = run(router.read_history("veg", 1, 10))  # 2 and 3 left the history
    assert (seqs(gone), gone.recovered) == ([4, 5, 6, 7, 8], False)
    ahead = run(router.read_history("veg", 9, 10))  # the counter was reset
    assert (ahead.messages, ahead.recovered) == ([], False)
    caught_up = run(router.read_history("veg", 8, 10))
    assert (caught_up.messages, caught_up.recovered, caught_up.more) == ([], True, False)
    never = run(router.read_history("none", 0, 10))
    assert (never.seq, never.messages, never.recovered) == (0, [], True)


# --- channel lists -----------------------------------------------------------------------


def test_a_channel_list_asks_each_link_only_for_its_own_channels_and_adds_up() -> None:
    async def main() -> ChannelList:
        router, (a, b, c) = node("a", "b", "c")
        for link, channels in ((a, ["veg", "fruit"]), (b, ["veg", "news:a"]), (c, ["zoo"])):
            for channel in channels:
                tell(router, link, Kind.SUB, channel)
        asking = asyncio.create_task(router.list_channels("", 3))
        await asyncio.sleep(0)
        assert c.frames == []  # "zoo" is not among the first three
        for link, counts in ((a, b'{"veg":2,"fruit":1}'), (b, b'{"veg":1,"news:a":4}')):
            [(kind, _, payload)] = link.decoded()
            assert kind == Kind.CHANNELS_ASK
            names = msgspec.json.decode(payload[TOKEN.size :])
            assert names == sorted(names) and "zoo" not in names
            tell(router, link, Kind.CHANNELS_PART, "", payload[: TOKEN.size] + counts)
        return await asking

    result = run(main())
    assert result == ChannelList({"fruit": 1, "news:a": 4, "veg": 3}, truncated=True)
    assert list(result.channels) == ["fruit", "news:a", "veg"]


def test_a_channel_list_by_prefix_and_a_worker_that_does_not_answer(monkeypatch) -> None:
    monkeypatch.setattr(router_module, "PRESENCE_TIMEOUT", 0.05)

    async def main() -> ChannelList:
        router, (a, b) = node("a", "b")
        tell(router, a, Kind.SUB, "news:a")
        tell(router, b, Kind.SUB, "news:b")
        tell(router, b, Kind.SUB, "veg")
        asking = asyncio.create_task(router.list_channels("news:", 10))
        await asyncio.sleep(0)
        [(_, _, payload)] = a.decoded()
        tell(router, a, Kind.CHANNELS_PART, "", payload[: TOKEN.size] + b'{"news:a":1}')
        return await asking  # b never answers

    assert run(main()) == ChannelList({"news:a": 1}, partial=True)
    assert run(node("a")[0].list_channels("", 10)) == ChannelList({})  # nobody to ask


@pytest.mark.parametrize("seed", range(5))
def test_parts_each_cut_to_the_limit_add_up_to_the_exact_first_channels(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"c{i:03}" for i in range(60)]
    parts = [{n: rng.randint(1, 3) for n in rng.sample(names, 25)} for _ in range(4)]
    whole: dict[str, int] = {}
    for part in parts:
        for name, n in part.items():
            whole[name] = whole.get(name, 0) + n
    for limit in (1, 10, 40, 100):
        merged = ChannelList({})
        for part in parts:
            cut = ChannelList(dict(part))
            cut.cap(limit)  # what a node sends: its own first ``limit``, and if it had more
            merged.merge(cut)
        merged.cap(limit)
        first = sorted(whole)[:limit]
        assert merged.channels == {name: whole[name] for name in first}
        assert merged.truncated == (len(whole) > limit)


def test_answers_gather_any_mergeable_result() -> None:
    async def main() -> ChannelList:
        answers = Answers(ChannelList({}), 2)
        answers.add(ChannelList({"a": 1}))
        answers.add(ChannelList({"a": 2, "b": 1}, truncated=True))
        return await answers.wait(1.0)

    assert run(main()) == ChannelList({"a": 3, "b": 1}, truncated=True)


# --- the Redis backplane reads what comes on its topics (no Redis needed) ---------------


def redis_node(*names: str) -> tuple[RedisBackplane, Router, list[FakeLink]]:
    backplane = RedisBackplane("redis://127.0.0.1:1")
    router = Router(backplane)
    links = [FakeLink(n) for n in names]
    for link in links:
        router.attach(link)
    return backplane, router, links


def test_redis_payloads_on_a_users_topic_are_dms_exclusions_and_commands() -> None:
    backplane, router, (a,) = redis_node("a")
    router.users["ann"] = a  # as USER_ON would, without subscribing anything
    dm = b'{"ev":"dm","from":null,"data":1}\n'
    backplane._on_message(b"md:u{ann}", dm)
    backplane._on_message(b"md:u{ann}", b"x" + CONN.encode() + b" " + dm)
    backplane._on_message(b"md:u{ann}", b"dbanned")
    backplane._on_message(b"md:u{ann}", b"uveg")
    assert kinds(a) == [
        (Kind.DELIVER_USER, "ann", dm),
        (Kind.DELIVER_USER_EXCEPT, "ann", HEAD + dm),
        (Kind.DISCONNECT, "ann", b"banned"),
        (Kind.UNSUBSCRIBE, "ann", b"veg"),
    ]


def test_redis_channel_and_broadcast_exclusions_keep_the_plain_line_in_history() -> None:
    backplane, router, (a,) = redis_node("a")
    router.channels["veg"] = {a}
    backplane.state["veg"] = ChannelState(last=4, ready=True)
    line = b'{"ev":"msg","channel":"veg","seq":5,"from":null,"data":1}\n'
    backplane._on_message(b"md:c{veg}", b"x" + CONN.encode() + b" m5 " + line)
    backplane.state["veg"].ready = False  # subscribing again: buffered, then forwarded
    later = line.replace(b'"seq":5', b'"seq":6')
    backplane._on_message(b"md:c{veg}", b"x" + CONN.encode() + b" m6 " + later)
    assert len(a.frames) == 1
    backplane._flush_channel("veg", backplane.state["veg"])
    bline = b'{"ev":"broadcast","seq":3,"from":null,"data":2}\n'
    backplane._on_message(b"md:b{all}", b"x" + CONN.encode() + b" b3 " + bline)
    assert kinds(a) == [
        (Kind.DELIVER_CHANNEL_EXCEPT, "veg", HEAD + line),
        (Kind.DELIVER_CHANNEL_EXCEPT, "veg", HEAD + later),
        (Kind.DELIVER_ALL_EXCEPT, "", HEAD + bline),
    ]
    assert list(backplane.history.entries("veg", 0.0)) == [(5, line), (6, later)]


def test_a_redis_node_answers_a_channel_question_on_the_askers_topic() -> None:
    async def main() -> tuple[list[Any], FakeLink]:
        backplane, router, (a,) = redis_node("a")
        sent: list[Any] = []

        class FakeRedis:
            async def publish(self, topic: str, payload: bytes) -> int:
                sent.append((topic, payload))
                return 1

        backplane.redis = FakeRedis()
        tell(router, a, Kind.SUB, "veg sprouts")
        a.frames.clear()
        backplane._on_message(b"md:b{all}", b"lasker 7 10 veg s")  # a prefix with a space
        while not a.frames:
            await asyncio.sleep(0)
        [(_, _, payload)] = a.decoded()
        tell(router, a, Kind.CHANNELS_PART, "", payload[: TOKEN.size] + b'{"veg sprouts":2}')
        while not sent:
            await asyncio.sleep(0)
        return sent, a

    sent, _ = run(main())
    [(topic, payload)] = sent
    assert topic == "md:n{asker}"
    assert payload.startswith(b"k7 ")
    assert msgspec.json.decode(payload[3:]) == {
        "channels": {"veg sprouts": 2},
        "truncated": False,
        "partial": False,
    }


def test_exclude_heads_come_from_the_welcomes_id_form() -> None:
    assert exclude_head(CONN) == HEAD


def test_publishes_redis_took_whose_push_never_came_are_delivered_when_it_goes_away() -> None:
    backplane, router, (a,) = redis_node("a")
    router.channels["veg"] = {a}
    backplane.state["veg"] = ChannelState(last=52, ready=True)
    zero = b'{"ev":"msg","channel":"veg","seq":0,"from":null,"data":%d}\n'
    # Redis answered seqs 52 and 53; the push of 52 came back, 53's died with Redis.
    backplane.outbox.recent.extend([("veg", 52, zero % 52), ("veg", 53, zero % 53)])
    backplane.deliver_unseen()
    line = b'{"ev":"msg","channel":"veg","seq":53,"from":null,"data":53}\n'
    assert kinds(a) == [(Kind.DELIVER_CHANNEL, "veg", line)]
    assert backplane.state["veg"].last == 53 and not backplane.outbox.recent

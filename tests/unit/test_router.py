"""The node's router over the local backplane, with fake worker links (no processes)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from msgspec import Raw

from manydoors.broker.backplane import LocalBackplane
from manydoors.broker.base import BrokerStats, PresenceResult, Published, RedisStats
from manydoors.broker.router import Router
from manydoors.protocol.ipc import JOIN_HEAD, RECOVER_HEAD, RECOVERED_HEAD, TOKEN, IpcParser, Kind
from manydoors.protocol.ipc import encode_frame as frame


class FakeLink:
    """A worker's link as the router uses it: it records every frame queued to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[bytes] = []

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None:
        self.frames.append(frame(kind, key, payload))

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def decoded(self) -> list[tuple[int, str, bytes]]:
        return IpcParser().feed(b"".join(self.frames))

    def __repr__(self) -> str:
        return f"FakeLink({self.name})"


def node(*names: str, history: int = 100) -> tuple[Router, list[FakeLink]]:
    router = Router(LocalBackplane(history, 300.0))
    links = [FakeLink(n) for n in names]
    for link in links:
        router.attach(link)
    return router, links


def tell(router: Router, link: FakeLink, kind: Kind, key: str, payload: bytes = b"") -> None:
    router.on_frame(link, kind, key, payload)


def envelope(sender: str | None, data: Any) -> bytes:
    return msgspec.json.encode([sender, data])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def as_json(result: msgspec.Struct) -> dict[str, Any]:
    return msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(result)))


# --- routing ---------------------------------------------------------------------------


def test_a_channel_publish_reaches_only_the_links_holding_the_channel() -> None:
    router, (a, b, c) = node("a", "b", "c")
    tell(router, a, Kind.SUB, "news")
    tell(router, c, Kind.SUB, "news")
    tell(router, b, Kind.SUB, "sport")
    done = run(router.publish_channel("news", "ops", Raw(b'"hi"')))
    assert done == Published(seq=1, workers=2)
    assert b.frames == []
    [(kind, key, line)] = a.decoded()
    assert (kind, key) == (Kind.DELIVER_CHANNEL, "news")
    assert line == b'{"ev":"msg","channel":"news","seq":1,"from":"ops","data":"hi"}\n'


def test_a_fan_out_is_encoded_once_and_the_same_bytes_go_to_every_link() -> None:
    router, links = node("a", "b", "c")
    for link in links:
        tell(router, link, Kind.SUB, "news")
        tell(router, link, Kind.USER_ON, "ann")
    run(router.publish_channel("news", None, Raw(b"1")))
    run(router.publish_user("ann", None, Raw(b"2")))
    run(router.broadcast(None, Raw(b"3")))
    for i in range(3):
        first = links[0].frames[i]
        assert all(link.frames[i] is first for link in links)


def test_a_user_message_reaches_only_the_links_holding_the_user() -> None:
    router, (a, b) = node("a", "b")
    tell(router, b, Kind.USER_ON, "ann")
    assert run(router.publish_user("ann", None, Raw(b"1"))) == Published(workers=1)
    assert a.frames == []
    assert [(k, key) for k, key, _ in b.decoded()] == [(Kind.DELIVER_USER, "ann")]
    assert run(router.publish_user("bob", None, Raw(b"1"))) == Published(workers=0)


def test_a_user_on_one_link_is_stored_as_that_link_not_a_set_of_one() -> None:
    router, (a, b) = node("a", "b")
    tell(router, a, Kind.USER_ON, "ann")
    assert router.users["ann"] is a
    tell(router, a, Kind.USER_ON, "ann")  # the same link again changes nothing
    assert router.users["ann"] is a
    tell(router, b, Kind.USER_ON, "ann")
    assert router.users["ann"] == {a, b}
    assert run(router.publish_user("ann", None, Raw(b"1"))) == Published(workers=2)
    tell(router, a, Kind.USER_OFF, "ann")
    assert router.users["ann"] is b
    tell(router, b, Kind.USER_OFF, "ann")
    assert "ann" not in router.users


def test_a_broadcast_reaches_every_link_and_numbers_broadcasts() -> None:
    router, links = node("a", "b", "c")
    assert run(router.broadcast(None, Raw(b"1"))) == Published(seq=1, workers=3)
    assert run(router.broadcast(None, Raw(b"2"))) == Published(seq=2, workers=3)
    assert all(len(link.frames) == 2 for link in links)
    [(kind, key, line), _] = links[0].decoded()
    assert (kind, key) == (Kind.DELIVER_ALL, "")
    assert msgspec.json.decode(line)["seq"] == 1


def test_unsubscribing_the_last_link_drops_the_channel() -> None:
    router, (a, b) = node("a", "b")
    tell(router, a, Kind.SUB, "news")
    tell(router, b, Kind.SUB, "news")
    tell(router, a, Kind.UNSUB, "news")
    assert router.channels == {"news": {b}}
    tell(router, b, Kind.UNSUB, "news")
    tell(router, b, Kind.UNSUB, "news")  # twice is harmless
    assert router.channels == {}


def test_detach_forgets_everything_the_link_held() -> None:
    router, (a, b) = node("a", "b")
    for link in (a, b):
        tell(router, link, Kind.SUB, "news")
        tell(router, link, Kind.USER_ON, "ann")
    tell(router, a, Kind.SUB, "only-a")
    tell(router, a, Kind.USER_ON, "only-a")
    router.detach(a)
    assert router.links == {b}
    assert router.channels == {"news": {b}}
    assert router.users == {"ann": b}
    run(router.publish_channel("news", None, Raw(b"1")))
    run(router.broadcast(None, Raw(b"1")))
    assert a.frames == []
    assert len(b.frames) == 2


# --- frames from workers ---------------------------------------------------------------


def test_a_workers_publish_is_numbered_delivered_and_kept_in_history() -> None:
    router, (a, b) = node("a", "b")
    tell(router, b, Kind.SUB, "news")
    tell(router, a, Kind.PUB, "news", envelope("ann", {"x": 1}))
    tell(router, a, Kind.PUB, "news", envelope("ann", {"x": 2}))
    lines = [msgspec.json.decode(line) for _, _, line in b.decoded()]
    assert [(m["seq"], m["from"], m["data"]) for m in lines] == [
        (1, "ann", {"x": 1}),
        (2, "ann", {"x": 2}),
    ]
    assert router.published == 2
    assert router.stats().history_channels == 1


def test_a_workers_send_reaches_the_users_links() -> None:
    router, (a, b) = node("a", "b")
    tell(router, b, Kind.USER_ON, "bob")
    tell(router, a, Kind.SEND, "bob", envelope("ann", "psst"))
    [(kind, key, line)] = b.decoded()
    assert (kind, key) == (Kind.DELIVER_USER, "bob")
    assert line == b'{"ev":"dm","from":"ann","data":"psst"}\n'


def test_frames_that_cannot_be_decoded_are_counted_not_raised() -> None:
    router, (a,) = node("a")
    tell(router, a, Kind.PUB, "news", b"not json")
    tell(router, a, Kind.RECOVER, "news", b"short")
    tell(router, a, 99, "x")
    assert router.bad_frames == 3
    assert router.published == 0


def test_a_sync_is_answered_at_once_on_a_lone_node() -> None:
    router, (a,) = node("a")
    tell(router, a, Kind.SYNC, "")
    assert [k for k, _, _ in a.decoded()] == [Kind.SYNCED]


def test_a_recovery_sends_the_missed_lines_in_order() -> None:
    router, (a,) = node("a")
    tell(router, a, Kind.SUB, "news")
    for i in range(3):
        run(router.publish_channel("news", None, Raw(str(i).encode())))
    a.frames.clear()
    tell(router, a, Kind.RECOVER, "news", RECOVER_HEAD.pack(7, 1))
    [(kind, key, payload)] = a.decoded()
    assert (kind, key) == (Kind.RECOVERED, "news")
    req, recovered, seq = RECOVERED_HEAD.unpack_from(payload)
    assert (req, recovered, seq) == (7, True, 3)
    lines = payload[RECOVERED_HEAD.size :].splitlines()
    assert [msgspec.json.decode(line)["seq"] for line in lines] == [2, 3]


def test_a_recovery_past_the_history_says_not_recovered() -> None:
    router, (a,) = node("a", history=1)
    for i in range(3):
        run(router.publish_channel("news", None, Raw(str(i).encode())))
    tell(router, a, Kind.RECOVER, "news", RECOVER_HEAD.pack(1, 0))
    [(_, _, payload)] = a.decoded()
    assert RECOVERED_HEAD.unpack(payload) == (1, False, 3)


# --- the backplane is told of 0 <-> 1 transitions only ---------------------------------


class Recording(LocalBackplane):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def channel_added(self, channel: str) -> None:
        self.calls.append(("channel_added", channel))

    def channel_removed(self, channel: str) -> None:
        self.calls.append(("channel_removed", channel))

    def user_added(self, user: str) -> None:
        self.calls.append(("user_added", user))

    def user_removed(self, user: str) -> None:
        self.calls.append(("user_removed", user))


def test_the_backplane_hears_of_a_nodes_first_and_last_holder_only() -> None:
    backplane = Recording()
    router = Router(backplane)
    a, b = FakeLink("a"), FakeLink("b")
    for link in (a, b):
        router.attach(link)
        tell(router, link, Kind.SUB, "news")
        tell(router, link, Kind.USER_ON, "ann")
    tell(router, a, Kind.UNSUB, "news")
    router.detach(b)
    tell(router, a, Kind.USER_OFF, "ann")
    assert backplane.calls == [
        ("channel_added", "news"),
        ("user_added", "ann"),
        ("channel_removed", "news"),
        ("user_removed", "ann"),
    ]


# --- presence --------------------------------------------------------------------------


def test_presence_asks_the_links_holding_the_channel_and_merges_their_answers() -> None:
    async def main() -> PresenceResult:
        router, (a, b, c) = node("a", "b", "c")
        tell(router, a, Kind.SUB, "news")
        tell(router, b, Kind.SUB, "news")
        asking = asyncio.create_task(router.presence("news"))
        await asyncio.sleep(0)
        assert c.frames == []
        for link, part in ((a, b'[{"ann":1},2]'), (b, b'[{"ann":2,"bob":1},0]')):
            [(kind, key, token)] = link.decoded()
            assert (kind, key) == (Kind.PRESENCE_ASK, "news")
            tell(router, link, Kind.PRESENCE_PART, "news", token + part)
        return await asking

    assert run(main()) == PresenceResult({"ann": 3, "bob": 1}, 2)


def test_a_workers_presence_question_is_answered_on_its_link() -> None:
    async def main() -> FakeLink:
        router, (a,) = node("a")
        tell(router, a, Kind.PRESENCE, "empty", TOKEN.pack(5))
        while not a.frames:
            await asyncio.sleep(0)
        return a

    [(kind, key, payload)] = run(main()).decoded()
    assert (kind, key) == (Kind.PRESENCE_DONE, "empty")
    assert TOKEN.unpack_from(payload) == (5,)
    assert msgspec.json.decode(payload[TOKEN.size :]) == {
        "users": {},
        "anonymous": 0,
        "partial": False,
    }


# --- typed results: the API's JSON of each case ----------------------------------------


def test_published_results_keep_the_json_of_each_case() -> None:
    cases = [
        (Published(seq=4, workers=2), {"seq": 4, "workers": 2}),  # local channel, broadcast
        (Published(workers=0), {"workers": 0}),  # local user
        (Published(seq=4, nodes=3), {"seq": 4, "nodes": 3}),  # redis channel, broadcast
        (Published(nodes=1), {"nodes": 1}),  # redis user
        (Published(degraded=True, workers=2), {"degraded": True, "workers": 2}),
    ]
    for result, expected in cases:
        got = msgspec.to_builtins(result)
        assert got == expected
        assert list(got) == list(expected)  # the key order too


def test_stats_have_the_keys_they_always_had() -> None:
    router, (a,) = node("a")
    tell(router, a, Kind.SUB, "news")
    tell(router, a, Kind.USER_ON, "ann")
    run(router.publish_channel("news", None, Raw(b"1")))
    stats = router.stats()
    assert isinstance(stats, BrokerStats)
    assert as_json(stats) == {
        "kind": "local",
        "status": "ok",
        "channels": 1,
        "users": 1,
        "published": 1,
        "history_channels": 1,
        "bad_frames": 0,
    }
    redis_keys = [f.encode_name for f in msgspec.structs.fields(RedisStats)]
    assert redis_keys == [
        *as_json(stats),
        "node",
        "redis",
        "cluster",
        "received_from_redis",
        "sent_to_redis",
        "delivered_locally_while_degraded",
        "reconnects",
        "last_error",
    ]


def test_join_asks_seat_members_while_the_channel_has_room() -> None:
    router, (a, b) = node("a", "b")
    answers: list[bool] = []

    def ask(link: FakeLink, req: int, member: str, limit: int = 2) -> None:
        tell(router, link, Kind.JOIN_ASK, "room", JOIN_HEAD.pack(req, limit) + member.encode())
        kind, key, payload = link.decoded()[-1]
        assert (kind, key, payload[:4]) == (Kind.JOINED, "room", TOKEN.pack(req))
        answers.append(payload[4:] == b"\x01")

    ask(a, 1, "u1")
    ask(b, 2, "u2")
    ask(a, 3, "u3")  # full
    ask(b, 4, "u1")  # a member already in: always
    assert answers == [True, True, False, True]
    assert router.member_counts == {"room": 2}
    tell(router, a, Kind.LEAVE, "room", b"u2")  # not a's: nothing
    tell(router, b, Kind.LEAVE, "room", b"u2")
    ask(a, 5, "u3")
    assert answers[-1] is True
    router.detach(a)
    router.detach(b)
    assert router.member_counts == {}

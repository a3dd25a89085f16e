"""End-to-end presence and history recovery on the local broker: two real workers.

Presence is gathered from every worker that holds the channel; ``sub`` with ``since``
replays what a client missed from the broker's history, then goes live, each seq once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from support.client import Client
from support.server import Server, spread
from support.wait import wait_for

Connect = Callable[..., Client]


def two_workers(serve: Callable[..., Server], *flags: str) -> Server:
    # Publishers here stream from one connection: no message rate limit.
    return serve(
        "--workers", "2", "--max-connections", "1000", "--max-messages-per-second", "0", *flags
    )


def pair(clients: Connect, server: Server, per_worker: int) -> tuple[list[Client], list[Client]]:
    """``per_worker`` clients on each worker: (those of the lower slot, the others)."""
    groups = spread(clients, server.port(), per_worker=per_worker, workers=2)
    (_, on_a), (_, on_b) = sorted(groups.items())
    return on_a, on_b


def joined(client: Client, user: str | None = None, channel: str | None = None) -> Client:
    if user is not None:
        assert client.call({"op": "hello", "user": user, "id": "h"}) == {"ev": "ok", "id": "h"}
    if channel is not None:
        assert client.call({"op": "sub", "channel": channel, "id": "s"}) == {"ev": "ok", "id": "s"}
    return client


def presence(client: Client, channel: str) -> dict[str, Any]:
    answer = client.call({"op": "presence", "channel": channel, "id": "p"})
    assert answer["ev"] == "presence" and answer["channel"] == channel, answer
    return answer


def who(client: Client, channel: str) -> tuple[dict[str, int], int]:
    answer = presence(client, channel)
    return answer["users"], answer["anonymous"]


def data_until(client: Client, end: object) -> list[dict[str, Any]]:
    return client.until(lambda e: e.get("ev") == "msg" and e["data"] == end)


def publish_many(server: Server, channel: str, items: list[object]) -> list[int]:
    return [server.publish(channel=channel, data=item)["seq"] for item in items]


# --- presence -------------------------------------------------------------------------


def test_presence_counts_each_users_connections_on_every_worker_and_anonymous(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=4)
    joined(on_a[0], user="ann", channel="veg")
    joined(on_b[0], user="ann", channel="veg")  # ann's second connection, other worker
    joined(on_a[1], user="bob", channel="veg")
    joined(on_a[2], channel="veg")  # no hello: anonymous
    joined(on_b[1], channel="veg")
    joined(on_b[2], user="cid", channel="fruit")  # another channel: not counted
    asker = joined(on_a[3], user="dee")  # says hello but subscribes to nothing

    expected = {
        "ev": "presence",
        "channel": "veg",
        "users": {"ann": 2, "bob": 1},
        "anonymous": 2,
        "id": "p",
    }
    assert presence(asker, "veg") == expected  # no "partial": every worker answered
    assert presence(on_b[3], "veg") == expected  # asked from the other worker
    assert presence(on_b[0], "veg") == expected  # asked by a subscriber itself
    assert who(asker, "fruit") == ({"cid": 1}, 0)


def test_presence_of_a_channel_nobody_joined_is_empty(serve, clients):
    server = two_workers(serve)
    client = clients(server.port())
    assert presence(client, "nobody-here") == {
        "ev": "presence",
        "channel": "nobody-here",
        "users": {},
        "anonymous": 0,
        "id": "p",
    }
    assert server.http("GET", "/api/presence?channel=nobody-here") == (
        200,
        {"channel": "nobody-here", "users": {}, "anonymous": 0, "partial": False},
    )


def test_presence_follows_unsub_disconnect_and_a_late_hello(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=3)
    ann_a = joined(on_a[0], user="ann", channel="veg")
    ann_b = joined(on_b[0], user="ann", channel="veg")
    bob = joined(on_b[1], user="bob", channel="veg")
    late = joined(on_a[1], channel="veg")
    asker = on_a[2]
    assert who(asker, "veg") == ({"ann": 2, "bob": 1}, 1)

    assert ann_b.call({"op": "unsub", "channel": "veg", "id": 1}) == {"ev": "ok", "id": 1}
    wait_for(lambda: who(asker, "veg") == ({"ann": 1, "bob": 1}, 1), what="unsub seen")
    ann_a.close()
    wait_for(lambda: who(asker, "veg") == ({"bob": 1}, 1), what="disconnect seen")
    bob.close()
    wait_for(lambda: who(asker, "veg") == ({}, 1), what="last user gone")
    # A connection that says hello after subscribing is counted as that user from then.
    joined(late, user="eve")
    wait_for(lambda: who(asker, "veg") == ({"eve": 1}, 0), what="late hello seen")
    late.close()
    wait_for(lambda: who(asker, "veg") == ({}, 0), what="channel empty")
    # ann's other connection is still there and can rejoin.
    joined(ann_b, channel="veg")
    assert who(asker, "veg") == ({"ann": 1}, 0)


def test_http_presence_and_its_missing_channel_error(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=2)
    joined(on_a[0], user="ann", channel="veg")
    joined(on_b[0], user="ann", channel="veg")
    joined(on_b[1], channel="veg")
    assert server.http("GET", "/api/presence?channel=veg") == (
        200,
        {"channel": "veg", "users": {"ann": 2}, "anonymous": 1, "partial": False},
    )
    for path in ("/api/presence", "/api/presence?channel="):
        status, body = server.http("GET", path)
        assert status == 400 and body["error"] == "missing_field", (path, body)


def test_presence_says_partial_when_a_worker_does_not_answer(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=2)
    joined(on_a[0], user="ann", channel="veg")
    joined(on_b[0], user="bob", channel="veg")
    slot_b = on_b[0].worker
    stopped = server.worker_pids()[slot_b]
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)
    try:
        started = time.monotonic()
        on_a[1].send({"op": "presence", "channel": "veg", "id": 1})
        status, body = server.http("GET", "/api/presence?channel=veg")
        answer = on_a[1].recv()
        waited = time.monotonic() - started
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert answer == {
        "ev": "presence",
        "channel": "veg",
        "users": {"ann": 1},
        "anonymous": 0,
        "id": 1,
        "partial": True,
    }
    assert (status, body) == (
        200,
        {"channel": "veg", "users": {"ann": 1}, "anonymous": 0, "partial": True},
    )
    assert 1.5 < waited < 4.5  # the 2 s presence timeout, not the client's 10 s
    # Once the worker runs again the answer is whole (its late part was ignored).
    assert presence(on_a[1], "veg") == {
        "ev": "presence",
        "channel": "veg",
        "users": {"ann": 1, "bob": 1},
        "anonymous": 0,
        "id": "p",
    }


# --- history: recovery ----------------------------------------------------------------


@pytest.mark.parametrize("rejoin", ["same-worker", "other-worker"])
def test_a_reconnecting_client_recovers_what_it_missed_then_goes_live(serve, clients, rejoin):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=2)
    # The keeper holds the channel on worker A. Rejoining there, the worker already has
    # subscribers of the channel; rejoining on B, it has none and must subscribe first.
    keeper = joined(on_a[0], channel="veg")
    first = joined(on_b[0], user="ann", channel="veg")
    assert server.publish(channel="veg", data=1) == {"accepted": True, "seq": 1, "workers": 2}
    assert server.publish(channel="veg", data=2)["seq"] == 2
    assert [(e["seq"], e["data"]) for e in data_until(first, 2)] == [(1, 1), (2, 2)]
    assert [e["seq"] for e in data_until(keeper, 2)] == [1, 2]
    first.close()
    wait_for(lambda: who(keeper, "veg") == ({}, 1), what="first gone")
    assert server.publish(channel="veg", data=3) == {"accepted": True, "seq": 3, "workers": 1}
    assert publish_many(server, "veg", [4, 5]) == [4, 5]

    again = on_a[1] if rejoin == "same-worker" else on_b[1]
    again.send({"op": "sub", "channel": "veg", "since": 2, "id": 7})
    assert again.recv() == {"ev": "ok", "id": 7, "recovered": True, "seq": 5, "missed": 3}
    replayed = [again.recv() for _ in range(3)]
    assert replayed == [
        {"ev": "msg", "channel": "veg", "seq": s, "from": None, "data": s} for s in (3, 4, 5)
    ]
    workers = 1 if rejoin == "same-worker" else 2
    assert server.publish(channel="veg", data=6) == {"accepted": True, "seq": 6, "workers": workers}
    server.publish(channel="veg", data="end")
    assert [(e["seq"], e["data"]) for e in data_until(again, "end")] == [(6, 6), (7, "end")]
    # The keeper never saw anything twice either.
    assert [e["seq"] for e in data_until(keeper, "end")] == list(range(3, 8))


def test_recovery_of_everything_and_of_nothing(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=1)
    publish_many(server, "veg", ["a", "b", "c"])
    everything = on_a[0]
    everything.send({"op": "sub", "channel": "veg", "since": 0, "id": 1})
    assert everything.recv() == {"ev": "ok", "id": 1, "recovered": True, "seq": 3, "missed": 3}
    assert [everything.recv()["data"] for _ in range(3)] == ["a", "b", "c"]
    up_to_date = on_b[0]
    up_to_date.send({"op": "sub", "channel": "veg", "since": 3, "id": 2})
    assert up_to_date.recv() == {"ev": "ok", "id": 2, "recovered": True, "seq": 3, "missed": 0}
    # A channel nothing was ever published on: seq 0, nothing to recover.
    up_to_date.send({"op": "sub", "channel": "new", "since": 0, "id": 3})
    assert up_to_date.recv() == {"ev": "ok", "id": 3, "recovered": True, "seq": 0, "missed": 0}
    server.publish(channel="veg", data="end")
    server.publish(channel="new", data="end")
    for client in (everything, up_to_date):
        assert [e["seq"] for e in data_until(client, "end")] == [4]
    assert [e["seq"] for e in data_until(up_to_date, "end")] == [1]


def test_since_on_a_channel_already_subscribed_is_a_plain_ok(serve, clients):
    server = two_workers(serve)
    client = joined(clients(server.port()), channel="veg")
    publish_many(server, "veg", [1, 2, 3])
    assert [e["seq"] for e in data_until(client, 3)] == [1, 2, 3]
    client.send({"op": "sub", "channel": "veg", "since": 0, "id": 9})
    assert client.recv() == {"ev": "ok", "id": 9}  # nothing replayed
    server.publish(channel="veg", data=4)
    assert client.recv()["seq"] == 4


def test_since_must_be_a_non_negative_integer(serve, clients):
    server = two_workers(serve)
    client = clients(server.port())
    for i, bad in enumerate([-1, 1.5, "2", True, [2]]):
        client.send({"op": "sub", "channel": "veg", "since": bad, "id": i})
        answer = client.recv()
        assert answer["ev"] == "error" and answer["code"] == "bad_field", (bad, answer)
        assert answer["id"] == i
    # None of them subscribed.
    assert who(client, "veg") == ({}, 0)
    client.send({"op": "ping", "id": "still"})
    assert client.recv() == {"ev": "pong", "id": "still"}


def test_a_since_too_large_for_the_wire_is_answered_not_fatal(serve, clients):
    server = two_workers(serve)
    client = clients(server.port())
    server.publish(channel="veg", data=1)
    client.send({"op": "sub", "channel": "veg", "since": 2**64, "id": 1})
    answer = client.recv()
    # Either reading is fine: a since from the future, or a field out of range.
    assert answer in (
        {"ev": "ok", "id": 1, "recovered": False, "seq": 1, "missed": 0},
        {"ev": "error", "code": "bad_field", "reason": answer.get("reason"), "id": 1},
    )
    client.send({"op": "ping", "id": 2})
    assert client.recv() == {"ev": "pong", "id": 2}


def test_recovery_counts_a_message_with_a_raw_cr_in_its_data_once(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=1)
    on_a[0].send(b'{"op":"pub","channel":"veg","data":[1,\r2],"id":1}\n')
    assert on_a[0].recv() == {"ev": "ok", "id": 1}
    server.publish(channel="veg", data="after")
    on_b[0].send({"op": "sub", "channel": "veg", "since": 0, "id": 2})
    assert on_b[0].recv() == {"ev": "ok", "id": 2, "recovered": True, "seq": 2, "missed": 2}
    assert [on_b[0].recv()["data"] for _ in range(2)] == [[1, 2], "after"]


# --- history: what cannot be recovered ------------------------------------------------


def test_a_gap_older_than_the_history_is_not_recovered(serve, clients):
    server = two_workers(serve, "--history-size", "3")
    on_a, on_b = pair(clients, server, per_worker=2)
    assert publish_many(server, "veg", list(range(1, 11))) == list(range(1, 11))
    # History holds 8, 9, 10: since=7 is exactly covered, since=6 is not.
    covered = on_a[0]
    covered.send({"op": "sub", "channel": "veg", "since": 7, "id": 1})
    assert covered.recv() == {"ev": "ok", "id": 1, "recovered": True, "seq": 10, "missed": 3}
    assert [covered.recv()["seq"] for _ in range(3)] == [8, 9, 10]
    for client in (on_a[1], on_b[0]):
        client.send({"op": "sub", "channel": "veg", "since": 6, "id": 2})
        assert client.recv() == {"ev": "ok", "id": 2, "recovered": False, "seq": 10, "missed": 0}
    on_b[1].send({"op": "sub", "channel": "veg", "since": 2, "id": 3})
    assert on_b[1].recv() == {"ev": "ok", "id": 3, "recovered": False, "seq": 10, "missed": 0}
    server.publish(channel="veg", data="live")
    for client in (covered, on_a[1], on_b[0], on_b[1]):
        assert [(e["seq"], e["data"]) for e in data_until(client, "live")] == [(11, "live")]


def test_a_since_from_the_future_is_not_recovered(serve, clients):
    server = two_workers(serve)
    on_a, on_b = pair(clients, server, per_worker=1)
    publish_many(server, "veg", [1, 2, 3])
    for client in (on_a[0], on_b[0]):
        client.send({"op": "sub", "channel": "veg", "since": 9, "id": 1})
        assert client.recv() == {"ev": "ok", "id": 1, "recovered": False, "seq": 3, "missed": 0}
    on_a[0].send({"op": "sub", "channel": "empty", "since": 1, "id": 2})
    assert on_a[0].recv() == {"ev": "ok", "id": 2, "recovered": False, "seq": 0, "missed": 0}
    server.publish(channel="veg", data="live")
    for client in (on_a[0], on_b[0]):
        assert [e["seq"] for e in data_until(client, "live")] == [4]


def test_history_size_zero_turns_recovery_off(serve, clients):
    server = two_workers(serve, "--history-size", "0")
    on_a, on_b = pair(clients, server, per_worker=1)
    publish_many(server, "veg", [1, 2, 3])
    on_a[0].send({"op": "sub", "channel": "veg", "since": 2, "id": 1})
    assert on_a[0].recv() == {"ev": "ok", "id": 1, "recovered": False, "seq": 3, "missed": 0}
    on_b[0].send({"op": "sub", "channel": "veg", "since": 0, "id": 1})
    assert on_b[0].recv() == {"ev": "ok", "id": 1, "recovered": False, "seq": 3, "missed": 0}
    server.publish(channel="veg", data="live")
    for client in on_a + on_b:
        assert [e["seq"] for e in data_until(client, "live")] == [4]
    assert server.stats()["broker"]["history_channels"] == 0


def test_history_expires_history_ttl_after_the_channels_last_message(serve, clients):
    server = two_workers(serve, "--history-ttl", "1")
    on_a, on_b = pair(clients, server, per_worker=2)
    publish_many(server, "veg", [1, 2])
    published = time.monotonic()
    on_a[0].send({"op": "sub", "channel": "veg", "since": 1, "id": 1})
    assert on_a[0].recv() == {"ev": "ok", "id": 1, "recovered": True, "seq": 2, "missed": 1}
    assert time.monotonic() - published < 1  # else the test machine is too slow to tell
    # Waiting out the ttl is what this test is about.
    time.sleep(1.2)
    for client in (on_a[1], on_b[0]):
        client.send({"op": "sub", "channel": "veg", "since": 1, "id": 2})
        assert client.recv() == {"ev": "ok", "id": 2, "recovered": False, "seq": 2, "missed": 0}
    # The seq counter outlives the history: the next message is 3, and it starts a new
    # history that a client can recover from at once.
    assert server.publish(channel="veg", data=3)["seq"] == 3
    on_b[1].send({"op": "sub", "channel": "veg", "since": 2, "id": 3})
    assert on_b[1].recv() == {"ev": "ok", "id": 3, "recovered": True, "seq": 3, "missed": 1}
    assert on_b[1].recv()["data"] == 3


def test_messages_older_than_the_ttl_are_not_replayed_after_a_new_one(serve, clients):
    server = two_workers(serve, "--history-ttl", "1")
    client = clients(server.port())
    publish_many(server, "veg", [1, 2])
    time.sleep(1.2)  # seqs 1 and 2 expire
    server.publish(channel="veg", data=3)
    client.send({"op": "sub", "channel": "veg", "since": 0, "id": 1})
    assert client.recv() == {"ev": "ok", "id": 1, "recovered": False, "seq": 3, "missed": 0}


# --- history: recovery while the channel is busy --------------------------------------


def test_recovery_while_a_publisher_keeps_publishing_gives_each_seq_once_in_order(serve, clients):
    # History holds every message, so each recovery must succeed: a gap or a duplicate
    # can only come from the replay racing live delivery.
    server = two_workers(serve, "--history-size", "1000")
    on_a, on_b = pair(clients, server, per_worker=5)
    watcher = joined(on_a[0], channel="busy")  # worker A holds the channel throughout
    publisher = on_b[0]  # on worker B: publishes only, so B holds no subscriber at first
    recoverers = on_a[1:] + on_b[1:]  # 0-3 on worker A, 4-7 on worker B
    # After publishing n: read the watcher up to a seq; then publish 15 more, one line
    # per write, and at once send the joins {recoverer: since} while those 15 are on
    # their way to the broker. Pubs carry no id: no replies to read.
    joins_after = {
        40: (20, {4: 0}),  # first on B: its worker must subscribe first
        80: (60, {0: 55}),
        120: (100, {1: 99, 2: 99}),  # two at once on A
        170: (150, {5: 120, 6: 150}),  # two at once on B
        220: (200, {3: 200}),  # the very seq seen
        260: (240, {7: 1}),  # far back
    }
    sinces: dict[int, int] = {}
    joins: dict[int, int] = {}
    for n in range(1, 301):
        publisher.send(b'{"op":"pub","channel":"busy","data":%d}\n' % n)
        if n in joins_after:
            seen, joins = joins_after[n]
            assert watcher.until(lambda e, seen=seen: e["seq"] >= seen)[-1]["seq"] == seen
        elif n - 15 in joins_after:
            for i, since in joins.items():
                recoverers[i].send({"op": "sub", "channel": "busy", "since": since, "id": i})
                sinces[i] = since
    publisher.send({"op": "pub", "channel": "busy", "data": "end"})

    assert [e["seq"] for e in data_until(watcher, "end")] == list(range(241, 302))
    assert sorted(sinces) == list(range(8))
    for i, since in sinces.items():
        client = recoverers[i]
        ack = client.recv()
        assert ack["ev"] == "ok" and ack["id"] == i and ack["recovered"] is True, ack
        assert since <= ack["seq"] <= 301 and ack["missed"] == ack["seq"] - since, (since, ack)
        events = data_until(client, "end")
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(since + 1, 302)), (i, since, ack, seqs[:5], seqs[-5:])
        assert [e["data"] for e in events] == [*range(since + 1, 301), "end"]


def test_an_unsub_right_after_a_sub_with_since_acks_both_and_leaves(serve, clients):
    server = two_workers(serve)
    client = clients(server.port())
    server.publish(channel="veg", data=1)
    client.send(
        b'{"op":"sub","channel":"veg","since":0,"id":1}\n{"op":"unsub","channel":"veg","id":2}\n'
    )
    assert [client.recv(), client.recv()] == [{"ev": "ok", "id": 1}, {"ev": "ok", "id": 2}]
    status, presence = server.http("GET", "/api/presence?channel=veg")
    assert status == 200 and (presence["users"], presence["anonymous"]) == ({}, 0)

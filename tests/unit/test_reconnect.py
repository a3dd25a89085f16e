"""``manydoors load --reconnect``: the backoff, when a dropped connection dials again, and
how its subscription resumes (``since``) with each seq counted once.

The agent is real and runs in this process; its connections are socketpairs (the far
end reads what the agent sent), so no server is involved: tests/live/test_storm.py
restarts a real one under the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from manydoors.loadgen import cli as load_cli
from manydoors.loadgen.agent import Agent, AgentOptions
from manydoors.loadgen.conns import LoadConn, RedialConn, RedialWsConn
from manydoors.loadgen.planner import AgentPlan, Lane
from manydoors.loadgen.reconnect import Backoff, Redial, merge, sub_op

PLAN = AgentPlan(
    0, (Lane("127.0.1.1", "127.0.0.1", 7000, 3), Lane("127.0.1.2", "127.0.0.1", 7000, 2)), 10
)


class Draws(random.Random):
    """random() gives the values set, in turn (the last one from then on)."""

    def __init__(self, *values: float) -> None:
        super().__init__()
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


# --- backoff ----------------------------------------------------------------------------


def test_the_window_doubles_from_the_base_up_to_the_cap():
    b = Backoff(0.5, 30)
    assert [b.window(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.window(10_000) == 30  # no overflow however long the outage


def test_full_jitter_draws_the_whole_delay_within_the_window():
    b = Backoff(0.5, 30)
    assert b.delay(3, 0.0) == 0.0
    assert b.delay(3, 0.5) == 2.0
    assert b.delay(3, 0.999) < b.window(3)
    rng = random.Random(7)
    delays = [b.delay(4, rng.random()) for _ in range(10_000)]
    assert 0 <= min(delays) < 0.1 and 7.9 < max(delays) < 8
    assert 3.8 < sum(delays) / len(delays) < 4.2  # uniform: the mean is half the window


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (1, 0.5), (float("nan"), 1)])
def test_a_backoff_that_makes_no_sense_is_refused(base, cap):
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base, cap)


# --- when a dropped connection dials again ------------------------------------------------


def conn(user: int = 10) -> RedialConn:
    """A connection between dials: its socket closed (the scheduling never reads it)."""
    ours, theirs = socket.socketpair()
    ours.close()
    theirs.close()
    return RedialConn(ours, 0.0, user)


def test_a_drop_dials_again_after_its_backoff_and_no_sooner():
    redial = Redial(PLAN, Backoff(0.5, 30), Draws(0.5))
    c = conn()
    redial.dropped(c, "ECONNRESET", now=100.0)
    assert redial.due(100.2, room=10) == []  # U(0, 0.5) drew 0.25
    assert redial.due(100.25, room=10) == [c]
    assert redial.attempts == 1 and redial.pending == 1  # dialing
    assert redial.drops == {"ECONNRESET": 1} and redial.first_drop_at > 0


def test_each_failed_dial_doubles_the_window_and_being_ready_starts_it_over():
    redial = Redial(PLAN, Backoff(0.5, 30), Draws(1.0))  # always the whole window
    c = conn()
    now = 0.0
    waits = []
    for _ in range(5):
        redial.dropped(c, "ECONNREFUSED", now)
        due = redial.queue[0][0]
        waits.append(due - now)
        assert redial.due(due, 1) == [c]
        now = due
    assert waits == [0.5, 1, 2, 4, 8]
    redial.ready(c)  # hello and sub answered
    assert redial.back == 1 and redial.last_back_at > 0 and redial.pending == 0
    redial.dropped(c, "closed_by_server", now)
    assert redial.queue[0][0] - now == 0.5
    assert redial.back_hist.total() == 1


def test_dials_wait_for_room_and_go_earliest_first():
    redial = Redial(PLAN, Backoff(1, 1), Draws(0.9, 0.1, 0.5))
    a, b, c = conn(10), conn(11), conn(12)
    for x in (a, b, c):
        redial.dropped(x, "closed_by_server", 0.0)
    assert redial.due(5.0, room=2) == [b, c]
    assert redial.due(5.0, room=0) == []
    assert redial.due(5.0, room=5) == [a]


def test_ready_without_a_drop_is_not_a_return():
    redial = Redial(PLAN, Backoff())
    redial.ready(conn())
    assert redial.back == 0 and redial.last_back_at == 0


def test_a_user_dials_again_from_its_own_lane():
    redial = Redial(PLAN, Backoff())
    # first_user 10: users 10-12 are the first lane's three, 13-14 the second's two.
    assert [redial.lane(u).src for u in range(10, 15)] == ["127.0.1.1"] * 3 + ["127.0.1.2"] * 2


# --- resume: every seq once ---------------------------------------------------------------


def test_seqs_in_order_are_neither_gaps_nor_repeats():
    redial = Redial(PLAN, Backoff())
    c = conn()
    for seq in (41, 42, 43):  # the first seq after a plain sub can be any number
        redial.seen(c, seq)
    assert (c.seq, redial.gaps, redial.repeats) == (43, 0, 0)


def test_a_skipped_seq_is_a_gap_and_a_seen_one_a_repeat():
    redial = Redial(PLAN, Backoff())
    c = conn()
    for seq in (1, 2, 5, 5, 3, 6):
        redial.seen(c, seq)
    assert (c.seq, redial.gaps, redial.repeats) == (6, 2, 2)


def test_an_unsequenced_message_is_counted_apart_and_keeps_the_resume_point():
    redial = Redial(PLAN, Backoff())
    c = conn()
    for seq in (41, 0, 0, 42):  # seq 0: a node cut off from Redis delivered it
        redial.seen(c, seq)
    assert (c.seq, redial.unsequenced, redial.gaps, redial.repeats) == (42, 2, 0, 0)


def test_a_recovered_resubscription_counts_what_history_filled_in():
    redial = Redial(PLAN, Backoff())
    c = conn()
    redial.seen(c, 2)
    redial.resumed(c, recovered=True, seq=6, missed=4)
    for seq in (3, 4, 5, 6, 7):
        redial.seen(c, seq)
    assert (redial.recovered, redial.gaps, redial.not_recovered, c.seq) == (4, 0, 0, 7)


def test_a_resubscription_history_could_not_cover_counts_its_gap():
    redial = Redial(PLAN, Backoff())
    c = conn()
    redial.seen(c, 2)
    redial.resumed(c, recovered=False, seq=120, missed=0)
    redial.seen(c, 121)
    assert (redial.not_recovered, redial.gaps, redial.repeats, c.seq) == (1, 118, 0, 121)


def test_a_channel_whose_counter_restarted_resumes_from_its_new_seq():
    redial = Redial(PLAN, Backoff())
    c = conn()
    redial.seen(c, 50)
    redial.resumed(c, recovered=False, seq=3, missed=0)  # a local broker restarted
    redial.seen(c, 4)
    assert (redial.not_recovered, redial.gaps, redial.repeats, c.seq) == (1, 0, 0, 4)


def test_the_sub_asks_since_only_once_a_seq_was_seen():
    assert json.loads(sub_op("news", 0)) == {"op": "sub", "channel": "news", "id": 2}
    assert json.loads(sub_op("news", 9)) == {"op": "sub", "channel": "news", "id": 2, "since": 9}


def test_the_processes_snapshots_merge_into_one():
    one = Redial(PLAN, Backoff(), Draws(0.0))
    two = Redial(PLAN, Backoff(), Draws(0.0))
    a, b = conn(), conn()
    one.dropped(a, "ECONNRESET", 0.0)
    two.dropped(b, "ECONNRESET", 0.0)
    two.dropped(conn(), "no_answer", 0.0)
    for redial, c in ((one, a), (two, b)):
        redial.due(1.0, 10)
        redial.ready(c)
    merged = merge([one.snapshot(final=True), two.snapshot(final=True)])
    assert merged["drops"] == {"ECONNRESET": 2, "no_answer": 1}
    assert merged["reconnected"] == 2 and merged["pending"] == 1 and merged["attempts"] == 3
    assert merged["first_drop_at"] == min(one.first_drop_at, two.first_drop_at)
    assert merged["last_back_at"] == max(one.last_back_at, two.last_back_at)
    assert sum(merged["back_0.1s"].values()) == 2
    assert merge([]) == {**merge([]), "drops": {}, "last_back_at": None}


# --- the agent: drop, dial again, resume ---------------------------------------------------


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(2)]
    yield made
    for ours, theirs in made:
        ours.close()
        theirs.close()


def make_agent(reconnect: bool = True, ws: bool = False) -> Agent:
    opts = AgentOptions(
        rate=1000,
        hello=True,
        subscribe="news",
        connect_timeout=10,
        fd_limit=1024,
        ws=ws,
        reconnect=Backoff(0.5, 30) if reconnect else None,
    )
    return Agent(PLAN, opts, pipe=None)  # type: ignore[arg-type]  # no pipe needed here


def lines(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def msg(seq: int, n: int) -> dict[str, Any]:
    return {"ev": "msg", "channel": "news", "seq": seq, "from": None, "data": {"t": 0, "n": n}}


OK_HELLO, OK_SUB = {"ev": "ok", "id": 1}, {"ev": "ok", "id": 2}
WELCOME = {"ev": "welcome", "conn": "1-2", "service": "chat", "worker": 0}


def held(agent: Agent, sock: socket.socket, user: int) -> LoadConn:
    """A connection as the ramp leaves it: connected, greeting sent, then answered."""
    c = RedialConn(sock, time.perf_counter(), user) if agent.redial else LoadConn(sock, 0.0)
    agent.conns.add(c)
    agent.open_now += 1
    agent.waiting[c] = user
    agent.received_data(c, lines(WELCOME, OK_HELLO, OK_SUB))
    assert c.ready
    return c


def test_a_dropped_connection_resumes_after_the_last_seq_it_saw(pairs):
    async def body() -> None:
        agent = make_agent()
        redial = agent.redial
        assert redial is not None
        (ours, _), (again, theirs) = pairs
        c = held(agent, ours, 12)
        agent.received_data(c, lines(msg(1, 1), msg(2, 2)))
        agent.close(c, "ECONNRESET")
        assert agent.errors == {} and redial.drops == {"ECONNRESET": 1}
        assert agent.ready == 0 and agent.open_now == 0 and redial.pending == 1
        (due,) = redial.due(time.monotonic() + 1, room=10)
        assert due is c
        # The same object on a new socket: its greeting resumes after seq 2.
        c.redial(again, time.perf_counter())
        agent.connected(c, c.user)
        hello, sub = (json.loads(x) for x in theirs.recv(4096).splitlines())
        assert hello == {"op": "hello", "user": "u12", "id": 1}
        assert sub == {"op": "sub", "channel": "news", "since": 2, "id": 2}
        recovered = {"ev": "ok", "id": 2, "recovered": True, "seq": 4, "missed": 2}
        agent.received_data(c, lines(OK_HELLO, recovered, msg(3, 3), msg(4, 4), msg(5, 5)))
        assert c.ready and agent.ready == 1 and redial.back == 1 and redial.pending == 0
        assert agent.received == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1} and agent.duplicates == 0
        assert (redial.gaps, redial.repeats, redial.recovered, redial.not_recovered) == (0, 0, 2, 0)
        agent.stop.set()
        agent.close(c, None)  # the run stops: no dial after this
        assert redial.pending == 0 and agent.errors == {}

    asyncio.run(body())


def test_a_connection_reset_before_its_greeting_dials_again(pairs):
    async def body() -> None:
        agent = make_agent()
        redial = agent.redial
        assert redial is not None
        (ours, theirs), _ = pairs
        theirs.close()  # as a listener closed with the connection still in its queue
        c = RedialConn(ours, time.perf_counter(), 11)
        agent.connected(c, c.user)
        assert redial.drops == {"EPIPE": 1} and redial.pending == 1
        assert agent.open_now == 0 and not agent.waiting and not agent.conns

    asyncio.run(body())


def test_a_task_that_dies_is_a_load_bug_in_the_report():
    async def body() -> None:
        agent = make_agent()

        async def broken() -> None:
            raise RuntimeError("bug")

        task = asyncio.get_running_loop().create_task(broken())
        await asyncio.wait([task])
        agent.task_ended(task)
        assert agent.errors == {"load_bug: RuntimeError: bug": 1} and not agent.ramp_done

    asyncio.run(body())


def test_a_message_delivered_twice_is_a_duplicate_and_a_repeat(pairs):
    agent = make_agent()
    redial = agent.redial
    assert redial is not None
    c = held(agent, pairs[0][0], 10)
    agent.received_data(c, lines(msg(7, 1), msg(8, 2), msg(8, 2)))
    assert agent.duplicates == 1 and redial.repeats == 1 and agent.received == {1: 1, 2: 1}


def test_without_reconnect_a_drop_is_an_error_and_nothing_dials_again(pairs):
    async def body() -> None:
        agent = make_agent(reconnect=False)
        assert agent.redial is None
        c = held(agent, pairs[0][0], 10)
        agent.close(c, "ECONNRESET")
        assert agent.errors == {"ECONNRESET": 1} and agent.open_now == 0

    asyncio.run(body())


def test_over_websocket_the_resubscription_is_a_masked_frame_with_since():
    agent = make_agent(ws=True)
    greeting = agent.greeting(10, since=41)
    assert greeting.startswith(b"GET / HTTP/1.1\r\n")
    assert greeting.endswith(b'{"op":"sub","channel":"news","id":2,"since":41}')
    ws = RedialWsConn(conn().sock, 0.0, 10)
    assert isinstance(ws, LoadConn) and (ws.user, ws.seq, ws.buf) == (10, 0, b"")


# --- the flags ---------------------------------------------------------------------------


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    load_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["load", *argv])


def test_reconnect_takes_its_backoff_from_the_flag():
    assert load_cli.reconnect_backoff(flags(), None) is None
    assert load_cli.reconnect_backoff(flags("--reconnect"), None) == Backoff(0.5, 30)
    found = load_cli.reconnect_backoff(flags("--reconnect", "--backoff", "0.1,5"), None)
    assert found == Backoff(0.1, 5)


@pytest.mark.parametrize(
    ("argv", "wrong"),
    [
        (["--raw"], "do not go together"),
        (["--backoff", "1"], "--backoff BASE,CAP"),
        (["--backoff", "2,1"], "must be at least its base"),
        (["--backoff", "x,1"], "--backoff BASE,CAP"),
    ],
)
def test_reconnect_flags_that_do_not_go_together(argv, wrong):
    found = load_cli.reconnect_backoff(flags("--reconnect", *argv), None)
    assert isinstance(found, str) and wrong in found

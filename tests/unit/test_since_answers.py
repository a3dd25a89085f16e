"""Every ``sub`` with ``since`` is answered, the largest ``since`` (2**63 - 1) too: a real
Worker and a real Router (local backplane), their frames carried by hand (issue 18)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec

from manydoors.broker.backplane import LocalBackplane
from manydoors.broker.router import Router
from manydoors.protocol.ipc import IpcParser, Kind, encode_frame, request_ids
from manydoors.server.connection import Connection
from manydoors.server.worker import Worker
from support.fakes import OPEN, FakeLink, FakeTransport, connect, in_loop, make_worker

BIGGEST = 2**63 - 1  # the largest since a client may send (messages.Sub)


class RouterSide:
    """The router's end of the worker's link: the frames it queues to the worker."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, kind: Kind, key: str = "", payload: bytes = b"") -> None:
        self.frames.append(encode_frame(kind, key, payload))

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


class Node:
    """One worker and the node's router, the link between them pumped by ``settle``."""

    def __init__(self, history: int = 100) -> None:
        self.worker, self.link = make_worker(channels=OPEN, max_messages_per_second=0)
        self.router = Router(LocalBackplane(history, 300.0))
        self.side = RouterSide()
        self.router.attach(self.side)  # type: ignore[arg-type]

    def client(self, port: int = 40000) -> tuple[Connection, FakeTransport]:
        conn, tr = connect(self.worker, ("10.0.0.1", port))
        tr.take()  # the welcome
        return conn, tr

    def settle(self) -> None:
        """Carry frames both ways (the worker's link writes) until neither has any."""
        link: FakeLink = self.link
        worker: Worker = self.worker
        for _ in range(20):
            link.flush()
            up, link.frames = link.frames, []
            for kind, key, payload in up:
                self.router.on_frame(self.side, kind, key, payload)  # type: ignore[arg-type]
            down = IpcParser().feed(b"".join(self.side.frames))
            self.side.frames.clear()
            for kind, key, payload in down:
                worker.on_frame(link, kind, key, payload)  # type: ignore[arg-type]
            if not up and not down and not link.hooks:
                return
        raise AssertionError("the link never went quiet")

    async def asettle(self) -> None:
        """``settle``, and let the router's tasks (presence gathering) run between."""
        for _ in range(50):
            self.settle()
            await asyncio.sleep(0)

    def publish(self, channel: str, *data: Any) -> None:
        for item in data:
            payload = msgspec.json.encode([None, item])
            self.router.on_frame(self.side, Kind.PUB, channel, payload)  # type: ignore[arg-type]
        self.settle()


def send(conn: Connection, *ops: dict[str, Any]) -> None:
    conn.data_received(b"".join(json.dumps(op).encode() + b"\n" for op in ops))


def test_the_largest_since_on_a_channel_with_history_is_answered_not_recovered() -> None:
    node = Node()
    node.publish("veg", 1, 2, 3)
    conn, tr = node.client()
    send(conn, {"op": "sub", "channel": "veg", "since": BIGGEST, "id": 1})
    node.settle()
    assert tr.take() == [{"ev": "ok", "id": 1, "recovered": False, "seq": 3, "missed": 0}]
    node.publish("veg", "live")  # subscribed from seq 4 on
    assert [(e["seq"], e["data"]) for e in tr.take()] == [(4, "live")]


def test_the_largest_since_is_answered_on_a_new_channel_subscribed_one_and_without_id() -> None:
    node = Node()
    conn, tr = node.client()
    send(
        conn,
        {"op": "sub", "channel": "new", "since": BIGGEST, "id": "n"},
        {"op": "sub", "channel": "plain", "id": "p"},
        {"op": "sub", "channel": "anon", "since": BIGGEST},  # no id: its ok all the same
    )
    node.settle()
    send(conn, {"op": "sub", "channel": "plain", "since": BIGGEST, "id": "again"})
    send(conn, {"op": "ping", "id": "after"})
    node.settle()
    got = tr.take()
    assert {"ev": "ok", "id": "n", "recovered": False, "seq": 0, "missed": 0} in got
    assert {"ev": "ok", "id": "p"} in got
    assert {"ev": "ok", "id": None, "recovered": False, "seq": 0, "missed": 0} in got
    assert got[-2:] == [{"ev": "ok", "id": "again"}, {"ev": "pong", "id": "after"}]
    assert len(got) == 5


def test_a_pipeline_of_subs_with_any_since_gets_one_answer_each() -> None:
    node = Node(history=3)
    node.publish("veg", *range(10))  # history: seqs 8, 9, 10
    conn, tr = node.client()
    sinces = [BIGGEST, 0, 7, 10, BIGGEST - 1, 11, BIGGEST]
    send(
        conn,
        *({"op": "sub", "channel": f"c{i}", "since": s, "id": i} for i, s in enumerate(sinces)),
    )
    send(conn, *({"op": "sub", "channel": "veg", "since": s, "id": f"v{s}"} for s in sinces))
    node.settle()
    answers = [e for e in tr.take() if e["ev"] == "ok"]
    ids = [e["id"] for e in answers]
    assert sorted(map(str, ids)) == sorted(
        [*map(str, range(len(sinces))), *(f"v{s}" for s in sinces)]
    )
    first_veg = next(e for e in answers if str(e["id"]).startswith("v"))
    assert first_veg == {
        "ev": "ok",
        "id": f"v{BIGGEST}",
        "recovered": False,
        "seq": 10,
        "missed": 0,
    }


@in_loop
async def test_request_ids_wrap_at_the_frames_u32_and_every_op_is_still_answered() -> None:
    """A worker's 2**32nd request (a sub with since, a presence) raised struct.error."""
    node = Node()
    node.worker.sessions.requests = request_ids(2**32 - 2)
    conn, tr = node.client()
    send(conn, *({"op": "sub", "channel": f"c{i}", "since": BIGGEST, "id": i} for i in range(4)))
    send(conn, {"op": "presence", "channel": "c0", "id": "who"})
    await node.asettle()
    got = tr.take()
    assert sorted(str(e.get("id")) for e in got) == ["0", "1", "2", "3", "who"]
    assert got[-1]["ev"] == "presence" and got[-1]["anonymous"] == 1


def test_request_ids_count_up_from_one_and_wrap_to_zero() -> None:
    ids = request_ids()
    assert [next(ids) for _ in range(3)] == [1, 2, 3]
    ids = request_ids(2**32 - 1)
    assert [next(ids) for _ in range(3)] == [2**32 - 1, 0, 1]


def test_100000_subs_with_since_then_their_unsubs_take_linear_time() -> None:
    """A client resubscribing everything with ``since`` after a reconnect (issue 18:
    each unsub walked the dict of recoveries, which keeps the size it once had)."""
    node = Node()
    node.worker.sessions.max_subscriptions = 200_000
    conn, tr = node.client()
    n, budget = 100_000, 20.0  # ~2 s here once linear (2 cores, 2026-12)
    started = time.perf_counter()
    for ops in ("sub", "unsub"):
        extra = ',"since":0' if ops == "sub" else ""
        lines = [
            b'{"op":"%s","channel":"c%d"%s,"id":%d}\n' % (ops.encode(), i, extra.encode(), i)
            for i in range(n)
        ]
        for i in range(0, n, 2000):
            conn.data_received(b"".join(lines[i : i + 2000]))
            spent = time.perf_counter() - started
            assert spent < budget, f"{ops}: {i + 2000:,} of {n:,} in {spent:.1f} s"
        node.settle()
        assert len(tr.take()) == n
        assert len(node.worker.hub.channels) == (n if ops == "sub" else 0)

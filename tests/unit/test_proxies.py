"""Proxy hooks (connect, subscribe, publish) through a real Worker, over a fake backend."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from manydoors.config import AuthConfig, HooksConfig, NamespaceConfig
from manydoors.protocol.ipc import Kind
from manydoors.server.proxies import judge
from manydoors.server.worker import Worker
from support.fakes import (
    HOOKS,
    FakeLink,
    connect,
    counter,
    in_loop,
    make_worker,
    settle,
    with_backend,
)

PROXY = AuthConfig(mode="proxy")
ASKED = NamespaceConfig(name="club", subscribe="proxy", publish="all", presence=True)
CHECKED = NamespaceConfig(name="wall", publish="all", publish_proxy=True)


def line(op: dict[str, object]) -> bytes:
    return json.dumps(op).encode() + b"\n"


def synced(worker: Worker, link: FakeLink) -> None:
    """The broker's round trip: held acks go out."""
    link.flush()
    worker.on_frame(link, Kind.SYNCED, "", b"")  # type: ignore[arg-type]


def test_judge_reads_the_backends_answers() -> None:
    ok = judge("connect", 200, b'{"user":"ann","channels":["$a"],"expire_at":5}')
    assert ok.outcome == "ok" and ok.reply.user == "ann" and ok.reply.channels == ["$a"]
    assert judge("subscribe", 200, b"").outcome == "ok"  # 2xx without error: allowed
    assert judge("subscribe", 204, b"").outcome == "ok"
    for status in (200, 403):
        refused = judge("connect", status, b'{"error":"banned"}')
        assert (refused.outcome, refused.reason) == ("refused", "banned")
    assert judge("publish", 403, b"").reason == "refused by the backend (403)"
    for status, body in (
        (500, b'{"error":"x"}'),  # 5xx: the backend is in trouble, whatever it says
        (503, b""),
        (200, b"not json"),
        (200, b'{"user":7}'),
        (200, b"{}"),  # neither user nor error
        (200, b'{"channels":"a"}'),
    ):
        assert judge("connect", status, body).outcome == "unavailable", (status, body)
    replaced = judge("publish", 200, b'{"data":{"clean":true}}')
    assert bytes(replaced.reply.data) == b'{"clean":true}'
    assert len(judge("publish", 200, b"{}").reply.data) == 0  # keep the client's


@in_loop
async def test_a_hello_asks_the_connect_hook_and_gets_ok_as_the_backends_user() -> None:
    worker, link = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    backend.answer = lambda hook, body: (200, {"user": "ann", "channels": ["$vip"]})
    conn, tr = connect(worker, ("10.0.0.7", 4242))
    tr.take()
    conn.data_received(line({"op": "hello", "token": "t0k", "data": {"v": [1]}, "id": 1}))
    await settle(worker)
    assert backend.calls == [
        (
            "connect",
            {
                "token": "t0k",
                "data": {"v": [1]},
                "address": "10.0.0.7:4242",
                "service": "chat",
                "worker": 0,
            },
        )
    ]
    synced(worker, link)
    assert tr.take() == [{"ev": "ok", "id": 1}]
    assert conn.user == "ann" and (Kind.USER_ON, "ann", b"") in link.frames
    assert worker.sessions.rights.grants[conn] == frozenset({"$vip"})
    conn.data_received(line({"op": "sub", "channel": "$vip", "id": 2}))
    synced(worker, link)
    assert tr.take() == [{"ev": "ok", "id": 2}]
    assert counter(worker, "hook_connect_ok") == 1


@in_loop
async def test_a_hello_without_data_sends_null_and_ops_before_ok_are_unauthorized() -> None:
    worker, _ = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    backend.delay = 0.05
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "token": "t", "id": 1}))
    conn.data_received(line({"op": "sub", "channel": "news", "id": 2}))
    assert tr.take() == [
        {"ev": "error", "code": "unauthorized", "reason": "say hello with a token first", "id": 2}
    ]
    await settle(worker)
    assert backend.calls[0][1]["data"] is None


@in_loop
async def test_a_refusal_is_unauthorized_with_the_backends_reason_and_closes() -> None:
    worker, _ = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    backend.answer = lambda hook, body: (403, {"error": "banned until Monday"})
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "token": "t", "id": 1}))
    await settle(worker)
    events = tr.take()
    assert events[0] == {
        "ev": "error",
        "code": "unauthorized",
        "reason": "banned until Monday",
        "id": 1,
    }
    assert events[1] == {"ev": "bye", "reason": "unauthorized"} and tr.closed
    assert counter(worker, "hook_connect_refused") == 1
    assert counter(worker, "closed_unauthorized") == 1


@in_loop
async def test_a_backend_that_fails_answers_unavailable_and_the_connection_stays() -> None:
    worker, link = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    failures: list[Any] = [
        ConnectionRefusedError(111, "Connection refused"),
        (502, b"<html>bad gateway</html>"),
        (200, b"{}"),
    ]
    backend.answer = lambda hook, body: failures.pop(0) if failures else (200, {"user": "bo"})
    conn, tr = connect(worker)
    tr.take()
    reasons = []
    for n in range(3):
        conn.data_received(line({"op": "hello", "token": "t", "id": n}))
        await settle(worker)
        (error,) = tr.take()
        assert error["code"] == "unavailable" and error["id"] == n
        reasons.append(error["reason"])
    assert reasons == [
        "the backend cannot be reached (Connection refused)",
        "the backend answered 502",
        "the backend's answer has neither user nor error",
    ]
    assert not tr.closed
    conn.data_received(line({"op": "hello", "token": "t", "id": 9}))  # the backend is back
    await settle(worker)
    synced(worker, link)
    assert tr.take() == [{"ev": "ok", "id": 9}]
    assert counter(worker, "hook_connect_unavailable") == 3
    assert counter(worker, "error_unavailable") == 3


@in_loop
async def test_a_backend_slower_than_the_timeout_is_unavailable() -> None:
    hooks = HooksConfig(connect_url="http://backend/connect", timeout=0.05)
    worker, _ = make_worker(PROXY, hooks=hooks)
    backend = with_backend(worker)
    backend.delay = 5.0
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "token": "t", "id": 1}))
    await asyncio.wait_for(settle(worker), 2.0)
    (error,) = tr.take()
    assert error["code"] == "unavailable" and "within 0.05 s" in error["reason"]


@in_loop
async def test_a_connection_closed_while_its_hook_runs_is_left_alone() -> None:
    worker, link = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    backend.delay = 0.02
    backend.answer = lambda hook, body: (200, {"user": "ann"})
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "token": "t", "id": 1}))
    conn.connection_lost(None)
    await settle(worker)  # a write after close would fail the fake transport
    assert conn.user is None and not worker.hub.conns
    assert Kind.USER_ON not in link.kinds()


@in_loop
async def test_calls_beyond_the_cap_and_its_queue_are_unavailable_at_once() -> None:
    hooks = HooksConfig(connect_url="http://backend/connect", concurrency=1, timeout=5.0)
    worker, _ = make_worker(PROXY, hooks=hooks)
    backend = with_backend(worker)
    gate = asyncio.Event()

    async def held(url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        backend.calls.append(("connect", {}))
        await gate.wait()
        return 200, b'{"user":"u"}'

    backend.post = held  # type: ignore[method-assign]
    proxies = worker.sessions.proxies
    assert proxies is not None
    conns = [connect(worker, ("10.0.0.1", 1000 + n)) for n in range(proxies.most + 2)]
    for conn, tr in conns:
        tr.take()
        conn.data_received(line({"op": "hello", "token": "t", "id": 1}))
    await asyncio.sleep(0.01)
    assert len(backend.calls) == 1  # one in flight, the others wait for its slot
    refused = [tr for _, tr in conns if tr.out]
    assert len(refused) == 2
    assert refused[0].events()[0]["code"] == "unavailable"
    assert counter(worker, "hook_connect_unavailable") == 2
    gate.set()
    await settle(worker)
    assert len(backend.calls) == proxies.most


@in_loop
async def test_subscribe_proxy_asks_the_backend_and_joins_only_when_allowed() -> None:
    worker, link = make_worker(
        hooks=HooksConfig(subscribe_url="http://b/subscribe"), namespaces=(ASKED,)
    )
    backend = with_backend(worker)
    backend.answer = lambda hook, body: (
        (200, {"ok": True}) if body["channel"] == "club:open" else (200, {"error": "members only"})
    )
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "user": "ann"}))
    conn.data_received(line({"op": "presence", "channel": "club:open", "id": 0}))
    assert tr.take()[0]["code"] == "forbidden"  # who has not joined may not look in
    conn.data_received(line({"op": "sub", "channel": "club:open", "id": 1}))
    conn.data_received(line({"op": "sub", "channel": "club:shut", "id": 2}))
    conn.data_received(line({"op": "sub", "channel": "plain", "id": 3}))  # not asked
    await settle(worker)
    assert backend.calls == [
        ("subscribe", {"user": "ann", "channel": "club:open", "service": "chat"}),
        ("subscribe", {"user": "ann", "channel": "club:shut", "service": "chat"}),
    ]
    synced(worker, link)
    events = tr.take()
    assert {"ev": "error", "code": "forbidden", "reason": "members only", "id": 2} in events
    assert {"ev": "ok", "id": 1} in events and {"ev": "ok", "id": 3} in events
    assert set(worker.hub.channels) == {"club:open", "plain"}
    conn.data_received(line({"op": "sub", "channel": "club:open", "id": 4}))  # held: not asked
    assert len(backend.calls) == 2
    assert counter(worker, "hook_subscribe_ok") == 1
    assert counter(worker, "hook_subscribe_refused") == 1


@in_loop
async def test_publish_proxy_may_refuse_or_replace_the_data() -> None:
    worker, link = make_worker(
        hooks=HooksConfig(publish_url="http://b/publish"), namespaces=(CHECKED,)
    )
    backend = with_backend(worker)

    def answer(hook: str, body: dict[str, Any]) -> Any:
        if body["data"] == "spam":
            return 200, {"error": "no spam"}
        if body["data"] == "darn":
            return 200, {"data": "d**n"}
        return 204, b""

    backend.answer = answer
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "user": "ann"}))
    for n, text in enumerate(("spam", "darn", "hi")):
        conn.data_received(line({"op": "pub", "channel": "wall:a", "data": text, "id": n}))
    await settle(worker)
    assert backend.calls[0] == (
        "publish",
        {"user": "ann", "channel": "wall:a", "data": "spam", "service": "chat"},
    )
    pubs = [json.loads(p) for k, _, p in link.frames if k == Kind.PUB]
    assert pubs == [["ann", "d**n"], ["ann", "hi"]]
    events = tr.take()
    assert {"ev": "error", "code": "forbidden", "reason": "no spam", "id": 0} in events
    assert {"ev": "ok", "id": 1} in events and {"ev": "ok", "id": 2} in events
    conn.data_received(line({"op": "pub", "channel": "other", "data": 1, "id": 5}))
    assert tr.take()[0]["code"] == "forbidden"  # rights first: the backend is not asked
    assert len(backend.calls) == 3


# --- refresh: credentials that end ---------------------------------------------------

SECRET = "s" * 32
TOKEN_AUTH = AuthConfig(mode="token", secret=SECRET)


def jwt_for(user: str, exp: float, **claims: object) -> str:
    import jwt

    return jwt.encode({"sub": user, "exp": int(exp), **claims}, SECRET, algorithm="HS256")


class Wall:
    """The expiry's wall clock, moved by the test one tick (1 s) per sweep."""

    def __init__(self, worker: Worker, now: float) -> None:
        self.now = now
        self.worker = worker
        worker.clock.expiry.wall = lambda: self.now

    def sweep(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.now += self.worker.clock.tick_s
            self.worker.clock.sweep()


@in_loop
async def test_a_token_connection_is_warned_then_closed_expired() -> None:
    worker, link = make_worker(TOKEN_AUTH)
    assert worker.clock.tick_s == 1.0
    end = int(time.time()) + 8
    wall = Wall(worker, end - 8)
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "token": jwt_for("ann", end), "id": 1}))
    synced(worker, link)
    assert tr.take() == [{"ev": "ok", "id": 1}]
    assert worker.clock.expiry.ends[conn][0] == end
    wall.sweep(5)
    assert tr.take() == []
    wall.sweep()  # a quarter of the lifetime (8 s) before the end
    assert tr.take() == [{"ev": "refresh", "in": 2}]
    wall.sweep()
    assert tr.take() == [] and not tr.closed
    wall.sweep()
    assert tr.take() == [{"ev": "bye", "reason": "expired"}] and tr.closed
    assert counter(worker, "closed_expired") == 1
    conn.connection_lost(None)
    assert not worker.clock.expiry.ends


@in_loop
async def test_a_refresh_with_a_new_token_moves_the_end() -> None:
    worker, link = make_worker(TOKEN_AUTH, ping_interval=0)  # no pings in the way
    end = int(time.time()) + 8
    wall = Wall(worker, end - 8)
    conn, tr = connect(worker)
    conn.data_received(line({"op": "hello", "token": jwt_for("ann", end), "id": 1}))
    synced(worker, link)
    wall.sweep(6)
    tr.take()
    later = end + 100
    conn.data_received(line({"op": "refresh", "token": jwt_for("ann", later), "id": 2}))
    assert tr.take() == [{"ev": "ok", "id": 2}]
    wall.sweep(10)  # past the old end: still open, no second warning
    assert tr.take() == [] and not tr.closed
    wall.sweep(100)
    events = tr.take()
    # A quarter of the new lifetime (102 s) before its end, then the end.
    assert events == [{"ev": "refresh", "in": 25}, {"ev": "bye", "reason": "expired"}]


@in_loop
async def test_a_refresh_for_another_user_is_unauthorized_and_closes() -> None:
    worker, link = make_worker(TOKEN_AUTH)
    end = time.time() + 60
    conn, tr = connect(worker)
    conn.data_received(line({"op": "hello", "token": jwt_for("ann", end), "id": 1}))
    synced(worker, link)
    tr.take()
    conn.data_received(line({"op": "refresh", "token": jwt_for("bob", end), "id": 2}))
    error, bye = tr.take()
    assert error["code"] == "unauthorized" and "same user" in error["reason"]
    assert bye == {"ev": "bye", "reason": "unauthorized"}


def test_without_auth_there_is_nothing_to_refresh() -> None:
    worker, _ = make_worker()
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "refresh", "token": "x", "id": 1}))
    assert tr.take()[0]["code"] == "forbidden"


@in_loop
async def test_proxy_credentials_end_at_expire_at_and_refresh_asks_the_backend() -> None:
    worker, link = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    end = time.time() + 40
    ends = {"t1": end, "t2": end + 60}
    backend.answer = lambda hook, body: (
        (200, {"user": "ann", "expire_at": ends[body["token"]]})
        if body["token"] in ends
        else (200, {"error": "stale token"})
    )
    wall = Wall(worker, end - 40)
    conn, tr = connect(worker)
    conn.data_received(line({"op": "hello", "token": "t1", "id": 1}))
    await settle(worker)
    synced(worker, link)
    assert worker.clock.expiry.ends[conn][0] == end
    wall.sweep(30)
    assert tr.take()[-1] == {"ev": "refresh", "in": 10}
    conn.data_received(line({"op": "refresh", "token": "t2", "id": 2}))
    await settle(worker)
    assert tr.take() == [{"ev": "ok", "id": 2}]
    assert backend.calls[-1][1]["token"] == "t2" and backend.calls[-1][1]["data"] is None
    assert worker.clock.expiry.ends[conn][0] == end + 60
    conn.data_received(line({"op": "refresh", "token": "t3", "id": 3}))
    await settle(worker)
    error, bye = tr.take()
    assert (error["code"], error["reason"]) == ("unauthorized", "stale token")
    assert bye == {"ev": "bye", "reason": "unauthorized"}


@in_loop
async def test_an_expire_at_in_the_past_is_unauthorized() -> None:
    worker, _ = make_worker(PROXY, hooks=HOOKS)
    backend = with_backend(worker)
    backend.answer = lambda hook, body: (200, {"user": "ann", "expire_at": time.time() - 1})
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "hello", "token": "t", "id": 1}))
    await settle(worker)
    assert tr.take()[0]["reason"] == "credentials expired (expire_at)"


def test_closed_connections_do_not_stay_in_the_expiry_queues_until_their_end() -> None:
    from manydoors.server.expiry import SLACK, Expiry

    class Conn:
        transport = object()

    expiry = Expiry(1.0, lambda conn: None, wall=lambda: 1000.0)
    keep = Conn()
    expiry.set(keep, 1000.0 + 3600, 0)  # type: ignore[arg-type]
    for _ in range(SLACK):  # a churn of connections holding hour-long tokens
        conn = Conn()
        expiry.set(conn, 1000.0 + 3600, 0)  # type: ignore[arg-type]
        expiry.forget(conn)  # type: ignore[arg-type]
    held = sum(len(c) for _, c in expiry.expire_due.queue) + sum(
        len(c) for _, c in expiry.warn_due.queue
    )
    assert held <= SLACK + 2  # without compaction: 2 * SLACK + 2
    assert keep in [c for _, cs in expiry.expire_due.queue for c in cs]
    expiry.forget(keep)  # type: ignore[arg-type]
    expiry.sweep(1)
    assert not expiry.warn_due.queue and not expiry.expire_due.queue


def test_proxy_namespaces_without_their_url_fail_closed() -> None:
    # The config refuses this; a worker built without the URLs still lets nobody in.
    worker, link = make_worker(namespaces=(ASKED, CHECKED))
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "sub", "channel": "club:a", "id": 1}))
    conn.data_received(line({"op": "pub", "channel": "wall:a", "data": 1, "id": 2}))
    assert [e["code"] for e in tr.take()] == ["forbidden", "forbidden"]
    assert not worker.hub.channels and Kind.PUB not in link.kinds()

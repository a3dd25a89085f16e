"""Proxy hooks through a real node and a real backend: an aiohttp app on 127.0.0.1.

The backend runs on its own event loop in a thread, records every call and answers
with ``respond(hook, body)``: (status, JSON body, seconds to wait first).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from support.backend import HttpBackend
from support.client import Client
from support.server import Server, small
from support.wait import wait_for

Answer = tuple[int, Any, float]


class Backend(HttpBackend):
    """POST /connect, /subscribe, /publish of the application's backend."""

    path = "/{hook}"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.respond: Callable[[str, dict[str, Any]], Answer] = lambda hook, body: (200, {}, 0.0)

    def url(self, hook: str) -> str:
        return f"http://127.0.0.1:{self.port}/{hook}"

    async def handle(self, request: web.Request) -> web.Response:
        hook = request.match_info["hook"]
        body = json.loads(await request.read())
        with self.lock:
            self.calls.append((hook, body))
        status, answer, delay = self.respond(hook, body)
        if delay:
            await asyncio.sleep(delay)
        return web.json_response(answer, status=status)

    def recorded(self, hook: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for h, body in self.calls if h == hook]


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    b.up()
    try:
        yield b
    finally:
        b.close()


def connect_answer(hook: str, body: dict[str, Any]) -> Answer:
    """Tokens ``ok-<user>`` get in (granted $vip), ``slow`` waits 3 s, the others not."""
    token = body.get("token") or ""
    if token.startswith("ok-"):
        return 200, {"user": token[3:], "channels": ["$vip"]}, 0.0
    if token == "slow":
        return 200, {"user": "late"}, 3.0
    return 403, {"error": f"unknown token {token}"}, 0.0


def proxied(serve: Callable[..., Server], backend: Backend, *flags: str) -> Server:
    return small(
        serve,
        "--auth-mode",
        "proxy",
        "--connect-url",
        backend.url("connect"),
        "--hook-timeout",
        "0.5",
        *flags,
    )


def test_the_connect_hook_says_who_the_client_is(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    backend.respond = connect_answer
    server = proxied(serve, backend)
    c = clients(server.port())
    assert c.call({"op": "sub", "channel": "news", "id": 0})["code"] == "unauthorized"
    hello = {"op": "hello", "token": "ok-ann", "data": {"app": [1, 2]}, "id": 1}
    assert c.call(hello) == {"ev": "ok", "id": 1}
    assert c.call({"op": "sub", "channel": "$vip", "id": 2}) == {"ev": "ok", "id": 2}
    (call,) = backend.recorded("connect")
    host, _, port = call.pop("address").rpartition(":")
    assert host == "127.0.0.1" and int(port) == c.sock.getsockname()[1]
    assert call == {"token": "ok-ann", "data": {"app": [1, 2]}, "service": "chat", "worker": 0}
    server.publish(user="ann", data="psst")
    assert c.recv()["data"] == "psst"  # the hub knows the backend's user
    stats = server.stats()
    assert stats["hooks"]["connect"] == {"ok": 1, "refused": 0, "unavailable": 0}
    status, metrics = server.http("GET", "/metrics")
    assert status == 200
    assert 'manydoors_hooks_total{hook="connect",outcome="ok"} 1.0' in metrics


def test_a_refusal_is_unauthorized_with_the_backends_reason(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    backend.respond = connect_answer
    server = proxied(serve, backend)
    c = clients(server.port())
    error = c.call({"op": "hello", "token": "forged", "id": 1})
    assert error == {
        "ev": "error",
        "code": "unauthorized",
        "reason": "unknown token forged",
        "id": 1,
    }
    assert c.recv() == {"ev": "bye", "reason": "unauthorized"}
    assert c.closed()
    assert server.stats()["hooks"]["connect"]["refused"] == 1


def test_a_slow_backend_is_unavailable_and_delays_nobody_else(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    backend.respond = connect_answer
    server = proxied(serve, backend)
    other = clients(server.port())
    assert other.call({"op": "hello", "token": "ok-bob", "id": 1})["ev"] == "ok"
    slow = clients(server.port())
    started = time.monotonic()
    slow.send({"op": "hello", "token": "slow", "id": 1})
    wait_for(lambda: backend.recorded("connect")[1:], 5, "the slow call to reach the backend")
    for n in range(20):  # the same worker answers others at once meanwhile
        t = time.monotonic()
        assert other.call({"op": "ping", "id": n}) == {"ev": "pong", "id": n}
        assert time.monotonic() - t < 0.2
    error = slow.recv()
    assert error["code"] == "unavailable" and error["id"] == 1, error
    assert "within 0.5 s" in error["reason"]
    assert 0.4 < time.monotonic() - started < 2.5
    assert slow.call({"op": "ping", "id": 2})["ev"] == "pong"  # still open
    stats = server.stats()
    assert stats["hooks"]["connect"]["unavailable"] == 1
    assert stats["errors"]["unavailable"] == 1


def test_a_backend_that_is_down_is_unavailable(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    backend.respond = connect_answer
    server = proxied(serve, backend)
    backend.down()  # the port is closed: connections are refused
    c = clients(server.port())
    error = c.call({"op": "hello", "token": "ok-ann", "id": 1})
    assert error["code"] == "unavailable" and "cannot be reached" in error["reason"]
    backend.up()  # back on the same port
    assert c.call({"op": "hello", "token": "ok-ann", "id": 2}) == {"ev": "ok", "id": 2}
    assert server.stats()["hooks"]["connect"] == {"ok": 1, "refused": 0, "unavailable": 1}


def test_subscribe_and_publish_proxies_decide_and_the_backend_may_replace_data(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    def respond(hook: str, body: dict[str, Any]) -> Answer:
        if hook == "subscribe":
            if body["channel"] == "secret":
                return 200, {"error": "members only"}, 0.0
            return 200, {"ok": True}, 0.0
        if body["data"] == "spam":
            return 403, {"error": "no spam"}, 0.0
        return 200, {"data": {"clean": body["data"].replace("darn", "d**n")}}, 0.0

    backend.respond = respond
    server = small(
        serve,
        "--subscribe",
        "proxy",
        "--subscribe-url",
        backend.url("subscribe"),
        "--publish-proxy",
        "true",
        "--publish-url",
        backend.url("publish"),
        "--publish",
        "subscribers",
    )
    a, b = clients(server.port()), clients(server.port())
    for name, c in (("ann", a), ("bo", b)):
        assert c.call({"op": "hello", "user": name, "id": 1})["ev"] == "ok"
        assert c.call({"op": "sub", "channel": "room", "id": 2}) == {"ev": "ok", "id": 2}
    refused = b.call({"op": "sub", "channel": "secret", "id": 3})
    assert refused == {"ev": "error", "code": "forbidden", "reason": "members only", "id": 3}
    assert backend.recorded("subscribe")[0] == {"user": "ann", "channel": "room", "service": "chat"}
    assert a.call({"op": "pub", "channel": "room", "data": "spam", "id": 4})["reason"] == "no spam"
    assert a.call({"op": "pub", "channel": "room", "data": "darn it", "id": 5})["ev"] == "ok"
    msg = b.until(lambda e: e["ev"] == "msg")[-1]
    assert (msg["from"], msg["data"]) == ("ann", {"clean": "d**n it"})
    assert backend.recorded("publish")[0] == {
        "user": "ann",
        "channel": "room",
        "data": "spam",
        "service": "chat",
    }
    hooks = server.stats()["hooks"]
    assert hooks["subscribe"] == {"ok": 2, "refused": 1, "unavailable": 0}
    assert hooks["publish"] == {"ok": 1, "refused": 1, "unavailable": 0}


# --- refresh --------------------------------------------------------------------------

SECRET = "a-test-secret-of-at-least-32-bytes!"


def jwt_for(user: str, exp: float) -> str:
    import jwt

    return jwt.encode({"sub": user, "exp": int(exp)}, SECRET, algorithm="HS256")


def test_a_token_is_refreshed_before_its_exp_then_the_connection_expires(
    serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = small(serve, "--auth-mode", "token", env={"MANYDOORS_AUTH_SECRET": SECRET})
    c = clients(server.port())
    end = int(time.time()) + 4
    assert c.call({"op": "hello", "token": jwt_for("ann", end), "id": 1})["ev"] == "ok"
    warning = c.recv()  # a quarter of the lifetime before the end
    assert warning["ev"] == "refresh" and 0 < warning["in"] <= 2, warning
    assert time.time() < end
    later = end + 3
    refreshed = c.call({"op": "refresh", "token": jwt_for("ann", later), "id": 2})
    assert refreshed == {"ev": "ok", "id": 2}
    assert c.recv()["ev"] == "refresh"  # the new end's warning
    assert c.recv() == {"ev": "bye", "reason": "expired"}
    assert time.time() >= later
    assert c.closed()
    assert server.stats()["closed"]["expired"] == 1


def test_a_proxy_connection_expires_at_expire_at(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = proxied(serve, backend)
    c = clients(server.port())
    # The warning comes a quarter of the lifetime before the end (1.5 s): room for a
    # busy machine's late tick, which would skip a warning already past.
    end = time.time() + 6
    backend.respond = lambda hook, body: (200, {"user": "ann", "expire_at": end}, 0.0)
    assert c.call({"op": "hello", "token": "t", "id": 1})["ev"] == "ok"
    assert c.recv()["ev"] == "refresh"
    assert c.recv() == {"ev": "bye", "reason": "expired"}
    assert time.time() >= end

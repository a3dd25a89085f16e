"""Webhooks to a real backend: an aiohttp app on 127.0.0.1 that records every call.

The backend runs on its own event loop in a thread, so the blocking clients of a
``manydoors serve`` test and the sender's own loop (in-process tests) both reach it.
Every recorded call is checked with ``standardwebhooks``, the reference library.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from manydoors.config import HooksConfig
from manydoors.server.webhooks import RetryPolicy, Webhooks
from support.backend import HttpBackend
from support.client import Client
from support.server import Server, small
from support.wait import poll, wait_for

SECRET = "whsec_" + base64.b64encode(b"manydoors-webhook-test-key!").decode()


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def verified(self) -> dict[str, Any]:
        return dict(Webhook(SECRET).verify(self.body, self.headers))


class Backend(HttpBackend):
    """The application's webhook endpoint, ``POST /events``; goes down and comes back
    on the same port. ``status`` and ``delay`` say how it answers."""

    path = "/events"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.status = 200
        self.delay = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def handle(self, request: web.Request) -> web.Response:
        call = Call(dict(request.headers), await request.read())
        with self.lock:
            self.calls.append(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status)

    def recorded(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The verified bodies of the calls so far (of type ``kind``), in arrival order."""
        bodies = [c.verified() for c in self.recorded()]
        return [b for b in bodies if kind is None or b["type"] == kind]


@pytest.fixture
def backend() -> Iterator[Backend]:
    """A backend that is up; a test asks for it before ``serve`` so that it outlives
    the server (the server's last events reach it)."""
    b = Backend()
    b.up()
    try:
        yield b
    finally:
        b.close()


def hooked(serve: Callable[..., Server], backend: Backend, *flags: str) -> Server:
    return small(
        serve,
        "--webhook-url",
        backend.url,
        "--publish",
        "all",
        *flags,
        env={"MANYDOORS_WEBHOOK_SECRET": SECRET},
    )


def channel_events(backend: Backend) -> list[tuple[str, str]]:
    return [
        (e["type"], e["data"]["channel"])
        for e in backend.events()
        if e["type"] in ("channel_occupied", "channel_vacated")
    ]


# --- through a real node -------------------------------------------------------------------


def test_channel_occupied_and_vacated_arrive_signed(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = hooked(serve, backend)
    a, b = clients(server.port()), clients(server.port())
    for n, c in enumerate((a, b)):
        assert c.call({"op": "hello", "user": f"u{n}", "id": 1})["ev"] == "ok"
        assert c.call({"op": "sub", "channel": "news", "id": 2})["ev"] == "ok"
    wait_for(lambda: backend.events("channel_occupied"), 10, "channel_occupied")
    a.call({"op": "unsub", "channel": "news", "id": 3})
    b.close()  # the node's last subscriber of news is gone
    wait_for(lambda: backend.events("channel_vacated"), 10, "channel_vacated")
    assert channel_events(backend) == [("channel_occupied", "news"), ("channel_vacated", "news")]
    (occupied,) = backend.events("channel_occupied")
    assert set(occupied["data"]) == {"channel", "node"}
    assert occupied["data"]["node"] == backend.events("channel_vacated")[0]["data"]["node"]
    stats = wait_for(
        lambda: (s := server.stats()["webhooks"])["delivered"] == len(backend.recorded()) and s,
        10,
        "delivered to match the calls",
    )
    assert stats["url"] == backend.url
    assert (stats["failed"], stats["dropped"], stats["rejected"], stats["invalid"]) == (0, 0, 0, 0)
    status, metrics = server.http("GET", "/metrics")
    assert status == 200
    assert f'manydoors_webhooks_total{{outcome="delivered"}} {stats["delivered"]}.0' in metrics


def test_events_queued_while_the_backend_is_down_arrive_after_once_each(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    backend.down()  # the port is closed: connections are refused
    server = hooked(serve, backend)
    c = clients(server.port())
    c.call({"op": "hello", "user": "alice", "id": 1})
    channels = ["a", "b", "c"]
    for n, channel in enumerate(channels):
        c.call({"op": "sub", "channel": channel, "id": 10 + n})
    for n, channel in enumerate(channels):
        c.call({"op": "unsub", "channel": channel, "id": 20 + n})
    wait_for(
        lambda: server.stats()["webhooks"]["retried"] >= 2 * len(channels), 15, "failed attempts"
    )
    assert server.stats()["webhooks"]["delivered"] == 0
    backend.up()  # back, on the same port
    want = len(channels) * 2
    wait_for(lambda: len(channel_events(backend)) >= want, 20, "the queued events")
    got = channel_events(backend)
    assert sorted(got) == sorted(
        [("channel_occupied", ch) for ch in channels] + [("channel_vacated", ch) for ch in channels]
    )
    calls = backend.recorded()
    assert len({call.id for call in calls}) == len(calls)  # none twice
    stats = wait_for(
        lambda: (s := server.stats()["webhooks"])["delivered"] == len(backend.recorded()) and s,
        10,
        "delivered to match the calls",
    )
    assert (stats["failed"], stats["dropped"], stats["queued"]) == (0, 0, 0)
    assert stats["last_error"].startswith("ClientConnectorError: Cannot connect"), stats


def test_a_slow_backend_never_delays_the_clients(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    backend.delay = 5.0  # past the 1 s timeout: every call times out
    server = hooked(serve, backend, "--hook-timeout", "1")
    c = clients(server.port())
    c.call({"op": "hello", "user": "alice", "id": 1})
    rounds: list[float] = []

    def round_trips(first: int) -> None:
        for n in range(first, first + 20):
            start = time.monotonic()
            channel = f"ch{n}"  # a new channel each time: a new channel_occupied webhook
            assert c.call({"op": "sub", "channel": channel, "id": 2 * n})["ev"] == "ok"
            assert c.call({"op": "pub", "channel": channel, "data": n, "id": 2 * n + 1})
            message = c.recv()
            assert message["data"] == n, message
            rounds.append(time.monotonic() - start)

    round_trips(0)  # while the first calls wait on the backend
    wait_for(
        lambda: "no answer within 1 s" in server.stats()["webhooks"]["last_error"],
        10,
        "a webhook timeout",
    )
    round_trips(100)  # while calls time out and are retried
    # Waiting on the backend would take its 1 s timeout (or its 5 s) at least once.
    assert max(rounds) < 0.9 and sorted(rounds)[len(rounds) // 2] < 0.1, rounds
    assert len(backend.recorded()) > 0
    stats = server.stats()["webhooks"]
    assert stats["retried"] > 0 and stats["delivered"] == 0


def test_connect_and_disconnect_arrive_with_the_user_and_the_reason(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = hooked(serve, backend)
    c = clients(server.port())
    c.call({"op": "hello", "user": "alice", "id": 1})
    (connect,) = wait_for(lambda: backend.events("connect"), 10, "connect")
    local = c.sock.getsockname()
    assert connect["data"] == {
        "user": "alice",
        "service": "chat",
        "address": f"{local[0]}:{local[1]}",
        "node": connect["data"]["node"],
    }
    c.close()
    (disconnect,) = wait_for(lambda: backend.events("disconnect"), 10, "disconnect")
    assert disconnect["data"]["user"] == "alice"
    assert disconnect["data"]["reason"] == "client", disconnect  # the client hung up


def test_a_stopping_node_sends_its_last_events_before_it_exits(
    backend: Backend, serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = hooked(serve, backend)
    c = clients(server.port())
    c.call({"op": "hello", "user": "alice", "id": 1})
    c.call({"op": "sub", "channel": "news", "id": 2})
    wait_for(lambda: backend.events("channel_occupied"), 10, "channel_occupied")
    assert server.stop() == 0
    assert backend.events("channel_vacated")[0]["data"]["channel"] == "news"
    (disconnect,) = backend.events("disconnect")
    assert disconnect["data"]["reason"] == "shutdown"


# --- the sender in this process, against the backend ---------------------------------------


def run_sender(backend: Backend, test: Callable[[Webhooks], Any], **hooks: Any) -> Webhooks:
    config = HooksConfig(webhook_url=backend.url, webhook_secret=SECRET, **hooks)
    policy = RetryPolicy(base=0.05, cap=0.2, max_attempts=20)
    sender = Webhooks(config, "here", policy=policy, flush_timeout=5.0)

    async def main() -> None:
        await sender.start()
        try:
            await test(sender)
        finally:
            await sender.close()

    asyncio.run(main())
    return sender


def test_the_sender_posts_signed_events_over_http(backend: Backend) -> None:
    async def test(hooks: Webhooks) -> None:
        for n in range(50):
            hooks.emit("connect", {"user": f"u{n}"})
        await poll(lambda: hooks.delivered == 50, 10, "50 deliveries")

    sender = run_sender(backend, test, concurrency=4)
    users = sorted(e["data"]["user"] for e in backend.events("connect"))
    assert users == sorted(f"u{n}" for n in range(50))
    assert all(c.headers["User-Agent"] == "manydoors-webhooks" for c in backend.recorded())
    assert sender.stats().retried == 0


def test_the_sender_retries_a_5xx_and_a_timeout_under_one_id(backend: Backend) -> None:
    backend.status = 503

    async def test(hooks: Webhooks) -> None:
        hooks.emit("disconnect", {"user": "u", "reason": "closed"})
        await poll(lambda: len(backend.recorded()) >= 2, 10, "two 503s")
        backend.status, backend.delay = 200, 1.0  # now slower than the 0.3 s timeout
        await poll(lambda: "no answer" in hooks.last_error, 10, "a timeout")
        backend.delay = 0.0
        await poll(lambda: hooks.delivered == 1, 10, "the delivery")

    sender = run_sender(backend, test, timeout=0.3)
    calls = backend.recorded()
    assert len({c.id for c in calls}) == 1  # every attempt is the same event
    assert len({c.body for c in calls}) == 1
    for call in calls:
        call.verified()
    assert msgspec.json.decode(calls[0].body)["data"] == {"user": "u", "reason": "closed"}
    s = sender.stats()
    assert (s.delivered, s.failed, s.rejected) == (1, 0, 0) and s.retried == len(calls) - 1


def test_the_sender_counts_a_4xx_as_rejected_without_retrying(backend: Backend) -> None:
    backend.status = 410

    async def test(hooks: Webhooks) -> None:
        hooks.emit("leave", {"user": "u", "channel": "c"})
        await poll(lambda: hooks.rejected == 1, 10, "the rejection")

    sender = run_sender(backend, test)
    assert len(backend.recorded()) == 1
    assert sender.stats().last_error == "HTTP 410"

"""The webhook sender over a fake backend and a fake clock (no sockets, no sleeping).

Signatures are checked with ``standardwebhooks``, the Standard Webhooks reference
library, never with our own code. The sender against a real HTTP backend is in
tests/live/test_webhooks.py.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from standardwebhooks import Webhook

from manydoors import cli
from manydoors.broker.backplane import LocalBackplane
from manydoors.broker.router import Router
from manydoors.config import HooksConfig
from manydoors.protocol.ipc import Kind
from manydoors.server.api import _Collector
from manydoors.server.nodestats import NodeStats
from manydoors.server.webhooks import (
    RetryPolicy,
    Webhooks,
    public_url,
    secret_key,
    sign,
    verdict,
)
from support.wait import poll

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
URL = "http://127.0.0.1:9/events"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

Answer = int | tuple[int, float | None] | BaseException


class Backend:
    """A fake POST: answers from a script (then 200), records every call."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[bytes, dict[str, str]]] = []
        self.gate: asyncio.Event | None = None  # set: calls wait for it
        self.busy = 0
        self.most_busy = 0

    async def __call__(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, float | None]:
        self.calls.append((body, dict(headers)))
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.busy -= 1
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, BaseException):
            raise answer
        return answer if isinstance(answer, tuple) else (answer, None)

    def ids(self) -> set[str]:
        return {h["webhook-id"] for _, h in self.calls}


class Clock:
    """Monotonic time that moves only when the sender sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def hooks(**kw: Any) -> HooksConfig:
    return HooksConfig(webhook_url=URL, webhook_secret=SECRET, **kw)


def sender(backend: Backend, clock: Clock | None = None, **kw: Any) -> Webhooks:
    clock = clock or Clock()
    policy = kw.pop("policy", RetryPolicy(base=1.0, cap=8.0, max_attempts=5, max_age=100.0))
    flush = kw.pop("flush_timeout", 1.0)
    return Webhooks(
        hooks(**kw),
        "node-1",
        policy=policy,
        post=backend,
        sleep=clock.sleep,
        clock=clock.time,
        rand=lambda: 1.0,  # the longest wait of each step: delays are known
        flush_timeout=flush,
    )


def run(test: Callable[[], Any]) -> Any:
    return asyncio.run(test())


async def settle(hooks: Webhooks, what: str = "the queue to empty") -> None:
    await poll(lambda: hooks.queue.qsize() == 0 and hooks.in_flight == 0, 5, what)


# --- signing ----------------------------------------------------------------------------


def test_a_delivery_verifies_with_the_standardwebhooks_library() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        assert hooks.emit("connect", {"user": "alice", "service": "chat"})
        await settle(hooks)
        await hooks.close()

    run(main)
    ((body, headers),) = backend.calls
    event = Webhook(SECRET).verify(body, headers)
    assert event["type"] == "connect"
    assert event["data"] == {"user": "alice", "service": "chat"}
    assert ISO_UTC.match(event["timestamp"]), event["timestamp"]
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"].startswith("msg_")
    assert headers["webhook-signature"].startswith("v1,")


def test_a_tampered_body_or_another_secret_fails_verification() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        hooks.emit("connect", {"user": "alice"})
        await settle(hooks)
        await hooks.close()

    run(main)
    ((body, headers),) = backend.calls
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body.replace(b"alice", b"mallory"), headers)
    other = "whsec_" + base64.b64encode(b"x" * 24).decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other).verify(body, headers)


def test_sign_matches_the_library_for_the_same_id_time_and_body() -> None:
    body = b'{"type":"connect"}'
    mine = sign(secret_key(SECRET), "msg_1", 1_700_000_000, body)
    theirs = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body)
    assert mine == theirs


def test_secret_key_takes_whsec_base64_with_or_without_prefix_or_padding() -> None:
    raw = b"0123456789abcdef0123"
    text = base64.b64encode(raw).decode()
    assert secret_key("whsec_" + text) == raw
    assert secret_key(text) == raw
    assert secret_key("whsec_" + text.rstrip("=")) == raw


@pytest.mark.parametrize(
    "bad", ["whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_secret_key_refuses_what_is_not_a_key(bad: str) -> None:
    with pytest.raises(ValueError, match="webhook_secret"):
        secret_key(bad)


# --- the queue --------------------------------------------------------------------------


def test_a_full_queue_drops_new_events_and_counts_them() -> None:
    async def main() -> None:
        hooks = sender(Backend(), queue_size=3)  # not started: nothing leaves the queue
        kept = [hooks.emit("connect", {"n": n}) for n in range(5)]
        assert kept == [True, True, True, False, False]
        s = hooks.stats()
        assert (s.queued, s.dropped, s.queue_size) == (3, 2, 3)
        await hooks.close()
        assert hooks.stats().dropped == 5  # never started: the three queued are lost too

    run(main)


def test_events_the_backend_did_not_ask_for_are_neither_queued_nor_counted() -> None:
    async def main() -> None:
        hooks = sender(Backend(), webhook_events=("channel_occupied",))
        assert not hooks.emit("connect", {"user": "a"})
        hooks.worker_event("disconnect", b'{"user":"a"}', "chat")
        s = hooks.stats()
        assert (s.queued, s.dropped, s.invalid, s.events) == (0, 0, 0, ["channel_occupied"])
        await hooks.close()

    run(main)


def test_no_more_than_concurrency_deliveries_are_in_flight() -> None:
    backend = Backend()

    async def main() -> None:
        backend.gate = asyncio.Event()
        hooks = sender(backend, concurrency=3)
        await hooks.start()
        for n in range(10):
            hooks.emit("connect", {"n": n})
        await poll(lambda: backend.busy == 3, 5, "three posts in flight")
        for _ in range(5):
            await asyncio.sleep(0)
        assert (backend.busy, hooks.stats().in_flight, hooks.stats().queued) == (3, 3, 7)
        backend.gate.set()
        await settle(hooks)
        await hooks.close()
        assert hooks.stats().delivered == 10

    run(main)
    assert backend.most_busy == 3


# --- retries ----------------------------------------------------------------------------


def test_5xx_429_and_no_answer_are_retried_with_the_same_id_and_growing_waits() -> None:
    backend = Backend(503, ConnectionRefusedError(111, "refused"), TimeoutError(), 429)
    clock = Clock()

    async def main() -> None:
        hooks = sender(backend, clock)
        await hooks.start()
        hooks.emit("channel_occupied", {"channel": "news"})
        await settle(hooks)
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.retried, s.failed, s.rejected) == (1, 4, 0, 0)
        assert s.last_error == "HTTP 429"

    run(main)
    assert len(backend.calls) == 5
    assert len(backend.ids()) == 1  # one event, one webhook-id: the backend deduplicates
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0]  # base 1 s doubling, rand = 1.0
    for body, headers in backend.calls:  # every attempt is signed at its own time
        Webhook(SECRET).verify(body, headers)


def test_a_4xx_other_than_429_is_final_and_counted_as_rejected() -> None:
    backend = Backend(400, 404)

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        hooks.emit("connect", {"n": 1})
        hooks.emit("connect", {"n": 2})
        await settle(hooks)
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.retried, s.rejected, s.last_error) == (0, 0, 2, "HTTP 404")

    run(main)
    assert len(backend.calls) == 2


def test_a_backend_that_keeps_failing_is_given_up_after_max_attempts() -> None:
    backend = Backend(*[500] * 10)
    clock = Clock()

    async def main() -> None:
        hooks = sender(backend, clock)
        await hooks.start()
        hooks.emit("connect", {})
        await settle(hooks)
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.retried, s.failed) == (0, 4, 1)

    run(main)
    assert len(backend.calls) == 5  # max_attempts


def test_an_event_older_than_max_age_is_given_up() -> None:
    backend = Backend(*[500] * 10)
    clock = Clock()
    policy = RetryPolicy(base=4.0, cap=60.0, max_attempts=100, max_age=30.0)

    async def main() -> None:
        hooks = sender(backend, clock, policy=policy)
        await hooks.start()
        hooks.emit("connect", {})
        await settle(hooks)
        await hooks.close()
        assert hooks.stats().failed == 1

    run(main)
    assert clock.sleeps == [4.0, 8.0, 16.0]  # the next wait (32 s) would pass 30 s of age
    assert len(backend.calls) == 4


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    backend = Backend((429, 5.0), (503, 600.0))
    clock = Clock()

    async def main() -> None:
        hooks = sender(backend, clock)
        await hooks.start()
        hooks.emit("connect", {})
        await settle(hooks)
        await hooks.close()

    run(main)
    assert clock.sleeps == [5.0, 8.0]  # 5 s asked (over the 1 s step); 600 s capped at 8 s


def test_backoff_doubles_to_the_cap_with_half_of_each_step_random() -> None:
    policy = RetryPolicy(base=0.5, cap=10.0)
    assert [policy.delay(n, lambda: 1.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 10]
    assert [policy.delay(n, lambda: 0.0) for n in range(1, 7)] == [0.25, 0.5, 1, 2, 4, 5]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (301, "rejected"),
        (400, "rejected"),
        (408, "rejected"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
    ],
)
def test_verdict_of_each_status(status: int, outcome: str) -> None:
    assert verdict(status) == outcome


def test_an_unexpected_error_fails_that_event_and_the_sender_goes_on() -> None:
    backend = Backend(ValueError("a bug"))

    async def main() -> None:
        hooks = sender(backend, concurrency=1)
        await hooks.start()
        hooks.emit("connect", {"n": 1})
        hooks.emit("connect", {"n": 2})
        await settle(hooks)
        await hooks.close()
        s = hooks.stats()
        assert (s.failed, s.delivered, s.last_error) == (1, 1, "ValueError: a bug")

    run(main)


def test_every_event_has_its_own_id() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        for n in range(100):
            hooks.emit("connect", {"n": n})
        await settle(hooks)
        await hooks.close()

    run(main)
    assert len(backend.ids()) == 100


# --- stopping ---------------------------------------------------------------------------


def test_close_delivers_what_is_queued_when_the_backend_answers() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend, concurrency=2)
        await hooks.start()
        for n in range(20):
            hooks.emit("disconnect", {"n": n})
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.dropped, s.queued, s.in_flight) == (20, 0, 0, 0)

    run(main)


def test_close_gives_up_after_the_flush_time_and_counts_the_rest_as_dropped() -> None:
    backend = Backend()

    async def main() -> None:
        backend.gate = asyncio.Event()  # the backend never answers
        hooks = sender(backend, concurrency=2, flush_timeout=0.05)
        await hooks.start()
        for n in range(5):
            hooks.emit("disconnect", {"n": n})
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.dropped, s.queued, s.in_flight) == (0, 5, 0, 0)
        assert not hooks.emit("disconnect", {"n": 6})  # stopped: dropped, counted
        assert hooks.stats().dropped == 6

    run(main)


# --- where events come from ---------------------------------------------------------------


def test_a_worker_event_keeps_its_fields_and_gains_the_node_and_service() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        hooks.worker_event("disconnect", b'{"user":"bob","reason":"closed"}', "chat")
        hooks.worker_event("connect", b'{"user":"al","service":"web"}', "chat")
        hooks.worker_event("connect", b'["not", "an", "object"]', "chat")
        hooks.worker_event("connect", b"{broken", "chat")
        await settle(hooks)
        await hooks.close()
        assert hooks.stats().invalid == 2

    run(main)
    data = [msgspec.json.decode(body)["data"] for body, _ in backend.calls]
    assert {"user": "bob", "reason": "closed", "service": "chat", "node": "node-1"} in data
    assert {"user": "al", "service": "web", "node": "node-1"} in data


def test_the_router_reports_a_channels_first_and_last_subscriber_on_the_node() -> None:
    seen: list[tuple[str, str]] = []
    router = Router(LocalBackplane(10, 60.0), events=lambda e, c: seen.append((e, c)))
    a, b = object(), object()  # the router only keeps links in sets here
    for link in (a, b):
        router.attach(link)  # type: ignore[arg-type]
    for link in (a, b):
        router.on_frame(link, Kind.SUB, "news", b"")  # type: ignore[arg-type]
    assert seen == [("channel_occupied", "news")]
    router.on_frame(a, Kind.UNSUB, "news", b"")  # type: ignore[arg-type]
    router.detach(b)  # type: ignore[arg-type]
    assert seen == [("channel_occupied", "news"), ("channel_vacated", "news")]


def test_a_router_without_webhooks_calls_nothing() -> None:
    router = Router(LocalBackplane(10, 60.0))
    link = object()
    router.attach(link)  # type: ignore[arg-type]
    router.on_frame(link, Kind.SUB, "news", b"")  # type: ignore[arg-type]
    router.on_frame(link, Kind.UNSUB, "news", b"")  # type: ignore[arg-type]
    assert router.events is None and not router.channels


# --- figures ----------------------------------------------------------------------------


def test_stats_and_metrics_show_each_outcome() -> None:
    backend = Backend(400, 500)

    async def main() -> NodeStats:
        hooks = sender(backend, queue_size=2)
        hooks.emit("connect", {"n": 1})
        hooks.emit("connect", {"n": 2})
        hooks.emit("connect", {"n": 3})  # dropped: the queue holds two
        await hooks.start()
        await settle(hooks)
        await hooks.close()
        view = NodeStats([], Router(LocalBackplane(10, 60.0)), 1000, lambda: False)
        view.webhooks = hooks.stats
        return view

    view = run(main)
    got = view.stats()["webhooks"]
    assert got["url"] == URL and got["queue_size"] == 2
    outcomes = {k: got[k] for k in ("delivered", "retried", "failed", "rejected", "dropped")}
    assert outcomes == {"delivered": 1, "retried": 1, "failed": 0, "rejected": 1, "dropped": 1}
    families = {m.name: m for m in _Collector(view).collect()}
    samples = {s.labels.get("outcome"): s.value for s in families["manydoors_webhooks"].samples}
    assert samples["delivered"] == 1 and samples["rejected"] == 1 and samples["dropped"] == 1
    assert "manydoors_webhooks_queued" in families and "manydoors_webhooks_in_flight" in families


def test_stats_without_webhooks_have_no_webhooks_object() -> None:
    view = NodeStats([], Router(LocalBackplane(10, 60.0)), 1000, lambda: False)
    assert "webhooks" not in view.stats()
    assert "manydoors_webhooks" not in {m.name for m in _Collector(view).collect()}


def test_the_url_in_stats_has_no_password() -> None:
    assert public_url("https://u:p@hooks.example:8443/x?y=1") == "https://hooks.example:8443/x?y=1"
    assert public_url(URL) == URL


def test_serve_refuses_a_secret_that_is_not_whsec_base64(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", "--port", "0", "--api-port", "0", "--webhook-url", URL]
    assert cli.main([*argv, "--webhook-secret", "whsec_not base64!"]) == 1  # nothing started
    assert "webhook_secret must be whsec_ followed by base64" in capsys.readouterr().err

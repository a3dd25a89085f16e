"""Pusher webhooks (server/pusherhooks.py) over a fake backend: bodies and signatures
checked with the PyPI ``pusher`` library's ``validate_webhook``, batching, order,
retries, bounds, and which events reach which app (or the node's own webhooks).

The sender against a real HTTP backend and a real node is in
tests/live/test_pusher_api.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pusher
import pytest
from msgspec import Raw

from manydoors.broker.backplane import LocalBackplane
from manydoors.broker.router import Router
from manydoors.config import AppConfig, Config, HooksConfig, ServiceConfig
from manydoors.protocol.ipc import Kind
from manydoors.pusher import frames, names
from manydoors.server.api import _Collector
from manydoors.server.nodestats import NodeStats
from manydoors.server.pusherhooks import (
    BATCH_EVENTS,
    AppWebhooks,
    PusherWebhooks,
    channel_events,
    member_events,
)
from manydoors.server.supervisor import Supervisor
from manydoors.server.webhooks import RetryPolicy
from support.wait import poll
from unit.test_webhooks import Backend, Clock

URL = "http://127.0.0.1:9/pusher"
APP = AppConfig(id="1001", key="app-key", secret="app-secret", webhook_url=URL)
QUIET = AppConfig(
    id="1002",
    key="quiet-key",
    secret="quiet-secret",
    webhook_url=URL,
    webhook_events=("member_added",),
)
BARE = AppConfig(id="1003", key="bare-key", secret="bare-secret")  # no webhook_url


def library(app: AppConfig = APP) -> Any:
    return pusher.Pusher(app_id=app.id, key=app.key, secret=app.secret)


def sender(backend: Backend, clock: Clock | None = None, **kw: Any) -> AppWebhooks:
    clock = clock or Clock()
    policy = kw.pop("policy", RetryPolicy(base=1.0, cap=8.0, max_attempts=5, max_age=100.0))
    return AppWebhooks(
        kw.pop("app", APP),
        HooksConfig(**kw),
        policy=policy,
        post=backend,
        sleep=clock.sleep,
        clock=clock.time,
        rand=lambda: 1.0,
        flush_timeout=1.0,
        batch_wait=0.0,
    )


def run(test: Callable[[], Any]) -> Any:
    return asyncio.run(test())


async def settle(hooks: AppWebhooks) -> None:
    await poll(lambda: not hooks.pending and hooks.in_flight == 0 and hooks.idle.is_set(), 5)


def bodies(backend: Backend, app: AppConfig = APP) -> list[dict[str, Any]]:
    """Every POST's body, each validated by the library as a backend would."""
    out = []
    for body, headers in backend.calls:
        assert headers["Content-Type"] == "application/json"
        checked = library(app).validate_webhook(
            headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body
        )
        assert checked is not None, "validate_webhook refused the body"
        out.append(checked)
    return out


# --- bodies, signatures, batches ------------------------------------------------------------


def test_events_together_share_one_post_the_library_validates() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        hooks.emit({"name": "channel_occupied", "channel": "chat"})
        hooks.emit({"name": "member_added", "channel": "presence-r", "user_id": "alice"})
        await hooks.start()  # both wait already: one POST
        await settle(hooks)
        await hooks.close()

    run(main)
    (body,) = bodies(backend)
    assert body["events"] == [
        {"name": "channel_occupied", "channel": "chat"},
        {"name": "member_added", "channel": "presence-r", "user_id": "alice"},
    ]
    assert isinstance(body["time_ms"], int)


def test_a_burst_goes_in_posts_of_at_most_a_hundred_in_order() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        for n in range(BATCH_EVENTS * 2 + 5):
            hooks.emit({"name": "channel_occupied", "channel": f"c{n}"})
        await hooks.start()
        await settle(hooks)
        await hooks.close()
        assert hooks.stats().delivered == BATCH_EVENTS * 2 + 5

    run(main)
    sent = [[e["channel"] for e in b["events"]] for b in bodies(backend)]
    assert [len(s) for s in sent] == [100, 100, 5]
    assert [c for s in sent for c in s] == [f"c{n}" for n in range(205)]


def test_only_the_app_s_webhook_events_are_sent() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend, app=QUIET)
        assert not hooks.emit({"name": "channel_occupied", "channel": "chat"})
        assert hooks.emit({"name": "member_added", "channel": "presence-r", "user_id": "a"})
        await hooks.start()
        await settle(hooks)
        await hooks.close()
        assert hooks.stats().dropped == 0

    run(main)
    assert [e["name"] for b in bodies(backend, QUIET) for e in b["events"]] == ["member_added"]


# --- retries, bounds, stopping ---------------------------------------------------------------


def test_a_backend_down_is_retried_with_the_same_body_then_delivered() -> None:
    backend = Backend(503, ConnectionRefusedError(111, "refused"), 500)
    clock = Clock()

    async def main() -> None:
        hooks = sender(backend, clock)
        await hooks.start()
        hooks.emit({"name": "channel_vacated", "channel": "chat"})
        await settle(hooks)
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.retried, s.failed, s.last_error) == (1, 3, 0, "HTTP 500")

    run(main)
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert len({body for body, _ in backend.calls}) == 1  # one webhook, sent again as it was
    assert len(bodies(backend)) == 4


def test_the_events_of_a_post_given_up_or_rejected_are_counted_so() -> None:
    backend = Backend(*[500] * 5, 400)

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        for n in range(3):
            hooks.emit({"name": "channel_occupied", "channel": f"c{n}"})
        await settle(hooks)  # five attempts: given up
        hooks.emit({"name": "channel_occupied", "channel": "x"})
        await settle(hooks)  # 400: final
        await hooks.close()
        s = hooks.stats()
        assert (s.failed, s.rejected, s.retried, s.delivered) == (3, 1, 4, 0)

    run(main)


def test_pusher_s_retry_window_ends_inside_validate_webhook_s_five_minutes() -> None:
    hooks = AppWebhooks(APP, HooksConfig())
    assert hooks.policy.max_age < 300
    assert hooks.concurrency == 1  # one POST at a time: the app's events stay in order


def test_events_that_waited_past_max_age_are_given_up_not_sent() -> None:
    backend = Backend()
    clock = Clock()

    async def main() -> None:
        hooks = sender(backend, clock)
        hooks.emit({"name": "channel_occupied", "channel": "old"})
        clock.now += 101  # max_age is 100 s
        hooks.emit({"name": "channel_occupied", "channel": "new"})
        await hooks.start()
        await settle(hooks)
        await hooks.close()
        assert (hooks.stats().failed, hooks.stats().delivered) == (1, 1)

    run(main)
    assert [e["channel"] for b in bodies(backend) for e in b["events"]] == ["new"]


def test_past_queue_size_new_events_are_dropped_and_counted() -> None:
    async def main() -> None:
        hooks = sender(Backend(), queue_size=3)  # not started: nothing leaves
        kept = [hooks.emit({"name": "channel_occupied", "channel": f"c{n}"}) for n in range(5)]
        assert kept == [True, True, True, False, False]
        s = hooks.stats()
        assert (s.queued, s.dropped, s.queue_size) == (3, 2, 3)
        await hooks.close()
        assert hooks.stats().dropped == 5

    run(main)


def test_close_sends_what_waits_then_refuses_new_events() -> None:
    backend = Backend()

    async def main() -> None:
        hooks = sender(backend)
        await hooks.start()
        for n in range(150):
            hooks.emit({"name": "channel_vacated", "channel": f"c{n}"})
        await hooks.close()
        assert (hooks.stats().delivered, hooks.stats().dropped) == (150, 0)
        assert not hooks.emit({"name": "channel_vacated", "channel": "late"})
        assert hooks.stats().dropped == 1

    run(main)


def test_close_gives_up_on_a_backend_that_never_answers() -> None:
    backend = Backend()

    async def main() -> None:
        backend.gate = asyncio.Event()  # never set
        hooks = sender(backend)
        hooks.flush_timeout = 0.05
        await hooks.start()
        for n in range(3):
            hooks.emit({"name": "channel_vacated", "channel": f"c{n}"})
        await hooks.close()
        s = hooks.stats()
        assert (s.delivered, s.dropped, s.queued, s.in_flight) == (0, 3, 0, 0)

    run(main)


# --- where events come from -----------------------------------------------------------------


def webhooks(backend: Backend) -> PusherWebhooks:
    return PusherWebhooks(
        [APP, QUIET, BARE], HooksConfig(), post=backend, batch_wait=0.0, flush_timeout=1.0
    )


def test_router_and_worker_events_reach_their_app_as_pusher_names_them() -> None:
    backend = Backend()

    async def main() -> PusherWebhooks:
        hooks = webhooks(backend)
        assert set(hooks.apps) == {APP.id, QUIET.id}  # BARE has no webhook_url
        await hooks.start()
        hooks.channel("channel_occupied", names.channel(APP.id, "chat"))
        hooks.channel("channel_occupied", "native")  # not an app's: nobody's
        hooks.channel("channel_occupied", names.channel("9999", "chat"))  # no such app
        alice = frames.member_key("alice", Raw(b'{"name":"Alice"}'))
        hooks.member("join", names.channel(APP.id, "presence-r"), alice)
        hooks.member(
            "leave", names.channel(APP.id, "presence-r"), frames.member_key("7", Raw(b"1"))
        )
        hooks.member("join", names.channel(QUIET.id, "presence-r"), alice)
        hooks.member("join", names.channel(APP.id, "presence-r"), "not a member key")
        report = {
            "app_id": APP.id,
            "channel": "private-chat",
            "event": "client-typing",
            "data": {"typing": True},
            "socket_id": "1.2",
            "user_id": "alice",
        }
        hooks.worker_event(
            "pusher_client_event", json.dumps(report, separators=(",", ":")).encode()
        )
        report.update(data="already a string", event="client-said")
        del report["user_id"]
        hooks.worker_event("pusher_client_event", json.dumps(report).encode())
        miss = {"app_id": APP.id, "channel": "cache-news"}
        hooks.worker_event("pusher_cache_miss", json.dumps(miss).encode())
        hooks.worker_event("pusher_cache_miss", b"{broken")
        hooks.worker_event("pusher_unknown", json.dumps(miss).encode())
        await poll(lambda: all(h.idle.is_set() for h in hooks.apps.values()), 5)
        await hooks.close()
        return hooks

    hooks = run(main)
    assert hooks.stats().invalid == 3
    events: dict[str, list[Any]] = {}
    for body, headers in backend.calls:
        app = APP if headers["X-Pusher-Key"] == APP.key else QUIET
        checked = library(app).validate_webhook(app.key, headers["X-Pusher-Signature"], body)
        events.setdefault(app.id, []).extend(checked["events"])
    assert events[QUIET.id] == [
        {"name": "member_added", "channel": "presence-r", "user_id": "alice"}
    ]
    assert events[APP.id] == [
        {"name": "channel_occupied", "channel": "chat"},
        {"name": "member_added", "channel": "presence-r", "user_id": "alice"},
        {"name": "member_removed", "channel": "presence-r", "user_id": "7"},
        {
            "name": "client_event",
            "channel": "private-chat",
            "event": "client-typing",
            "data": '{"typing":true}',  # Pusher's webhooks carry data as a string
            "socket_id": "1.2",
            "user_id": "alice",
        },
        {
            "name": "client_event",
            "channel": "private-chat",
            "event": "client-said",
            "data": "already a string",
            "socket_id": "1.2",
        },
        {"name": "cache_miss", "channel": "cache-news"},
    ]


def test_the_router_callbacks_split_app_channels_from_native_ones() -> None:
    native: list[tuple[str, ...]] = []
    apps: list[tuple[str, ...]] = []
    both = channel_events(lambda *a: native.append(a), lambda *a: apps.append(a))
    assert both is not None
    both("channel_occupied", "news")
    both("channel_occupied", names.channel("1001", "news"))
    assert native == [("channel_occupied", "news")]
    assert apps == [("channel_occupied", names.channel("1001", "news"))]
    only_native = member_events(lambda *a: native.append(a), None)
    assert only_native is not None
    only_native("join", names.channel("1001", "presence-r"), "k")  # an app's: not the node's
    only_native("join", "room", "ann")
    assert native[-1] == ("join", "room", "ann") and len(native) == 2
    assert channel_events(None, None) is None and member_events(None, None) is None


def test_the_supervisor_sends_app_events_to_the_app_and_the_rest_to_the_node_s_hooks() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    config = Config(
        services=(ServiceConfig(name="pusher", protocol="pusher", port=0),),
        apps=(APP, BARE),
        hooks=HooksConfig(webhook_url="http://127.0.0.1:9/native", webhook_secret=secret),
    )

    class Link:
        name = "pusher/0"

    async def main() -> None:
        sup = Supervisor(config)
        router = sup.broker
        assert sup.webhooks is not None and sup.pusher_webhooks is not None
        app_hooks = sup.pusher_webhooks.apps[APP.id]
        router.events("channel_occupied", names.channel(APP.id, "chat"))  # type: ignore[attr-defined]
        router.events("channel_occupied", "news")  # type: ignore[attr-defined]
        alice = frames.member_key("alice", Raw(b"{}"))
        router.member_events("join", names.channel(APP.id, "presence-r"), alice)  # type: ignore[attr-defined]
        router.member_events("join", "room", "ann")  # type: ignore[attr-defined]
        report = json.dumps({"app_id": APP.id, "channel": "cache-x"}).encode()
        sup.on_frame(Link(), Kind.EVENT, "pusher_cache_miss", report)  # type: ignore[arg-type]
        sup.on_frame(Link(), Kind.EVENT, "connect", b'{"user":"ann"}')  # type: ignore[arg-type]
        sent = [json.loads(e)["name"] for _, e in app_hooks.pending]
        assert sent == ["channel_occupied", "member_added", "cache_miss"]
        native = [json.loads(sup.webhooks.queue.get_nowait().body)["type"] for _ in range(3)]
        assert native == ["channel_occupied", "join", "connect"]
        assert sup.webhooks.queue.empty()
        stats = sup.view.stats()
        assert stats["pusher_webhooks"]["apps"][0]["queued"] == 3
        assert stats["webhooks"]["queued"] == 0
        await sup.pusher_webhooks.close()
        await sup.webhooks.close()

    run(main)


def test_stats_and_metrics_show_each_app_s_outcomes() -> None:
    backend = Backend(400)

    async def main() -> NodeStats:
        hooks = webhooks(backend)
        hooks.channel("channel_occupied", names.channel(APP.id, "a"))
        await hooks.start()
        await poll(lambda: backend.calls, 5)
        hooks.channel("channel_occupied", names.channel(APP.id, "b"))
        await poll(lambda: len(backend.calls) == 2, 5)
        await hooks.close()
        view = NodeStats([], Router(LocalBackplane(10, 60.0)), 1000, lambda: False)
        view.pusher_webhooks = hooks.stats
        return view

    view = run(main)
    got = view.stats()["pusher_webhooks"]
    (app,) = [a for a in got["apps"] if a["app"] == APP.id]
    assert (app["rejected"], app["delivered"], app["url"]) == (1, 1, URL)
    families = {m.name: m for m in _Collector(view).collect()}
    samples = {
        (s.labels["app"], s.labels["outcome"]): s.value
        for s in families["manydoors_pusher_webhooks"].samples
    }
    assert samples[(APP.id, "delivered")] == 1 and samples[(APP.id, "rejected")] == 1
    assert "manydoors_pusher_webhooks_queued" in families


@pytest.mark.parametrize("data", [b"null", b"12", b'"text"', b'{"a":[1,2]}'])
def test_client_event_data_becomes_a_string_of_its_json(data: bytes) -> None:
    from manydoors.server.pusherhooks import _text

    expected = (
        None if data == b"null" else json.loads(data) if data.startswith(b'"') else data.decode()
    )
    assert _text(Raw(data)) == expected

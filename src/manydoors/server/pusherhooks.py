"""Pusher webhooks: each Pusher app's events to its ``webhook_url``, as Pusher sends them.

A POST of ``{"time_ms": <when it was made>, "events": [...]}`` with ``X-Pusher-Key``
(the app's key) and ``X-Pusher-Signature`` (hex HMAC-SHA256 of the body under the
app's secret), what the Pusher server libraries' ``validate_webhook`` checks. The
events, each sent only if the app lists it in ``webhook_events``:

- ``channel_occupied`` / ``channel_vacated`` ``{channel}``: the router's ``events``
  (the node's first and last subscriber of an app's channel);
- ``member_added`` / ``member_removed`` ``{channel, user_id}``: its ``member_events``
  (a user's first join and last leave of a presence channel, server-wide);
- ``client_event`` ``{channel, event, data, socket_id, user_id?}`` and ``cache_miss``
  ``{channel}``: reported by the workers as ``Kind.EVENT`` frames
  (``pusher_client_event``, ``pusher_cache_miss``).

Events that happen close together share a POST: after the first, up to
``BATCH_WAIT`` seconds for more, at most ``BATCH_EVENTS``. One POST per app is in
flight at a time, so the backend gets an app's events in the order they happened
(a vacated never overtakes its occupied). A POST is retried with backoff
(``webhooks.Courier``, shared with the node's own webhooks) while the backend is
down or answers 5xx or 429, for at most ``MAX_AGE`` seconds: inside the 5 minutes
after ``time_ms`` in which ``validate_webhook`` accepts a body (Pusher retries for
5 minutes too). At most ``queue_size`` events of an app wait; past that a new one is
dropped and counted.

Imported only by the supervisor at run time: aiohttp stays out of the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import msgspec
from msgspec import Raw, Struct
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import AppConfig, HooksConfig
from ..pusher import frames, names
from ..pusher.signing import webhook_signature
from .webhooks import FLUSH_TIMEOUT, Courier, Post, RetryPolicy, public_url

BATCH_EVENTS: Final = 100  # events of one POST at most
BATCH_WAIT: Final = 0.05  # seconds a first event waits for others to share its POST
MAX_AGE: Final = 270.0  # seconds a POST is retried (validate_webhook allows 300)
MEMBER_EVENTS: Final = {"join": "member_added", "leave": "member_removed"}
WORKER_EVENTS: Final = {"pusher_client_event": "client_event", "pusher_cache_miss": "cache_miss"}

_encode: Final = msgspec.json.Encoder().encode


class Report(Struct):
    """A worker's ``Kind.EVENT`` payload for an app (cache_miss: app and channel only)."""

    app_id: str
    channel: str
    event: str | None = None
    data: Raw = Raw(b"null")
    socket_id: str | None = None
    user_id: str | None = None


_decode_report: Final = msgspec.json.Decoder(Report).decode


class AppWebhookStats(Struct):
    """One app's figures in ``pusher_webhooks`` of /api/stats (every key always present)."""

    app: str  # the app's id
    url: str  # without user and password
    events: list[str]  # the events sent
    queue_size: int
    queued: int  # events waiting now
    in_flight: int  # events of the POST being sent (or waiting to be retried)
    delivered: int  # events the backend took (2xx)
    retried: int  # POSTs that failed and were tried again
    failed: int  # events given up (too old, or past max_attempts)
    rejected: int  # events the backend refused (4xx other than 429): final
    dropped: int  # events that found the queue full, or the node stopping
    last_error: str  # the last failed attempt, "" if none


class PusherWebhookStats(Struct):
    """``pusher_webhooks`` of /api/stats."""

    invalid: int  # worker reports that were not understood
    apps: list[AppWebhookStats]


def _text(data: Raw) -> str | None:
    """A client event's ``data`` as Pusher's webhooks carry it: a string (JSON text)."""
    raw = bytes(data)
    if raw == b"null":
        return None
    if raw.startswith(b'"'):
        return str(msgspec.json.decode(raw, type=str))
    return raw.decode()


class AppWebhooks(Courier):
    """One app's webhooks: events batched into signed POSTs, one POST at a time."""

    def __init__(
        self,
        app: AppConfig,
        hooks: HooksConfig,
        *,
        policy: RetryPolicy | None = None,
        post: Post | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        flush_timeout: float = FLUSH_TIMEOUT,
        batch_wait: float = BATCH_WAIT,
    ) -> None:
        if app.webhook_url is None:
            raise ValueError(f"app {app.id} has no webhook_url")
        super().__init__(
            app.webhook_url,
            hooks.timeout,
            1,  # one POST at a time: the app's events stay in order
            policy=policy or RetryPolicy(max_age=MAX_AGE),
            post=post,
            sleep=sleep,
            clock=clock,
            wall=wall,
            rand=rand,
        )
        self.app_id = app.id
        self.key = app.key
        self.secret = app.secret
        self.events = frozenset(app.webhook_events)
        self.queue_size = hooks.queue_size
        self.flush_timeout = flush_timeout
        self.batch_wait = batch_wait
        self.pending: deque[tuple[float, bytes]] = deque()  # (monotonic time, event JSON)
        self.wake = asyncio.Event()  # events are pending (or the node is stopping)
        self.idle = asyncio.Event()  # nothing pending, nothing in flight
        self.idle.set()
        self.sender: asyncio.Task[None] | None = None
        self.closing = False
        self.in_flight = 0
        self.dropped = 0

    def emit(self, event: Mapping[str, object]) -> bool:
        """Queue ``event`` (its ``name`` among the app's ``webhook_events``); False if not
        wanted, or dropped (the queue is full, or the node is stopping)."""
        if event["name"] not in self.events:
            return False
        if self.closing or len(self.pending) + self.in_flight >= self.queue_size:
            self.dropped += 1
            return False
        self.pending.append((self.clock(), _encode(event)))
        self.idle.clear()
        self.wake.set()
        return True

    async def start(self) -> None:
        self.open_session()
        self.sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while True:
            await self.wake.wait()
            if len(self.pending) < BATCH_EVENTS and not self.closing:
                await asyncio.sleep(self.batch_wait)  # the others of a burst join this POST
            batch = self._take()
            if batch:
                self.in_flight = len(batch)
                try:
                    await self._deliver(batch)
                except Exception as exc:  # a bug here must not stop the app's webhooks
                    self.failed += len(batch)
                    self.last_error = f"{type(exc).__name__}: {exc}"
                finally:
                    self.in_flight = 0
            if not self.pending:
                self.wake.clear()
                self.idle.set()

    def _take(self) -> list[bytes]:
        """The next POST's events; those older than ``max_age`` are given up."""
        oldest = self.clock() - self.policy.max_age
        batch: list[bytes] = []
        while self.pending and len(batch) < BATCH_EVENTS:
            born, event = self.pending.popleft()
            if born < oldest:
                self.failed += 1  # waited behind a backend that was down: too late now
            else:
                batch.append(event)
        return batch

    async def _deliver(self, batch: list[bytes]) -> None:
        time_ms = int(self.wall() * 1000)
        body = b'{"time_ms":%d,"events":[%b]}' % (time_ms, b",".join(batch))
        headers = {
            "Content-Type": "application/json",
            "X-Pusher-Key": self.key,
            "X-Pusher-Signature": webhook_signature(self.secret, body),
        }
        # The same body and signature on every attempt: time_ms says when it was made.
        await self.attempt(body, self.clock(), lambda: headers, len(batch))

    async def close(self) -> None:
        """Stop taking events; deliver what waits for at most ``flush_timeout`` seconds,
        then count what is left as dropped."""
        self.closing = True
        self.wake.set()  # a batch waiting for more goes now
        if self.sender is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), self.flush_timeout)
        # Counted before the sender is cancelled: its ``finally`` zeroes in_flight.
        self.dropped += len(self.pending) + self.in_flight
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sender
            self.sender = None
        self.pending.clear()
        self.in_flight = 0
        await self.close_session()

    def stats(self) -> AppWebhookStats:
        return AppWebhookStats(
            app=self.app_id,
            url=public_url(self.url),
            events=sorted(self.events),
            queue_size=self.queue_size,
            queued=len(self.pending),
            in_flight=self.in_flight,
            delivered=self.delivered,
            retried=self.retried,
            failed=self.failed,
            rejected=self.rejected,
            dropped=self.dropped,
            last_error=self.last_error,
        )


class PusherWebhooks:
    """The webhooks of every Pusher app with a ``webhook_url``: events of an app's
    channels (``names.split``) go to that app's ``AppWebhooks``."""

    def __init__(self, apps: Iterable[AppConfig], hooks: HooksConfig, **world: Any) -> None:
        self.apps = {
            app.id: AppWebhooks(app, hooks, **world) for app in apps if app.webhook_url is not None
        }
        self.invalid = 0

    def wants(self, *events: str) -> bool:
        """Does any app want one of ``events``?"""
        return any(hooks.events.intersection(events) for hooks in self.apps.values())

    def channel(self, event: str, node_channel: str) -> None:
        """The router's ``channel_occupied`` / ``channel_vacated`` of an app's channel."""
        owner = names.split(node_channel)
        hooks = None if owner is None else self.apps.get(owner[0])
        if owner is not None and hooks is not None:
            hooks.emit({"name": event, "channel": owner[1]})

    def member(self, event: str, node_channel: str, member_key: str) -> None:
        """The router's ``join`` / ``leave`` of a presence channel (server-wide)."""
        owner = names.split(node_channel)
        hooks = None if owner is None else self.apps.get(owner[0])
        if owner is None or hooks is None or event not in MEMBER_EVENTS:
            return
        try:
            user_id = str(frames.member(member_key).user_id)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.invalid += 1
            return
        hooks.emit({"name": MEMBER_EVENTS[event], "channel": owner[1], "user_id": user_id})

    def worker_event(self, kind: str, payload: bytes) -> None:
        """A worker's ``pusher_client_event`` or ``pusher_cache_miss`` report."""
        name = WORKER_EVENTS.get(kind)
        try:
            report = _decode_report(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            report = None
        if name is None or report is None:
            self.invalid += 1
            return
        hooks = self.apps.get(report.app_id)
        if hooks is None:
            return
        event: dict[str, object] = {"name": name, "channel": report.channel}
        if name == "client_event":
            event["event"] = report.event
            event["data"] = _text(report.data)
            event["socket_id"] = report.socket_id
            if report.user_id is not None:
                event["user_id"] = report.user_id
        hooks.emit(event)

    async def start(self) -> None:
        for hooks in self.apps.values():
            await hooks.start()

    async def close(self) -> None:
        await asyncio.gather(*(hooks.close() for hooks in self.apps.values()))

    def stats(self) -> PusherWebhookStats:
        return PusherWebhookStats(
            invalid=self.invalid, apps=[hooks.stats() for hooks in self.apps.values()]
        )


ChannelEvents = Callable[[str, str], None]
MemberEvents = Callable[[str, str, str], None]


def channel_events(
    native: ChannelEvents | None, pusher: ChannelEvents | None
) -> ChannelEvents | None:
    """The router's one ``events`` callback: an app's channel (``names.split``) to
    ``pusher``, any other channel to ``native``; None when neither wants them."""
    if native is None and pusher is None:
        return None

    def route(event: str, channel: str) -> None:
        to = pusher if names.split(channel) is not None else native
        if to is not None:
            to(event, channel)

    return route


def member_events(native: MemberEvents | None, pusher: MemberEvents | None) -> MemberEvents | None:
    """The router's one ``member_events`` callback, split as ``channel_events`` is."""
    if native is None and pusher is None:
        return None

    def route(event: str, channel: str, user: str) -> None:
        to = pusher if names.split(channel) is not None else native
        if to is not None:
            to(event, channel, user)

    return route


OUTCOMES: Final = ("delivered", "retried", "failed", "rejected", "dropped")


def pusher_webhook_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """``pusher_webhooks`` of the stats as metric families, by app (see docs/pusher.md)."""
    family = CounterMetricFamily(
        "manydoors_pusher_webhooks",
        "Pusher webhook events by app and outcome (retried: POSTs)",
        labels=["app", "outcome"],
    )
    queued = GaugeMetricFamily(
        "manydoors_pusher_webhooks_queued", "Pusher webhook events waiting", labels=["app"]
    )
    for app in stats["apps"]:
        for outcome in OUTCOMES:
            family.add_metric([app["app"], outcome], app[outcome])
        queued.add_metric([app["app"]], app["queued"] + app["in_flight"])
    yield family
    yield queued

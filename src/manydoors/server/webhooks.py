"""Webhooks: the node tells the application's backend what happened (Standard Webhooks).

Runs in the supervisor's process, never in a worker: workers report ``connect``,
``disconnect``, ``join`` and ``leave`` as ``Kind.EVENT`` frames, the router reports
``channel_occupied`` and ``channel_vacated``, and :class:`Webhooks` POSTs each one as
``{"type", "timestamp", "data"}`` JSON, signed as https://www.standardwebhooks.com
says (``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64>``).

What a slow or dead backend may cost is bounded: events wait in a queue of
``queue_size`` (a new event finding it full is dropped and counted), at most
``concurrency`` deliveries are in flight, each POST has ``timeout`` seconds. A
delivery is retried with exponential backoff and jitter while the backend cannot be
reached, times out, or answers 5xx or 429, under the same ``webhook-id`` (the backend
deduplicates by it); another 4xx is final. Delivery is at least once; with several
deliveries in flight and retries, the order of events is not kept.

The retries, the HTTP session and the counts of outcomes (:class:`Courier`) are
shared with the Pusher apps' webhooks (``pusherhooks.py``). Events of a Pusher app's
channels go there, not here.

Imported only by the supervisor at run time: aiohttp stays out of the workers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec

from ..config import HooksConfig

CHANNEL_EVENTS: Final = frozenset({"channel_occupied", "channel_vacated"})
FLUSH_TIMEOUT: Final = 3.0  # seconds the node waits at stop for what is still queued
USER_AGENT: Final = "manydoors-webhooks"

# One POST: (body, headers) -> (HTTP status, Retry-After in seconds or None). Raises
# OSError, TimeoutError or aiohttp.ClientError when there is no answer.
Post = Callable[[bytes, Mapping[str, str]], Awaitable[tuple[int, float | None]]]
RETRYABLE: Final = (OSError, TimeoutError, aiohttp.ClientError)

_encode: Final = msgspec.json.Encoder().encode
_decode_object: Final = msgspec.json.Decoder(dict[str, Any]).decode


class WebhookStats(msgspec.Struct):
    """The ``webhooks`` object of /api/stats (every key always present)."""

    url: str  # without user and password
    events: list[str]  # the events sent
    queue_size: int
    queued: int  # waiting now
    in_flight: int  # being delivered now (posting or waiting to retry)
    delivered: int  # the backend answered 2xx
    retried: int  # attempts that failed and were tried again
    failed: int  # given up after max_attempts or max_age
    rejected: int  # the backend answered 4xx (not 429): final
    dropped: int  # the queue was full, or the node stopped before delivering them
    invalid: int  # worker reports that were not a JSON object
    last_error: str  # the last failed attempt, "" if none


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try an event again, and when to give up on it."""

    base: float = 0.5  # seconds before the second attempt (about)
    cap: float = 60.0  # the longest wait between two attempts
    max_attempts: int = 12  # about 5 minutes of attempts with the defaults
    max_age: float = 900.0  # seconds after which an undelivered event is given up

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``attempts`` failed attempts: doubling, capped, and
        jittered (half fixed, half random) so that retries after an outage spread out."""
        step = min(self.cap, self.base * 2.0 ** (attempts - 1))
        return step / 2 + rand() * step / 2


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional)."""
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("webhook_secret must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("webhook_secret must hold at least 16 bytes (24 base64 characters)")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verdict(status: int) -> str:
    """``delivered`` (2xx), ``retry`` (5xx, 429) or ``rejected`` (any other answer)."""
    if 200 <= status < 300:
        return "delivered"
    if status >= 500 or status == 429:
        return "retry"
    return "rejected"


def public_url(url: str) -> str:
    """``url`` without its user and password (for stats and logs)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


class Delivery:
    """One event on its way: its body is encoded once, its id kept across retries."""

    __slots__ = ("body", "born", "id")

    def __init__(self, msg_id: str, body: bytes, born: float) -> None:
        self.id = msg_id
        self.body = body
        self.born = born  # monotonic time of the event


class Courier:
    """POSTs bodies to one URL, each until it is delivered, rejected or given up.

    What the node's webhooks (Standard Webhooks) and the Pusher apps' webhooks
    (``pusherhooks.py``) share: the HTTP session, the retry policy and the counts of
    outcomes. ``post``, ``sleep``, ``clock``, ``wall`` and ``rand`` are the world (tests
    pass fakes); by default an aiohttp session, asyncio's sleep and the system clocks.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        concurrency: int,
        *,
        policy: RetryPolicy | None = None,
        post: Post | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.concurrency = concurrency
        self.policy = policy or RetryPolicy()
        self.own_session = post is None
        self.post: Post = post or self._post
        self.sleep, self.clock, self.wall, self.rand = sleep, clock, wall, rand
        self.session: aiohttp.ClientSession | None = None
        self.delivered = self.retried = self.failed = self.rejected = 0
        self.last_error = ""

    def open_session(self) -> None:
        """The HTTP session the POSTs share (unless ``post`` was given)."""
        if self.own_session and self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": USER_AGENT},
            )

    async def close_session(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def attempt(
        self,
        body: bytes,
        born: float,
        headers: Callable[[], Mapping[str, str]],
        events: int = 1,
    ) -> None:
        """POST ``body`` until it is delivered, rejected or given up (``born``: its
        monotonic time; ``headers``: asked again for each attempt). ``delivered``,
        ``failed`` and ``rejected`` count ``events`` (a body may carry several);
        ``retried`` counts attempts."""
        policy = self.policy
        attempts = 0
        while True:
            attempts += 1
            retry_after = None
            try:
                status, retry_after = await self.post(body, headers())
            except TimeoutError:
                status, self.last_error = 0, f"no answer within {self.timeout:g} s"
            except RETRYABLE as exc:
                status, self.last_error = 0, f"{type(exc).__name__}: {exc}"
            outcome = verdict(status) if status else "retry"
            if outcome == "delivered":
                self.delivered += events
                return
            if status:
                self.last_error = f"HTTP {status}"
            if outcome == "rejected":
                self.rejected += events
                return
            wait = policy.delay(attempts, self.rand)
            if retry_after is not None:
                wait = max(wait, min(retry_after, policy.cap))
            too_old = self.clock() + wait - born > policy.max_age
            if attempts >= policy.max_attempts or too_old:
                self.failed += events
                return
            self.retried += 1
            await self.sleep(wait)

    async def _post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, float | None]:
        assert self.session is not None
        async with self.session.post(
            self.url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            await resp.read()  # read to the end: the connection goes back to the pool
            return resp.status, _seconds(resp.headers.get("Retry-After"))


class Webhooks(Courier):
    """Signs and sends the node's events to ``hooks.webhook_url`` from a bounded queue,
    one event a POST, ``concurrency`` POSTs at once."""

    def __init__(
        self,
        hooks: HooksConfig,
        node: str,
        *,
        policy: RetryPolicy | None = None,
        post: Post | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        flush_timeout: float = FLUSH_TIMEOUT,
    ) -> None:
        if hooks.webhook_url is None or not hooks.webhook_secret:
            raise ValueError("webhooks need webhook_url and webhook_secret")
        super().__init__(
            hooks.webhook_url,
            hooks.timeout,
            hooks.concurrency,
            policy=policy,
            post=post,
            sleep=sleep,
            clock=clock,
            wall=wall,
            rand=rand,
        )
        self.key = secret_key(hooks.webhook_secret)
        self.events = frozenset(hooks.webhook_events)
        self.node = node
        self.flush_timeout = flush_timeout
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(hooks.queue_size)
        # Ids unique across nodes and restarts without a syscall per event.
        prefix = f"msg_{secrets.token_hex(8)}_"
        self.ids = (f"{prefix}{n:x}" for n in itertools.count(1))
        self.senders: list[asyncio.Task[None]] = []
        self.closing = False
        self.in_flight = 0
        self.dropped = self.invalid = 0

    # --- events in ---------------------------------------------------------------------

    def emit(self, event: str, data: Mapping[str, object]) -> bool:
        """Queue ``event`` with ``data`` if it is one the backend wants; False if dropped
        (the queue is full or the node is stopping) or not wanted."""
        if event not in self.events:
            return False
        if self.closing:
            self.dropped += 1
            return False
        stamp = datetime.fromtimestamp(self.wall(), UTC).isoformat(timespec="microseconds")
        body = _encode({"type": event, "timestamp": stamp.replace("+00:00", "Z"), "data": data})
        try:
            self.queue.put_nowait(Delivery(next(self.ids), body, self.clock()))
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    def channel(self, event: str, channel: str) -> None:
        """The router's callback: the node gained its first (``channel_occupied``) or
        lost its last (``channel_vacated``) subscriber of ``channel``."""
        self.emit(event, {"channel": channel, "node": self.node})

    def member(self, event: str, channel: str, user: str) -> None:
        """The router's callback: ``user``'s first connection in the server joined
        (``join``) ``channel``, or its last left (``leave``); namespaces with join_leave."""
        if event in self.events:
            self.emit(event, {"channel": channel, "user": user, "node": self.node})

    def worker_event(self, event: str, payload: bytes, service: str) -> None:
        """A worker's ``Kind.EVENT`` frame: ``payload`` is a JSON object, sent as ``data``
        with the service and the node added when the worker left them out."""
        if event not in self.events:
            return
        try:
            data = _decode_object(payload)
        except msgspec.DecodeError:
            self.invalid += 1
            return
        data.setdefault("service", service)
        data.setdefault("node", self.node)
        self.emit(event, data)

    # --- delivering --------------------------------------------------------------------

    async def start(self) -> None:
        """Start ``concurrency`` senders (and the HTTP session they share)."""
        self.open_session()
        self.senders = [asyncio.create_task(self._send()) for _ in range(self.concurrency)]

    async def _send(self) -> None:
        queue = self.queue
        while True:
            delivery = await queue.get()
            self.in_flight += 1
            try:
                await self._deliver(delivery)
            except Exception as exc:  # a bug here must not stop this sender
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.in_flight -= 1
                queue.task_done()

    async def _deliver(self, d: Delivery) -> None:
        """Attempt ``d`` until it is delivered, rejected or given up."""

        def headers() -> dict[str, str]:
            stamp = int(self.wall())  # each attempt is signed at its own time
            return {
                "content-type": "application/json",
                "webhook-id": d.id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(self.key, d.id, stamp, d.body),
            }

        await self.attempt(d.body, d.born, headers)

    async def close(self) -> None:
        """Stop taking events; deliver what is queued for at most ``flush_timeout``
        seconds, then count what is left as dropped."""
        self.closing = True
        if self.senders:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.join(), self.flush_timeout)
        self.dropped += self.queue.qsize() + self.in_flight
        for task in self.senders:
            task.cancel()
        for task in self.senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.senders = []
        while not self.queue.empty():
            self.queue.get_nowait()
            self.queue.task_done()
        await self.close_session()

    def stats(self) -> WebhookStats:
        """The figures of /api/stats and /metrics."""
        return WebhookStats(
            url=public_url(self.url),
            events=sorted(self.events),
            queue_size=self.queue.maxsize,
            queued=self.queue.qsize(),
            in_flight=self.in_flight,
            delivered=self.delivered,
            retried=self.retried,
            failed=self.failed,
            rejected=self.rejected,
            dropped=self.dropped,
            invalid=self.invalid,
            last_error=self.last_error,
        )


def _seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is ignored)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None

"""Proxy hooks: a worker asks the application's backend (connect, subscribe, publish).

Each call is a task on the worker's loop, never a wait in it: the op that needs the
backend returns at once and its answer is acted on when the backend's comes, if the
connection is still open. What a slow or dead backend may cost is bounded per worker:
at most ``concurrency`` calls in flight, at most ``WAITING_PER_SLOT`` times as many
waiting for a slot (beyond that the client is answered ``unavailable`` at once), and
``timeout`` seconds per call, waiting included. Every call is counted by hook and
outcome: ``ok``, ``refused`` (the backend said no) or ``unavailable`` (no usable
answer in time).

The HTTP client (aiohttp, in ``backend.py``) is imported on the first call: this
module is imported by the worker, which the fork server preloads without aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec
from msgspec import Raw

from ..config import HooksConfig
from ..protocol.messages import Name
from .stats import Counters

WAITING_PER_SLOT: Final = 16  # calls that may wait for a free slot, per slot
MAX_REASON: Final = 200  # characters of a backend's reason passed on to a client
log = logging.getLogger(__name__)


class Client(Protocol):
    """The HTTP side (``backend.HttpClient``, or a test's fake backend)."""

    async def post(self, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """POST ``body`` as JSON: (status, body). Raises OSError or TimeoutError."""
        ...

    async def close(self) -> None: ...


# --- what the backend is asked, and answers ---------------------------------------


class ConnectCall(msgspec.Struct):
    """What the connect hook gets (auth mode "proxy": a hello, or a refresh)."""

    token: str | None
    data: Raw  # the hello's ``data``, as the client sent it (null if none)
    address: str | None
    service: str
    worker: int


class SubscribeCall(msgspec.Struct):
    user: str | None
    channel: str
    service: str


class PublishCall(msgspec.Struct):
    user: str | None
    channel: str
    data: Raw
    service: str


class ConnectReply(msgspec.Struct):
    user: Name | None = None
    channels: list[Name] = []
    expire_at: float | None = None  # unix seconds
    error: str | None = None


class SubscribeReply(msgspec.Struct):
    error: str | None = None


class PublishReply(msgspec.Struct):
    error: str | None = None
    data: Raw = Raw(b"")  # empty: keep the client's data


Reply = ConnectReply | SubscribeReply | PublishReply
_REPLIES: Final[dict[str, type[Reply]]] = {
    "connect": ConnectReply,
    "subscribe": SubscribeReply,
    "publish": PublishReply,
}
_DECODERS: Final = {hook: msgspec.json.Decoder(t) for hook, t in _REPLIES.items()}


class Answer:
    """The outcome of one call: ``ok`` (with the reply), ``refused`` or ``unavailable``."""

    __slots__ = ("outcome", "reason", "reply")

    def __init__(self, outcome: str, reason: str = "", reply: Any = None) -> None:
        self.outcome = outcome
        self.reason = reason
        self.reply = reply

    def __repr__(self) -> str:
        return f"Answer({self.outcome!r}, {self.reason!r})"


def judge(hook: str, status: int, body: bytes) -> Answer:
    """What an HTTP answer of the backend means (sans-I/O)."""
    if status >= 500:
        return Answer("unavailable", f"the backend answered {status}")
    try:
        reply: Any = _DECODERS[hook].decode(body or b"{}")
    except msgspec.ValidationError as exc:
        reply, problem = None, f"the backend's answer is invalid: {exc}"
    except msgspec.DecodeError:
        reply, problem = None, "the backend's answer is not JSON"
    if reply is not None and reply.error is not None:
        return Answer("refused", reply.error[:MAX_REASON] or "refused by the backend")
    if not 200 <= status < 300:
        return Answer("refused", f"refused by the backend ({status})")
    if reply is None:
        return Answer("unavailable", problem)
    if isinstance(reply, ConnectReply) and reply.user is None:
        return Answer("unavailable", "the backend's answer has neither user nor error")
    return Answer("ok", reply=reply)


class Proxies:
    """One worker's calls to the backend."""

    def __init__(self, hooks: HooksConfig, counters: Counters) -> None:
        self.urls = {
            "connect": hooks.connect_url,
            "subscribe": hooks.subscribe_url,
            "publish": hooks.publish_url,
        }
        self.timeout = hooks.timeout
        self.concurrency = hooks.concurrency
        self.most = hooks.concurrency * (1 + WAITING_PER_SLOT)  # in flight + waiting
        self.counters = counters
        self.client: Client | None = None  # made on the first call (or set by a test)
        self.slots: asyncio.Semaphore | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def ask(self, hook: str, body: bytes, done: Callable[[Answer], None]) -> None:
        """Call ``hook`` with ``body`` (JSON); ``done`` gets the answer, later or now."""
        if len(self.tasks) >= self.most:
            self.counters.hook(hook, "unavailable")
            done(Answer("unavailable", "the backend is busy: too many calls waiting"))
            return
        task = asyncio.get_running_loop().create_task(self._call(hook, body, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, hook: str, body: bytes, done: Callable[[Answer], None]) -> None:
        url = self.urls[hook]
        assert url is not None, f"config checks that {hook}_url is set"
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.concurrency)
        if self.client is None:
            from .backend import HttpClient  # aiohttp: loaded on the first call only

            self.client = HttpClient()
        try:
            async with asyncio.timeout(self.timeout), self.slots:
                status, got = await self.client.post(url, body, self.timeout)
            answer = judge(hook, status, got)
        except TimeoutError:
            answer = Answer("unavailable", f"the backend did not answer within {self.timeout:g} s")
        except OSError as exc:
            answer = Answer("unavailable", f"the backend cannot be reached ({exc.strerror or exc})")
        self.counters.hook(hook, answer.outcome)
        try:
            done(answer)
        except Exception:  # one client's answer must not end the others' calls
            log.exception("acting on the %s hook's answer", hook)

    async def close(self) -> None:
        """Cancel the calls in flight and close the HTTP client (the worker stops)."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
            self.client = None

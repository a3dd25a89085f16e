"""Pusher's HTTP REST API (aiohttp) for the Pusher server libraries.

``add_routes`` puts Pusher's paths on the node's API app (``server/api.py``): events
published to an app's channels, its channel lists and presence members, a user's
connections ended. Every request is signed with the app's secret (``signing.py``):
a bad signature answers 401 with the reason, an unknown app 404. The node under it
is the one the native API uses (``Broker`` below is the part of it asked here): an
app's channel ``presence-room`` is the node's ``names.channel(app_id, name)``.

Bodies are decoded strictly (msgspec Structs: ``data`` must be a string, as the
libraries send it); fields Pusher's libraries may add and this API does not know are
ignored, as Pusher does. Only the supervisor's process imports this module (aiohttp
stays out of the workers).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Any, Final, Protocol, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta, Raw, Struct

from ..config import AppConfig
from . import frames, names
from .signing import SignatureError, check_request

MAX_CHANNELS: Final = 100  # channels of one event, as Pusher
MAX_BATCH: Final = 10  # events of one batch_events call, as Pusher's multi-tenant clusters
MAX_NAME: Final = 200  # characters of an event name, as Pusher
MAX_LISTED: Final = 10_000  # channels of one GET channels (Pusher has no paging)
MAX_USER_ID: Final = 200  # characters of a user id, as the Pusher libraries check
PRESENCE_ASKS: Final = 16  # presence questions in flight for one GET channels
ATTRIBUTES: Final = frozenset({"user_count", "subscription_count"})
RESERVED: Final = ("pusher:", "pusher_internal:")  # event names only Pusher itself sends

_SOCKET_ID: Final = re.compile(r"\A([0-9]{1,10})\.([0-9]{1,20})\Z")
_PREFIX: Final = re.compile(r"\A[A-Za-z0-9_\-=@,.;#]*\Z")
_USER_ID: Final = re.compile(r"\A[A-Za-z0-9_\-=@,.;]+\Z")

EventName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]


class Broker(Protocol):
    """What this API asks of the node's broker (``broker.router.Router`` is one)."""

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> object: ...

    async def list_channels(self, prefix: str, limit: int) -> Any:
        """A ``ChannelList``: ``channels`` (node name -> connections)."""
        ...

    async def presence(self, channel: str) -> Any:
        """A ``PresenceResult``: ``users`` (member key -> connections)."""
        ...

    async def disconnect(self, user: str, reason: str) -> object: ...


class Event(Struct):
    """The body of ``POST /apps/{id}/events``."""

    name: EventName
    data: str
    channel: str | None = None
    channels: Annotated[list[str], Meta(min_length=1, max_length=MAX_CHANNELS)] | None = None
    socket_id: str | None = None
    info: str | None = None


class BatchEvent(Struct):
    """One event of ``POST /apps/{id}/batch_events``."""

    name: EventName
    data: str
    channel: str
    socket_id: str | None = None
    info: str | None = None


class Batch(Struct):
    batch: Annotated[list[BatchEvent], Meta(max_length=MAX_BATCH)]


class Refused(Exception):
    """A request answered with an error: its HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


B = TypeVar("B")
_decode_event: Final = msgspec.json.Decoder(Event).decode
_decode_batch: Final = msgspec.json.Decoder(Batch).decode
_APPS: web.AppKey[dict[str, AppConfig]] = web.AppKey("pusher_apps")
_KEYS: web.AppKey[dict[str, AppConfig]] = web.AppKey("pusher_keys")
_BROKER: web.AppKey[Broker] = web.AppKey("pusher_broker")
_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("pusher_clock")
_BUSY: web.AppKey[Callable[[], bool]] = web.AppKey("pusher_busy")


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


def _error(status: int, reason: str) -> web.Response:
    # Pusher answers an explanation; the libraries put the body in their exception.
    return _json({"error": reason, "code": status}, status)


Handler = Callable[[web.Request, AppConfig, bytes], Awaitable[web.Response]]


def _signed(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of a signed request: the app found, the signature checked first."""

    async def checked(request: web.Request) -> web.Response:
        app_id = request.match_info.get("app_id")
        if app_id is not None:
            app = request.app[_APPS].get(app_id)
            if app is None:
                return _error(404, f"no app has the id {app_id!r}")
        else:  # the PyPI library's terminate_user_connections leaves /apps/{id} out
            app = request.app[_KEYS].get(request.query.get("auth_key", ""))
            if app is None:
                return _error(401, "auth_key is missing or not the key of any app")
        body = await request.read()
        # The libraries sign the path as they wrote it: unescaped (Pusher's channel
        # names need no escaping), or as sent if a caller escaped it.
        paths = dict.fromkeys((request.path, request.raw_path.partition("?")[0]))
        now = request.app[_CLOCK]()
        for path in paths:
            try:
                check_request(request.method, path, request.query, body, app.key, app.secret, now)
                break
            except SignatureError as exc:
                refused = str(exc)
        else:
            return _error(401, refused)
        try:
            return await handler(request, app, body)
        except Refused as exc:
            return _error(exc.status, exc.reason)

    return checked


def _decode(decode: Callable[[bytes], B], body: bytes) -> B:
    if not body.isascii():
        try:  # msgspec.Raw would relay invalid UTF-8 to every subscriber
            body.decode()
        except UnicodeDecodeError as exc:
            raise Refused(400, f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        raise Refused(400, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Refused(400, f"body is not valid JSON: {exc}") from None


def _attributes(info: str | None) -> frozenset[str]:
    """The ``info`` attributes asked for (comma-separated); 400 for one not known."""
    asked = frozenset(a.strip() for a in (info or "").split(",") if a.strip())
    unknown = asked - ATTRIBUTES
    if unknown:
        known = ", ".join(sorted(ATTRIBUTES))
        raise Refused(400, f"info: unknown attribute {min(unknown)!r} (known: {known})")
    return asked


def _channel(name: str) -> str:
    if not names.valid(name):
        raise Refused(
            400,
            f"channel {name[:200]!r}: a channel name is 1 to {names.MAX_CHANNEL} characters "
            "of A-Z a-z 0-9 _ - = @ , . ; (or #server-to-user-<id>)",
        )
    return name


def _exclude(socket_id: str | None) -> str | None:
    """The node's connection id ("pid-token") of a Pusher socket id ("pid.token")."""
    if socket_id is None:
        return None
    match = _SOCKET_ID.match(socket_id)
    if match is None:
        raise Refused(400, f"socket_id {socket_id[:40]!r} is not a socket id (digits.digits)")
    return f"{match[1]}-{match[2]}"


class Trigger:
    """One event checked and ready to publish: to which channels, what, leaving out whom."""

    __slots__ = ("channels", "data", "exclude", "name")

    def __init__(
        self, app: AppConfig, name: str, data: str, channels: list[str], socket_id: str | None
    ) -> None:
        if name.startswith(RESERVED):
            raise Refused(400, f"event name {name!r}: pusher: and pusher_internal: are Pusher's")
        size = len(data.encode())
        if size > app.max_event_bytes:
            raise Refused(
                413, f"data is {size} bytes, over this app's limit of {app.max_event_bytes}"
            )
        self.channels = list(dict.fromkeys(_channel(c) for c in channels))  # each once
        if len(self.channels) > 1 and any(names.is_encrypted(c) for c in self.channels):
            raise Refused(400, "an event to an encrypted channel goes to that channel alone")
        self.name = name
        self.data = frames.api_data(data)
        self.exclude = _exclude(socket_id)

    async def publish(self, app: AppConfig, broker: Broker) -> None:
        """One publish per channel (the channel's name is inside each frame), gathered."""
        await asyncio.gather(
            *(
                broker.publish_channel(
                    names.channel(app.id, channel),
                    None,
                    Raw(frames.published(self.name, channel, self.data)),
                    self.exclude,
                )
                for channel in self.channels
            )
        )


async def _subscriptions(broker: Broker, node_channel: str) -> int:
    """Connections subscribed to one channel, on every node."""
    # The first channel by name with a prefix is the prefix itself, if it has subscribers.
    listed = await broker.list_channels(node_channel, 1)
    return int(listed.channels.get(node_channel, 0))


async def _users(broker: Broker, node_channel: str) -> list[str]:
    """The distinct user ids of a presence channel's members, on every node, sorted."""
    result = await broker.presence(node_channel)
    ids = set()
    for key, connections in result.users.items():
        if connections > 0:
            try:
                ids.add(str(frames.member(key).user_id))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a Pusher member: not one of this app's users
    return sorted(ids)


async def _channel_info(
    broker: Broker, app: AppConfig, channel: str, asked: Iterable[str]
) -> dict[str, int]:
    """The attributes ``asked`` of one channel (user_count for presence channels only)."""
    node = names.channel(app.id, channel)
    out: dict[str, int] = {}
    if "user_count" in asked and names.is_presence(channel):
        out["user_count"] = len(await _users(broker, node))
    if "subscription_count" in asked:
        out["subscription_count"] = await _subscriptions(broker, node)
    return out


def _busy(request: web.Request) -> web.Response | None:
    if request.app[_BUSY]():
        # Workers are not keeping up: say so rather than queue without bound.
        resp = _error(503, "the workers are behind on deliveries; retry shortly")
        resp.headers["Retry-After"] = "1"
        return resp
    return None


@_signed
async def events(request: web.Request, app: AppConfig, body: bytes) -> web.Response:
    """``POST /apps/{id}/events``: one event to one channel or up to 100."""
    if (busy := _busy(request)) is not None:
        return busy
    event = _decode(_decode_event, body)
    if (event.channel is None) == (event.channels is None):
        raise Refused(400, "give one of channel or channels")
    channels = [event.channel] if event.channel is not None else event.channels or []
    trigger = Trigger(app, event.name, event.data, channels, event.socket_id)
    asked = _attributes(event.info)  # checked before anything is published
    broker = request.app[_BROKER]
    await trigger.publish(app, broker)
    if not asked:
        return _json({})
    infos = await asyncio.gather(*(_channel_info(broker, app, c, asked) for c in trigger.channels))
    return _json({"channels": dict(zip(trigger.channels, infos, strict=True))})


@_signed
async def batch_events(request: web.Request, app: AppConfig, body: bytes) -> web.Response:
    """``POST /apps/{id}/batch_events``: up to 10 events, each to one channel."""
    if (busy := _busy(request)) is not None:
        return busy
    batch = _decode(_decode_batch, body).batch
    # Every event is checked before any is published: a bad one refuses the batch.
    triggers = [Trigger(app, e.name, e.data, [e.channel], e.socket_id) for e in batch]
    asks = [_attributes(e.info) for e in batch]
    broker = request.app[_BROKER]
    await asyncio.gather(*(t.publish(app, broker) for t in triggers))
    if not any(asks):
        return _json({})
    infos = await asyncio.gather(
        *(_channel_info(broker, app, t.channels[0], a) for t, a in zip(triggers, asks, strict=True))
    )
    return _json({"batch": infos})


@_signed
async def channels(request: web.Request, app: AppConfig, body: bytes) -> web.Response:
    """``GET /apps/{id}/channels``: the occupied channels (by prefix), with attributes."""
    prefix = request.query.get("filter_by_prefix", "")
    if not _PREFIX.match(prefix) or len(prefix) > names.MAX_CHANNEL:
        raise Refused(400, f"filter_by_prefix {prefix[:200]!r} is no channel name's start")
    asked = _attributes(request.query.get("info"))
    if "user_count" in asked and not names.is_presence(prefix):
        raise Refused(400, "info=user_count needs filter_by_prefix=presence- (or longer)")
    broker = request.app[_BROKER]
    listed = await broker.list_channels(names.channel(app.id, prefix), MAX_LISTED)
    counts = {names.outer(node): n for node, n in listed.channels.items() if n > 0}
    out: dict[str, dict[str, int]] = {}
    for channel, n in counts.items():
        out[channel] = {"subscription_count": n} if "subscription_count" in asked else {}
    if "user_count" in asked:
        gate = asyncio.Semaphore(PRESENCE_ASKS)  # a bounded number of questions at once

        async def count(channel: str) -> None:
            async with gate:
                users = await _users(broker, names.channel(app.id, channel))
            out[channel]["user_count"] = len(users)

        await asyncio.gather(*(count(c) for c in counts))
    return _json({"channels": out})


@_signed
async def channel(request: web.Request, app: AppConfig, body: bytes) -> web.Response:
    """``GET /apps/{id}/channels/{name}``: occupied, and the attributes asked for."""
    name = _channel(request.match_info["channel_name"])
    asked = _attributes(request.query.get("info"))
    if "user_count" in asked and not names.is_presence(name):
        raise Refused(400, "info=user_count is for presence channels only")
    broker = request.app[_BROKER]
    node = names.channel(app.id, name)
    subscriptions = await _subscriptions(broker, node)
    out: dict[str, object] = {"occupied": subscriptions > 0}
    if "subscription_count" in asked:
        out["subscription_count"] = subscriptions
    if "user_count" in asked:
        out["user_count"] = len(await _users(broker, node)) if subscriptions else 0
    return _json(out)


@_signed
async def users(request: web.Request, app: AppConfig, body: bytes) -> web.Response:
    """``GET /apps/{id}/channels/{name}/users``: a presence channel's user ids."""
    name = _channel(request.match_info["channel_name"])
    if not names.is_presence(name):
        raise Refused(400, "users are listed for presence channels only")
    ids = await _users(request.app[_BROKER], names.channel(app.id, name))
    return _json({"users": [{"id": user_id} for user_id in ids]})


@_signed
async def terminate(request: web.Request, app: AppConfig, body: bytes) -> web.Response:
    """``POST /apps/{id}/users/{user_id}/terminate_connections``: close them, every node."""
    user_id = request.match_info["user_id"]
    if len(user_id) > MAX_USER_ID or not _USER_ID.match(user_id):
        raise Refused(400, f"user id {user_id[:200]!r}: 1 to {MAX_USER_ID} of A-Z a-z 0-9 _-=@,.;")
    await request.app[_BROKER].disconnect(names.user(app.id, user_id), "terminated")
    return _json({})


def add_routes(
    app: web.Application,
    apps: Sequence[AppConfig],
    broker: Broker,
    *,
    clock: Callable[[], float] = time.time,
    busy: Callable[[], bool] = lambda: False,
) -> None:
    """Serve Pusher's REST API for ``apps`` on ``app``: nothing without apps.

    ``clock`` is the time auth_timestamp is checked against; ``busy`` says the
    workers are behind (a publish then answers 503).
    """
    if not apps:
        return
    app[_APPS] = {a.id: a for a in apps}
    app[_KEYS] = {a.key: a for a in apps}
    app[_BROKER] = broker
    app[_CLOCK] = clock
    app[_BUSY] = busy
    app.add_routes(
        [
            web.post("/apps/{app_id}/events", events),
            web.post("/apps/{app_id}/batch_events", batch_events),
            web.get("/apps/{app_id}/channels", channels),
            web.get("/apps/{app_id}/channels/{channel_name}", channel),
            web.get("/apps/{app_id}/channels/{channel_name}/users", users),
            web.post("/apps/{app_id}/users/{user_id}/terminate_connections", terminate),
            web.post("/users/{user_id}/terminate_connections", terminate),
        ]
    )

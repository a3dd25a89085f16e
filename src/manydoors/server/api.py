"""The HTTP API (aiohttp): publish, stats, health, Prometheus metrics, live dashboard.

The API sees the node through :class:`NodeView`, the few things it reads and asks of
it, never the supervisor: ``nodestats.NodeStats`` is the node's view. Only the
supervisor's process imports this module (aiohttp stays out of the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Protocol, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta, Raw
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import ApiConfig, AppConfig, AuthConfig, NamespaceConfig
from ..namespaces import Namespaces
from ..protocol.ipc import exclude_head
from ..protocol.messages import Name, page
from ..pusher import api as pusher_api
from .apiserver import Doors, DoorsSite, key_middleware, sized_cap
from .errors import StartupError
from .pusherhooks import pusher_webhook_metrics

MAX_BODY = 1024 * 1024
STREAM_INTERVAL = 1.0  # seconds between two events of /api/stream
STATIC = Path(__file__).parent / "static"


class BrokerView(Protocol):
    """What the API asks of the broker. Results may be dicts or msgspec Structs: the
    API turns them into JSON with ``msgspec.to_builtins``."""

    @property
    def status(self) -> str:
        """``ok``, or ``degraded`` while messages cannot cross nodes."""
        ...

    # ``exclude``: a connection id (a welcome's ``conn``) to leave out of the delivery.

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> object:
        """Deliver to every subscriber of ``channel``; what it reached."""
        ...

    async def publish_channels(
        self, channels: list[str], sender: str | None, data: Raw, exclude: str | None = None
    ) -> Sequence[object]:
        """Publish to each of ``channels``; what each reached, in that order."""
        ...

    async def publish_user(
        self, user: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> object:
        """Deliver to every connection of ``user``; what it reached."""
        ...

    async def broadcast(self, sender: str | None, data: Raw, exclude: str | None = None) -> object:
        """Deliver to every connection; what it reached."""
        ...

    async def presence(self, channel: str) -> object:
        """Who is subscribed to ``channel``: users, anonymous, partial."""
        ...

    async def disconnect(self, user: str, reason: str) -> object:
        """Close every connection of ``user`` (every node) with bye ``reason``; whom it asked."""
        ...

    async def unsubscribe(self, user: str, channel: str) -> object:
        """Take every connection of ``user`` (every node) out of ``channel``; whom it asked."""
        ...

    async def read_history(self, channel: str, since: int | None, limit: int) -> object:
        """Up to ``limit`` messages of ``channel``'s history (after ``since``, if given)."""
        ...

    async def list_channels(self, prefix: str, limit: int) -> object:
        """The first ``limit`` channels (by name) starting with ``prefix``, with counts."""
        ...


class NodeView(Protocol):
    """The node as the API sees it."""

    @property
    def broker(self) -> BrokerView:
        """Where publishes and presence questions go."""
        ...

    @property
    def stopping(self) -> bool:
        """The node is draining and no longer serves."""
        ...

    def stats(self) -> dict[str, Any]:
        """The /api/stats JSON object."""
        ...

    def queued_to_workers(self) -> int:
        """Bytes queued from the broker to the workers, not yet taken by them."""
        ...

    def services(self) -> Collection[str]:
        """The names of the node's services."""
        ...

    def workers(self) -> tuple[int, int]:
        """(workers alive, workers expected)."""
        ...

    async def connections(self, service: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` live connections of ``service`` (None: any service)."""
        ...


MAX_CHANNELS: Final = 100  # channels of one publish
HISTORY_LIMIT: Final = (100, 1000)  # messages of one history page: default, most
CHANNELS_LIMIT: Final = (1000, 10000)  # channels of one list: default, most
# A welcome's ``conn``: "<pid>-<token>" (ASCII digits only).
ConnId = Annotated[str, Meta(pattern=r"^[0-9]{1,10}-[0-9]{1,20}\Z")]
# A bye's reason from the API: a short name a program can match, as the server's own.
Reason = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}\Z")]


class PublishBody(msgspec.Struct, forbid_unknown_fields=True):
    data: msgspec.Raw
    channel: Name | None = None
    channels: Annotated[list[Name], Meta(min_length=1, max_length=MAX_CHANNELS)] | None = None
    user: Name | None = None
    broadcast: bool = False
    sender: Name | None = msgspec.field(name="from", default=None)
    exclude: ConnId | None = None


class DisconnectBody(msgspec.Struct, forbid_unknown_fields=True):
    user: Name
    reason: Reason = "disconnected"


class UnsubscribeBody(msgspec.Struct, forbid_unknown_fields=True):
    user: Name
    channel: Name


_decode_publish = msgspec.json.Decoder(PublishBody).decode
_decode_disconnect = msgspec.json.Decoder(DisconnectBody).decode
_decode_unsubscribe = msgspec.json.Decoder(UnsubscribeBody).decode
B = TypeVar("B")
_NODE: web.AppKey[NodeView] = web.AppKey("node")
_NAMESPACES: web.AppKey[Namespaces] = web.AppKey("namespaces")
_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")
_STREAMS: web.AppKey[set[web.StreamResponse]] = web.AppKey("streams")
_STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping")
_DOORS: web.AppKey[Doors] = web.AppKey("doors")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


# Bytes queued from the broker to the workers beyond which a publish is refused (503).
BUSY_BYTES: Final = 32 * 1024 * 1024


def _error(status: int, code: str, reason: str) -> web.Response:
    return _json({"error": code, "reason": reason}, status)


async def _body(request: web.Request, decode: Callable[[bytes], B]) -> B | web.Response:
    """The JSON body decoded by ``decode``, or the 400 answer that says what is wrong."""
    raw = await request.read()
    if not raw.isascii():
        # msgspec.Raw would relay invalid UTF-8 inside ``data`` to every recipient.
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            return _error(400, "bad_json", f"body is not valid UTF-8 (byte {exc.start})")
    if b"\n" in raw:
        # A raw newline in valid JSON is whitespace: keep it out of the NDJSON events.
        raw = raw.replace(b"\n", b" ")
    try:
        return decode(raw)
    except msgspec.ValidationError as exc:
        return _error(400, "bad_field", str(exc))
    except msgspec.DecodeError as exc:
        return _error(400, "bad_json", f"body is not valid JSON: {exc}")


async def publish(request: web.Request) -> web.Response:
    node = request.app[_NODE]
    if node.queued_to_workers() > BUSY_BYTES:
        # Workers are not keeping up: say so rather than queue without bound here.
        resp = _error(503, "busy", "the workers are behind on deliveries; retry shortly")
        resp.headers["Retry-After"] = "1"
        return resp
    body = await _body(request, _decode_publish)
    if isinstance(body, web.Response):
        return body
    targets = (body.channel, body.channels, body.user, body.broadcast or None)
    if sum(target is not None for target in targets) != 1:
        return _error(
            400, "bad_target", "give exactly one of: channel, channels, user, broadcast: true"
        )
    exclude = body.exclude
    if exclude is not None and exclude_head(exclude) is None:
        return _error(400, "bad_field", f"exclude: no connection is called {exclude}")
    broker = node.broker
    if body.channels is not None:
        if len(set(body.channels)) != len(body.channels):
            return _error(400, "bad_field", "channels: name each channel once")
        each = await broker.publish_channels(body.channels, body.sender, body.data, exclude)
        answers = [
            {"channel": channel, **msgspec.to_builtins(done)}
            for channel, done in zip(body.channels, each, strict=True)
        ]
        return _json({"accepted": True, "channels": answers}, 202)
    if body.channel is not None:
        done = await broker.publish_channel(body.channel, body.sender, body.data, exclude)
    elif body.user is not None:
        done = await broker.publish_user(body.user, body.sender, body.data, exclude)
    else:
        done = await broker.broadcast(body.sender, body.data, exclude)
    return _json({"accepted": True, **msgspec.to_builtins(done)}, 202)


async def disconnect(request: web.Request) -> web.Response:
    """Close every connection of a user, on every node, with a bye and its reason."""
    body = await _body(request, _decode_disconnect)
    if isinstance(body, web.Response):
        return body
    done = await request.app[_NODE].broker.disconnect(body.user, body.reason)
    return _json({"accepted": True, **msgspec.to_builtins(done)}, 202)


async def unsubscribe(request: web.Request) -> web.Response:
    """Take every connection of a user, on every node, out of a channel."""
    body = await _body(request, _decode_unsubscribe)
    if isinstance(body, web.Response):
        return body
    done = await request.app[_NODE].broker.unsubscribe(body.user, body.channel)
    return _json({"accepted": True, **msgspec.to_builtins(done)}, 202)


def _number(query: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A whole number >= 0 from the query string, or ``default``; ValueError if not one."""
    given = query.get(name)
    if given is None:
        return default
    if not (given.isascii() and given.isdigit()):
        raise ValueError(f"{name} must be a whole number >= 0")
    return int(given)


def _name_error(value: str, what: str) -> str | None:
    """Why ``value`` is not a valid name (channel, user), or None."""
    try:
        msgspec.convert(value, Name)
    except msgspec.ValidationError as exc:
        return f"{what}: {exc}"
    return None


async def history(request: web.Request) -> web.Response:
    """``?channel=NAME&since=SEQ&limit=N``: a page of the channel's recent messages."""
    query = request.query
    channel = query.get("channel", "")
    if not channel:
        return _error(400, "missing_field", "give ?channel=NAME")
    if (why := _name_error(channel, "channel")) is not None:
        return _error(400, "bad_field", why)
    try:
        since = _number(query, "since", None)
        limit = min(HISTORY_LIMIT[1], _number(query, "limit", HISTORY_LIMIT[0]) or 0)
    except ValueError as exc:
        return _error(400, "bad_field", str(exc))
    page = await request.app[_NODE].broker.read_history(channel, since, limit)
    return _json(page)  # a msgspec Struct: its messages are the events' own bytes


async def channels(request: web.Request) -> web.Response:
    """``?prefix=P&limit=N``: the channels with subscribers (every node), with counts."""
    query = request.query
    prefix = query.get("prefix", "")
    if prefix and (why := _name_error(prefix, "prefix")) is not None:
        return _error(400, "bad_field", why)
    try:
        limit = min(CHANNELS_LIMIT[1], _number(query, "limit", CHANNELS_LIMIT[0]) or 0)
    except ValueError as exc:
        return _error(400, "bad_field", str(exc))
    result = await request.app[_NODE].broker.list_channels(prefix, limit)
    return _json(msgspec.to_builtins(result))


async def presence(request: web.Request) -> web.Response:
    """Who is subscribed to ``?channel=NAME``, on every node."""
    channel = request.query.get("channel", "")
    if not channel:
        return _error(400, "missing_field", "give ?channel=NAME")
    ns = request.app[_NAMESPACES](channel)
    if not ns.presence:
        where = f"namespace {ns.name}" if ns.name else "the default namespace"
        return _error(403, "forbidden", f"presence is off in {where} ([channels] presence)")
    try:
        limit = min(ns.max_presence_members, max(1, int(request.query.get("limit", "1000000"))))
    except ValueError:
        return _error(400, "bad_field", "limit must be a number")
    answer = msgspec.to_builtins(await request.app[_NODE].broker.presence(channel))
    answer["users"], more = page(answer["users"], request.query.get("after") or None, limit)
    if more is not None:
        answer["next"] = more  # ask again with ?after= this for the next page
    return _json({"channel": channel, **answer})


async def connections(request: web.Request) -> web.Response:
    """A sample of live connections: ``?service=NAME&limit=N`` (default 20, at most 1000)."""
    try:
        limit = min(1000, max(0, int(request.query.get("limit", "20"))))
    except ValueError:
        return _error(400, "bad_field", "limit must be a number")
    service = request.query.get("service") or None
    node = request.app[_NODE]
    if service is not None and service not in node.services():
        return _error(404, "unknown_service", f"no service named {service!r}")
    return _json({"connections": await node.connections(service, limit)})


async def stats(request: web.Request) -> web.Response:
    return _json({**request.app[_NODE].stats(), "api": request.app[_DOORS].stats()})


async def healthz(request: web.Request) -> web.Response:
    node = request.app[_NODE]
    alive, total = node.workers()
    serving = alive == total and not node.stopping
    broker = node.broker.status
    status = "ok" if serving and broker == "ok" else "degraded"
    # A degraded broker still answers 200: the node serves its own clients, and a load
    # balancer that dropped every node during a Redis outage would drop them all.
    return _json(
        {"status": status, "broker": broker, "workers": alive, "workers_expected": total},
        200 if serving else 503,
    )


class _Collector:
    """Turns the stats snapshot into Prometheus metric families at scrape time."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        s = self.node.stats()
        conns = GaugeMetricFamily(
            "manydoors_connections", "Open client connections", labels=["service"]
        )
        rss = GaugeMetricFamily(
            "manydoors_worker_rss_bytes", "Worker resident memory", labels=["service", "slot"]
        )
        fds = GaugeMetricFamily(
            "manydoors_worker_fds", "Worker open file descriptors", labels=["service", "slot"]
        )
        for svc in s["services"]:
            conns.add_metric([svc["name"]], svc["connections"])
            for w in svc["workers"]:
                labels = [svc["name"], str(w["slot"])]
                if w["rss_bytes"] is not None:
                    rss.add_metric(labels, w["rss_bytes"])
                if w["fds"] is not None:
                    fds.add_metric(labels, w["fds"])
        yield conns
        yield rss
        yield fds
        for name, help_ in (
            ("accepted", "Connections accepted"),
            ("messages_in", "Client messages received"),
            ("messages_out", "Messages written to clients"),
            ("dropped", "Messages dropped for slow readers"),
            ("throttled", "Times a connection's reading paused for max_bytes_per_second"),
            ("pings", "Heartbeat pings sent to quiet connections"),
        ):
            yield CounterMetricFamily(f"manydoors_{name}", help_, value=s[name])
        for name, help_, key in (
            ("refused", "Connections refused, by reason", "refused"),
            ("closed", "Connections closed by the server, by reason", "closed"),
            ("lost", "Connections that ended in a network error, by reason", "lost"),
            ("errors", "Error events sent to clients, by code", "errors"),
        ):
            family = CounterMetricFamily(
                f"manydoors_{name}", help_, labels=["reason" if key != "errors" else "code"]
            )
            for label, value in s[key].items():
                family.add_metric([label], value)
            yield family
        hooks = CounterMetricFamily(
            "manydoors_hooks",
            "Proxy calls to the backend, by hook and outcome",
            labels=["hook", "outcome"],
        )
        for hook, outcomes in s["hooks"].items():
            for outcome, value in outcomes.items():
                hooks.add_metric([hook, outcome], value)
        yield hooks
        broker = s["broker"]
        yield GaugeMetricFamily(
            "manydoors_broker_degraded",
            "1 while the broker cannot carry messages between nodes",
            value=int(broker["status"] != "ok"),
        )
        for name, help_ in (
            ("published", "Messages published through this node's broker"),
            ("received_from_redis", "Messages this node received from Redis"),
            ("sent_to_redis", "Publishes this node sent to Redis"),
            ("delivered_locally_while_degraded", "Publishes delivered only on this node"),
            ("reconnects", "Reconnections to Redis"),
        ):
            if name in broker:
                yield CounterMetricFamily(f"manydoors_broker_{name}", help_, value=broker[name])
        if "webhooks" in s:
            yield from _webhook_metrics(s["webhooks"])
        if "pusher_webhooks" in s:
            yield from pusher_webhook_metrics(s["pusher_webhooks"])


WEBHOOK_OUTCOMES: Final = ("delivered", "retried", "failed", "rejected", "dropped", "invalid")


def _webhook_metrics(hooks: dict[str, Any]) -> Iterator[Metric]:
    """The ``webhooks`` object of the stats as metric families (see docs/hooks.md)."""
    family = CounterMetricFamily(
        "manydoors_webhooks", "Webhook events by outcome", labels=["outcome"]
    )
    for outcome in WEBHOOK_OUTCOMES:
        family.add_metric([outcome], hooks[outcome])
    yield family
    yield GaugeMetricFamily(
        "manydoors_webhooks_queued", "Webhook events waiting to be sent", value=hooks["queued"]
    )
    yield GaugeMetricFamily(
        "manydoors_webhooks_in_flight",
        "Webhook events being sent or waiting to be retried",
        value=hooks["in_flight"],
    )


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[_REGISTRY]
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``data: <stats JSON>`` event per second until either side stops."""
    app = request.app
    if len(app[_STREAMS]) >= app[_DOORS].max_connections // 2:
        # A stream holds its connection for good: half the API's leave room for the rest.
        return _error(503, "busy", "too many streams open: retry later")
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must pass each event on at once
        }
    )
    resp.force_close()  # the connection ends with the stream, never back to keep-alive
    stopping = app[_STOPPING]
    app[_STREAMS].add(resp)
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 1000\n\n")
        while not stopping.is_set():
            event = b"data: " + msgspec.json.encode(app[_NODE].stats()) + b"\n\n"
            await resp.write(event)
            # Wakes at once on shutdown instead of holding runner.cleanup for a tick.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), STREAM_INTERVAL)
    except ConnectionError:
        pass  # the client went away: a write to its closed transport tells us
    finally:
        app[_STREAMS].discard(resp)
    return resp


async def _end_streams(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for open handlers: let every stream return.
    app[_STOPPING].set()
    streams = app[_STREAMS]
    for _ in range(100):
        if not streams:
            break
        await asyncio.sleep(0.01)


async def start_api(
    node: NodeView,
    api: ApiConfig,
    auth: AuthConfig,
    namespaces: Namespaces | None = None,
    apps: Sequence[AppConfig] = (),
) -> tuple[web.AppRunner, int]:
    """Serve the API for ``node`` on ``api.host:api.port``; the runner and the real port.

    Port 0 asks the kernel for a free port: the returned port is the one it gave.
    Its connections are timed and capped (``apiserver.py``); ``api.max_connections``
    None: the fd limit less the fds open now and the reserve (the supervisor passes
    the number it sized with its workers in mind).
    With Pusher ``apps``, Pusher's REST API too (``pusher/api.py``; its own signatures,
    not the API key).
    """
    cap = api.max_connections or sized_cap(workers=0)
    doors = Doors(cap, api.header_timeout, api.keepalive_timeout)
    keyed = [] if auth.api_key is None else [key_middleware(auth.api_key, auth.protect_stats)]
    middlewares = [doors.track, *keyed, doors.read_body]  # the body after the key
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app[_NODE] = node
    app[_DOORS] = doors
    app[_NAMESPACES] = namespaces or Namespaces(NamespaceConfig())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(node))
    app[_REGISTRY] = registry
    app[_STREAMS] = set()
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_end_streams)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/api/stream", stream),
            web.static("/static", STATIC),
            web.post("/api/publish", publish),
            web.post("/api/disconnect", disconnect),
            web.post("/api/unsubscribe", unsubscribe),
            web.get("/api/history", history),
            web.get("/api/channels", channels),
            web.get("/api/presence", presence),
            web.get("/api/stats", stats),
            web.get("/api/connections", connections),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
        ]
    )
    pusher_api.add_routes(
        app, apps, node.broker, busy=lambda: node.queued_to_workers() > BUSY_BYTES
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = DoorsSite(runner, api.host, api.port, doors)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"API: cannot listen on {api.host}:{api.port}: {exc.strerror}") from None
    return runner, runner.addresses[0][1]

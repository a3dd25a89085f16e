"""The HTTP API (aiohttp): publish, stats, health, Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..protocol.messages import Name
from .supervisor import StartupError

if TYPE_CHECKING:
    from .supervisor import Supervisor

MAX_BODY = 1024 * 1024


class PublishBody(msgspec.Struct, forbid_unknown_fields=True):
    data: msgspec.Raw
    channel: Name | None = None
    user: Name | None = None
    broadcast: bool = False
    sender: Name | None = msgspec.field(name="from", default=None)


_decode_publish = msgspec.json.Decoder(PublishBody).decode
_SUP: web.AppKey[Supervisor] = web.AppKey("supervisor")
_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


def _error(status: int, code: str, reason: str) -> web.Response:
    return _json({"error": code, "reason": reason}, status)


async def publish(request: web.Request) -> web.Response:
    sup = request.app[_SUP]
    raw = await request.read()
    if not raw.isascii():
        # msgspec.Raw would relay invalid UTF-8 inside ``data`` to every recipient.
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            return _error(400, "bad_json", f"body is not valid UTF-8 (byte {exc.start})")
    try:
        body = _decode_publish(raw)
    except msgspec.ValidationError as exc:
        return _error(400, "bad_field", str(exc))
    except msgspec.DecodeError as exc:
        return _error(400, "bad_json", f"body is not valid JSON: {exc}")
    targets = [body.channel is not None, body.user is not None, body.broadcast]
    if sum(targets) != 1:
        return _error(400, "bad_target", "give exactly one of: channel, user, broadcast: true")
    broker = sup.broker
    if body.channel is not None:
        workers = broker.publish_channel(body.channel, body.sender, body.data)
    elif body.user is not None:
        workers = broker.publish_user(body.user, body.sender, body.data)
    else:
        workers = broker.broadcast(body.sender, body.data)
    return _json({"accepted": True, "workers": workers}, 202)


async def stats(request: web.Request) -> web.Response:
    return _json(request.app[_SUP].stats())


async def healthz(request: web.Request) -> web.Response:
    sup = request.app[_SUP]
    alive = sum(s.process is not None for p in sup.pools for s in p.slots)
    total = sum(len(p.slots) for p in sup.pools)
    status = "ok" if alive == total and not sup.stopping else "degraded"
    return _json(
        {"status": status, "workers": alive, "workers_expected": total},
        200 if status == "ok" else 503,
    )


class _Collector:
    """Turns the stats snapshot into Prometheus metric families at scrape time."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        s = self.sup.stats()
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
        ):
            yield CounterMetricFamily(f"manydoors_{name}", help_, value=s[name])
        for name, help_, key in (
            ("refused", "Connections refused, by reason", "refused"),
            ("closed", "Connections closed by the server, by reason", "closed"),
            ("errors", "Error events sent to clients, by code", "errors"),
        ):
            family = CounterMetricFamily(
                f"manydoors_{name}", help_, labels=["reason" if key != "errors" else "code"]
            )
            for label, value in s[key].items():
                family.add_metric([label], value)
            yield family


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[_REGISTRY]
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def start_api(sup: Supervisor) -> web.AppRunner:
    app = web.Application(client_max_size=MAX_BODY)
    app[_SUP] = sup
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(sup))
    app[_REGISTRY] = registry
    app.add_routes(
        [
            web.post("/api/publish", publish),
            web.get("/api/stats", stats),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, sup.config.api.host, sup.config.api.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"API: cannot listen on {sup.config.api.host}:{sup.config.api.port}: {exc.strerror}"
        ) from None
    sup.api_port = runner.addresses[0][1]  # the real port when 0 was asked for
    return runner

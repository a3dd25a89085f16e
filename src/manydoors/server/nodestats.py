"""What the node shows of itself: the stats JSON, a sample of live connections, health.

:class:`NodeStats` is the node as the HTTP API sees it (it has what
``api.NodeView`` asks for): it reads the pools' shared stats tables, the broker's
figures and /proc, and asks workers over their links for a sample of their
connections. It starts nothing and stops nothing; the supervisor owns the pools it
reads and tells it when a worker answers.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import msgspec

from ..broker.base import Broker
from ..node import procfs
from ..node.link import Link
from ..protocol.ipc import Kind
from ..protocol.messages import ERROR_CODES
from .pools import Pool
from .stats import CLOSED, HOOK_OUTCOMES, HOOKS, LOST, REFUSED

SAMPLE_TIMEOUT: Final = 2.0  # seconds a worker has to answer for /api/connections


class NodeStats:
    """The node's figures, read on demand from its pools and its broker."""

    __slots__ = (
        "_stopping",
        "broker",
        "fd_limit",
        "pools",
        "pusher_webhooks",
        "samples",
        "started",
        "webhooks",
    )

    def __init__(
        self,
        pools: list[Pool],
        broker: Broker,
        fd_limit: int,
        stopping: Callable[[], bool],
    ) -> None:
        self.pools = pools  # the supervisor's list: pools bound later show up here
        self.broker = broker
        self.fd_limit = fd_limit
        self.started = time.time()
        self.samples: dict[Link, asyncio.Future[bytes]] = {}  # SAMPLE asked, not answered
        self._stopping = stopping
        # The webhooks' figures (``Webhooks.stats``), set by the supervisor when it sends them.
        self.webhooks: Callable[[], object] | None = None
        # The Pusher apps' webhooks' figures (``PusherWebhooks.stats``), likewise.
        self.pusher_webhooks: Callable[[], object] | None = None

    @property
    def stopping(self) -> bool:
        """The node is draining: it no longer serves (a 503 on /healthz)."""
        return self._stopping()

    def services(self) -> set[str]:
        """The names of the node's services."""
        return {p.service.name for p in self.pools}

    def workers(self) -> tuple[int, int]:
        """(workers alive, workers expected), over every pool."""
        alive = sum(s.process is not None for p in self.pools for s in p.slots)
        return alive, sum(len(p.slots) for p in self.pools)

    def queued_to_workers(self) -> int:
        """Bytes of broker frames written to worker links and not yet taken by them."""
        total = 0
        for pool in self.pools:
            for slot in pool.slots:
                link = slot.link
                if link is not None and link.transport is not None:
                    total += link.transport.get_write_buffer_size()
        return total

    # --- a sample of connections ------------------------------------------------------

    def sampled(self, link: Link, payload: bytes) -> None:
        """A worker's answer (a SAMPLED frame) to the SAMPLE question it was sent."""
        waiter = self.samples.pop(link, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(payload)

    async def connections(self, service: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` live connections, asked of the workers (spread over them)."""
        loop = asyncio.get_running_loop()
        links = [
            s.link
            for p in self.pools
            for s in p.slots
            if s.link is not None and (service is None or p.service.name == service)
        ]
        if not links or limit < 1:
            return []
        each = max(1, math.ceil(limit / len(links)))
        waits = []
        for link in links:
            if link in self.samples:
                continue  # an earlier question is still out; skip this worker
            waiter: asyncio.Future[bytes] = loop.create_future()
            self.samples[link] = waiter
            link.send(Kind.SAMPLE, str(each))
            waits.append(waiter)
        done, _ = await asyncio.wait(waits, timeout=SAMPLE_TIMEOUT) if waits else (set(), set())
        for link in [k for k, w in self.samples.items() if w in waits and not w.done()]:
            del self.samples[link]  # a busy worker: answer without it
        out: list[dict[str, Any]] = []
        for waiter in done:
            out.extend(json.loads(waiter.result()))
        return out[:limit]

    # --- the stats JSON ---------------------------------------------------------------

    def _workers(self, pool: Pool, totals: Counter[str]) -> list[dict[str, Any]]:
        """The rows of ``pool``'s workers; adds their counters to ``totals``."""
        workers = []
        for slot in pool.slots:
            row = pool.table.row(slot.index)
            totals.update(row)
            pid = slot.process.pid if slot.process is not None else None
            workers.append(
                {
                    "slot": slot.index,
                    "pid": pid,
                    "connections": row["connections"],
                    # Listing /proc/PID/fd costs milliseconds at 20,000 fds;
                    # the worker's own fds plus one per connection is exact enough.
                    "fds": slot.base_fds + row["connections"] if pid else None,
                    "fd_limit": self.fd_limit,
                    "rss_bytes": procfs.rss(pid) if pid is not None else None,
                    "restarts": slot.restarts,
                    "loop_lag_max_ms": row["loop_lag_max_ms"],
                    "sync_wait_max_ms": row["sync_wait_max_ms"],
                }
            )
        return workers

    def stats(self) -> dict[str, Any]:
        """The /api/stats JSON (also the dashboard's stream and /metrics)."""
        totals: Counter[str] = Counter()
        services = []
        for pool in self.pools:
            svc = pool.service
            svc_totals: Counter[str] = Counter(pool.retired)
            workers = self._workers(pool, svc_totals)
            totals.update(svc_totals)
            services.append(
                {
                    "name": svc.name,
                    "host": svc.host,
                    "port": pool.port,
                    "protocol": svc.protocol,
                    "tls": svc.tls_cert is not None,
                    "max_connections": svc.max_connections,
                    "connections": svc_totals["connections"],
                    "workers": workers,
                }
            )
        out: dict[str, Any] = {
            "connections": totals["connections"],
            "accepted": totals["accepted"],
            "refused": {r: totals[f"refused_{r}"] for r in REFUSED},
            "messages_in": totals["messages_in"],
            "messages_out": totals["messages_out"],
            "dropped": totals["dropped"],
            "throttled": totals["throttled"],
            "pings": totals["pings"],
            "closed": {r: totals[f"closed_{r}"] for r in CLOSED},
            "lost": {r: totals[f"lost_{r}"] for r in LOST},
            "errors": {c: totals[f"error_{c}"] for c in ERROR_CODES},
            # Proxy calls to the backend by hook and outcome (docs/hooks.md).
            "hooks": {h: {o: totals[f"hook_{h}_{o}"] for o in HOOK_OUTCOMES} for h in HOOKS},
            # A dict or a msgspec Struct: either way, the same JSON object.
            "broker": msgspec.to_builtins(self.broker.stats()),
            "uptime_s": round(time.time() - self.started, 3),
            "services": services,
        }
        if self.webhooks is not None:
            out["webhooks"] = msgspec.to_builtins(self.webhooks())
        if self.pusher_webhooks is not None:
            out["pusher_webhooks"] = msgspec.to_builtins(self.pusher_webhooks())
        return out

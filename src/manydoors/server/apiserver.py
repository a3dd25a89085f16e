"""The API's doors: a header timeout, a keep-alive timeout and a cap on its connections.

aiohttp's server waits for a request head as long as its keep-alive timer allows (an
hour by default) and accepts until the process runs out of fds. The API runs in the
supervisor, so a client that opens thousands of connections and sends half a head each
would leave the supervisor no fd to restart a worker with. Here every API connection
goes through a :class:`Door` (a thin ``asyncio.Protocol`` around aiohttp's own) that
:class:`Doors` counts and times:

- a request's head must arrive within ``header_timeout`` of the connection's start (or
  of its first byte after a keep-alive pause), and its body within ``header_timeout``
  once the head is in; an idle keep-alive connection closes after ``keepalive_timeout``;
- at most ``max_connections`` are open. At the cap, a new connection closes the oldest
  one that is not in a request (idle, or still sending its head), as nginx reuses idle
  connections; a flood of half-sent heads cannot keep ``/healthz`` out. Only when every
  connection is in a request is the newcomer answered 503 and closed at once.

The API key's middleware is here too: what lets a request in. aiohttp is imported
here: only the supervisor (through ``api.py``) imports this module.
"""

from __future__ import annotations

import asyncio
import hmac
import resource
from collections.abc import Awaitable, Callable
from typing import Final, cast

import msgspec
from aiohttp import web

from ..node import procfs

# fds the supervisor keeps beside the API's connections: the broker's Redis connections,
# the webhooks' HTTP connections, the fork server, /proc reads, logs, the accept burst.
API_FD_RESERVE: Final = 256
FDS_PER_WORKER: Final = 8  # a worker's link, its sentinel, and a restart's pipes and socketpair
MIN_API_CONNECTIONS: Final = 16  # however tight the fd limit, the API takes a few
_BUSY: Final = b'{"error":"busy","reason":"the API is at max_connections: retry later"}'
REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_cap(fd_limit: int, in_use: int, workers: int) -> int:
    """Connections the API may hold: the fd limit less the fds in use and the reserve.

    ``workers`` is the node's worker slots: each needs fds in the supervisor (its link
    and sentinel) and more while it is restarted (a socketpair, the fork server's pipes).
    """
    free = fd_limit - in_use - API_FD_RESERVE - FDS_PER_WORKER * workers
    return max(free, MIN_API_CONNECTIONS)


def sized_cap(workers: int) -> int:
    """:func:`api_cap` of this process now: its soft fd limit, its open fds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20  # Linux's default fs.nr_open: no process gets more
    return api_cap(soft, procfs.open_fds() or 0, workers)


class Door(asyncio.Protocol):
    """One API connection: aiohttp's ``RequestHandler`` inside, counted and timed outside."""

    __slots__ = ("busy", "doors", "gone", "head_started", "inner", "timer", "transport")

    def __init__(self, doors: Doors, inner: asyncio.Protocol) -> None:
        self.doors = doors
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False  # a request's handler runs
        self.head_started = False  # a byte of the next request came after the last response
        self.gone = False  # closed by us (timeout or eviction), or lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.doors.opened(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and not self.head_started:
            self.head_started = True
            self.doors.head_started(self)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.doors.closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def shut(self) -> None:
        """Close it now, whatever aiohttp is doing with it."""
        if self.transport is not None:
            self.transport.close()


class _Refusal(asyncio.Protocol):
    """Over the cap with every connection in a request: answer 503 and close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        transport.write(REFUSED)
        transport.close()


class Doors:
    """The API's connections: how many, which are in a request, and their deadlines."""

    def __init__(
        self, max_connections: int, header_timeout: float, keepalive_timeout: float
    ) -> None:
        # aiohttp's protocol factory (its web.Server), which exists once the runner is set
        # up, after the app and so these middlewares: the site hands it over.
        self.make: Callable[[], asyncio.Protocol] | None = None
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.open: dict[Door, None] = {}
        self.waiting: dict[Door, None] = {}  # not in a request, the longest waiting first
        self.by_transport: dict[asyncio.BaseTransport, Door] = {}
        self.refused = self.evicted = self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        """The protocol factory of the API's listening socket."""
        if len(self.open) >= self.max_connections:
            if not self.waiting:
                self.refused += 1
                return _Refusal()
            oldest = next(iter(self.waiting))
            self.evicted += 1
            self.drop(oldest)
        assert self.make is not None, "DoorsSite.start() hands aiohttp's server over"
        return Door(self, self.make())

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self.open),
            "max_connections": self.max_connections,
            "timed_out": self.timed_out,
            "evicted": self.evicted,
            "refused": self.refused,
        }

    # --- a door's life ------------------------------------------------------------------

    def opened(self, door: Door) -> None:
        self.open[door] = None
        self.waiting[door] = None
        assert door.transport is not None
        self.by_transport[door.transport] = door
        self.arm(door, self.header_timeout)

    def head_started(self, door: Door) -> None:
        # After a keep-alive pause, the head's first byte starts its clock: never later
        # than the keep-alive deadline already set.
        self.arm(door, self.header_timeout, sooner_only=True)

    def started(self, door: Door) -> None:
        """A request's head is in: its handler runs, no deadline of ours until it ends."""
        door.busy = True
        self.waiting.pop(door, None)
        self.disarm(door)

    def ended(self, door: Door) -> None:
        """Its handler returned: the connection waits for the next request."""
        door.busy = door.head_started = False
        if door.gone:
            return
        self.waiting[door] = None  # the newest waiting, evicted last
        self.arm(door, self.keepalive_timeout)

    def closed(self, door: Door) -> None:
        self.forget(door)
        if door.transport is not None:
            self.by_transport.pop(door.transport, None)

    def drop(self, door: Door) -> None:
        """Close a door that waits (timed out, or the oldest at the cap): uncounted now."""
        self.forget(door)
        door.shut()

    def forget(self, door: Door) -> None:
        door.gone = True
        self.open.pop(door, None)
        self.waiting.pop(door, None)
        self.disarm(door)

    # --- deadlines ----------------------------------------------------------------------

    def arm(self, door: Door, seconds: float, sooner_only: bool = False) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        if door.timer is not None:
            if sooner_only and door.timer.when() <= when:
                return
            door.timer.cancel()
        door.timer = loop.call_at(when, self.expire, door)

    def disarm(self, door: Door) -> None:
        if door.timer is not None:
            door.timer.cancel()
            door.timer = None

    def expire(self, door: Door) -> None:
        door.timer = None
        if not door.busy and not door.gone:
            self.timed_out += 1
            self.drop(door)

    # --- the middlewares ----------------------------------------------------------------

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: the request's connection is busy until its handler returns."""
        transport = request.transport
        door = None if transport is None else self.by_transport.get(transport)
        if door is None:
            return await handler(request)
        self.started(door)
        try:
            return await handler(request)
        finally:
            self.ended(door)

    @web.middleware
    async def read_body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Innermost (after the API key): the body within ``header_timeout``, or 408.

        The handlers' own ``request.read()`` then returns the bytes read here.
        """
        if request.body_exists:
            try:
                async with asyncio.timeout(self.header_timeout):
                    await request.read()
            except TimeoutError:
                reason = f"no whole body in {self.header_timeout:g} s"
                resp = error(408, "timeout", reason)
                # Sent and closed here: aiohttp would linger (read and drop the rest of
                # the body) for 10 s more before it closes.
                resp.force_close()
                await resp.prepare(request)
                await resp.write_eof()
                request.protocol.force_close()
                return resp
        return await handler(request)


def error(status: int, code: str, reason: str) -> web.Response:
    """The API's error answer: ``{"error": code, "reason": reason}``."""
    body = msgspec.json.encode({"error": code, "reason": reason})
    return web.Response(body=body, status=status, content_type="application/json")


# What the API key guards: acting on clients and seeing who they are; stats only on request.
GUARDED: Final = frozenset(
    {
        "/api/publish",
        "/api/presence",
        "/api/connections",
        "/api/disconnect",
        "/api/unsubscribe",
        "/api/history",
        "/api/channels",
    }
)
STATS: Final = frozenset({"/api/stats", "/api/stream", "/metrics"})


def key_middleware(key: str, protect_stats: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    """401 for a guarded path without ``Authorization: Bearer <key>`` (constant-time)."""
    expected = f"Bearer {key}".encode()
    guarded = GUARDED | STATS if protect_stats else GUARDED

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in guarded:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                resp = error(401, "unauthorized", "send Authorization: Bearer <api key>")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
        return await handler(request)

    return check


class DoorsSite(web.BaseSite):
    """A TCP site whose connections go through ``doors`` (aiohttp's TCPSite, wrapped)."""

    __slots__ = ("_doors", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, doors: Doors) -> None:
        super().__init__(runner)
        self._host, self._port, self._doors = host, port, doors

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._doors.make = self._runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._doors, self._host, self._port)

"""Configuration as frozen data, validated at construction (no I/O).

``options.py`` builds a ``Config`` from TOML, ``MANYDOORS_*`` environment variables and
flags, every option listed there once with its three names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


PROTOCOLS: Final = ("tcp", "websocket", "pusher")
SLOW_POLICIES: Final = ("disconnect", "drop")
BROKERS: Final = ("local", "redis")
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
PUBLISH_RIGHTS: Final = ("none", "subscribers", "all")
SUBSCRIBE_RIGHTS: Final = ("all", "token", "proxy")
WEBHOOK_EVENTS: Final = (
    "connect",
    "disconnect",
    "channel_occupied",
    "channel_vacated",
    "join",
    "leave",
)

# What each field annotation (a string here, see the __future__ import) accepts; a TOML
# file can give any key any type, and bool is an int to isinstance.
_TYPES: Final[dict[str, tuple[tuple[type, ...], str]]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "int | None": ((int, type(None)), "an integer"),
    "str | None": ((str, type(None)), "a string"),
    "bool": ((bool,), "true or false"),
    "float": ((int, float), "a number"),
    "float | None": ((int, float, type(None)), "a number"),
}


def _check_types(obj: Any, where: str) -> None:
    """Reject a value of the wrong type with a message naming its key."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        want = _TYPES.get(str(f.type))
        bad_bool = isinstance(value, bool) and bool not in want[0] if want else False
        if want is not None and (bad_bool or not isinstance(value, want[0])):
            raise ConfigError(f"{where}: {f.name} must be {want[1]}, not {value!r}")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One service: a port (house) with its own pool of worker processes (cooks)."""

    name: str = "chat"
    host: str = "127.0.0.1"
    port: int = 7000
    protocol: str = "tcp"
    backlog: int = 4096
    max_connections: int = 100_000
    workers: int | None = None  # None: "auto", sized from max_connections and fds
    max_message_bytes: int = 64 * 1024
    max_outbound_bytes: int = 1024 * 1024
    # The kernel's send buffer per connection (SO_SNDBUF; Linux doubles it). Left to
    # autotuning (0) a reader that stops reading pins up to tcp_wmem's max (4 MiB) of
    # kernel memory before max_outbound_bytes sees a byte, and 10,000 such readers
    # push the whole machine's TCP memory into pressure.
    send_buffer: int = 128 * 1024
    max_bad_messages: int = 10  # consecutive bad lines before the connection is closed
    # A reader whose queued bytes pass max_outbound_bytes is closed ("disconnect"), or
    # keeps its connection while new messages for it are dropped and counted ("drop").
    slow_policy: str = "disconnect"
    max_subscriptions: int = 100  # channels one connection may be in at once
    # Client-to-user ``send``: a right like ``publish``, off on a public server.
    allow_send: bool = False
    # TLS: PEM files of the certificate (chain) and its private key; both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Limits for a public server; 0 turns a limit off.
    max_messages_per_second: float = 100.0  # token bucket per connection, burst 1 s
    max_bytes_per_second: int = 1024 * 1024  # over it, reading pauses until it refills
    max_connections_per_ip: int = 1000
    max_connections_per_user: int = 100
    # Loopback peers are usually a local reverse proxy carrying everyone's connections,
    # so they are not held to max_connections_per_ip unless this says so.
    limit_loopback: bool = False
    hello_timeout: float = 5.0  # auth modes "token", "proxy": seconds to say a valid hello
    read_timeout: float = 10.0  # seconds a started message (or WS handshake) may take
    ping_interval: float = 25.0  # a connection quiet this long gets {"ev":"ping"}
    ping_timeout: float = 10.0  # ... and is closed if nothing arrives within this

    def __post_init__(self) -> None:
        _check_types(self, f"service {self.name}")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"service name {self.name!r}: use letters, digits, - and _")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"service {self.name}: port {self.port} is not in 0-65535")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"service {self.name}: protocol {self.protocol!r} is not one of {PROTOCOLS}"
            )
        for key in (
            "backlog",
            "max_connections",
            "max_message_bytes",
            "max_outbound_bytes",
            "max_bad_messages",
            "max_subscriptions",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"service {self.name}: {key} must be at least 1")
        if self.slow_policy not in SLOW_POLICIES:
            raise ConfigError(
                f"service {self.name}: slow_policy {self.slow_policy!r} is not one of "
                f"{SLOW_POLICIES}"
            )
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"service {self.name}: workers must be 'auto' or at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"service {self.name}: tls_cert and tls_key go together")
        for key in (
            "max_messages_per_second",
            "max_bytes_per_second",
            "send_buffer",
            "max_connections_per_ip",
            "max_connections_per_user",
            "read_timeout",
            "ping_interval",
        ):
            if not getattr(self, key) >= 0:  # also catches NaN
                raise ConfigError(f"service {self.name}: {key} must be >= 0 (0: off)")
        for key in ("hello_timeout", "ping_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"service {self.name}: {key} must be positive")
        if 0 < self.max_bytes_per_second < self.max_message_bytes:
            raise ConfigError(
                f"service {self.name}: max_bytes_per_second must be 0 or at least "
                f"max_message_bytes ({self.max_message_bytes})"
            )


@dataclass(frozen=True, slots=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 7080
    header_timeout: float = 10.0  # seconds a request's head may take (and then its body)
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection stays open
    # API connections held at once. None: the supervisor's fd limit less the fds in use
    # and a reserve for restarting workers (server/apiserver.py, api_cap).
    max_connections: int | None = None

    def __post_init__(self) -> None:
        _check_types(self, "api")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"api: port {self.port} is not in 0-65535")
        for key in ("header_timeout", "keepalive_timeout"):
            value = getattr(self, key)
            if not 0 < value < float("inf"):  # NaN too
                raise ConfigError(f"api: {key} must be a number of seconds > 0, not {value}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError(f"api: max_connections must be >= 1, not {self.max_connections}")


@dataclass(frozen=True, slots=True)
class NamespaceConfig:
    """Rights and options of a group of channels: ``[channels]`` or a ``[[namespace]]``.

    A channel ``news:sports`` belongs to the namespace ``news``; a channel without ``:``
    (or of a namespace nobody configured) to the default one, ``[channels]``. The
    defaults are those of a public server: clients may subscribe, not publish.
    """

    name: str = ""  # "" for the default namespace
    publish: str = "none"  # who may ``pub`` from a client: none, subscribers, all
    subscribe: str = "all"  # all, token (the JWT ``channels`` claim), proxy (the backend)
    publish_proxy: bool = False  # the backend sees (and may refuse or replace) each pub
    presence: bool = False  # members (user ids, connection counts) may be listed
    join_leave: bool = False  # subscribers hear a user's first join and last leave
    history_size: int | None = None  # None: the global history_size
    history_ttl: float | None = None  # None: the global history_ttl
    max_presence_members: int = 1000  # members in one page of a presence answer

    def __post_init__(self) -> None:
        where = f"namespace {self.name}" if self.name else "channels"
        _check_types(self, where)
        if self.name and (":" in self.name or not self.name.isprintable()):
            raise ConfigError(f"{where}: a namespace name has no ':' and is printable")
        if self.publish not in PUBLISH_RIGHTS:
            raise ConfigError(f"{where}: publish {self.publish!r} is not one of {PUBLISH_RIGHTS}")
        if self.subscribe not in SUBSCRIBE_RIGHTS:
            raise ConfigError(
                f"{where}: subscribe {self.subscribe!r} is not one of {SUBSCRIBE_RIGHTS}"
            )
        if self.history_size is not None and self.history_size < 0:
            raise ConfigError(f"{where}: history_size must not be negative (0: no history)")
        if self.history_ttl is not None and not self.history_ttl > 0:
            raise ConfigError(f"{where}: history_ttl must be positive")
        if self.max_presence_members < 1:
            raise ConfigError(f"{where}: max_presence_members must be at least 1")


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """The application's backend: asked (proxies) and told (webhooks)."""

    connect_url: str | None = None  # auth mode "proxy": who is this client?
    subscribe_url: str | None = None  # namespaces with subscribe = "proxy"
    publish_url: str | None = None  # namespaces with publish_proxy = true
    webhook_url: str | None = None
    webhook_secret: str | None = None  # whsec_<base64> (Standard Webhooks)
    webhook_events: tuple[str, ...] = WEBHOOK_EVENTS
    timeout: float = 2.0  # seconds a backend has to answer one call
    concurrency: int = 64  # calls to the backend in flight at once, per process
    queue_size: int = 10_000  # webhook events waiting; over it they are dropped (counted)

    def __post_init__(self) -> None:
        _check_types(self, "hooks")
        for key in ("connect_url", "subscribe_url", "publish_url", "webhook_url"):
            url = getattr(self, key)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"hooks: {key} must be an http:// or https:// URL")
        bad = set(self.webhook_events) - set(WEBHOOK_EVENTS)
        if bad:
            raise ConfigError(
                f"hooks: unknown webhook_events {sorted(bad)} (known: {WEBHOOK_EVENTS})"
            )
        if self.webhook_url is not None and not self.webhook_secret:
            raise ConfigError("hooks: webhook_url needs webhook_secret (MANYDOORS_WEBHOOK_SECRET)")
        if not self.timeout > 0:
            raise ConfigError("hooks: timeout must be positive")
        if self.concurrency < 1 or self.queue_size < 1:
            raise ConfigError("hooks: concurrency and queue_size must be at least 1")


PUSHER_WEBHOOK_EVENTS: Final = (
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
)


@dataclass(frozen=True, slots=True)
class AppConfig:
    """A Pusher app (``[[app]]``): what a ``protocol = "pusher"`` service serves.

    Its channels are its own: two apps (and the native protocol) never share one.
    """

    id: str = ""
    key: str = ""
    secret: str = ""  # or MANYDOORS_APP_<ID>_SECRET
    max_connections: int = 0  # per node; 0: only the service's max_connections
    enable_client_events: bool = False  # client-* events on private and presence channels
    max_client_events_per_second: int = 10  # per connection, as Pusher
    max_presence_members: int = 100  # members of one presence channel
    max_event_bytes: int = 10 * 1024  # the ``data`` of one event (Pusher: 10 KB)
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = PUSHER_WEBHOOK_EVENTS

    def __post_init__(self) -> None:
        where = f"app {self.id}" if self.id else "[[app]]"
        _check_types(self, where)
        for key in ("id", "key"):
            value = getattr(self, key)
            if not value or not value.isprintable() or any(c in value for c in "/?:# "):
                raise ConfigError(f"{where}: {key} must be printable, without / ? : # or spaces")
        if not self.secret:
            raise ConfigError(
                f"{where}: needs a secret (or MANYDOORS_APP_{self.id.upper()}_SECRET)"
            )
        for key in (
            "max_connections",
            "max_client_events_per_second",
            "max_presence_members",
            "max_event_bytes",
        ):
            if getattr(self, key) < (0 if key == "max_connections" else 1):
                raise ConfigError(f"{where}: {key} is too small")
        if self.webhook_url is not None and not self.webhook_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(f"{where}: webhook_url must be an http:// or https:// URL")
        bad = set(self.webhook_events) - set(PUSHER_WEBHOOK_EVENTS)
        if bad:
            raise ConfigError(
                f"{where}: unknown webhook_events {sorted(bad)} (known: {PUSHER_WEBHOOK_EVENTS})"
            )


AUTH_MODES: Final = ("none", "token", "proxy")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may connect (client tokens) and who may use the HTTP API (the API key)."""

    # "token": a client's hello carries a JWT whose ``sub`` is its user id; "proxy": the
    # backend's connect hook ([hooks] connect_url) says who the client of a hello is.
    mode: str = "none"
    secret: str | None = None  # HMAC key (HS256/384/512) of the tokens ...
    public_key: str | None = None  # ... or a PEM file of an RSA/EC key (RS256, ES256)
    # When set, publish, presence and connections need ``Authorization: Bearer <key>``.
    api_key: str | None = None
    protect_stats: bool = False  # also /api/stats, /api/stream, /metrics (not /healthz)

    def __post_init__(self) -> None:
        _check_types(self, "auth")
        if self.mode not in AUTH_MODES:
            raise ConfigError(f"auth: mode {self.mode!r} is not one of {AUTH_MODES}")
        if self.mode == "token" and (self.secret is None) == (self.public_key is None):
            raise ConfigError('auth: mode "token" needs one of secret or public_key')
        if self.secret is not None and len(self.secret.encode()) < 32:
            # RFC 7518 3.2: an HMAC key at least as long as the hash (HS256: 32 bytes).
            raise ConfigError("auth: secret must be at least 32 bytes")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError("auth: api_key must be at least 16 characters")


@dataclass(frozen=True, slots=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    services: tuple[ServiceConfig, ...] = (ServiceConfig(),)
    drain_timeout: float = 10.0
    # Lower the per-worker fd limit below the hard limit (sharing a box, testing).
    fd_limit: int | None = None
    # fds a worker keeps for itself (listener, broker link, loop, /proc reads).
    fd_reserve: int = 64
    # The workers' nice value above the supervisor's: the router in the supervisor is on
    # every hello's and sub's path (their acks wait for its SYNCED), and with more
    # workers than cores, at an equal share it got 1.9 % of a core while runnable all
    # the time, and a 1M ramp's acks timed out (docs/benchmarks.md, issue 18).
    worker_nice: int = 10
    broker: str = "local"  # "redis": nodes sharing redis_url form one logical server
    redis_url: str = "redis://127.0.0.1:6379/0"
    history_size: int = 100  # messages kept per channel for ``sub`` with ``since``
    history_ttl: float = 300.0  # seconds a channel's history outlives its last message
    channels: NamespaceConfig = field(default_factory=NamespaceConfig)  # the default namespace
    namespaces: tuple[NamespaceConfig, ...] = ()
    hooks: HooksConfig = field(default_factory=HooksConfig)
    apps: tuple[AppConfig, ...] = ()  # Pusher apps, for services with protocol "pusher"

    def __post_init__(self) -> None:
        _check_types(self, "config")
        for attr in ("id", "key"):
            values = [getattr(app, attr) for app in self.apps]
            if len(set(values)) != len(values):
                raise ConfigError(f"app {attr}s must be unique: {values}")
        if any(s.protocol == "pusher" for s in self.services) and not self.apps:
            raise ConfigError('a service with protocol "pusher" needs at least one [[app]]')
        if self.channels.name:
            raise ConfigError("[channels] is the default namespace: it takes no name")
        names = [ns.name for ns in self.namespaces]
        if "" in names:
            raise ConfigError("every [[namespace]] needs a name")
        if len(set(names)) != len(names):
            raise ConfigError(f"namespace names must be unique: {names}")
        for ns in (self.channels, *self.namespaces):
            where = f"namespace {ns.name}" if ns.name else "[channels]"
            if ns.subscribe == "proxy" and self.hooks.subscribe_url is None:
                raise ConfigError(f'{where}: subscribe = "proxy" needs [hooks] subscribe_url')
            if ns.publish_proxy and self.hooks.publish_url is None:
                raise ConfigError(f"{where}: publish_proxy needs [hooks] publish_url")
        if self.auth.mode == "proxy" and self.hooks.connect_url is None:
            raise ConfigError('auth: mode "proxy" needs [hooks] connect_url')
        if self.auth.mode != "proxy" and self.hooks.connect_url is not None:
            # Else a forgotten mode would let everyone in while the backend waits for calls.
            raise ConfigError('hooks: connect_url is used only with [auth] mode = "proxy"')
        if not self.services:
            raise ConfigError("at least one [[service]] is needed")
        names = [s.name for s in self.services]
        if len(set(names)) != len(names):
            raise ConfigError(f"service names must be unique: {names}")
        ports = [(s.host, s.port) for s in self.services if s.port]
        if len(set(ports)) != len(ports):
            raise ConfigError(f"two services listen on the same address: {ports}")
        if not self.drain_timeout > 0:  # also catches NaN
            raise ConfigError("drain_timeout must be positive")
        if self.fd_reserve < 0:
            raise ConfigError("fd_reserve must not be negative")
        if not 0 <= self.worker_nice <= 19:
            raise ConfigError("worker_nice must be 0-19 (0: the supervisor's priority)")
        if self.fd_limit is not None and self.fd_limit <= self.fd_reserve + 1:
            raise ConfigError(f"fd_limit {self.fd_limit} leaves no room beside fd_reserve")
        if self.broker not in BROKERS:
            raise ConfigError(f"broker {self.broker!r} is not one of {BROKERS} (or a redis:// URL)")
        if not self.redis_url.startswith(REDIS_SCHEMES):
            raise ConfigError(f"redis_url {self.redis_url!r} must start with {REDIS_SCHEMES}")
        if self.history_size < 0:
            raise ConfigError("history_size must not be negative (0 turns history off)")
        if not self.history_ttl > 0:
            raise ConfigError("history_ttl must be positive")

"""Configuration as frozen data: TOML, then ``MANYDOORS_*`` environment, then flags.

No I/O here: the CLI reads the file and the environment and hands their contents in.
Every option is listed once in ``SERVICE_OPTIONS`` / ``GLOBAL_OPTIONS`` with its TOML
key, environment variable and flag, so the three sources cannot drift apart.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


PROTOCOLS: Final = ("tcp", "websocket")
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

    def __post_init__(self) -> None:
        _check_types(self, "api")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"api: port {self.port} is not in 0-65535")


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


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise ConfigError(f"expected true or false, not {value!r}")


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
    broker: str = "local"  # "redis": nodes sharing redis_url form one logical server
    redis_url: str = "redis://127.0.0.1:6379/0"
    history_size: int = 100  # messages kept per channel for ``sub`` with ``since``
    history_ttl: float = 300.0  # seconds a channel's history outlives its last message
    channels: NamespaceConfig = field(default_factory=NamespaceConfig)  # the default namespace
    namespaces: tuple[NamespaceConfig, ...] = ()
    hooks: HooksConfig = field(default_factory=HooksConfig)

    def __post_init__(self) -> None:
        _check_types(self, "config")
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


def _names(value: Any) -> tuple[str, ...]:
    """A list from TOML, or comma-separated names from env or a flag."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"expected a list of names, not {value!r}")


def _workers(value: Any) -> int | None:
    if value in ("auto", None):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):  # from env or a flag
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"workers must be 'auto' or a number, not {value!r}")


@dataclass(frozen=True, slots=True)
class Option:
    key: str  # TOML key (in [[service]], [api] as "api.port", or top level)
    env: str
    flag: str
    parse: Callable[[Any], Any]
    help: str

    @property
    def switch(self) -> bool:
        """A true/false option: its flag alone means true (``--allow-send``)."""
        return self.parse is _bool


SERVICE_OPTIONS: Final = (
    Option("name", "MANYDOORS_SERVICE", "--service", str, "service name"),
    Option("host", "MANYDOORS_HOST", "--host", str, "address to listen on"),
    Option("port", "MANYDOORS_PORT", "--port", int, "port to listen on"),
    Option("protocol", "MANYDOORS_PROTOCOL", "--protocol", str, "tcp"),
    Option("backlog", "MANYDOORS_BACKLOG", "--backlog", int, "listen() backlog"),
    Option(
        "max_connections",
        "MANYDOORS_MAX_CONNECTIONS",
        "--max-connections",
        int,
        "connections the service holds before answering server_full",
    ),
    Option("workers", "MANYDOORS_WORKERS", "--workers", _workers, "'auto' or a number"),
    Option(
        "max_message_bytes",
        "MANYDOORS_MAX_MESSAGE_BYTES",
        "--max-message-bytes",
        int,
        "longest line a client may send",
    ),
    Option(
        "max_outbound_bytes",
        "MANYDOORS_MAX_OUTBOUND_BYTES",
        "--max-outbound-bytes",
        int,
        "bytes queued to a reader before slow_policy applies",
    ),
    Option(
        "max_bad_messages",
        "MANYDOORS_MAX_BAD_MESSAGES",
        "--max-bad-messages",
        int,
        "consecutive bad lines before a client is closed",
    ),
    Option(
        "max_subscriptions",
        "MANYDOORS_MAX_SUBSCRIPTIONS",
        "--max-subscriptions",
        int,
        "channels one connection may be in at once",
    ),
    Option(
        "slow_policy",
        "MANYDOORS_SLOW_POLICY",
        "--slow-policy",
        str,
        "a reader over max_outbound_bytes: 'disconnect' (default) or 'drop' its messages",
    ),
    Option(
        "allow_send",
        "MANYDOORS_ALLOW_SEND",
        "--allow-send",
        _bool,
        "clients may send to a user (op send)",
    ),
    Option(
        "send_buffer",
        "MANYDOORS_SEND_BUFFER",
        "--send-buffer",
        int,
        "kernel send buffer per connection, bytes (0: kernel autotuning)",
    ),
    Option("tls_cert", "MANYDOORS_TLS_CERT", "--tls-cert", str, "PEM certificate (chain)"),
    Option("tls_key", "MANYDOORS_TLS_KEY", "--tls-key", str, "PEM private key of tls_cert"),
    Option(
        "max_messages_per_second",
        "MANYDOORS_MAX_MESSAGES_PER_SECOND",
        "--max-messages-per-second",
        float,
        "messages a connection may send per second (0: no limit)",
    ),
    Option(
        "max_bytes_per_second",
        "MANYDOORS_MAX_BYTES_PER_SECOND",
        "--max-bytes-per-second",
        int,
        "bytes a connection may send per second before reading pauses (0: no limit)",
    ),
    Option(
        "max_connections_per_ip",
        "MANYDOORS_MAX_CONNECTIONS_PER_IP",
        "--max-connections-per-ip",
        int,
        "connections from one address (0: no limit)",
    ),
    Option(
        "max_connections_per_user",
        "MANYDOORS_MAX_CONNECTIONS_PER_USER",
        "--max-connections-per-user",
        int,
        "connections of one user (0: no limit)",
    ),
    Option(
        "limit_loopback",
        "MANYDOORS_LIMIT_LOOPBACK",
        "--limit-loopback",
        _bool,
        "hold loopback peers to max_connections_per_ip too",
    ),
    Option(
        "hello_timeout",
        "MANYDOORS_HELLO_TIMEOUT",
        "--hello-timeout",
        float,
        'seconds to say a valid hello (auth mode "token" or "proxy")',
    ),
    Option(
        "read_timeout",
        "MANYDOORS_READ_TIMEOUT",
        "--read-timeout",
        float,
        "seconds a started message or handshake may take (0: no limit)",
    ),
    Option(
        "ping_interval",
        "MANYDOORS_PING_INTERVAL",
        "--ping-interval",
        float,
        "ping a connection quiet this many seconds (0: no heartbeat)",
    ),
    Option(
        "ping_timeout",
        "MANYDOORS_PING_TIMEOUT",
        "--ping-timeout",
        float,
        "close a pinged connection that sends nothing within this many seconds",
    ),
)
GLOBAL_OPTIONS: Final = (
    Option("api.host", "MANYDOORS_API_HOST", "--api-host", str, "HTTP API address"),
    Option("api.port", "MANYDOORS_API_PORT", "--api-port", int, "HTTP API port"),
    Option(
        "auth.mode",
        "MANYDOORS_AUTH_MODE",
        "--auth-mode",
        str,
        "'none', 'token' (JWT) or 'proxy' (the connect hook)",
    ),
    Option(
        "auth.secret",
        "MANYDOORS_AUTH_SECRET",
        "--auth-secret",
        str,
        "HMAC key of client tokens (prefer the env variable)",
    ),
    Option(
        "auth.public_key",
        "MANYDOORS_AUTH_PUBLIC_KEY",
        "--auth-public-key",
        str,
        "PEM file of the RSA/EC key that verifies client tokens",
    ),
    Option(
        "auth.api_key",
        "MANYDOORS_API_KEY",
        "--api-key",
        str,
        "bearer key the API asks for (prefer the env variable: flags show in ps)",
    ),
    Option(
        "auth.protect_stats",
        "MANYDOORS_PROTECT_STATS",
        "--protect-stats",
        _bool,
        "stats and metrics need the API key too",
    ),
    Option(
        "drain_timeout",
        "MANYDOORS_DRAIN_TIMEOUT",
        "--drain-timeout",
        float,
        "seconds to drain on SIGTERM",
    ),
    Option(
        "fd_limit",
        "MANYDOORS_FD_LIMIT",
        "--fd-limit",
        int,
        "per-worker fd limit (default: the hard limit)",
    ),
    Option(
        "fd_reserve",
        "MANYDOORS_FD_RESERVE",
        "--fd-reserve",
        int,
        "fds a worker keeps for itself beside its connections",
    ),
    Option(
        "broker",
        "MANYDOORS_BROKER",
        "--broker",
        str,
        "'local' (default), 'redis', or a redis:// URL (implies redis)",
    ),
    Option("redis_url", "MANYDOORS_REDIS_URL", "--redis-url", str, "Redis of the redis broker"),
    Option(
        "history_size",
        "MANYDOORS_HISTORY_SIZE",
        "--history-size",
        int,
        "messages kept per channel for sub with since (0: off)",
    ),
    Option(
        "history_ttl",
        "MANYDOORS_HISTORY_TTL",
        "--history-ttl",
        float,
        "seconds a channel's history outlives its last message",
    ),
    # The default namespace ([channels]); [[namespace]] tables exist in TOML only.
    Option(
        "channels.publish",
        "MANYDOORS_PUBLISH",
        "--publish",
        str,
        "who may pub from a client: none (default), subscribers, all",
    ),
    Option(
        "channels.subscribe",
        "MANYDOORS_SUBSCRIBE",
        "--subscribe",
        str,
        "who may subscribe: all (default), token (the JWT channels claim), proxy",
    ),
    Option(
        "channels.publish_proxy",
        "MANYDOORS_PUBLISH_PROXY",
        "--publish-proxy",
        _bool,
        "the backend's publish hook sees each client pub (may refuse or replace data)",
    ),
    Option(
        "channels.presence",
        "MANYDOORS_PRESENCE",
        "--presence",
        _bool,
        "presence lists a channel's members",
    ),
    Option(
        "channels.join_leave",
        "MANYDOORS_JOIN_LEAVE",
        "--join-leave",
        _bool,
        "subscribers hear users join and leave",
    ),
    Option(
        "channels.max_presence_members",
        "MANYDOORS_MAX_PRESENCE_MEMBERS",
        "--max-presence-members",
        int,
        "members in one page of a presence answer",
    ),
    Option(
        "hooks.connect_url",
        "MANYDOORS_CONNECT_URL",
        "--connect-url",
        str,
        "the backend's connect hook (auth mode proxy)",
    ),
    Option(
        "hooks.subscribe_url",
        "MANYDOORS_SUBSCRIBE_URL",
        "--subscribe-url",
        str,
        "the backend's subscribe hook (subscribe = proxy)",
    ),
    Option(
        "hooks.publish_url",
        "MANYDOORS_PUBLISH_URL",
        "--publish-url",
        str,
        "the backend's publish hook (publish_proxy)",
    ),
    Option("hooks.webhook_url", "MANYDOORS_WEBHOOK_URL", "--webhook-url", str, "where events go"),
    Option(
        "hooks.webhook_secret",
        "MANYDOORS_WEBHOOK_SECRET",
        "--webhook-secret",
        str,
        "whsec_... key that signs webhooks (prefer the env variable)",
    ),
    Option(
        "hooks.webhook_events",
        "MANYDOORS_WEBHOOK_EVENTS",
        "--webhook-events",
        _names,
        f"comma-separated events to send (default all: {','.join(WEBHOOK_EVENTS)})",
    ),
    Option(
        "hooks.timeout",
        "MANYDOORS_HOOK_TIMEOUT",
        "--hook-timeout",
        float,
        "seconds the backend has to answer a hook",
    ),
    Option(
        "hooks.concurrency",
        "MANYDOORS_HOOK_CONCURRENCY",
        "--hook-concurrency",
        int,
        "calls to the backend in flight at once, per process",
    ),
)


def _table(doc: dict[str, Any], name: str, cls: type) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}]: expected a table, not {table!r}")
    bad = set(table) - {f.name for f in fields(cls)}
    if bad:
        raise ConfigError(f"[{name}]: unknown keys {sorted(bad)}")
    return dict(table)


def _parse(opt: Option, value: Any, source: str) -> Any:
    try:
        return opt.parse(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load(
    toml_text: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build a Config. ``flags`` maps option keys (``"port"``, ``"api.port"``) to values.

    Service options given by env or flag apply to the single service; with several
    services in the file they are an error (say which one in the file instead).
    """
    doc: dict[str, Any] = {}
    if toml_text:
        try:
            doc = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file: {exc}") from None
    known_top = {"service", "namespace", *(f.name for f in fields(Config))}
    known_top -= {"services", "namespaces"}
    unknown = set(doc) - known_top
    if unknown:
        raise ConfigError(f"unknown config keys: {sorted(unknown)}")

    service_tables = doc.get("service", [{}])
    if not isinstance(service_tables, list):
        raise ConfigError("use [[service]] tables (an array of tables) for services")
    service_keys = {f.name for f in fields(ServiceConfig)}
    services: list[dict[str, Any]] = []
    for i, table in enumerate(service_tables):
        if not isinstance(table, dict):
            raise ConfigError(f"[[service]] #{i + 1}: expected a table, not {table!r}")
        bad = set(table) - service_keys
        if bad:
            raise ConfigError(f"[[service]] #{i + 1}: unknown keys {sorted(bad)}")
        svc = dict(table)
        if "workers" in svc:
            svc["workers"] = _workers(svc["workers"])
        services.append(svc)

    namespace_tables = doc.get("namespace", [])
    if not isinstance(namespace_tables, list) or not all(
        isinstance(t, dict) for t in namespace_tables
    ):
        raise ConfigError("use [[namespace]] tables (an array of tables) for namespaces")
    namespaces = []
    for i, table in enumerate(namespace_tables):
        bad = set(table) - {f.name for f in fields(NamespaceConfig)}
        if bad:
            raise ConfigError(f"[[namespace]] #{i + 1}: unknown keys {sorted(bad)}")
        namespaces.append(NamespaceConfig(**table))
    tables_of = {
        "api": ApiConfig,
        "auth": AuthConfig,
        "channels": NamespaceConfig,
        "hooks": HooksConfig,
    }
    top: dict[str, Any] = {
        k: v for k, v in doc.items() if k not in (*tables_of, "service", "namespace")
    }
    tables = {name: _table(doc, name, cls) for name, cls in tables_of.items()}
    if "webhook_events" in tables["hooks"]:
        tables["hooks"]["webhook_events"] = _names(tables["hooks"]["webhook_events"])
    overrides: dict[str, Any] = {}
    for opts in (SERVICE_OPTIONS, GLOBAL_OPTIONS):
        for opt in opts:
            if env and opt.env in env:
                overrides[opt.key] = _parse(opt, env[opt.env], opt.env)
            if flags and flags.get(opt.key) is not None:
                overrides[opt.key] = _parse(opt, flags[opt.key], opt.flag)
    for key, value in overrides.items():
        if "." in key:
            table, name = key.split(".", 1)
            tables[table][name] = value
        elif key in service_keys:
            if len(services) != 1:
                raise ConfigError(
                    f"{key} given by flag or env, but the config has {len(services)} "
                    "services: set it in the service's table instead"
                )
            services[0][key] = value
        else:
            top[key] = value
    broker = top.get("broker")
    if isinstance(broker, str) and broker.startswith(REDIS_SCHEMES):
        top["broker"], top["redis_url"] = "redis", broker  # --broker redis://host:port
    try:
        return Config(
            api=ApiConfig(**tables["api"]),
            auth=AuthConfig(**tables["auth"]),
            services=tuple(ServiceConfig(**s) for s in services),
            channels=NamespaceConfig(**tables["channels"]),
            namespaces=tuple(namespaces),
            hooks=HooksConfig(**tables["hooks"]),
            **top,
        )
    except TypeError as exc:
        raise ConfigError(str(exc)) from None

"""Options: TOML, then ``MANYDOORS_*`` environment, then flags, into a ``Config``.

No I/O here: the CLI reads the file and the environment and hands their contents in.
Every option is listed once in ``SERVICE_OPTIONS`` / ``GLOBAL_OPTIONS`` with its TOML
key, environment variable and flag, so the three sources cannot drift apart.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from .config import (
    REDIS_SCHEMES,
    WEBHOOK_EVENTS,
    ApiConfig,
    AppConfig,
    AuthConfig,
    Config,
    ConfigError,
    HooksConfig,
    NamespaceConfig,
    ServiceConfig,
)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise ConfigError(f"expected true or false, not {value!r}")


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
        "api.header_timeout",
        "MANYDOORS_API_HEADER_TIMEOUT",
        "--api-header-timeout",
        float,
        "seconds an API request's head (then its body) may take before the connection closes",
    ),
    Option(
        "api.keepalive_timeout",
        "MANYDOORS_API_KEEPALIVE_TIMEOUT",
        "--api-keepalive-timeout",
        float,
        "seconds an idle keep-alive API connection stays open",
    ),
    Option(
        "api.max_connections",
        "MANYDOORS_API_MAX_CONNECTIONS",
        "--api-max-connections",
        int,
        "API connections at once (default: the fd limit less a reserve for worker restarts)",
    ),
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
        "worker_nice",
        "MANYDOORS_WORKER_NICE",
        "--worker-nice",
        int,
        "workers' nice above the supervisor's, whose router every ack waits for (0-19)",
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


def _apps(app_tables: Any, env: Mapping[str, str]) -> tuple[AppConfig, ...]:
    """The ``[[app]]`` tables; a secret may come from MANYDOORS_APP_<ID>_SECRET instead."""
    if not isinstance(app_tables, list) or not all(isinstance(t, dict) for t in app_tables):
        raise ConfigError("use [[app]] tables (an array of tables) for Pusher apps")
    apps = []
    keys = {f.name for f in fields(AppConfig)}
    for i, table in enumerate(app_tables):
        bad = set(table) - keys
        if bad:
            raise ConfigError(f"[[app]] #{i + 1}: unknown keys {sorted(bad)}")
        app = dict(table)
        app["id"] = str(app.get("id", ""))  # id = 1001 is as good as id = "1001"
        secret = env.get(f"MANYDOORS_APP_{app['id'].upper()}_SECRET")
        if secret:
            app["secret"] = secret
        if "webhook_events" in app:
            app["webhook_events"] = _names(app["webhook_events"])
        apps.append(AppConfig(**app))
    return tuple(apps)


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
    known_top = {"service", "namespace", "app", *(f.name for f in fields(Config))}
    known_top -= {"services", "namespaces", "apps"}
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
    apps = _apps(doc.get("app", []), env or {})
    tables_of = {
        "api": ApiConfig,
        "auth": AuthConfig,
        "channels": NamespaceConfig,
        "hooks": HooksConfig,
    }
    top: dict[str, Any] = {
        k: v for k, v in doc.items() if k not in (*tables_of, "service", "namespace", "app")
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
            apps=apps,
            **top,
        )
    except TypeError as exc:
        raise ConfigError(str(exc)) from None

"""Config: TOML, then MANYDOORS_* environment, then flags; frozen and validated."""

from __future__ import annotations

import dataclasses

import pytest

from manydoors.config import (
    ApiConfig,
    Config,
    ConfigError,
    ServiceConfig,
)
from manydoors.options import GLOBAL_OPTIONS, SERVICE_OPTIONS, load

TWO_SERVICES = """
drain_timeout = 3.5
fd_limit = 5000

[api]
host = "0.0.0.0"
port = 9090

[[service]]
name = "chat"
port = 7000
workers = 4
max_connections = 500000

[[service]]
name = "web"
host = "0.0.0.0"
port = 7001
workers = "auto"
backlog = 128
max_message_bytes = 1024
"""


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- defaults --------------------------------------------------------------------------


def test_defaults_are_one_chat_service_on_7000_and_the_api_on_7080() -> None:
    config = load()
    assert len(config.services) == 1
    (svc,) = config.services
    assert (svc.name, svc.host, svc.port, svc.protocol) == ("chat", "127.0.0.1", 7000, "tcp")
    assert (config.api.host, config.api.port) == ("127.0.0.1", 7080)


def test_default_limits() -> None:
    config = load()
    svc = config.services[0]
    assert svc.workers is None
    assert svc.max_message_bytes == 64 * 1024
    assert svc.max_bad_messages == 10
    assert svc.max_outbound_bytes == 1024 * 1024
    assert config.drain_timeout == 10.0
    assert config.fd_limit is None
    assert config.fd_reserve == 64


def test_empty_inputs_are_the_defaults() -> None:
    assert load("", {}, {}) == load()
    assert load(None, None, None) == Config()


def test_flags_that_were_not_given_are_none_and_ignored() -> None:
    flags = {opt.key: None for opt in (*SERVICE_OPTIONS, *GLOBAL_OPTIONS)}
    assert load(flags=flags) == load()


def test_unrelated_environment_variables_are_ignored() -> None:
    assert load(env={"HOME": "/root", "MANYDOORS_NOT_AN_OPTION": "x"}) == load()


# --- TOML ------------------------------------------------------------------------------


def test_toml_with_api_and_two_services() -> None:
    config = load(TWO_SERVICES)
    assert config.api == ApiConfig(host="0.0.0.0", port=9090)
    chat, web = config.services
    assert (chat.name, chat.host, chat.port, chat.workers) == ("chat", "127.0.0.1", 7000, 4)
    assert chat.max_connections == 500_000
    assert (web.name, web.host, web.port, web.workers) == ("web", "0.0.0.0", 7001, None)
    assert (web.backlog, web.max_message_bytes) == (128, 1024)
    assert config.drain_timeout == 3.5
    assert config.fd_limit == 5000


def test_a_service_table_without_keys_gets_the_defaults() -> None:
    assert load("[[service]]\n").services == (ServiceConfig(),)


def test_worker_nice_defaults_to_10_and_must_be_a_nice_value() -> None:
    assert load("").worker_nice == 10
    assert load("worker_nice = 0\n").worker_nice == 0
    for bad in ("-1", "20"):
        with pytest.raises(ConfigError, match="worker_nice must be 0-19"):
            load(f"worker_nice = {bad}\n")


def test_toml_can_set_max_bad_messages_and_fd_reserve() -> None:
    config = load("fd_reserve = 100\n[[service]]\nmax_bad_messages = 3\n")
    assert config.fd_reserve == 100
    assert config.services[0].max_bad_messages == 3


def test_workers_auto_is_none() -> None:
    assert load('[[service]]\nworkers = "auto"\n').services[0].workers is None
    assert load(env={"MANYDOORS_WORKERS": "auto"}).services[0].workers is None
    assert load(flags={"workers": "auto"}).services[0].workers is None


def test_workers_number_from_each_source() -> None:
    assert load("[[service]]\nworkers = 3\n").services[0].workers == 3
    assert load(env={"MANYDOORS_WORKERS": "5"}).services[0].workers == 5
    assert load(flags={"workers": "7"}).services[0].workers == 7


# --- precedence ------------------------------------------------------------------------


def test_env_overrides_toml() -> None:
    toml = '[api]\nport = 9000\n[[service]]\nport = 7100\nhost = "10.0.0.1"\n'
    config = load(toml, env={"MANYDOORS_PORT": "7200", "MANYDOORS_API_PORT": "9100"})
    assert config.services[0].port == 7200
    assert config.services[0].host == "10.0.0.1"  # not given by env: TOML stays
    assert config.api.port == 9100


def test_flags_override_env() -> None:
    config = load(
        env={"MANYDOORS_PORT": "7200", "MANYDOORS_API_HOST": "10.0.0.2"},
        flags={"port": "7300", "api.host": "10.0.0.3"},
    )
    assert config.services[0].port == 7300
    assert config.api.host == "10.0.0.3"


def test_flags_override_env_which_overrides_toml() -> None:
    toml = "drain_timeout = 1.0\n[[service]]\nmax_connections = 10\nbacklog = 11\nworkers = 1\n"
    env = {"MANYDOORS_MAX_CONNECTIONS": "20", "MANYDOORS_BACKLOG": "21"}
    flags = {"max_connections": 30, "drain_timeout": "2.5"}
    config = load(toml, env, flags)
    svc = config.services[0]
    assert (svc.max_connections, svc.backlog, svc.workers) == (30, 21, 1)
    assert config.drain_timeout == 2.5


def test_every_option_is_reachable_by_env_and_flag() -> None:
    values = {
        "name": ("web", "web"),
        "host": ("10.1.1.1", "10.1.1.1"),
        "port": ("7555", 7555),
        "protocol": ("tcp", "tcp"),
        "backlog": ("99", 99),
        "max_connections": ("1234", 1234),
        "workers": ("2", 2),
        "max_message_bytes": ("2048", 2048),
        "max_outbound_bytes": ("4096", 4096),
        "max_bad_messages": ("3", 3),
        "slow_policy": ("drop", "drop"),
        "max_subscriptions": ("5", 5),
        "send_buffer": ("65536", 65536),
        "tls_cert": ("/etc/c.pem", "/etc/c.pem"),
        "tls_key": ("/etc/k.pem", "/etc/k.pem"),
        "max_messages_per_second": ("2.5", 2.5),
        "max_bytes_per_second": ("70000", 70000),
        "max_connections_per_ip": ("9", 9),
        "max_connections_per_user": ("4", 4),
        "limit_loopback": ("yes", True),
        "hello_timeout": ("1.5", 1.5),
        "read_timeout": ("0", 0.0),
        "ping_interval": ("3", 3.0),
        "ping_timeout": ("2", 2.0),
        "api.host": ("10.2.2.2", "10.2.2.2"),
        "api.port": ("7666", 7666),
        "api.header_timeout": ("2.5", 2.5),
        "api.keepalive_timeout": ("30", 30.0),
        "api.max_connections": ("500", 500),
        "auth.mode": ("none", "none"),
        "auth.secret": ("s" * 32, "s" * 32),
        "auth.public_key": ("/etc/jwt.pem", "/etc/jwt.pem"),
        "auth.api_key": ("k" * 20, "k" * 20),
        "auth.protect_stats": ("true", True),
        "drain_timeout": ("4.5", 4.5),
        "fd_limit": ("1000", 1000),
        "fd_reserve": ("32", 32),
        "worker_nice": ("5", 5),
        "broker": ("redis", "redis"),
        "redis_url": ("redis://10.0.0.5:6380/1", "redis://10.0.0.5:6380/1"),
        "history_size": ("7", 7),
        "history_ttl": ("60", 60.0),
        "allow_send": ("true", True),
        "channels.publish": ("subscribers", "subscribers"),
        "channels.subscribe": ("token", "token"),
        "channels.publish_proxy": ("true", True),
        "channels.presence": ("1", True),
        "channels.join_leave": ("yes", True),
        "channels.max_presence_members": ("50", 50),
        "hooks.webhook_url": ("http://127.0.0.1:9/e", "http://127.0.0.1:9/e"),
        "hooks.webhook_secret": ("whsec_abc", "whsec_abc"),
        "hooks.webhook_events": ("join, leave", ("join", "leave")),
        "hooks.timeout": ("0.5", 0.5),
        "hooks.concurrency": ("8", 8),
        "hooks.connect_url": ("http://127.0.0.1:9/c", "http://127.0.0.1:9/c"),
        "hooks.subscribe_url": ("http://127.0.0.1:9/s", "http://127.0.0.1:9/s"),
        "hooks.publish_url": ("http://127.0.0.1:9/p", "http://127.0.0.1:9/p"),
    }
    options = (*SERVICE_OPTIONS, *GLOBAL_OPTIONS)
    assert {opt.key for opt in options} == set(values)

    def read(config: Config, key: str) -> object:
        if "." in key:
            table, name = key.split(".", 1)
            return getattr(getattr(config, table), name)
        if key in ServiceConfig.__dataclass_fields__:
            return getattr(config.services[0], key)
        return getattr(config, key)

    partner = {  # valid only together
        "tls_cert": ("tls_key", values["tls_key"][0]),
        "tls_key": ("tls_cert", values["tls_cert"][0]),
        "hooks.webhook_url": ("hooks.webhook_secret", "whsec_abc"),
        "hooks.connect_url": ("auth.mode", "proxy"),
        "channels.publish_proxy": ("hooks.publish_url", "http://127.0.0.1:9/p"),
    }
    by_key = {opt.key: opt for opt in options}
    for opt in options:
        text, want = values[opt.key]
        assert opt.env.startswith("MANYDOORS_")
        assert opt.flag.startswith("--")
        env, flags = {opt.env: text}, {opt.key: text}
        if opt.key in partner:
            key, other_text = partner[opt.key]
            other = by_key[key]
            env[other.env] = flags[other.key] = other_text
        assert read(load(env=env), opt.key) == want, opt.env
        assert read(load(flags=flags), opt.key) == want, opt.flag


def test_api_options_by_env_work_with_several_services() -> None:
    config = load(TWO_SERVICES, env={"MANYDOORS_API_PORT": "9999"})
    assert config.api.port == 9999
    assert len(config.services) == 2


def test_global_options_by_flag_work_with_several_services() -> None:
    assert load(TWO_SERVICES, flags={"drain_timeout": 1}).drain_timeout == 1.0


# --- errors ----------------------------------------------------------------------------


def test_bad_toml_is_a_config_error() -> None:
    assert "config file" in config_error(toml_text="[[service]\nport = 1\n")


def test_a_toml_value_missing_is_a_config_error() -> None:
    assert "config file" in config_error(toml_text="drain_timeout =\n")


def test_unknown_top_level_key_is_a_config_error() -> None:
    assert "prot" in config_error(toml_text="prot = 7000\n")


def test_unknown_service_key_is_a_config_error_naming_it() -> None:
    message = config_error(toml_text="[[service]]\nname = 'a'\nmax_conections = 5\n")
    assert "max_conections" in message
    assert "#1" in message


def test_unknown_key_in_the_second_service_says_which_service() -> None:
    toml = "[[service]]\nname = 'a'\n[[service]]\nname = 'b'\nport = 1\nbogus = 1\n"
    assert "#2" in config_error(toml_text=toml)


def test_unknown_api_key_is_a_config_error_naming_it() -> None:
    message = config_error(toml_text="[api]\nport = 1\nprot = 2\n")
    assert "prot" in message
    assert "api" in message


def test_service_as_a_single_table_is_a_config_error() -> None:
    assert "[[service]]" in config_error(toml_text="[service]\nport = 1\n")


@pytest.mark.parametrize("toml", ["service = [3]\n", 'service = ["chat"]\n'])
def test_a_service_that_is_not_a_table_is_a_config_error(toml: str) -> None:
    assert "service" in config_error(toml_text=toml)


def test_api_that_is_not_a_table_is_a_config_error() -> None:
    assert "api" in config_error(toml_text="api = 7080\n")


def test_duplicate_service_names_are_a_config_error() -> None:
    toml = "[[service]]\nname = 'a'\nport = 1\n[[service]]\nname = 'a'\nport = 2\n"
    message = config_error(toml_text=toml)
    assert "unique" in message
    assert "'a'" in message


def test_duplicate_host_and_port_is_a_config_error() -> None:
    toml = "[[service]]\nname = 'a'\nport = 7000\n[[service]]\nname = 'b'\nport = 7000\n"
    message = config_error(toml_text=toml)
    assert "same address" in message
    assert "7000" in message


def test_same_port_on_different_hosts_is_fine() -> None:
    toml = (
        "[[service]]\nname = 'a'\nhost = '127.0.0.1'\nport = 7000\n"
        "[[service]]\nname = 'b'\nhost = '127.0.0.2'\nport = 7000\n"
    )
    assert [s.host for s in load(toml).services] == ["127.0.0.1", "127.0.0.2"]


def test_several_services_on_port_zero_are_fine() -> None:
    # port 0 asks the kernel for a free port: those never collide
    toml = "[[service]]\nname = 'a'\nport = 0\n[[service]]\nname = 'b'\nport = 0\n"
    assert [s.port for s in load(toml).services] == [0, 0]


@pytest.mark.parametrize("protocol", ["udp", "TCP", "", "ws"])
def test_an_unknown_protocol_is_a_config_error(protocol: str) -> None:
    message = config_error(toml_text=f"[[service]]\nprotocol = '{protocol}'\n")
    assert "protocol" in message
    assert repr(protocol) in message


def test_a_bad_protocol_from_env_is_a_config_error() -> None:
    assert "protocol" in config_error(env={"MANYDOORS_PROTOCOL": "sctp"})


@pytest.mark.parametrize("name", ["", "a b", "a.b", "a/b", "a:b"])
def test_a_bad_service_name_is_a_config_error(name: str) -> None:
    assert "name" in config_error(toml_text=f"[[service]]\nname = '{name}'\n")


def test_a_service_name_with_dash_and_underscore_is_fine() -> None:
    assert load("[[service]]\nname = 'web-2_b'\n").services[0].name == "web-2_b"


def test_a_service_flag_with_two_services_is_a_config_error() -> None:
    message = config_error(toml_text=TWO_SERVICES, flags={"port": 7500})
    assert "port" in message
    assert "2 services" in message


def test_a_service_env_with_two_services_is_a_config_error() -> None:
    message = config_error(toml_text=TWO_SERVICES, env={"MANYDOORS_WORKERS": "2"})
    assert "workers" in message
    assert "2 services" in message


def test_the_service_name_flag_with_two_services_is_a_config_error() -> None:
    assert "2 services" in config_error(toml_text=TWO_SERVICES, flags={"name": "other"})


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"MANYDOORS_PORT": "http"}, "MANYDOORS_PORT"),
        ({"MANYDOORS_API_PORT": "80a"}, "MANYDOORS_API_PORT"),
        ({"MANYDOORS_BACKLOG": "1e3"}, "MANYDOORS_BACKLOG"),
        ({"MANYDOORS_MAX_CONNECTIONS": ""}, "MANYDOORS_MAX_CONNECTIONS"),
        ({"MANYDOORS_DRAIN_TIMEOUT": "soon"}, "MANYDOORS_DRAIN_TIMEOUT"),
        ({"MANYDOORS_FD_LIMIT": "unlimited"}, "MANYDOORS_FD_LIMIT"),
        ({"MANYDOORS_WORKERS": "many"}, "MANYDOORS_WORKERS"),
        ({"MANYDOORS_WORKERS": "2.5"}, "MANYDOORS_WORKERS"),
    ],
)
def test_a_non_numeric_env_value_is_a_config_error_naming_the_variable(
    env: dict[str, str], var: str
) -> None:
    assert var in config_error(env=env)


@pytest.mark.parametrize(
    ("key", "value"),
    [("port", "http"), ("api.port", "x"), ("max_message_bytes", "64k"), ("workers", "lots")],
)
def test_a_non_numeric_flag_is_a_config_error_naming_the_flag(key: str, value: str) -> None:
    flag = next(o.flag for o in (*SERVICE_OPTIONS, *GLOBAL_OPTIONS) if o.key == key)
    assert flag in config_error(flags={key: value})


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[[service]]\nport = '7000'\n", "port"),
        ("[[service]]\nbacklog = 'big'\n", "backlog"),
        ("[[service]]\nmax_connections = '10'\n", "max_connections"),
        ("[[service]]\nmax_outbound_bytes = 1.5\n", "max_outbound_bytes"),
        ("[[service]]\nmax_bad_messages = 'ten'\n", "max_bad_messages"),
        ("[[service]]\nport = true\n", "port"),
        ("[api]\nport = '7080'\n", "port"),
        ("drain_timeout = 'soon'\n", "drain_timeout"),
        ("fd_limit = '1000'\n", "fd_limit"),
        ("fd_reserve = 'x'\n", "fd_reserve"),
    ],
)
def test_a_non_numeric_toml_value_is_a_config_error_naming_the_key(toml: str, key: str) -> None:
    assert key in config_error(toml_text=toml)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[[service]]\nhost = 1\n", "host"),
        ("[[service]]\nname = 5\n", "name"),
        ("[[service]]\nprotocol = ['tcp']\n", "protocol"),
        ("[api]\nhost = false\n", "host"),
    ],
)
def test_a_toml_string_option_of_another_type_is_a_config_error(toml: str, key: str) -> None:
    assert key in config_error(toml_text=toml)


@pytest.mark.parametrize("value", ["'many'", "2.5", "true", "[]"])
def test_workers_in_toml_must_be_auto_or_an_integer(value: str) -> None:
    assert "workers" in config_error(toml_text=f"[[service]]\nworkers = {value}\n")


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_a_service_port_out_of_range_is_a_config_error(port: int) -> None:
    assert str(port) in config_error(toml_text=f"[[service]]\nport = {port}\n")
    assert "0-65535" in config_error(env={"MANYDOORS_PORT": str(port)})
    assert "0-65535" in config_error(flags={"port": port})


@pytest.mark.parametrize("port", [-1, 65536])
def test_an_api_port_out_of_range_is_a_config_error(port: int) -> None:
    assert "api" in config_error(toml_text=f"[api]\nport = {port}\n")
    assert "api" in config_error(env={"MANYDOORS_API_PORT": str(port)})


@pytest.mark.parametrize(
    "toml",
    [
        "header_timeout = 0",
        "header_timeout = nan",
        "keepalive_timeout = -1",
        "keepalive_timeout = inf",
        "max_connections = 0",
    ],
)
def test_api_timeouts_and_cap_out_of_range_are_config_errors(toml: str) -> None:
    assert f"api: {toml.split()[0]}" in config_error(toml_text=f"[api]\n{toml}\n")


def test_api_cap_and_timeouts_default_to_10_s_75_s_and_sized_from_the_fd_limit() -> None:
    api = load().api
    assert (api.header_timeout, api.keepalive_timeout, api.max_connections) == (10, 75, None)


def test_ports_at_the_ends_of_the_range_are_fine() -> None:
    assert load(flags={"port": 0, "api.port": 65535}).services[0].port == 0
    assert load(flags={"port": 65535}).services[0].port == 65535


@pytest.mark.parametrize("key", ["backlog", "max_connections", "max_message_bytes"])
def test_sizes_below_one_are_a_config_error(key: str) -> None:
    assert key in config_error(toml_text=f"[[service]]\n{key} = 0\n")


def test_zero_workers_is_a_config_error() -> None:
    assert "workers" in config_error(flags={"workers": "0"})


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_drain_timeout_that_is_not_positive_is_a_config_error(value: str) -> None:
    assert "drain_timeout" in config_error(env={"MANYDOORS_DRAIN_TIMEOUT": value})


def test_an_fd_limit_at_or_below_the_reserve_is_a_config_error() -> None:
    assert "fd_limit" in config_error(flags={"fd_limit": 65})
    assert load(flags={"fd_limit": 66}).fd_limit == 66


def test_no_services_is_a_config_error() -> None:
    assert "service" in config_error(toml_text="service = []\n")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- config objects are frozen -------------------------------------------------------


def test_config_objects_are_frozen() -> None:
    config = load(TWO_SERVICES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.drain_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.api.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.services[0].port = 1  # type: ignore[misc]
    assert isinstance(config.services, tuple)


def test_config_objects_are_validated_when_built_directly() -> None:
    with pytest.raises(ConfigError):
        ServiceConfig(port=70000)
    with pytest.raises(ConfigError):
        ApiConfig(port=-5)
    with pytest.raises(ConfigError):
        Config(services=())


def test_config_objects_are_hashable_values() -> None:
    assert load(TWO_SERVICES) == load(TWO_SERVICES)
    assert hash(load(TWO_SERVICES)) == hash(load(TWO_SERVICES))


def test_broker_defaults_to_local_with_history() -> None:
    config = load()
    assert (config.broker, config.history_size, config.history_ttl) == ("local", 100, 300.0)


def test_broker_flag_takes_a_redis_url_and_implies_redis() -> None:
    config = load(flags={"broker": "redis://127.0.0.9:6390/2"})
    assert (config.broker, config.redis_url) == ("redis", "redis://127.0.0.9:6390/2")
    config = load('broker = "redis"\nredis_url = "redis://127.0.0.3:7000"\n')
    assert (config.broker, config.redis_url) == ("redis", "redis://127.0.0.3:7000")


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('broker = "kafka"', "not one of"),
        ('redis_url = "http://x"', "must start with"),
        ("history_size = -1", "must not be negative"),
        ("history_ttl = 0", "must be positive"),
    ],
)
def test_bad_broker_settings_say_which_key(toml: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load(toml + "\n")


def test_auth_table_sets_the_api_key_and_rejects_a_short_one() -> None:
    config = load('[auth]\napi_key = "0123456789abcdef"\nprotect_stats = true\n')
    assert (config.auth.api_key, config.auth.protect_stats) == ("0123456789abcdef", True)
    assert load().auth.api_key is None
    with pytest.raises(ConfigError, match="at least 16"):
        load('[auth]\napi_key = "short"\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load('[auth]\nkey = "x"\n')
    with pytest.raises(ConfigError, match="true or false"):
        load('[auth]\nprotect_stats = "maybe"\n')


def test_token_mode_needs_exactly_one_key_and_a_long_secret() -> None:
    secret = "s" * 32
    assert load(f'[auth]\nmode = "token"\nsecret = "{secret}"\n').auth.mode == "token"
    assert load(env={"MANYDOORS_AUTH_MODE": "token", "MANYDOORS_AUTH_PUBLIC_KEY": "/k.pem"})
    for bad, why in (
        ('mode = "token"', "needs one of secret or public_key"),
        (f'mode = "token"\nsecret = "{secret}"\npublic_key = "/k.pem"', "needs one of"),
        ('mode = "jwt"', "is not one of"),
        ('secret = "short"', "at least 32 bytes"),
    ):
        with pytest.raises(ConfigError, match=why):
            load(f"[auth]\n{bad}\n")


def test_limits_reject_negative_values_and_tls_needs_both_files() -> None:
    for key in ("max_messages_per_second", "max_connections_per_ip", "read_timeout"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 0"):
            load(f"[[service]]\n{key} = -1\n")
    with pytest.raises(ConfigError, match="ping_timeout must be positive"):
        load("[[service]]\nping_timeout = 0\n")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load('[[service]]\ntls_cert = "c.pem"\n')
    with pytest.raises(ConfigError, match="at least max_message_bytes"):
        load("[[service]]\nmax_bytes_per_second = 100\n")
    assert load("[[service]]\nmax_bytes_per_second = 0\n").services[0].max_bytes_per_second == 0

"""``manydoors load --pusher`` against a real ``pusher`` service.

The load generator speaks Pusher protocol 7 (connection_established, pusher:subscribe,
pusher:pong) and times events triggered through the node's Pusher REST API.
"""

from __future__ import annotations

from collections.abc import Callable

from support.server import Server, run_load
from support.wait import wait_for

APP_ID, KEY, SECRET = "1001", "load-key", "load-secret"


def config(workers: int = 2) -> str:
    return f"""
[api]
port = 0

[[service]]
name = "pusher"
port = 0
protocol = "pusher"
workers = {workers}
max_connections = 2000

[[app]]
id = "{APP_ID}"
key = "{KEY}"
secret = "{SECRET}"
"""


def pusher_node(serve: Callable[..., Server], *flags: str) -> Server:
    return serve(*flags, config=config(), chat=False)


def pusher_flags(secret: str = SECRET) -> list[str]:
    return ["--pusher", "--app-key", KEY, "--app-id", APP_ID, "--app-secret", secret]


def test_holds_subscribes_and_times_events_triggered_through_the_rest_api(serve, tmp_path):
    node = pusher_node(serve)
    code, err, report = run_load(
        *node.target(600, "pusher"),
        *pusher_flags(),
        "--fd-limit",
        "400",  # two load processes
        "--subscribe",
        "bench",
        *node.broadcasts(2),
        report=tmp_path / "r.json",
    )
    assert code == 0, err
    assert report["plan"]["processes"] == 2
    assert report["connections"] == {"target": 600, "peak": 600, "final": 600, "ready": 600}
    assert report["errors"] == {} and report["duplicates"] == 0
    assert [d["received"] for d in report["deliveries"]] == [600, 600]
    assert all(d["p99_ms"] is not None and d["error"] is None for d in report["deliveries"])
    wait_for(lambda: node.stats()["connections"] == 0, what="the load's connections closed")


def test_private_channel_subscriptions_are_signed_with_the_apps_secret(serve, tmp_path):
    node = pusher_node(serve)
    code, err, report = run_load(
        *node.target(100, "pusher"),
        *pusher_flags(),
        "--subscribe",
        "private-bench",
        *node.broadcasts(1),
        report=tmp_path / "r.json",
    )
    assert code == 0, err
    assert report["connections"]["ready"] == 100
    assert report["deliveries"][0]["received"] == 100


def test_a_wrong_secret_is_refused_and_explained(serve, tmp_path):
    node = pusher_node(serve)
    code, _, report = run_load(
        *node.target(20, "pusher"),
        *pusher_flags("not-the-secret"),
        "--subscribe",
        "private-bench",
        *node.broadcasts(1),
        report=tmp_path / "r.json",
    )
    assert code == 1
    assert report["connections"]["ready"] == 0
    (refused,) = [k for k in report["errors"] if k.startswith("subscription_error")]
    assert report["errors"][refused] == 20
    assert "--app-secret" in report["errors_explained"][refused]
    assert report["deliveries"][0]["error"].startswith("HTTP 401"), report["deliveries"]


def test_an_unknown_app_key_is_counted_by_its_pusher_code(serve, tmp_path):
    node = pusher_node(serve)
    code, _, report = run_load(
        *node.target(10, "pusher"),
        "--pusher",
        "--app-key",
        "no-such-key",
        report=tmp_path / "r.json",
    )
    assert code == 1
    assert report["connections"]["ready"] == 0
    assert any(k.startswith("pusher 4001") for k in report["errors"]), report["errors"]


def test_the_servers_pings_are_answered_while_held(serve, tmp_path):
    node = pusher_node(serve, "--ping-interval", "1")
    code, err, report = run_load(
        *node.target(50, "pusher"),
        *pusher_flags(),
        "--subscribe",
        "bench",
        "--hold",
        "4",
        report=tmp_path / "r.json",
    )
    assert code == 0, err
    assert report["connections"]["final"] == 50 and report["errors"] == {}
    stats = node.stats()
    assert stats["closed"]["ping_timeout"] == 0
    assert stats["messages_in"] >= 50 * 3  # its subscribe and at least two pongs each

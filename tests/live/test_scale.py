"""25,000 connections held and messaged: two workers, two load processes."""

from __future__ import annotations

from support.server import run_load
from support.wait import wait_for


def test_25k_connections_held_subscribed_and_broadcast_to(serve, tmp_path):
    server = serve("--workers", "2", "--max-connections", "26000")
    code, err, report = run_load(
        *server.target(25000),
        "--processes",
        "2",
        "--rate",
        "20000",
        "--subscribe",
        "veg",
        *server.broadcasts(2),
        report=tmp_path / "load.json",
    )
    assert code == 0, err
    assert report["connections"]["peak"] == 25000
    assert report["errors"] == {}
    assert report["duplicates"] == 0
    assert report["plan"]["processes"] == 2
    for delivery in report["deliveries"]:
        assert delivery["expected"] == 25000
        assert delivery["received"] == 25000
    # The load generator has gone: the server sees every close (no leak in its books).
    stats = wait_for(lambda: (s := server.stats())["connections"] == 0 and s, what="closes")
    assert len(stats["services"][0]["workers"]) == 2
    assert stats["accepted"] == 25000
    assert stats["messages_out"] >= 50000

"""bench/floor: the C reference server and client, at a small scale (2,000 connections).

The bench runs them at 1,000,000 beside manydoors (``./run bench c1m``); here: they
build warning-free with ``cc``, hold every connection, deliver every broadcast, and
leave no process behind, also when the run fails half-way.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "floor"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "peers"))
from _procs import tree

import floor  # bench/floor/floor.py
from manydoors.node import procfs
from support.server import Server


def need_cc() -> None:
    """Skip without a C compiler; fail in CI, which installs one (.ci/run)."""
    if any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        return
    message = "no C compiler: apt-get install -y gcc"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def floor_processes() -> list[int]:
    """This test's descendants that are the floor's server or client."""
    found = []
    for pid in tree(os.getpid())[1:]:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("floor_"):
            found.append(pid)
    return found


def test_the_floor_builds_without_a_warning(tmp_path: Path) -> None:
    need_cc()
    paths = floor.build(str(tmp_path))  # -Wall -Wextra; any output fails the build
    assert sorted(paths) == ["client", "server"]
    assert all(os.access(p, os.X_OK) for p in paths.values())


def test_the_floor_holds_every_connection_and_delivers_every_broadcast() -> None:
    need_cc()
    found = floor.run(2000, 20_000, 2, server_procs=2, client_procs=2, say=lambda _: None)
    assert found["held"] == 2000 and found["errors"] == {} and not found["stalled"]
    assert found["server"]["counts"]["accepted"] == 2000
    assert found["server"]["counts"]["sent"] == 2 * 2000
    assert [(d["n"], d["expected"], d["received"]) for d in found["deliveries"]] == [
        (1, 2000, 2000),
        (2, 2000, 2000),
    ]
    assert all(d["max_ms"] is not None for d in found["deliveries"])
    assert found["duplicates"] == 0
    assert found["ramp_per_second"] > 0 and found["connect_ms"]["max"] is not None
    assert found["cpu"]["deliveries"] == 4000
    assert found["server"]["processes"] == 3 and found["load"]["processes"] == 2
    assert floor_processes() == []


def test_a_failing_run_stops_every_process_it_started() -> None:
    need_cc()

    def fail_at_ramp_done(line: str) -> None:
        if line.startswith("ramp done"):
            raise RuntimeError("the caller gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        floor.run(1000, 20_000, 1, server_procs=2, client_procs=2, say=fail_at_ramp_done)
    assert floor_processes() == []


def test_ratios_are_manydoors_over_the_floor() -> None:
    ours = {
        "held": 1000,
        "ramp_per_second": 5000,
        "server_cpu_us_per_connection": 60.0,
        "time_to_all_ms": [1200.0, 900.0],
        "cpu_s_per_million_deliveries": 10.0,
        "server_user_bytes_per_connection": 1500,
        "user_bytes_per_connection_pair": 2600,
        "kernel_bytes_per_connection_pair": 10_000,
    }
    theirs = {
        **ours,
        "ramp_per_second": 20_000,
        "server_cpu_us_per_connection": 15.0,
        "time_to_all_ms": [300.0, 400.0],
        "cpu_s_per_million_deliveries": 8.0,
        "server_user_bytes_per_connection": 0,  # no ratio to a zero
    }
    r = floor.ratios(ours, theirs)
    assert r["held"] == 1.0 and r["ramp_per_second"] == 0.25
    assert r["server_cpu_us_per_connection"] == 4.0
    assert r["time_to_all"] == 3.0  # slowest over slowest
    assert r["time_to_all_each"] == [4.0, 2.25]
    assert r["cpu_s_per_million_deliveries"] == 1.25
    assert r["server_user_bytes_per_connection"] is None
    table = floor.ratio_table(ours, theirs)
    assert "| ramp (connections/s) | 5,000 | 20,000 | 0.25 |" in table
    assert "| broadcast: time to all (slowest, s) | 1.20 | 0.40 | 3.0 |" in table


def test_the_floor_client_ramps_manydoors_each_saying_hello_and_subscribing(
    serve: Callable[..., Server],
) -> None:
    need_cc()
    server = serve("--workers", "2", "--max-connections", "3000", "--ping-interval", "0")

    def cpu() -> float:
        return float(sum(procfs.cpu_seconds(p) or 0 for p in tree(server.proc.pid)))

    found = floor.ramp_manydoors(
        server.port(), 2000, 20_000, cpu, channel="veg", client_procs=2, say=lambda _: None
    )
    assert (found["held"], found["ready"], found["errors"]) == (2000, 2000, {})
    assert found["ramp_per_second"] > 0 and found["server_cpu_us_per_connection"] > 0
    stats = server.stats()
    assert stats["accepted"] == 2000
    assert not any(stats["errors"].values())  # every hello and sub was good
    assert floor_processes() == []


def test_the_floor_client_counts_a_refusal_as_refused(serve: Callable[..., Server]) -> None:
    need_cc()
    server = serve("--workers", "1", "--max-connections", "500", "--ping-interval", "0")
    found = floor.ramp_manydoors(
        server.port(), 800, 20_000, lambda: 0.0, client_procs=1, say=lambda _: None
    )
    assert found["ready"] == 500 and found["errors"] == {"refused": 300}


@pytest.mark.parametrize("kind", ["kill", "term"])
def test_the_floor_clients_reconnect_after_the_server_is_stopped(kind: str) -> None:
    need_cc()
    found = floor.storm(
        2000, 20_000, kind, 1.0, "0.2,2", server_procs=2, client_procs=2, say=lambda _: None
    )
    assert (found["held"], found["back"], found["drops"], found["reconnected"]) == (2000,) * 4
    assert found["all_back_after_signal_s"] >= found["outage_s"] >= 1.0
    assert found["errors"].get("closed_by_server") == 2000  # each saw its server go
    assert floor_processes() == []

"""The load generator against real servers: several processes, and each error for real."""

from __future__ import annotations

import random
import socket

from support.server import run_load


def test_small_fd_limit_spreads_the_load_over_several_processes(serve, tmp_path):
    server = serve("--workers", "2", "--max-connections", "1000")
    code, err, report = run_load(
        *server.target(600),
        "--fd-limit",
        "150",
        "--subscribe",
        "veg",
        *server.broadcasts(2),
        "--plot",
        str(tmp_path / "run.png"),
        report=tmp_path / "r.json",
    )
    assert code == 0, err
    # 600 connections / (150 fds - 64 reserved) = 7 processes
    assert report["plan"]["processes"] == 7
    assert report["connections"] == {"target": 600, "peak": 600, "final": 600, "ready": 600}
    assert report["errors"] == {} and report["duplicates"] == 0
    assert [d["received"] for d in report["deliveries"]] == [600, 600]
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Users are numbered across processes without overlap: the server saw 600 hellos.
    assert server.stats()["messages_in"] == 1200


def test_report_has_the_documented_schema(serve, tmp_path):
    server = serve("--workers", "1", "--max-connections", "100")
    code, err, report = run_load(
        *server.target(50),
        *server.broadcasts(1),
        report=tmp_path / "r.json",
    )
    assert code == 0, err
    assert set(report["machine"]) >= {"cores", "memory_bytes", "kernel", "fd_limit", "port_range"}
    assert set(report["connect_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["connect_ms"]["p99"] is not None
    assert report["rate_achieved"] > 0
    assert report["plan"]["lanes"][0]["dst"] == "127.0.0.1"
    (delivery,) = report["deliveries"]
    assert set(delivery) == {
        "n",
        "expected",
        "received",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "per_second",
        "error",
    }
    assert delivery["expected"] == delivery["received"] == 50 and delivery["error"] is None
    assert report["publish_failed"] == 0
    assert report["timeline"] and {"t", "open", "ready", "errors"} <= set(report["timeline"][0])


def test_closed_port_is_counted_and_explained_as_econnrefused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once this closes
    code, err, report = run_load(
        "--target", f"127.0.0.1:{port}", "--connections", "40", report=tmp_path / "r.json"
    )
    assert code == 1
    assert report["errors"] == {"ECONNREFUSED": 40}
    assert "ECONNREFUSED: nothing is listening" in err
    assert report["connections"]["peak"] == 0


def test_tiny_source_port_plan_is_refused_then_forced_into_eaddrnotavail(serve, tmp_path):
    server = serve("--workers", "1", "--max-connections", "100")
    lo = random.randrange(45000, 60000, 10)  # a fresh window: no TIME_WAIT from other runs
    args = (
        *server.target(30),
        "--source-ips",
        "127.0.3.7",
        "--source-ports",
        f"{lo}-{lo + 9}",
    )
    code, err, _ = run_load(*args)
    assert code == 2
    assert "cannot open 30 connections: 1 source IPs x 1 target ports x 10" in err
    code, err, report = run_load(*args, "--force", report=tmp_path / "r.json")
    assert code == 1
    assert report["connections"]["peak"] == 10
    assert report["errors"] == {"EADDRNOTAVAIL": 20}
    assert "ran out of ephemeral ports" in err


def test_full_server_is_counted_as_server_full(serve, tmp_path):
    server = serve("--workers", "1", "--max-connections", "20")
    code, _, report = run_load(
        *server.target(50),
        report=tmp_path / "r.json",
    )
    assert code == 1
    assert report["errors"]["server_full"] == 30
    assert server.stats()["refused"]["server_full"] == 30


def test_load_processes_run_at_the_workers_nice(serve, tmp_path):
    """--nice (default 10, as worker_nice): load and workers compete as equals."""
    import os
    import subprocess

    from manydoors.node import procfs
    from support.server import manydoors_cmd

    server = serve("--workers", "1", "--max-connections", "1000")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    load = subprocess.Popen(
        manydoors_cmd("load", *server.target(200), "--processes", "2", "--hold", "30"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert load.stderr is not None
        for line in load.stderr:
            if "ramp done" in line:
                break
        children: dict[int, list[int]] = {}
        for pid in procfs.pids():
            fields = procfs.stat(pid)
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(pid)
        todo, mine = [load.pid], []
        while todo:
            pid = todo.pop()
            mine.append(pid)
            todo += children.get(pid, [])
        nices = sorted(os.getpriority(os.PRIO_PROCESS, pid) for pid in mine[1:])
        assert nices.count(min(19, base + 10)) == 2, nices  # the two load processes
        assert os.getpriority(os.PRIO_PROCESS, load.pid) == base  # not the controller
    finally:
        load.terminate()
        load.wait(30)
        if load.stderr is not None:
            load.stderr.close()

"""The load generator against servers that misbehave, and stopped halfway: it always ends.

- a server that stops accepting without closing: the connections left in its listen
  backlog are timed out (no_answer), and a ramp that stops moving ends (stalled);
- SIGINT/SIGTERM: the run ends, its processes with it, and the report is written;
- a WebSocket peer with protocol keepalive (the ``websockets`` library): its pings are
  answered, over TLS too, so it keeps the connections;
- a publish call that fails (an HTTP error, a closed connection, no answer, nothing
  listening): the round says why, the next rounds are still tried, the report is written.

The small servers run on an asyncio loop in a thread of the test; the load generator
and ``manydoors serve`` are real processes, stopped by pid even when a test fails.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from support.certfix import self_signed
from support.server import Server, manydoors_cmd, run_load, small
from support.wait import wait_for

T = TypeVar("T")
RAMP_DONE = re.compile(r"^load: ramp done: ([\d,]+) ready$", re.M)


class LoopThread:
    """An asyncio loop in a thread: the home of a small server the load is aimed at."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


class StopsAccepting:
    """Greets the first ``answer`` connections as manydoors does, then stops accepting.

    Its listening socket stays open: later connects complete into the listen backlog
    (and past it, the kernel drops their SYNs), where nobody ever reads their hello.
    """

    def __init__(self, answer: int, backlog: int) -> None:
        self.answer = answer
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(backlog)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.accepted = 0
        self.task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        conns: list[asyncio.Task[None]] = []
        try:
            while self.accepted < self.answer:
                sock, _ = await loop.sock_accept(self.lsock)
                self.accepted += 1
                conns.append(loop.create_task(self.greet(sock)))
            await asyncio.Event().wait()  # until cancelled: accept nothing more
        finally:
            for task in conns:
                task.cancel()
            await asyncio.gather(*conns, return_exceptions=True)
            self.lsock.close()

    async def greet(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, b'{"ev":"welcome"}\n')
            buf = b""
            while data := await loop.sock_recv(sock, 4096):
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    op = json.loads(line)
                    await loop.sock_sendall(sock, b'{"ev":"ok","id":%d}\n' % op["id"])
        finally:
            sock.close()


def start_stops_accepting(loop_thread: LoopThread, answer: int) -> StopsAccepting:
    server = StopsAccepting(answer, backlog=8)

    async def start() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(server.serve())

    # The loop holds its tasks only weakly: keep this one until the fixture cancels it.
    server.task = loop_thread.call(start())
    return server


def ramp_200(
    loop_thread: LoopThread, tmp_path: Any, connect_timeout: str, stall_timeout: str
) -> tuple[int, str, dict[str, Any], float]:
    """200 connections to a server that answers 20 and then stops accepting."""
    server = start_stops_accepting(loop_thread, answer=20)
    started = time.monotonic()
    code, err, report = run_load(
        *("--target", f"127.0.0.1:{server.port}", "--connections", "200"),
        *("--connect-timeout", connect_timeout, "--stall-timeout", stall_timeout),
        report=tmp_path / "r.json",
        timeout=60,
    )
    return code, err, report, time.monotonic() - started


def test_server_that_stops_accepting_ends_the_ramp_with_no_answer(loop_thread, tmp_path):
    # stall timeout 30 s: not needed here, the connect timeouts alone end the ramp
    code, err, report, took = ramp_200(loop_thread, tmp_path, "1", "30")
    assert code == 1, err
    assert took < 20, err
    assert report["connections"]["ready"] == 20
    assert report["connections"]["peak"] >= 20
    errors = report["errors"]
    # Those in the backlog connected but were never answered; past the backlog the
    # kernel drops the SYNs (or the handshake's last ACK), so the connect times out.
    assert set(errors) <= {"no_answer", "ETIMEDOUT"} and errors.get("no_answer", 0) >= 5
    assert sum(errors.values()) == 180
    assert report["stalled"] is False and report["interrupted"] is False
    assert "no_answer: connected, but the server did not answer the hello" in err
    assert RAMP_DONE.search(err)[1] == "20"  # type: ignore[index]


def test_ramp_that_stops_moving_is_ended_and_reported_as_stalled(loop_thread, tmp_path):
    # connect timeout 60 s: nothing times out during the run, only the stall ends the ramp
    code, err, report, took = ramp_200(loop_thread, tmp_path, "60", "2")
    assert code == 1, err
    assert took < 25, err
    assert report["stalled"] is True
    at = report["stalled_at"]
    assert at["ready"] == 20 and at["attempted"] == 200 and at["open"] >= 20
    assert at["still_seconds"] >= 2
    assert report["connections"]["ready"] == 20
    assert "ramp stalled: nothing moved for 2 s at open" in err
    assert RAMP_DONE.search(err)[1] == "20"  # type: ignore[index]


# --- stopped by a signal -------------------------------------------------------------


def _starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the pid, names one process even if pids recycle."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError):
        return None


def descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` (the load's forkserver and its agents): pid -> start."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                start = _starttime(pid)
                if start is not None:
                    found[pid] = start
                    frontier.append(pid)
    return found


def alive(procs: dict[int, str]) -> list[int]:
    return [pid for pid, start in procs.items() if _starttime(pid) == start]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_ends_the_run_with_a_report_and_no_process_left(serve, tmp_path, sig):
    server = serve("--workers", "1", "--max-connections", "1000")
    report_path = tmp_path / "r.json"
    cmd = manydoors_cmd("load", *server.target(200), "--hold", "60", "--report", str(report_path))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    children: dict[int, str] = {}
    try:
        wait_for(lambda: RAMP_DONE.search("".join(lines)), 60, "the ramp done line")
        children = descendants(proc.pid)
        assert children, "the load's processes"
        stopped = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(15)
        assert time.monotonic() - stopped < 10
        reader.join(10)
        err = "".join(lines)
        assert code == 128 + sig, err
        report = json.loads(report_path.read_text())
        assert report["interrupted"] is True and report["stalled"] is False
        assert report["connections"]["peak"] == 200
        assert report["connections"]["ready"] == 200
        assert f"load: interrupted by {sig.name}: report in {report_path}" in err
        assert "load: peak 200 of 200" in err
        wait_for(lambda: not alive(children), 10, "the load's processes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


# --- WebSocket keepalive -------------------------------------------------------------


def server_context(root: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*self_signed(root))
    return ctx


class KeepalivePeer:
    """A ``websockets`` server that pings every 0.3 s and drops who does not pong in 0.5 s.

    It speaks just enough of the manydoors protocol for the load's hello: a welcome,
    then an ok for every op with an id.
    """

    def __init__(self) -> None:
        self.conns: list[ServerConnection] = []
        self.dropped: list[int | None] = []  # close codes of connections it closed

    async def handler(self, ws: ServerConnection) -> None:
        self.conns.append(ws)
        await ws.send('{"ev":"welcome"}')
        try:
            async for message in ws:
                await ws.send(json.dumps({"ev": "ok", "id": json.loads(message)["id"]}))
        except websockets.ConnectionClosed:
            pass
        if ws.close_code == 1011:  # "keepalive ping timeout"
            self.dropped.append(ws.close_code)

    async def start(self, ctx: ssl.SSLContext | None) -> tuple[int, Any]:
        server = await ws_serve(
            self.handler, "127.0.0.1", 0, ping_interval=0.3, ping_timeout=0.5, ssl=ctx
        )
        return server.sockets[0].getsockname()[1], server


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_peer_keepalive_pings_are_answered(loop_thread, tmp_path, tls):
    peer = KeepalivePeer()
    port, server = loop_thread.call(peer.start(server_context(tmp_path) if tls else None))
    try:
        code, err, report = run_load(
            "--ws",
            *(["--tls"] if tls else []),
            "--target",
            f"127.0.0.1:{port}",
            "--connections",
            "50",
            "--hold",
            "2",  # several ping intervals; unanswered, every connection goes after 0.8 s
            report=tmp_path / "r.json",
            timeout=60,
        )
    finally:
        server.close()
        loop_thread.call(server.wait_closed())
    assert code == 0, err
    assert report["connections"] == {"target": 50, "peak": 50, "final": 50, "ready": 50}
    assert report["errors"] == {}
    assert peer.dropped == []
    # Every connection's pings came back: websockets measures the round trip on a pong.
    assert len(peer.conns) == 50 and all(ws.latency > 0 for ws in peer.conns)


# --- a publish that fails ------------------------------------------------------------


class FlakyApi:
    """An /api/publish in front of a real server that answers as scripted, one step a call.

    "503": busy, as the API says it; "502": a proxy's bare error page; "close": closes
    the connection without an answer; "hang": never answers (until the test ends);
    "forward": publishes on the server; "forward_sigint": publishes, waits until the
    server has written the message to every connection, then SIGINTs the load before
    answering, so the signal lands while the round is in flight.
    """

    def __init__(self, server: Server, steps: list[str], recipients: int = 0) -> None:
        self.server = server
        self.steps = list(steps)
        self.recipients = recipients
        self.load_pid = 0
        self.release = threading.Event()  # ends a "hang"
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                step = api.steps.pop(0) if api.steps else "forward"
                if step == "503":
                    self.answer(503, {"error": "busy", "reason": "the workers are behind"})
                elif step == "502":
                    self.send_error(502)
                elif step == "hang":
                    api.release.wait(60)
                elif step.startswith("forward"):
                    before = api.server.stats()["messages_out"]
                    status, answer = api.server.http("POST", "/api/publish", body)
                    if step == "forward_sigint":
                        wait_for(
                            lambda: api.server.stats()["messages_out"] >= before + api.recipients,
                            10,
                            "the broadcast to be written",
                        )
                        os.kill(api.load_pid, signal.SIGINT)
                    self.answer(status, answer)
                # "close", and after "hang": return without an answer (HTTP/1.0: it closes)

            def answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def flaky_api() -> Iterator[Any]:
    made: list[FlakyApi] = []

    def start(server: Server, steps: list[str], recipients: int = 0) -> FlakyApi:
        api = FlakyApi(server, steps, recipients)
        made.append(api)
        return api

    yield start
    for api in made:
        api.close()


def test_failed_publishes_are_reported_and_the_next_rounds_still_run(serve, flaky_api, tmp_path):
    server = small(serve)
    api = flaky_api(server, ["503", "close", "502", "hang", "forward"])
    started = time.monotonic()
    code, err, report = run_load(
        *server.target(50),
        "--api",
        api.url,
        "--broadcasts",
        "5",
        "--delivery-timeout",
        "5",  # how long the "hang" waits for its answer
        report=tmp_path / "r.json",
        timeout=120,
    )
    took = time.monotonic() - started
    assert code == 1, err
    assert "Traceback" not in err
    deliveries = report["deliveries"]
    assert [d["error"] for d in deliveries] == [
        "HTTP 503 busy: the workers are behind",
        "the server closed the connection without an answer",
        "HTTP 502 Bad Gateway",
        "no answer in time (--delivery-timeout)",
        None,
    ]
    assert [(d["received"], d["expected"]) for d in deliveries] == [(0, 50)] * 4 + [(50, 50)]
    assert report["publish_failed"] == 4
    assert report["connections"]["ready"] == 50 and report["errors"] == {}
    # A failed round waits for no deliveries: only the "hang" costs its 5 s.
    assert took < 25, err
    assert "load: message 1: publish failed: HTTP 503 busy: the workers are behind\n" in err
    assert "load: message 2: publish failed: the server closed the connection" in err
    assert "load: message 5: 50/50 p50" in err


def test_publish_to_nothing_listening_is_econnrefused_and_the_report_is_written(serve, tmp_path):
    server = small(serve)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once this closes
    code, err, report = run_load(
        *server.target(20),
        "--api",
        f"http://127.0.0.1:{port}",
        "--broadcasts",
        "2",
        report=tmp_path / "r.json",
        timeout=60,
    )
    assert code == 1, err
    assert [d["error"] for d in report["deliveries"]] == ["ECONNREFUSED: Connection refused"] * 2
    assert [d["expected"] for d in report["deliveries"]] == [20, 20]
    assert report["publish_failed"] == 2
    assert err.count("publish failed: ECONNREFUSED: Connection refused") == 4  # live + summary


def test_signal_during_a_broadcast_reports_what_had_arrived(serve, flaky_api, tmp_path):
    server = small(serve)
    api = flaky_api(server, ["forward_sigint"], recipients=50)
    report_path = tmp_path / "r.json"
    flags = ["--api", api.url, "--broadcasts", "1", "--report", str(report_path)]
    cmd = manydoors_cmd("load", *server.target(50), *flags)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    api.load_pid = proc.pid
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True
    (delivery,) = report["deliveries"]
    # The histogram and the count agree: both what the load's processes had got.
    assert sum(report["histograms"]["delivery_ms"]["1"].values()) == 50
    assert (delivery["received"], delivery["expected"]) == (50, 50)
    assert delivery["p50_ms"] is not None and delivery["error"] is None

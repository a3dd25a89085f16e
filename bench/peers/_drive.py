"""What drives a server under test: the publish proxy, the load generator, the 1:1 client."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _procs import Reaper

from manydoors.loadgen import wsclient


class Proxy:
    """The API URL given to the load generator: snapshot the server, restamp, forward."""

    def __init__(self, upstream: str, on_publish: Callable[[int], None]) -> None:
        self.count = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                proxy.count += 1
                on_publish(proxy.count)
                msg = json.loads(body)
                if isinstance(msg.get("data"), dict) and "t" in msg["data"]:
                    msg["data"]["t"] = time.time()  # the reading above is not latency
                headers = {"Content-Type": "application/json"}
                if self.headers.get("Authorization"):
                    headers["Authorization"] = self.headers["Authorization"]
                req = urllib.request.Request(
                    upstream + self.path, data=json.dumps(msg).encode(), headers=headers
                )
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, answer = resp.status, resp.read()
                except urllib.error.HTTPError as exc:
                    status, answer = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the load generator -----------------------------------------------------------------

ROUND_LINE = re.compile(r"^load: message (\d+): .* received in ")
RAMP_LINE = re.compile(r"^load: ramp: open ([\d,]+)/[\d,]+ ready ([\d,]+)")
STALL_S = 60.0  # a ramp whose counts do not move for this long has stalled


@dataclass
class LoadRun:
    code: int | None = None  # None: it had to be stopped
    stopped: str | None = None  # why it was stopped
    progress: tuple[int, int] | None = None  # (open, ready) on its last ramp line
    tail: list[str] = field(default_factory=list)


def run_load(
    flags: list[str],
    timeout: float,
    on_round: Callable[[int], None],
    before_stop: Callable[[LoadRun], None],
    tag: str,
) -> LoadRun:
    """``manydoors load FLAGS`` with its lines echoed; stopped if it stalls or overruns.

    The controller has no "stop now and report" (SIGINT stops its processes and loses
    the report), so a stalled run is read here: ``before_stop`` gets the last counts.
    """
    cmd = [sys.executable, "-m", "manydoors", "load", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reaper = Reaper(proc.pid)
    run = LoadRun()
    moved = [time.monotonic()]
    in_ramp = [True]

    def echo() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            print(f"[{tag}] {line}", file=sys.stderr, flush=True)
            run.tail[:] = [*run.tail[-20:], line]
            ramp = RAMP_LINE.match(line)
            if ramp:
                counts = (int(ramp[1].replace(",", "")), int(ramp[2].replace(",", "")))
                if counts != run.progress:
                    run.progress = counts
                    moved[0] = time.monotonic()
            done = ROUND_LINE.match(line)
            if done:
                in_ramp[0] = False
                on_round(int(done[1]))

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            reaper.look()
            if time.monotonic() > deadline:
                run.stopped = f"did not finish in {timeout:.0f} s"
            elif in_ramp[0] and time.monotonic() - moved[0] > STALL_S:
                run.stopped = f"ramp stalled for {STALL_S:.0f} s at (open, ready) {run.progress}"
            if run.stopped:
                print(f"peers: load {run.stopped}: stopping it", file=sys.stderr, flush=True)
                before_stop(run)
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            time.sleep(1)
        else:
            run.code = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        time.sleep(0.5)
        reaper.kill_leftovers()
    return run


# --- 1:1 throughput -------------------------------------------------------------------------


class Wire:
    """A blocking client speaking NDJSON or WebSocket text frames (the same JSON)."""

    def __init__(self, port: int, ws: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.ws = ws
        self.upgraded = not ws
        self.buf = b""
        if ws:
            self.sock.sendall(wsclient.upgrade_request("127.0.0.1", port))

    def frame(self, payload: bytes) -> bytes:
        return wsclient.masked_text(payload) if self.ws else payload + b"\n"

    def send(self, *payloads: bytes) -> None:
        self.sock.sendall(b"".join(self.frame(p) for p in payloads))

    def read(self) -> list[bytes]:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("closed by the server")
        buf = self.buf + data
        if not self.upgraded:
            self.upgraded, buf = wsclient.split_response(buf)
            if not self.upgraded:
                self.buf = buf
                return []
        if self.ws:
            payloads, closed, self.buf = wsclient.read_frames(buf)
            if closed:
                raise ConnectionError("close frame from the server")
            return payloads
        *lines, self.buf = buf.split(b"\n")
        return [line for line in lines if line]

    def wait_ok(self, op_id: int) -> None:
        while True:
            for payload in self.read():
                ev = json.loads(payload)
                if ev.get("ev") == "ok" and ev.get("id") == op_id:
                    return
                if ev.get("ev") == "error":
                    raise RuntimeError(f"server error: {ev}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


PUB = b'{"op":"pub","channel":"one","data":{"n":1}}'


def one_to_one(port: int, ws: bool, n: int, timeout: float) -> dict[str, Any]:
    """Messages/s from the first publish to the subscriber's last message."""
    sub = Wire(port, ws)
    pub = Wire(port, ws)
    try:
        sub.send(b'{"op":"hello","user":"reader","id":1}', b'{"op":"sub","channel":"one","id":2}')
        sub.wait_ok(2)
        pub.send(b'{"op":"hello","user":"writer","id":1}')
        pub.wait_ok(1)
        batch = pub.frame(PUB) * 100
        n = max(100, n - n % 100)
        failed: list[BaseException] = []

        def pump() -> None:
            try:
                for _ in range(n // 100):
                    pub.sock.sendall(batch)
            except OSError as exc:
                failed.append(exc)

        start = time.perf_counter()
        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        got = 0
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            while got < n and time.monotonic() < deadline:
                got += len(sub.read())
        seconds = time.perf_counter() - start
    finally:
        sub.close()
        pub.close()
    out: dict[str, Any] = {
        "messages": n,
        "received": got,
        "seconds": round(seconds, 3),
        "per_second": round(got / seconds),
    }
    if failed:
        out["publisher_error"] = repr(failed[0])
    return out

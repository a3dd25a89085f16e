"""What drives a server under test: the publish proxy, the load generator, the 1:1 client."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
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

from _procs import Reaper, Usage, usage

from manydoors.launch import stop
from manydoors.loadgen import wsclient
from manydoors.loadgen.pusherclient import PusherApp, signed_query


class Proxy:
    """The API URL given to the load generator: snapshot the server, restamp, forward.

    With ``pusher`` (the app), the publishes are Pusher REST calls: the stamp is inside
    the event's ``data`` string, and the restamped body is signed again.
    """

    def __init__(
        self, upstream: str, on_publish: Callable[[int], None], pusher: PusherApp | None = None
    ) -> None:
        self.count = 0
        self.failed: str | None = None  # why the server did not answer a publish
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                proxy.count += 1
                on_publish(proxy.count)
                msg = json.loads(body)
                path = self.path
                if isinstance(msg.get("data"), dict) and "t" in msg["data"]:
                    msg["data"]["t"] = time.time()  # the reading above is not latency
                elif pusher is not None and isinstance(msg.get("data"), str):
                    stamp = json.loads(msg["data"])
                    stamp["t"] = time.time()
                    msg["data"] = json.dumps(stamp)
                data = json.dumps(msg).encode()
                if pusher is not None:
                    where = path.split("?", 1)[0]
                    path = f"{where}?{signed_query('POST', where, data, pusher, time.time())}"
                headers = {"Content-Type": "application/json"}
                if self.headers.get("Authorization"):
                    headers["Authorization"] = self.headers["Authorization"]
                req = urllib.request.Request(upstream + path, data=data, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, answer = resp.status, resp.read()
                except urllib.error.HTTPError as exc:
                    status, answer = exc.code, exc.read()
                except OSError as exc:  # e.g. a server with every fd in use takes no call
                    proxy.failed = repr(exc)
                    status, answer = 502, json.dumps({"error": proxy.failed}).encode()
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

# A round's end: its count, or its publish failed (the summary repeats that line).
ROUND_LINE = re.compile(r"^load: message (\d+): (?:.* received in |publish failed: )")
RAMP_DONE = re.compile(r"^load: ramp done: ([\d,]+) ready")  # printed after a stall too
STALL_S = 60  # --stall-timeout: a ramp that stops moving this long ends, holding what is open


class Readings:
    """The server's usage at the load's milestones, taken by the callbacks below.

    ``ramp_done`` (give it to run_load) at the load's "ramp done" line: the reading
    should no publish come; ``published`` (to Proxy) at the first publish: every
    connection held and subscribed, nothing broadcast yet; ``round_done`` (to run_load)
    at the line of the last broadcast: the end of the broadcasts' CPU count.
    """

    def __init__(self, pids: Callable[[], list[int]], broadcasts: int) -> None:
        self.pids = pids
        self.broadcasts = broadcasts
        self.at: dict[str, Usage] = {}

    def ramp_done(self) -> None:
        self.at["ramp_done"] = usage(self.pids())

    def published(self, count: int) -> None:
        if count == 1:
            self.at["held"] = usage(self.pids())

    def round_done(self, number: int) -> None:
        # Once: a failed publish's line comes again in the summary, after the hold.
        if number == self.broadcasts and "broadcasts_done" not in self.at:
            self.at["broadcasts_done"] = usage(self.pids())


def broadcast_cpu(at: dict[str, Usage], deliveries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Server CPU seconds (all its processes) over the broadcasts, per million deliveries."""
    if "held" not in at or "broadcasts_done" not in at:
        return None
    delivered = sum(d["received"] for d in deliveries)
    cpu = at["broadcasts_done"].cpu_s - at["held"].cpu_s
    return {
        "broadcast_s": round(cpu, 2),
        "deliveries": delivered,
        "per_million_deliveries_s": round(cpu / delivered * 1e6, 2) if delivered else None,
    }


@dataclass
class LoadRun:
    code: int | None = None
    stopped: str | None = None  # why it was interrupted
    ready: int | None = None  # from its "ramp done" line, should it write no report
    tail: list[str] = field(default_factory=list)


def run_load(
    flags: list[str],
    timeout: float,
    on_ramp_done: Callable[[], None],
    on_round: Callable[[int], None],
    tag: str,
    tick: Callable[[], None] | None = None,
) -> LoadRun:
    """``manydoors load FLAGS`` with its lines echoed; interrupted if it overruns.

    The load generator ends a stalled ramp itself (and says where in its report); on
    SIGINT it stops its processes and still writes the report. ``tick`` is called
    about once a second while it runs (a caller's own sampling).
    """
    cmd = [sys.executable, "-m", "manydoors", "load", "--stall-timeout", str(STALL_S), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reaper = Reaper(proc.pid)
    run = LoadRun()

    def echo() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            print(f"[{tag}] {line}", file=sys.stderr, flush=True)
            run.tail[:] = [*run.tail[-20:], line]
            ramp = RAMP_DONE.match(line)
            if ramp:
                run.ready = int(ramp[1].replace(",", ""))
                on_ramp_done()
            done = ROUND_LINE.match(line)
            if done:
                on_round(int(done[1]))

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            reaper.look()  # its load processes, to kill any it leaves behind
            if tick is not None:
                tick()
            time.sleep(1)
        if proc.poll() is None:
            run.stopped = f"did not finish in {timeout:.0f} s"
            print(
                f"peers: load {run.stopped}: SIGTERM (it still reports)",
                file=sys.stderr,
                flush=True,
            )
            stop(proc, 30)
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

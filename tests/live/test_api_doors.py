"""The API's doors under a flood (server/apiserver.py): a node whose supervisor has 1,024
fds, and more connections to its API port than that, each sending half a request head
(2,000 held from the client's side, 1,500 new ones a second, 12,000 in all).

The supervisor keeps its fds (the API's cap is its fd limit less a reserve), restarts a
worker killed during the flood, answers /healthz throughout (a new connection closes the
oldest half head at the cap) and closes every half head after the header timeout.
The timeouts come through the environment, which an older server ignores: run against
one, this test fails on what it does, not on a flag it does not know.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import cast

from support.server import Server
from support.wait import wait_for

HALF = b"GET /healthz HTTP/1.1\r\nHost: flood\r\n"  # the head's blank line never comes
NOFILE = 1024  # the node's RLIMIT_NOFILE: the flood outnumbers it
FLOOD = 2000  # half heads the flood keeps open from its side (some wait in the backlog)
RATE = 1500  # new connections a second once it has its FLOOD: two caps' worth
BUDGET = 12_000  # connections in all: the flood ends when the test no longer needs it
HEADER_TIMEOUT = 3.0


def closed(sock: socket.socket) -> bool:
    """The server closed (or reset) this connection."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Flood(threading.Thread):
    """Keeps ``size`` connections open to ``port``, each with half a head sent: opens a
    new one for each the server closes, until halted. Connects without blocking, many
    at once as a real flood does: one at a time, a SYN dropped while the accept queue
    is full would stall it for a second."""

    def __init__(self, port: int, size: int, rate: int = RATE, budget: int = BUDGET) -> None:
        super().__init__(daemon=True)
        self.port, self.size, self.rate, self.budget = port, size, rate, budget
        self.open: set[socket.socket] = set()  # connecting, or sent half a head
        self.selector = selectors.DefaultSelector()
        self.started = self.opened = self.failed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set():
            allowed = min(self.budget, self.size + int((time.monotonic() - start) * self.rate))
            while len(self.open) < self.size and self.started < allowed:
                self.started += 1
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", self.port))
                self.selector.register(sock, selectors.EVENT_WRITE)
                self.open.add(sock)
            for key, events in self.selector.select(0.01):
                sock = cast(socket.socket, key.fileobj)
                if events & selectors.EVENT_WRITE:  # connected, or failed to
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        with contextlib.suppress(OSError):
                            sock.send(HALF)
                            self.selector.modify(sock, selectors.EVENT_READ)
                            self.opened += 1
                            continue
                    self.failed += 1
                elif not closed(sock):  # a closed one turns readable (EOF)
                    continue
                self.selector.unregister(sock)
                self.open.discard(sock)
                sock.close()

    def close(self) -> None:
        self.halt.set()
        self.join(10)
        for sock in self.open:
            sock.close()
        self.selector.close()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def health(server: Server) -> dict[str, object]:
    status, answer = server.http("GET", "/healthz")
    assert status in (200, 503), answer
    return dict(answer)


def evicted(server: Server) -> int:
    """Connections the API closed because a new one came at its cap."""
    return int(server.stats()["api"]["evicted"])


def test_a_flooded_api_keeps_its_fds_restarts_a_killed_worker_and_answers_healthz(
    serve: Callable[..., Server],
) -> None:
    server = serve(
        "--workers", "2", "--max-connections", "500",
        env={"MANYDOORS_API_HEADER_TIMEOUT": str(HEADER_TIMEOUT)},
        nofile=NOFILE,
    )  # fmt: skip
    supervisor = server.proc.pid
    port = int(server.api.rsplit(":", 1)[1])
    flood = Flood(port, FLOOD)
    most = 0
    try:
        flood.start()
        # Past the point where a node with no cap had no fd left.
        wait_for(lambda: flood.opened >= 2 * NOFILE, timeout=60, what="the flood")
        most = max(most, fds(supervisor))
        assert health(server)["status"] == "ok"

        before = evicted(server)
        assert before > 0  # the flood holds the API at its cap
        old = server.worker_pids()
        os.kill(old[0], signal.SIGKILL)

        def restarted() -> bool:
            nonlocal most
            most = max(most, fds(supervisor))
            pids = server.worker_pids()
            return None not in pids and pids[0] != old[0] and health(server)["status"] == "ok"

        wait_for(restarted, timeout=30, what="the killed worker back during the flood")
        most = max(most, fds(supervisor))
        assert evicted(server) > before  # and still did while the worker came back
    finally:
        flood.halt.set()  # it opens no more, and keeps what it has open
        flood.join(10)
    assert most < NOFILE - 128, f"the supervisor held {most} of its {NOFILE} fds"
    stats = server.stats()["api"]
    assert stats["max_connections"] < NOFILE - 256
    assert stats["evicted"] >= FLOOD - stats["max_connections"]

    # The flood stopped but keeps its sockets: the header timeout closes what the API
    # holds (less the connection that asks for the stats).
    try:
        api = server.stats()["api"]
        wait_for(
            lambda: server.stats()["api"]["connections"] <= 1,
            timeout=HEADER_TIMEOUT + 5,
            what="every half head closed",
        )
        assert server.stats()["api"]["timed_out"] - api["timed_out"] >= api["connections"] // 2
    finally:
        flood.close()
    assert fds(supervisor) < 200
    assert "Traceback" not in server.output()

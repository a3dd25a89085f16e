"""Per-connection limits: inbound rates, connections per IP and per user, slow-loris
(read_timeout) and heartbeats. Each violation is an error event or a bye, a count in
/api/stats and /metrics, and leaves every other connection alone."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import subprocess
import time

import jwt
import pytest

from support.client import Client
from support.server import small
from support.wait import wait_for


def refused(client: Client, code: str) -> dict:
    error = client.until(lambda e: e["ev"] == "error")[-1]
    assert error["code"] == code, error
    assert client.closed()
    return error


def test_messages_over_the_rate_get_rate_limited_and_are_not_done(serve, clients):
    server = small(serve, "--max-messages-per-second", "5")
    client = clients(server.port())
    for i in range(8):  # the bucket holds 5
        client.send({"op": "ping", "id": i})
    answers = [client.recv() for _ in range(8)]
    assert [a["ev"] for a in answers] == ["pong"] * 5 + ["error"] * 3
    assert {a["code"] for a in answers[5:]} == {"rate_limited"}
    assert [a["id"] for a in answers] == list(range(8))
    time.sleep(1.3)  # refilled
    assert client.call({"op": "ping", "id": 9}) == {"ev": "pong", "id": 9}
    assert server.stats()["errors"]["rate_limited"] == 3


def test_a_flood_is_closed_after_max_bad_messages_and_others_carry_on(serve, clients):
    server = small(serve, "--max-messages-per-second", "5", "--max-bad-messages", "4")
    calm = clients(server.port())
    flooder = clients(server.port())
    flooder.send(b'{"op":"ping"}\n' * 50)
    events = flooder.until(lambda e: e["ev"] == "bye")
    assert events[-1] == {"ev": "bye", "reason": "bad_input"}
    assert sum(e["ev"] == "error" for e in events) == 4
    assert calm.call({"op": "ping", "id": 1}) == {"ev": "pong", "id": 1}
    assert server.stats()["closed"]["bad_input"] == 1


def test_bytes_over_the_rate_pause_reading_and_lose_nothing(serve, clients):
    server = small(
        serve, "--max-messages-per-second", "0", "--max-bytes-per-second", "65536",
        "--read-timeout", "0",
    )  # fmt: skip
    client = clients(server.port())
    line = b'{"op":"ping","id":1}\n'
    count = 400_000 // len(line)
    started = time.monotonic()
    client.send(line * count)
    for _ in range(count):
        assert client.recv() == {"ev": "pong", "id": 1}
    # The bucket holds 64 KiB and a read may overdraw it by one chunk (<= 256 KiB):
    # what is left takes more than a second at 64 KiB/s.
    assert time.monotonic() - started > 1.0  # it was throttled, not refused
    assert server.stats()["throttled"] >= 1


def test_connections_per_ip_across_workers(serve):
    server = small(serve, "--max-connections-per-ip", "3", "--limit-loopback", "true", workers=2)
    port = server.port()
    held = [Client(port, source="127.0.0.9") for _ in range(3)]
    fourth = Client(port, welcome=False, source="127.0.0.9")  # the error comes instead
    error = refused(fourth, "too_many_connections")
    fourth.close()
    assert "more than 3 connections from 127.0.0.9" in error["reason"]
    other = Client(port, source="127.0.0.10")  # another address has its own count
    assert other.call({"op": "ping", "id": 1})["ev"] == "pong"
    assert server.stats()["refused"]["per_ip"] == 1
    held.pop().close()
    wait_for(lambda: server.stats()["connections"] == 3, what="the close counted")
    again = Client(port, source="127.0.0.9")
    assert again.call({"op": "ping", "id": 1})["ev"] == "pong"
    for c in [*held, other, again]:
        c.close()


def test_loopback_peers_are_exempt_by_default(serve, clients):
    server = small(serve, "--max-connections-per-ip", "2")
    conns = [clients(server.port()) for _ in range(5)]
    assert conns[-1].call({"op": "ping", "id": 1})["ev"] == "pong"


def test_connections_per_user_with_tokens(serve, clients):
    secret = "s" * 32
    server = small(
        serve, "--max-connections-per-user", "2", "--auth-mode", "token",
        env={"MANYDOORS_AUTH_SECRET": secret}, workers=2,
    )  # fmt: skip
    port = server.port()

    def hello(user: str) -> dict:
        return {"op": "hello", "token": jwt.encode({"sub": user}, secret), "id": 1}

    for _ in range(2):
        assert clients(port).call(hello("ann"))["ev"] == "ok"
    third = clients(port)
    third.send(hello("ann"))
    assert "user ann has 2 connections" in refused(third, "too_many_connections")["reason"]
    assert clients(port).call(hello("bob"))["ev"] == "ok"
    assert server.stats()["refused"]["per_user"] == 1
    _, metrics = server.http("GET", "/metrics")
    assert 'manydoors_refused_total{reason="per_user"} 1.0' in metrics


def test_without_tokens_a_user_name_is_not_limited(serve, clients):
    # Anyone may claim any name: a limit would let anyone lock a user out.
    server = small(serve, "--max-connections-per-user", "1")
    for _ in range(3):
        assert clients(server.port()).call({"op": "hello", "user": "ann", "id": 1})["ev"] == "ok"


def test_a_dead_workers_counts_are_cleared(serve):
    server = small(serve, "--max-connections-per-ip", "2", "--limit-loopback", "true")
    port = server.port()
    before = [Client(port, source="127.0.0.12") for _ in range(2)]
    [pid] = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: server.worker_pids()[0] not in (None, pid), what="restart", timeout=20)
    for client in before:
        assert client.closed()
        client.close()
    after = [Client(port, source="127.0.0.12") for _ in range(2)]
    assert after[1].call({"op": "ping", "id": 1})["ev"] == "pong"
    for client in after:
        client.close()


def test_a_slow_loris_is_closed_at_read_timeout(serve, clients):
    server = small(serve, "--read-timeout", "0.6")
    quiet = clients(server.port())  # says nothing at all: that is allowed on TCP
    loris = clients(server.port())
    started = time.monotonic()
    for byte in b'{"op":"ping"':  # one byte every 0.1 s, never a newline
        try:
            loris.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    error = refused(loris, "read_timeout")
    assert "within 0.6 s" in error["reason"]
    assert time.monotonic() - started < 3
    assert quiet.call({"op": "ping", "id": 1})["ev"] == "pong"
    assert server.stats()["closed"]["read_timeout"] == 1


def test_an_unfinished_websocket_handshake_is_closed_at_read_timeout(serve):
    server = small(serve, "--protocol", "websocket", "--read-timeout", "0.5")
    sock = socket.create_connection(("127.0.0.1", server.port()), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b'"code":"read_timeout"' in answer
    sock.close()
    assert server.stats()["closed"]["read_timeout"] == 1


@pytest.mark.parametrize(
    "timeouts",
    [
        ("--ping-interval", "0.5", "--ping-timeout", "0.5"),  # a scan every tick
        # hello_timeout sets a 0.1 s tick: the scan runs every 2nd tick, and a quiet
        # connection must still get one ping per quiet interval, not one per tick
        ("--hello-timeout", "0.4", "--ping-interval", "0.8", "--ping-timeout", "0.8"),
    ],
    ids=["scan-every-tick", "scan-every-2-ticks"],
)
def test_heartbeat_pings_quiet_connections_and_closes_silent_ones(serve, clients, timeouts):
    server = small(serve, *timeouts)
    answering = clients(server.port())
    silent = clients(server.port())
    deadline = time.monotonic() + 3
    pings = 0
    while time.monotonic() < deadline:  # answer every ping for 3 s: 6 ping intervals
        if select.select([answering.sock], [], [], 0.1)[0]:  # pings come 0.5 s apart
            assert answering.recv() == {"ev": "ping"}
            answering.send({"op": "pong"})
            pings += 1
    assert pings >= 3
    assert silent.recv() == {"ev": "ping"}
    assert silent.recv() == {"ev": "bye", "reason": "ping_timeout"}
    assert silent.closed()
    assert answering.call({"op": "ping", "id": 1})["ev"] == "pong"
    stats = server.stats()
    assert stats["closed"]["ping_timeout"] == 1 and stats["pings"] >= pings + 1


def test_a_peer_that_stops_reading_and_answering_is_closed(serve):
    """A half-open peer as the server sees it: nothing comes back, whatever is sent."""
    server = small(serve, "--ping-interval", "0.3", "--ping-timeout", "0.3")
    peer = Client(server.port(), welcome=False, rcvbuf=4096)
    peer.send(b'{"op":"sub","channel":"news"}\n')
    wait_for(lambda: server.stats()["closed"]["ping_timeout"] == 1, what="closed", timeout=10)
    wait_for(lambda: server.stats()["connections"] == 0, what="released")
    peer.close()


def test_accepted_sockets_have_keepalive_and_a_bounded_send_buffer(serve, clients):
    server = small(serve)
    client = clients(server.port())
    client.call({"op": "ping", "id": 1})

    def timers() -> str:  # ss shows the running timer: keepalive once the pong is acked
        cmd = ["ss", "-tnoH", "state", "established", f"( sport = :{server.port()} )"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return out if "keepalive" in out else ""

    # TCP_KEEPIDLE 5 min (the kernel's default is 2 hours)
    out = wait_for(timers, what="keepalive")
    assert re.search(r"timer:\(keepalive,(5min|4min\d+sec)", out), out
    # send_buffer 128 KiB (doubled by Linux), not autotuned up to 4 MiB
    cmd = ["ss", "-tmnH", "state", "established", f"( sport = :{server.port()} )"]
    mem = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert ",tb262144," in mem, mem


def test_api_publish_says_busy_while_a_worker_cannot_keep_up(serve, clients):
    """A stopped worker: the broker's queue to it grows until publishing answers 503."""
    server = small(
        serve, "--ping-interval", "0",
        "--max-outbound-bytes", "100000000",  # the reader gets it all at once on SIGCONT
    )  # fmt: skip
    reader = clients(server.port())
    assert reader.call({"op": "sub", "channel": "big", "id": 1})["ev"] == "ok"
    [pid] = server.worker_pids()
    pad = "x" * 60_000
    os.kill(pid, signal.SIGSTOP)
    try:
        statuses = []
        for _ in range(2000):  # 32 MiB is ~560 of these
            status, answer = server.http("POST", "/api/publish", {"channel": "big", "data": pad})
            statuses.append(status)
            if status != 202:
                break
        assert statuses[-1] == 503 and answer["error"] == "busy", (statuses[-3:], answer)
        assert len(statuses) > 500  # only once the queue is really long
    finally:
        os.kill(pid, signal.SIGCONT)
    accepted = len(statuses) - 1
    reader.sock.settimeout(30)
    for _ in range(accepted):  # nothing accepted was lost
        assert reader.recv()["data"] == pad
    wait_for(lambda: server.http("POST", "/api/publish", {"channel": "big", "data": 1})[0] == 202)


def test_a_peer_reset_is_counted_as_lost_and_a_clean_close_is_not(serve, clients):
    server = small(serve)
    polite = clients(server.port())
    polite.call({"op": "hello", "user": "p", "id": 1})
    polite.close()
    rude = clients(server.port())
    rude.call({"op": "hello", "user": "r", "id": 1})
    rude.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rude.close()  # linger 0: an RST instead of a FIN
    wait_for(lambda: server.stats()["connections"] == 0, what="both released")
    assert server.stats()["lost"] == {"reset": 1, "timed_out": 0, "error": 0}
    assert 'manydoors_lost_total{reason="reset"} 1.0' in server.http("GET", "/metrics")[1]

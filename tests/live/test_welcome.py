"""The welcome held with the first acks (server/welcome.py), under a real event loop.

400 clients connect at once, each sending its hello and sub right behind the connect
(the case the hold is for), while the API publishes to their channel. Every client's
first line is still its welcome, then its acks; a message that reached it while the
welcome waited comes after the welcome, never before; and nothing is lost or doubled.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from support.server import ApiPublisher, Server

CLIENTS = 400


def read_until_acked(sock: socket.socket, deadline: float) -> list[dict[str, object]]:
    """The events a client got, up to and including the ok of its sub (id 2)."""
    buf, events = b"", []
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {events}"
        buf += chunk
        *lines, buf = buf.split(b"\n")
        events += [json.loads(line) for line in lines]
        if any(e.get("ev") == "ok" and e.get("id") == 2 for e in events):
            return events
    raise AssertionError(f"no ok for the sub within the time: {events}")


def test_a_ramp_of_clients_that_speak_first_gets_the_welcome_first(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "2", "--max-connections", "2000", "--ping-interval", "0")
    publisher = ApiPublisher(server, 0.002, channel="veg")
    publisher.start()
    socks = []
    try:
        for i in range(CLIENTS):
            sock = socket.create_connection(("127.0.0.1", server.port()), timeout=10)
            sock.sendall(
                b'{"op":"hello","user":"u%d","id":1}\n{"op":"sub","channel":"veg","id":2}\n' % i
            )
            socks.append(sock)
        deadline = time.monotonic() + 30
        got = [read_until_acked(sock, deadline) for sock in socks]
    finally:
        publisher.halt.set()
        publisher.join(10)
        for sock in socks:
            sock.close()
    assert publisher.error is None and publisher.seqs
    for events in got:
        assert events[0]["ev"] == "welcome", events[:3]
        assert [e["ev"] for e in events].count("welcome") == 1
        acks = [e["id"] for e in events if e["ev"] == "ok"]
        assert acks == [1, 2]
        seqs = [e["seq"] for e in events if e["ev"] == "msg"]
        assert seqs == sorted(set(seqs))  # in order, none twice

"""Slow readers: over max_outbound_bytes they are closed (default) or their messages dropped."""

from __future__ import annotations

from collections.abc import Callable

from support.client import Client
from support.wait import wait_for

BIG = "x" * 32_000  # 300 of these (9.6 MB) overflow the kernel's socket buffers too


def never_reader(clients: Callable[..., Client], port: int) -> Client:
    """A client that subscribes to "news", then never reads again (tiny receive buffer)."""
    client = clients(port, welcome=False, rcvbuf=4096)
    client.send(b'{"op":"sub","channel":"news","id":1}\n')
    return client


def flood(server, reader: Client, count: int = 300) -> None:
    """Publish ``count`` big messages; the good reader reads each one as it comes."""
    for i in range(count):
        server.publish(channel="news", data={"n": i, "pad": BIG})
        assert reader.recv()["data"]["n"] == i


def subscribed(client: Client) -> Client:
    assert client.call({"op": "sub", "channel": "news", "id": 1})["ev"] == "ok"
    return client


def test_a_reader_over_its_outbound_cap_is_closed_and_the_others_carry_on(serve, clients):
    server = serve("--workers", "1", "--max-connections", "10", "--max-outbound-bytes", "65536")
    slow = never_reader(clients, server.port())
    good = subscribed(clients(server.port()))
    wait_for(lambda: server.stats()["connections"] == 2, what="both connected")

    flood(server, good)
    wait_for(lambda: server.stats()["closed"]["slow"] == 1, what="the slow reader closed")
    wait_for(lambda: server.stats()["connections"] == 1, what="its fd released")
    # Its queue was dropped: reading now ends (EOF, or the abort's reset) well before
    # the 9.6 MB that were published.
    got = b""
    slow.sock.settimeout(10)
    try:
        while chunk := slow.sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    slow.close()
    assert len(got) < 9_600_000
    assert good.call({"op": "ping", "id": 2}) == {"ev": "pong", "id": 2}


def test_with_the_drop_policy_a_slow_reader_keeps_its_connection(serve, clients):
    server = serve(
        "--workers", "1", "--max-connections", "10", "--max-outbound-bytes", "65536",
        "--slow-policy", "drop",
    )  # fmt: skip
    slow = never_reader(clients, server.port())
    good = subscribed(clients(server.port()))
    wait_for(lambda: server.stats()["connections"] == 2, what="both connected")

    flood(server, good)
    stats = server.stats()
    assert stats["dropped"] > 0 and stats["closed"]["slow"] == 0
    assert stats["connections"] == 2
    # Reading again, it gets what was queued (with a gap in seq), then live messages.
    events = slow.drain()
    assert [e["ev"] for e in events[:2]] == ["welcome", "ok"]
    seqs = [e["seq"] for e in events[2:]]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 300  # the rest dropped
    server.publish(channel="news", data="live")
    live = slow.drain()[-1]
    slow.close()
    assert (live["data"], live["seq"]) == ("live", 301)  # the gap shows in seq

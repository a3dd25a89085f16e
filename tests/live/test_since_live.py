"""The largest ``since`` a client may send (2**63 - 1) is answered by a real server, on
the local broker and on Redis (issue 18: every op gets an answer)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from support.client import Client
from support.server import Server

BIGGEST = 2**63 - 1


@pytest.mark.parametrize("broker", ["local", "redis"])
def test_the_largest_since_is_answered_on_every_broker(
    serve: Callable[..., Server],
    clients: Callable[..., Client],
    broker: str,
    request: pytest.FixtureRequest,
) -> None:
    flags = ["--workers", "2", "--max-connections", "1000", "--max-messages-per-second", "0"]
    if broker == "redis":
        flags += ["--broker", request.getfixturevalue("redis_server").url]
    server = serve(*flags)
    client = clients(server.port())
    assert server.publish(channel="veg", data=1)["seq"] == 1
    client.send({"op": "sub", "channel": "veg", "since": BIGGEST, "id": 1})
    assert client.recv() == {"ev": "ok", "id": 1, "recovered": False, "seq": 1, "missed": 0}
    client.send({"op": "sub", "channel": "new", "since": BIGGEST, "id": 2})
    assert client.recv() == {"ev": "ok", "id": 2, "recovered": False, "seq": 0, "missed": 0}
    client.send({"op": "sub", "channel": "veg", "since": BIGGEST, "id": 3})  # held already
    assert client.recv() == {"ev": "ok", "id": 3}
    client.send({"op": "sub", "channel": "veg", "since": BIGGEST + 1, "id": 4})
    answer = client.recv()
    assert answer["ev"] == "error" and answer["code"] == "bad_field" and answer["id"] == 4
    # Subscribed from seq 2 on, and still answering.
    server.publish(channel="veg", data="live")
    got = client.recv()
    assert (got["ev"], got["seq"], got["data"]) == ("msg", 2, "live")
    client.send({"op": "ping", "id": 5})
    assert client.recv() == {"ev": "pong", "id": 5}

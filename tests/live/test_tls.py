"""TLS on TCP and WebSocket services, end to end, with a self-signed certificate.

Peers: Python's ssl module (blocking, like ``openssl s_client``), the ``websockets``
library over wss://, the asyncio client library, and the load generator's own TLS.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Callable

import pytest
import websockets

from manydoors.client import Client as AsyncClient
from support.certfix import Certs
from support.client import Client
from support.server import manydoors_cmd, run_load
from support.wait import wait_for


@pytest.fixture
def tls_clients(certs: Certs, clients: Callable[..., Client]) -> Callable[[int], Client]:
    """Blocking NDJSON clients over TLS that verify the server against ``certs``."""
    return lambda port: clients(port, tls=certs.client_context())


def test_tls_clients_get_the_welcome_and_chat(serve, certs, tls_clients):
    server = serve("--workers", "2", "--max-connections", "100", *certs.flags())
    alice, bob = tls_clients(server.port()), tls_clients(server.port())
    assert alice.welcome["ev"] == "welcome"
    assert alice.sock.version() in ("TLSv1.2", "TLSv1.3")
    alice.call({"op": "hello", "user": "alice", "id": 1})
    alice.call({"op": "sub", "channel": "veg", "id": 2})
    bob.call({"op": "hello", "user": "bob", "id": 1})
    bob.send({"op": "pub", "channel": "veg", "data": {"d": 1}})
    bob.send({"op": "send", "user": "alice", "data": "psst"})
    got = alice.until(lambda e: e["ev"] == "dm")
    assert got[0] == {"ev": "msg", "channel": "veg", "seq": 1, "from": "bob", "data": {"d": 1}}
    assert got[-1] == {"ev": "dm", "from": "bob", "data": "psst"}
    server.publish(channel="veg", data="from the API")
    assert alice.recv()["data"] == "from the API"
    service = server.stats()["services"][0]
    assert service["tls"] is True and service["connections"] == 2


def test_plain_text_client_on_the_tls_port_is_dropped_and_not_counted(serve, certs, tls_clients):
    # read_timeout is the TLS handshake timeout too: a silent plain client goes in 1 s.
    server = serve("--workers", "1", "--read-timeout", "1", *certs.flags())
    alice = tls_clients(server.port())
    alice.call({"op": "hello", "user": "alice", "id": 1})
    for _ in range(20):
        plain = Client(server.port(), welcome=False)
        plain.send({"op": "ping", "id": 1})
        assert plain.closed(), "a plain-text client must be dropped"
        plain.close()
    with socket.create_connection(("127.0.0.1", server.port()), timeout=10) as silent:
        assert silent.recv(100) == b""  # dropped at the handshake timeout
    # The TLS client did not notice, and the dropped ones are not counted as connections.
    assert alice.call({"op": "ping", "id": 2}) == {"ev": "pong", "id": 2}
    wait_for(lambda: server.stats()["connections"] == 1, what="only the TLS client counted")
    assert server.stats()["accepted"] == 1


WSS_AND_TLS = """
[api]
port = 0

[[service]]
name = "web"
port = 0
protocol = "websocket"
workers = 1
max_connections = 1000
allow_send = true
tls_cert = "{cert}"
tls_key = "{key}"

[[service]]
name = "chat"
port = 0
workers = 1
max_connections = 1000
allow_send = true
tls_cert = "{cert}"
tls_key = "{key}"
"""


def test_websockets_library_connects_with_wss(serve, certs, tls_clients):
    server = serve(config=WSS_AND_TLS.format(cert=certs.cert, key=certs.key))
    tcp = tls_clients(server.port("chat"))
    tcp.call({"op": "hello", "user": "tina", "id": 1})

    async def scenario() -> list[dict[str, object]]:
        url = f"wss://127.0.0.1:{server.port('web')}/"
        async with websockets.connect(url, ssl=certs.client_context()) as ws:

            async def next_event() -> dict[str, object]:
                message = await asyncio.wait_for(ws.recv(), 10)
                assert isinstance(message, str)
                return dict(json.loads(message))

            assert (await next_event())["service"] == "web"
            await ws.send(json.dumps({"op": "hello", "user": "wendy", "id": 1}))
            assert await next_event() == {"ev": "ok", "id": 1}
            await ws.send(json.dumps({"op": "sub", "channel": "veg", "id": 2}))
            assert await next_event() == {"ev": "ok", "id": 2}
            await ws.send(json.dumps({"op": "send", "user": "tina", "data": "hi tina"}))
            await asyncio.to_thread(server.publish, channel="veg", data="api")
            return [await next_event()]

    got = asyncio.run(scenario())
    assert got == [{"ev": "msg", "channel": "veg", "seq": 1, "from": None, "data": "api"}]
    assert tcp.recv() == {"ev": "dm", "from": "wendy", "data": "hi tina"}
    assert [s["tls"] for s in server.stats()["services"]] == [True, True]


def test_client_library_speaks_tls(serve, certs):
    server = serve("--workers", "1", *certs.flags())

    async def main() -> None:
        ctx = certs.client_context()
        async with AsyncClient("127.0.0.1", server.port(), user="alice", ssl=ctx) as alice:
            await alice.subscribe("news")
            await alice.publish("news", "hi")
            async with asyncio.timeout(10):
                assert (await alice.next())["data"] == "hi"

    asyncio.run(main())


@pytest.mark.parametrize("ws", [False, True], ids=["tcp", "wss"])
def test_load_generator_opens_tls_connections_and_answers_pings(serve, certs, tmp_path, ws):
    proto = ("--protocol", "websocket") if ws else ()
    heartbeat = ("--ping-interval", "0.3", "--ping-timeout", "0.6")
    server = serve(
        "--workers", "2", "--max-connections", "1000", *proto, *heartbeat, *certs.flags()
    )
    code, err, report = run_load(
        "--tls",
        *(["--ws"] if ws else []),
        *server.target(200),
        "--subscribe",
        "veg",
        *server.broadcasts(1),
        "--hold",
        "2",  # the pongs go through TLS too, or the connections go after 0.9 s
        report=tmp_path / "report.json",
    )
    assert code == 0, err
    assert report["connections"]["peak"] == 200 and not report["errors"]
    assert report["deliveries"][0]["received"] == 200
    assert report["connections"]["final"] == 200
    stats = server.stats()
    assert stats["pings"] >= 200 and stats["closed"]["ping_timeout"] == 0


def test_load_generator_without_tls_on_a_tls_port_reports_it(serve, certs, tmp_path):
    server = serve("--workers", "1", *certs.flags())
    code, _, report = run_load(
        *server.target(5), "--connect-timeout", "3", report=tmp_path / "r.json"
    )
    assert code != 0
    assert report["errors"].get("closed_by_server") == 5


def _serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = manydoors_cmd("serve", "--port", "0", "--api-port", "0", "--workers", "1", *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_serve_refuses_a_key_that_does_not_match_the_certificate(certs):
    result = _serve_fails("--tls-cert", str(certs.cert), "--tls-key", str(certs.other_key))
    assert result.returncode == 1
    assert f"the private key {certs.other_key} does not match the certificate" in result.stderr
    assert "ready" not in result.stderr  # no worker started


def test_serve_refuses_a_missing_key_file(certs, tmp_path):
    missing = tmp_path / "nope.pem"
    result = _serve_fails("--tls-cert", str(certs.cert), "--tls-key", str(missing))
    assert result.returncode == 1
    assert f"cannot read the private key {missing}: No such file or directory" in result.stderr

"""The WebSocket service end to end, against independent peers.

Peers: the Python `websockets` client, Node's `ws` client (tests/node, installed by
./run test), and raw sockets for malformed handshakes and frames.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

import websockets

from support.nodefix import NODE_DIR, need_node
from support.server import run_load
from support.wait import wait_for

WS_AND_TCP = """
[api]
port = 0

[[service]]
name = "web"
port = 0
protocol = "websocket"
workers = 1
max_connections = 1000
allow_send = true
max_message_bytes = 1024

[[service]]
name = "chat"
port = 0
workers = 1
max_connections = 1000
allow_send = true
"""


async def _next(ws: websockets.ClientConnection) -> dict[str, object]:
    message = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(message, str), "events are text frames"
    return dict(json.loads(message))


def test_browser_style_client_and_tcp_client_share_channels_and_send(serve, clients):
    server = serve(config=WS_AND_TCP)
    tcp = clients(server.port("chat"))
    tcp.call({"op": "hello", "user": "tina", "id": 1})
    tcp.call({"op": "sub", "channel": "veg", "id": 2})

    async def scenario() -> list[dict[str, object]]:
        url = f"ws://127.0.0.1:{server.port('web')}/"
        async with websockets.connect(url) as ws:
            welcome = await _next(ws)
            assert welcome["ev"] == "welcome" and welcome["service"] == "web"
            await ws.send(json.dumps({"op": "hello", "user": "wendy", "id": 1}))
            assert await _next(ws) == {"ev": "ok", "id": 1}
            await ws.send(json.dumps({"op": "sub", "channel": "veg", "id": 2}))
            assert await _next(ws) == {"ev": "ok", "id": 2}
            await ws.send(json.dumps({"op": "pub", "channel": "veg", "data": {"from": "ws"}}))
            await ws.send(json.dumps({"op": "send", "user": "tina", "data": "hi tina"}))
            got = [await _next(ws)]
            server.publish(channel="veg", data="api")
            got.append(await _next(ws))
            tcp.send({"op": "send", "user": "wendy", "data": "hi wendy"})
            got.append(await _next(ws))
            pong = await ws.ping()
            await asyncio.wait_for(pong, 10)  # the server answers WebSocket pings
            return got

    got = asyncio.run(scenario())
    assert got[0]["ev"] == "msg" and got[0]["data"] == {"from": "ws"} and got[0]["from"] == "wendy"
    assert got[1]["data"] == "api"
    assert got[2] == {"ev": "dm", "from": "tina", "data": "hi wendy"}
    # The TCP client saw the WebSocket user's publish and direct message.
    assert tcp.recv()["data"] == {"from": "ws"}
    assert tcp.recv() == {"ev": "dm", "from": "wendy", "data": "hi tina"}
    assert tcp.recv()["data"] == "api"


def test_node_ws_client_receives_what_the_api_publishes(serve):
    need_node()
    server = serve(config=WS_AND_TCP)
    proc = subprocess.Popen(
        [
            "node",
            str(NODE_DIR / "ws_client.js"),
            f"ws://127.0.0.1:{server.port('web')}/",
            "nora",
            "news",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: server.stats()["broker"]["channels"] >= 1, what="node client subscribed")
        server.publish(channel="news", data={"n": 1})
        server.publish(channel="news", data={"n": 2})
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    events = [x["event"] for x in lines if "event" in x]
    assert all(not x["binary"] for x in lines if "event" in x)
    assert [e["data"] for e in events if e["ev"] == "msg"] == [{"n": 1}, {"n": 2}]
    assert lines[-1] == {"closed": 1000}


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _frame(payload: bytes, opcode: int = 1, masked: bool = True) -> bytes:
    head = bytes((0x80 | opcode, (0x80 if masked else 0) | len(payload)))
    return head + (b"\x00\x00\x00\x00" if masked else b"") + payload


def _close_code(answer: bytes) -> int:
    """The code of the close frame at the end of what the server sent."""
    i = answer.rfind(b"\x88")
    assert i >= 0, answer
    return int.from_bytes(answer[i + 2 : i + 4], "big")


def test_malformed_handshakes_and_frames_get_the_rfc_answer(serve):
    server = serve(config=WS_AND_TCP)
    port = server.port("web")
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(port, UPGRADE.replace(b"13", b"8")).startswith(b"HTTP/1.1 426")
    assert _raw(port, UPGRADE.replace(b"GET", b"POST")).startswith(b"HTTP/1.1 405")
    assert _raw(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    ok = _raw(port, UPGRADE + _frame(b"{}", masked=False))
    assert ok.startswith(b"HTTP/1.1 101") and _close_code(ok) == 1002  # unmasked
    assert _close_code(_raw(port, UPGRADE + _frame(b"\xff\xfe"))) == 1007  # bad UTF-8
    assert _close_code(_raw(port, UPGRADE + _big_frame(2000))) == 1009  # > max_message_bytes
    assert _close_code(_raw(port, UPGRADE + _frame(b"\x03\xe8", opcode=8))) == 1000
    # A bad JSON message is an application error, not a protocol error: the
    # connection stays and gets the same error event as TCP clients.
    answer = _raw(port, UPGRADE + _frame(b"nope") + _frame(b"", opcode=8))
    assert b'"code":"bad_json"' in answer
    stats = server.stats()
    assert stats["errors"]["bad_handshake"] >= 4
    assert stats["errors"]["bad_frame"] >= 2 and stats["errors"]["too_long"] >= 1


def _big_frame(n: int) -> bytes:
    return bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") + b"\x00" * 4 + b"a" * n


def test_load_generator_drives_a_websocket_service(serve, tmp_path):
    server = serve(config=WS_AND_TCP)
    code, err, data = run_load(
        "--ws",
        *server.target(300, "web"),
        "--subscribe",
        "veg",
        *server.broadcasts(2),
        report=tmp_path / "r.json",
    )
    assert code == 0, err
    assert data["connections"]["peak"] == 300 and data["errors"] == {}
    assert [d["received"] for d in data["deliveries"]] == [300, 300]

"""Client auth (auth mode "token"): a JWT in hello, private ($) channels, hello_timeout."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from support.client import Client
from support.server import small
from support.wait import wait_for

SECRET = "a-test-secret-of-at-least-32-bytes!"


def token(sub: str = "ann", key: object = SECRET, alg: str = "HS256", **claims: object) -> str:
    return jwt.encode({"sub": sub, **claims}, key, algorithm=alg)  # type: ignore[arg-type]


def token_server(serve, *args: str):
    return small(serve, "--auth-mode", "token", *args, env={"MANYDOORS_AUTH_SECRET": SECRET})


def refused(client: Client, code: str, bye: str) -> dict:
    """The error event, then bye, then the server closes."""
    error = client.until(lambda e: e["ev"] == "error")[-1]
    assert error["code"] == code, error
    assert client.recv() == {"ev": "bye", "reason": bye}
    assert client.closed()
    return error


def test_a_valid_token_names_the_user_and_a_direct_message_reaches_it(serve, clients):
    server = token_server(serve)
    ann = clients(server.port())
    assert ann.call({"op": "hello", "token": token("ann"), "id": 1}) == {"ev": "ok", "id": 1}
    server.publish(user="ann", data={"hi": 1})
    assert ann.recv()["data"] == {"hi": 1}


@pytest.mark.parametrize(
    ("hello", "why"),
    [
        (
            {"op": "hello", "token": token("ann", key="another-secret-of-at-least-32-bytes")},
            "invalid token",
        ),
        ({"op": "hello", "token": token("ann", exp=int(time.time()) - 60)}, "token expired"),
        ({"op": "hello", "token": "not.a.jwt"}, "invalid token"),
        ({"op": "hello", "user": "ann"}, "hello needs a token"),
        ({"op": "hello", "user": "bob", "token": token("ann")}, "differs from the token"),
        ({"op": "hello", "token": jwt.encode({"u": "ann"}, SECRET)}, "invalid token"),  # no sub
    ],
)
def test_a_bad_token_gets_unauthorized_and_a_close(serve, clients, hello, why):
    server = token_server(serve)
    client = clients(server.port())
    client.send({**hello, "id": 7})
    error = refused(client, "unauthorized", "unauthorized")
    assert why in error["reason"] and error["id"] == 7
    stats = server.stats()
    assert stats["errors"]["unauthorized"] == 1 and stats["closed"]["unauthorized"] == 1


def test_ops_before_hello_are_refused_and_silence_is_closed_at_hello_timeout(serve, clients):
    server = token_server(serve, "--hello-timeout", "0.6")
    client = clients(server.port())
    assert client.call({"op": "sub", "channel": "news", "id": 1})["code"] == "unauthorized"
    assert client.call({"op": "ping", "id": 2}) == {"ev": "pong", "id": 2}
    started = time.monotonic()
    error = refused(client, "unauthorized", "hello_timeout")
    assert "no valid hello within 0.6 s" in error["reason"]
    assert time.monotonic() - started < 5
    # One that said hello in time is left alone.
    ok = clients(server.port())
    assert ok.call({"op": "hello", "token": token("bob"), "id": 1})["ev"] == "ok"
    time.sleep(1.2)
    assert ok.call({"op": "ping", "id": 2}) == {"ev": "pong", "id": 2}
    assert server.stats()["closed"]["hello_timeout"] == 1


def test_private_channels_need_the_channels_claim(serve, clients):
    server = token_server(serve)
    ann = clients(server.port())
    granted = token("ann", channels=["$team", "public"])
    assert ann.call({"op": "hello", "token": granted, "id": 1})["ev"] == "ok"
    assert ann.call({"op": "sub", "channel": "$team", "id": 2}) == {"ev": "ok", "id": 2}
    for op in (
        {"op": "sub", "channel": "$other"},
        {"op": "presence", "channel": "$other"},
        {"op": "pub", "channel": "$other", "data": 1},
    ):
        error = ann.call({**op, "id": 3})
        assert (error["ev"], error["code"]) == ("error", "forbidden"), error
    bob = clients(server.port())
    assert bob.call({"op": "hello", "token": token("bob"), "id": 1})["ev"] == "ok"
    assert bob.call({"op": "pub", "channel": "$team", "data": 1, "id": 2})["code"] == "forbidden"
    assert ann.call({"op": "pub", "channel": "$team", "data": 2, "id": 4})["ev"] == "ok"
    assert ann.recv()["data"] == 2
    # A new hello with a token without the claim takes the grant away.
    assert ann.call({"op": "hello", "token": token("ann"), "id": 5})["ev"] == "ok"
    assert ann.call({"op": "pub", "channel": "$team", "data": 3, "id": 6})["code"] == "forbidden"
    assert server.stats()["errors"]["forbidden"] == 5


def test_without_auth_private_channels_are_refused(serve, clients):
    server = small(serve)
    client = clients(server.port())
    error = client.call({"op": "sub", "channel": "$secret", "id": 1})
    assert error["code"] == "forbidden" and "auth mode token" in error["reason"]
    assert client.call({"op": "hello", "id": 2})["code"] == "missing_field"


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_tokens(serve, clients, tmp_path: Path, kind):
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    server = small(serve, "--auth-mode", "token", "--auth-public-key", str(pem))
    good = clients(server.port())
    assert good.call({"op": "hello", "token": token("ann", private, kind), "id": 1})["ev"] == "ok"

    # An HMAC token made with the public key as its secret must not pass (alg confusion).
    # PyJWT will not make one, so it is made by hand.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(b'{"sub":"eve"}')
    mac = hmac.new(pem.read_bytes(), signing, hashlib.sha256).digest()
    forged = clients(server.port())
    forged.send({"op": "hello", "token": (signing + b"." + b64(mac)).decode(), "id": 1})
    refused(forged, "unauthorized", "unauthorized")


def test_an_unreadable_public_key_stops_the_start(tmp_path: Path):
    import subprocess

    from support.server import manydoors_cmd

    bad = tmp_path / "nokey.pem"
    bad.write_text("not a key")
    for path, why in ((bad, "not a PEM public key"), (tmp_path / "missing.pem", "No such file")):
        result = subprocess.run(
            manydoors_cmd(
                "serve",
                "--port",
                "0",
                "--api-port",
                "0",
                "--auth-mode",
                "token",
                "--auth-public-key",
                str(path),
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and why in result.stderr, result.stderr


def test_websocket_token_auth(serve, tmp_path):
    import asyncio
    import json

    import websockets

    server = small(
        serve, "--protocol", "websocket", "--auth-mode", "token",
        env={"MANYDOORS_AUTH_SECRET": SECRET},
    )  # fmt: skip

    async def main() -> list[dict]:
        async with websockets.connect(f"ws://127.0.0.1:{server.port()}") as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"op": "hello", "token": token("x", exp=1), "id": 1}))
            got = [json.loads(await ws.recv()), json.loads(await ws.recv())]
            await ws.wait_closed()
            return got

    error, bye = asyncio.run(main())
    assert error["code"] == "unauthorized" and bye == {"ev": "bye", "reason": "unauthorized"}
    wait_for(lambda: server.stats()["connections"] == 0, what="closed")

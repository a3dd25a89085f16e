"""What the Python peers share: flags, the ready line, the events, the HTTP publish call.

A peer speaks the part of the manydoors protocol that ``manydoors load`` and the 1:1
driver of ``bench/peers.py`` use: ``hello``, ``sub``, ``unsub``, ``pub``, ``ping`` in;
``ok``, ``msg``, ``broadcast``, ``pong``, ``error`` out, as the same JSON objects (the
load generator's latency stamp travels inside ``data``). It sends no ``welcome``: with
``hello`` the load generator does not need one.

``POST /api/publish`` takes the body the load generator sends (``{"channel": C,
"data": D}`` or ``{"broadcast": true, "data": D}``) and answers 202 with JSON, as
manydoors does. It is served on its own port by a few lines of asyncio streams, so
the peer's own library is the only thing holding the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

# Publish to a channel (None: to every connection), return how many got it.
Publish = Callable[[str | None, str | None, Any], int]

_COMPACT = (",", ":")


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="clients (0: a free port)")
    p.add_argument("--api-port", type=int, default=0, help="HTTP publish (0: a free port)")
    p.add_argument("--backlog", type=int, default=4096, help="listen backlog (as manydoors)")
    return p.parse_args()


def announce(port: int, api_port: int, workers: list[int] | None = None) -> None:
    """The one line on stdout the bench waits for: the real ports and the serving pids."""
    ready = {"port": port, "api_port": api_port, "workers": workers or [os.getpid()]}
    print(json.dumps(ready), flush=True)


def event(channel: str | None, seq: int, sender: str | None, data: Any) -> str:
    """A ``msg`` (or, without a channel, a ``broadcast``) event, encoded once per publish."""
    if channel is None:
        body: dict[str, Any] = {"ev": "broadcast", "seq": seq, "from": sender, "data": data}
    else:
        body = {"ev": "msg", "channel": channel, "seq": seq, "from": sender, "data": data}
    return json.dumps(body, separators=_COMPACT)


def reply(kind: str, op_id: Any = None, **fields: Any) -> str:
    body = {"ev": kind, **fields}
    if op_id is not None:
        body["id"] = op_id
    return json.dumps(body, separators=_COMPACT)


_NEEDS: dict[str, tuple[str, ...]] = {
    "hello": ("user",),
    "sub": ("channel",),
    "unsub": ("channel",),
    "pub": ("channel", "data"),
    "ping": (),
}


def decode_op(line: bytes | str) -> dict[str, Any] | str:
    """The client op as a dict with its fields checked, or the ``error`` event to answer."""
    try:
        op = json.loads(line)
    except ValueError as exc:
        return reply("error", code="bad_json", reason=str(exc))
    if not isinstance(op, dict):
        return reply("error", code="not_object", reason="a message must be a JSON object")
    needs = _NEEDS.get(op.get("op"))  # type: ignore[arg-type]
    if needs is None:
        return reply("error", op.get("id"), code="unknown_op", reason=f"known: {list(_NEEDS)}")
    for field in needs:
        if field not in op or (field != "data" and not isinstance(op[field], str)):
            return reply("error", op.get("id"), code="bad_field", reason=f"{field} needed")
    return op


class Seqs:
    """Per-channel sequence numbers (None: the broadcast counter), from 1."""

    def __init__(self) -> None:
        self.last: dict[str | None, int] = {}

    def next(self, channel: str | None) -> int:
        seq = self.last[channel] = self.last.get(channel, 0) + 1
        return seq


async def start_api(host: str, port: int, publish: Publish) -> asyncio.Server:
    """``POST /api/publish`` on asyncio streams: one request per connection, then close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            status, answer = _publish(method, path, body, publish)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            status, answer = 400, {"error": "bad_request", "reason": str(exc)}
        payload = json.dumps(answer).encode()
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (status, b"Accepted" if status == 202 else b"Error", len(payload), payload)
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def _publish(method: str, path: str, body: bytes, publish: Publish) -> tuple[int, Any]:
    if method != "POST" or path.split("?")[0] != "/api/publish":
        return 404, {"error": "not_found", "reason": f"{method} {path}"}
    msg = json.loads(body)
    if not isinstance(msg, dict) or "data" not in msg:
        return 400, {"error": "bad_field", "reason": "a JSON object with data"}
    if isinstance(msg.get("channel"), str):
        channel: str | None = msg["channel"]
    elif msg.get("broadcast") is True:
        channel = None
    else:
        return 400, {"error": "bad_target", "reason": "channel or broadcast (no user here)"}
    recipients = publish(channel, msg.get("from"), msg["data"])
    return 202, {"accepted": True, "recipients": recipients}


def port_of(server: Any) -> int:
    """The bound port of an asyncio (or websockets) server."""
    return int(server.sockets[0].getsockname()[1])

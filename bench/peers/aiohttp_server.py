"""Peer 7: an ``aiohttp`` WebSocket server (asyncio's default loop, as ``run_app`` uses).

aiohttp's idiom: a ``WebSocketResponse`` per connection in a request handler that
iterates over its messages, the open sockets kept in the app, and a fan-out that
awaits ``send_str`` to each subscriber. The publish endpoint is a route of the same
app (served on a second port, so every peer has the same two ports). No heartbeat
and no compression. One process: aiohttp's multi-process deployment (gunicorn
workers) has no broadcast between workers without an external broker.

    python bench/peers/aiohttp_server.py [--port 0] [--api-port 0]
"""

from __future__ import annotations

import asyncio
from typing import Any

from _peer import Seqs, announce, decode_op, event, parse_args, reply
from aiohttp import WSMsgType, web

channels: dict[str, set[web.WebSocketResponse]] = {}
clients: set[web.WebSocketResponse] = set()
seqs = Seqs()


async def publish(channel: str | None, sender: str | None, data: Any) -> int:
    text = event(channel, seqs.next(channel), sender, data)
    subs = list(clients if channel is None else channels.get(channel, ()))
    for ws in subs:
        if not ws.closed:
            await ws.send_str(text)
    return len(subs)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=None, compress=False)
    await ws.prepare(request)
    user: str | None = None
    subs: set[str] = set()
    clients.add(ws)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            op = decode_op(msg.data)
            if isinstance(op, str):
                await ws.send_str(op)
                continue
            kind, op_id = op["op"], op.get("id")
            if kind == "hello":
                user = op["user"]
            elif kind == "sub":
                channels.setdefault(op["channel"], set()).add(ws)
                subs.add(op["channel"])
            elif kind == "unsub":
                channels.get(op["channel"], set()).discard(ws)
                subs.discard(op["channel"])
            elif kind == "pub":
                await publish(op["channel"], user, op["data"])
            if kind == "ping":
                await ws.send_str(reply("pong", op_id))
            elif op_id is not None:
                await ws.send_str(reply("ok", op_id))
    except ConnectionError:
        pass
    finally:
        clients.discard(ws)
        for name in subs:
            members = channels.get(name)
            if members is not None:
                members.discard(ws)
                if not members:
                    del channels[name]
    return ws


async def api_publish(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "bad_json"}, status=400)
    if not isinstance(body, dict) or "data" not in body:
        return web.json_response({"error": "bad_field"}, status=400)
    if isinstance(body.get("channel"), str):
        channel: str | None = body["channel"]
    elif body.get("broadcast") is True:
        channel = None
    else:
        return web.json_response({"error": "bad_target"}, status=400)
    recipients = await publish(channel, body.get("from"), body["data"])
    return web.json_response({"accepted": True, "recipients": recipients}, status=202)


async def main() -> None:
    args = parse_args(__doc__ or "")
    app = web.Application()
    app.router.add_get("/", websocket)
    app.router.add_post("/api/publish", api_publish)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=args.backlog)
    api = web.TCPSite(runner, args.host, args.api_port)
    await site.start()
    await api.start()
    announce(site.port, api.port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())

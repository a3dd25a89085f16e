"""Peer 5: the ``websockets`` library's asyncio server and its ``broadcast()``.

The library's own idiom: ``serve(handler, ...)``, one handler coroutine per connection
iterating over its messages, and ``broadcast(connections, message)`` to fan a message
out (it writes to each connection without waiting, encoding the frame per
connection). Keepalive pings are off: the load generator holds idle connections and
does not answer pings, as a real client would. No compression (the load generator
offers none). One process: the library documents running several behind a load
balancer with a broker in between, which is a different server.

    python bench/peers/websockets_server.py [--port 0] [--api-port 0]
"""

from __future__ import annotations

import asyncio
from typing import Any

from _peer import Seqs, announce, decode_op, event, parse_args, port_of, reply, start_api
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

channels: dict[str, set[ServerConnection]] = {}
clients: set[ServerConnection] = set()
seqs = Seqs()


def publish(channel: str | None, sender: str | None, data: Any) -> int:
    subs = clients if channel is None else channels.get(channel, set())
    broadcast(subs, event(channel, seqs.next(channel), sender, data))
    return len(subs)


async def handler(ws: ServerConnection) -> None:
    user: str | None = None
    subs: set[str] = set()
    clients.add(ws)
    try:
        async for message in ws:
            op = decode_op(message)
            if isinstance(op, str):
                await ws.send(op)
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
                publish(op["channel"], user, op["data"])
            if kind == "ping":
                await ws.send(reply("pong", op_id))
            elif op_id is not None:
                await ws.send(reply("ok", op_id))
    except ConnectionClosed:
        pass
    finally:
        clients.discard(ws)
        for name in subs:
            members = channels.get(name)
            if members is not None:
                members.discard(ws)
                if not members:
                    del channels[name]


async def main() -> None:
    args = parse_args(__doc__ or "")
    async with serve(
        handler,
        args.host,
        args.port,
        ping_interval=None,
        compression=None,
        backlog=args.backlog,
    ) as server:
        api = await start_api(args.host, args.api_port, publish)
        announce(port_of(server), port_of(api))
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

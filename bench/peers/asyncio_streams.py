"""Peer 3: plain asyncio NDJSON pub/sub on streams, stdlib json, default event loop.

The server a Python developer writes first: ``asyncio.start_server``, one handler
coroutine per connection reading lines, a dict of channel -> set of writers, and a
publish that writes the same encoded line to each subscriber's ``StreamWriter``.
One process (asyncio has no multi-process mode), so RLIMIT_NOFILE caps it.

    python bench/peers/asyncio_streams.py [--port 0] [--api-port 0]
"""

from __future__ import annotations

import asyncio
from typing import Any

from _peer import Seqs, announce, decode_op, event, parse_args, port_of, reply, start_api

channels: dict[str, set[asyncio.StreamWriter]] = {}
clients: set[asyncio.StreamWriter] = set()
seqs = Seqs()


def publish(channel: str | None, sender: str | None, data: Any) -> int:
    line = (event(channel, seqs.next(channel), sender, data) + "\n").encode()
    subs = clients if channel is None else channels.get(channel, set())
    for writer in subs:
        writer.write(line)
    return len(subs)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    user: str | None = None
    subs: set[str] = set()
    clients.add(writer)
    try:
        async for line in reader:
            if not line.strip():
                continue
            op = decode_op(line)
            if isinstance(op, str):
                writer.write(op.encode() + b"\n")
                continue
            kind, op_id = op["op"], op.get("id")
            if kind == "hello":
                user = op["user"]
            elif kind == "sub":
                channels.setdefault(op["channel"], set()).add(writer)
                subs.add(op["channel"])
            elif kind == "unsub":
                channels.get(op["channel"], set()).discard(writer)
                subs.discard(op["channel"])
            elif kind == "pub":
                publish(op["channel"], user, op["data"])
            if kind == "ping":
                writer.write(reply("pong", op_id).encode() + b"\n")
            elif op_id is not None:
                writer.write(reply("ok", op_id).encode() + b"\n")
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass  # reset by the peer, or a line over the stream's 64 KiB limit
    finally:
        clients.discard(writer)
        for name in subs:
            members = channels.get(name)
            if members is not None:
                members.discard(writer)
                if not members:
                    del channels[name]
        writer.close()


async def main() -> None:
    args = parse_args(__doc__ or "")
    server = await asyncio.start_server(handle, args.host, args.port, backlog=args.backlog)
    api = await start_api(args.host, args.api_port, publish)
    announce(port_of(server), port_of(api))
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

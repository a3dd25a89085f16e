"""Peer 4: the same NDJSON pub/sub as peer 3, on uvloop with an ``asyncio.Protocol``.

What a Python developer writes when streams are too slow: no task and no stream
objects per connection, just a slotted protocol whose ``data_received`` splits lines,
and a publish that calls ``transport.write`` with the same bytes for each subscriber.
One process (neither asyncio nor uvloop has a multi-process mode), so RLIMIT_NOFILE
caps it.

    python bench/peers/uvloop_protocol.py [--port 0] [--api-port 0]
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop
from _peer import Seqs, announce, decode_op, event, parse_args, port_of, reply, start_api

MAX_LINE = 65536

channels: dict[str, set[Conn]] = {}
clients: set[Conn] = set()
seqs = Seqs()


def publish(channel: str | None, sender: str | None, data: Any) -> int:
    line = (event(channel, seqs.next(channel), sender, data) + "\n").encode()
    subs = clients if channel is None else channels.get(channel, set())
    for conn in subs:
        conn.transport.write(line)
    return len(subs)


class Conn(asyncio.Protocol):
    __slots__ = ("buf", "subs", "transport", "user")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.user: str | None = None
        self.subs: set[str] = set()
        clients.add(self)

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            if line.strip():
                self.handle(line)
        if len(self.buf) > MAX_LINE:
            self.transport.close()

    def handle(self, line: bytes) -> None:
        op = decode_op(line)
        if isinstance(op, str):
            self.transport.write(op.encode() + b"\n")
            return
        kind, op_id = op["op"], op.get("id")
        if kind == "hello":
            self.user = op["user"]
        elif kind == "sub":
            channels.setdefault(op["channel"], set()).add(self)
            self.subs.add(op["channel"])
        elif kind == "unsub":
            channels.get(op["channel"], set()).discard(self)
            self.subs.discard(op["channel"])
        elif kind == "pub":
            publish(op["channel"], self.user, op["data"])
        if kind == "ping":
            self.transport.write(reply("pong", op_id).encode() + b"\n")
        elif op_id is not None:
            self.transport.write(reply("ok", op_id).encode() + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        clients.discard(self)
        for name in self.subs:
            members = channels.get(name)
            if members is not None:
                members.discard(self)
                if not members:
                    del channels[name]


async def main() -> None:
    args = parse_args(__doc__ or "")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, args.host, args.port, backlog=args.backlog)
    api = await start_api(args.host, args.api_port, publish)
    announce(port_of(server), port_of(api))
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())

"""The floor under our memory figure: a bare uvloop transport per idle connection.

    ./run bench transport_floor [bare|slots6]

A child process runs a uvloop server whose protocol does nothing (one slot, or six
like ``Connection``); the parent opens 15,000 connections and prints the child's RSS
growth per connection.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import time

import uvloop

from manydoors.node import procfs

N = 15_000


class Bare(asyncio.Protocol):
    __slots__ = ("t",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport


class Six(asyncio.Protocol):
    __slots__ = ("a", "b", "c", "d", "e", "t")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.a = self.b = self.c = self.d = self.e = None


def main() -> int:
    kind = sys.argv[1] if len(sys.argv) > 1 else "bare"
    proto = {"bare": Bare, "slots6": Six}[kind]
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    port = lsock.getsockname()[1]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:

        async def serve() -> None:
            await asyncio.get_running_loop().create_server(proto, sock=lsock)
            gc.collect()
            gc.freeze()
            os.write(w, b"x")
            await asyncio.sleep(120)

        uvloop.run(serve())
        os._exit(0)
    try:
        os.read(r, 1)
        time.sleep(0.3)
        before = procfs.rss(pid) or 0
        held = []
        for i in range(N):
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
            s.bind((f"127.0.{10 + i // 2000}.1", 0))
            s.connect(("127.0.0.1", port))
            held.append(s)
        time.sleep(2)
        print(f"{kind}: {((procfs.rss(pid) or 0) - before) / N:.0f} bytes per idle connection")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

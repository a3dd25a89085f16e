"""The load generator reads what a server sends in pieces of RECV_BYTES."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any, cast

from manydoors.loadgen.agent import RECV_BYTES, Agent, AgentOptions
from manydoors.loadgen.conns import LoadConn
from manydoors.loadgen.planner import AgentPlan


def test_a_message_longer_than_one_read_is_received_whole_once() -> None:
    async def run() -> Agent:
        opts = AgentOptions(rate=1, hello=True, subscribe="veg", connect_timeout=10, fd_limit=100)
        agent = Agent(AgentPlan(0, (), 0), opts, cast(Any, None))
        mine, server = socket.socketpair()
        mine.setblocking(False)
        conn = LoadConn(mine, 0.0)
        big = {"ev": "msg", "channel": "veg", "seq": 1, "from": None, "data": "x" * 300_000}
        lines = json.dumps(big).encode() + b"\n" + b'{"ev":"ok","id":2}\n'
        assert len(lines) > 4 * RECV_BYTES
        server.setblocking(False)
        sent = 0
        while sent < len(lines):  # the socket buffer holds less than the whole
            with contextlib.suppress(BlockingIOError):
                sent += server.send(lines[sent:])
            agent.on_readable(conn)
        for _ in range(16):
            agent.on_readable(conn)  # nothing left: EAGAIN, no error
        server.close()
        mine.close()
        return agent

    agent = asyncio.run(run())
    assert agent.received[0] == 1 and not agent.errors

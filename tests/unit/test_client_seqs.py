"""The client library's ordering of channel messages (no I/O: its dispatch alone)."""

from __future__ import annotations

import asyncio
from typing import Any

from manydoors.client import Client


def dispatched(*events: dict[str, Any], last: int | None = 3) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        client = Client("127.0.0.1", 1)
        client._subs["news"] = last
        for event in events:
            client._dispatch(event)
        out = []
        while not client._events.empty():
            out.append(client._events.get_nowait())
        return out

    return asyncio.run(run())


def msg(seq: int) -> dict[str, Any]:
    return {"ev": "msg", "channel": "news", "seq": seq, "from": None, "data": seq}


def test_duplicates_are_dropped_and_the_next_seq_passes() -> None:
    assert dispatched(msg(2), msg(3), msg(4)) == [msg(4)]


def test_a_seq_jump_while_connected_is_said_as_a_gap() -> None:
    got = dispatched(msg(4), msg(6))
    assert got == [msg(4), {"ev": "gap", "channel": "news", "since": 4, "seq": 5}, msg(6)]


def test_a_seq_0_message_of_a_node_cut_off_from_redis_is_passed_on() -> None:
    assert dispatched(msg(0), msg(0), msg(4)) == [msg(0), msg(0), msg(4)]

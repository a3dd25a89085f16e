"""The asyncio client library against real servers (and one fake for close())."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from manydoors.client import Client, ClientError
from support.wait import poll

ARGS = ("--workers", "2", "--max-connections", "100")


async def take(client: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        return [await client.next() for _ in range(n)]


def test_subscribe_publish_receive(serve):
    server = serve(*ARGS)

    async def main() -> None:
        async with (
            Client("127.0.0.1", server.port(), user="alice") as alice,
            Client("127.0.0.1", server.port()) as anon,
        ):
            await alice.subscribe("news")
            await anon.subscribe("news")
            await alice.publish("news", {"text": "hi"})
            await asyncio.to_thread(server.publish, channel="news", data=2.5)
            for c in (alice, anon):
                got = await take(c, 2)
                assert [(e["ev"], e["from"], e["data"]) for e in got] == [
                    ("msg", "alice", {"text": "hi"}),
                    ("msg", None, 2.5),
                ]
                assert got[1]["seq"] == got[0]["seq"] + 1
            await anon.unsubscribe("news")
            await alice.publish("news", "only alice")
            assert (await alice.next())["data"] == "only alice"
            await anon.publish("news", "from anon")
            assert (await alice.next())["data"] == "from anon"
            assert anon._events.empty()

    asyncio.run(main())


def test_send_dm_and_presence(serve):
    server = serve(*ARGS)

    async def main() -> None:
        port = server.port()
        async with (
            Client("127.0.0.1", port, user="alice") as alice,
            Client("127.0.0.1", port, user="bob") as bob,
            Client("127.0.0.1", port, user="bob") as bob2,
            Client("127.0.0.1", port) as anon,
        ):
            await alice.send("bob", "lunch?")
            for c in (bob, bob2):
                assert await c.next() == {"ev": "dm", "from": "alice", "data": "lunch?"}
            for c in (alice, bob, bob2, anon):
                await c.subscribe("room")
            answer = await anon.presence("room")
            assert answer["users"] == {"alice": 1, "bob": 2}
            assert answer["anonymous"] == 1
            assert "partial" not in answer

    asyncio.run(main())


def test_error_raises_client_error_and_connection_stays_usable(serve):
    server = serve(*ARGS)

    async def main() -> None:
        async with Client("127.0.0.1", server.port()) as c:
            with pytest.raises(ClientError) as info:
                await c.subscribe("x" * 129)
            assert info.value.code == "bad_field"
            with pytest.raises(ClientError):
                await c.send("", 1)
            await c.subscribe("ok")
            await c.publish("ok", 1)
            assert (await c.next())["data"] == 1
            assert c.connected and c.reconnects == 0

    asyncio.run(main())


def test_messages_survive_a_worker_crash_exactly_once_in_order(serve):
    server = serve(*ARGS)

    async def publish(values: range) -> None:
        for v in values:
            await asyncio.to_thread(server.publish, channel="news", data=v)

    async def main() -> None:
        async with Client("127.0.0.1", server.port(), user="alice", backoff=(0.05, 0.5)) as c:
            await c.subscribe("news")
            await publish(range(0, 5))
            got = await take(c, 5)
            pid = server.worker_pids()[c.welcome["worker"]]
            os.kill(pid, signal.SIGKILL)
            await poll(lambda: not c.connected, what="the client to see the crash")
            await publish(range(5, 10))  # while the client is away
            await poll(lambda: c.connected, timeout=20, what="reconnect")
            await publish(range(10, 15))
            got += await take(c, 10)
            assert [e["data"] for e in got] == list(range(15))
            seqs = [e["seq"] for e in got]
            assert seqs == list(range(seqs[0], seqs[0] + 15))
            assert {e["ev"] for e in got} == {"msg"}
            assert c.reconnects == 1
            await c.publish("news", "end")
            assert (await c.next())["data"] == "end"
            assert c._events.empty()

    asyncio.run(main())


def test_gap_event_when_history_does_not_cover_the_outage(serve):
    server = serve(*ARGS, "--history-size", "3")

    async def main() -> None:
        async with Client("127.0.0.1", server.port(), backoff=(0.05, 0.5)) as c:
            await c.subscribe("news")
            await asyncio.to_thread(server.publish, channel="news", data="before")
            first = await c.next()
            os.kill(server.worker_pids()[c.welcome["worker"]], signal.SIGKILL)
            await poll(lambda: not c.connected, what="the client to see the crash")
            for i in range(5):
                await asyncio.to_thread(server.publish, channel="news", data=i)
            await poll(lambda: c.connected, timeout=20, what="reconnect")
            gap = await c.next()
            assert gap == {"ev": "gap", "channel": "news", "since": first["seq"], "seq": 6}
            await asyncio.to_thread(server.publish, channel="news", data="after")
            after = await c.next()
            assert (after["seq"], after["data"]) == (7, "after")

    asyncio.run(main())


def test_close_stops_reconnecting():
    async def main() -> None:
        accepted = 0

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # A server that welcomes and hangs up at once: the client keeps coming back.
            nonlocal accepted
            accepted += 1
            writer.write(b'{"ev":"welcome","conn":"1-1","service":"fake","worker":0}\n')
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        fake = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        c = Client("127.0.0.1", port, backoff=(0.01, 0.02))
        await c.connect()
        await poll(lambda: accepted >= 3, what="reconnect attempts")
        await c.close()
        seen = accepted
        await asyncio.sleep(0.2)  # 10x the backoff cap: any reconnect would show
        assert accepted == seen
        assert not c.connected
        with pytest.raises(ConnectionError):
            await c.publish("news", 1)
        assert [e async for e in c] == []
        fake.close()
        await fake.wait_closed()

    asyncio.run(main())

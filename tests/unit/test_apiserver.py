"""The API's doors (server/apiserver.py): header and keep-alive timeouts, the cap, 408, 503.

A small aiohttp app behind ``Doors`` in this process, on uvloop as in the supervisor,
and raw sockets on 127.0.0.1 that send what a browser would not: half a head, a head a
byte at a time, half a body. A whole node behind the same doors is in
tests/live/test_server_api.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from aiohttp import web

from manydoors.config import ApiConfig, AuthConfig
from manydoors.server.api import start_api
from manydoors.server.apiserver import (
    API_FD_RESERVE,
    FDS_PER_WORKER,
    MIN_API_CONNECTIONS,
    Doors,
    DoorsSite,
    api_cap,
)
from support.wait import poll

HALF = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # no blank line: the head never ends
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
SLACK = 1.0  # a deadline fires this much late at most on a loaded test machine


@asynccontextmanager
async def api(
    cap: int = 100, header: float = 0.3, keepalive: float = 5.0
) -> AsyncIterator[tuple[Doors, int, asyncio.Event]]:
    """Doors over an app with /healthz and /hold (which waits for the event); the port."""
    doors = Doors(cap, header, keepalive)
    release = asyncio.Event()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def hold(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"held": True})

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(middlewares=[doors.track, doors.read_body])
    app.add_routes([web.get("/healthz", healthz), web.get("/hold", hold), web.post("/echo", echo)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = DoorsSite(runner, "127.0.0.1", 0, doors)
    await site.start()
    try:
        yield doors, runner.addresses[0][1], release
    finally:
        release.set()
        await runner.cleanup()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 30))


async def connect(port: int, data: bytes = b"") -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def closed_in(reader: asyncio.StreamReader, within: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection (and what it sent before)."""
    start = time.monotonic()
    got = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return time.monotonic() - start, got


async def answer(port: int, request: bytes = GET) -> bytes:
    reader, writer = await connect(
        port, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    )
    try:
        _, got = await closed_in(reader, 10)
        return got
    finally:
        writer.close()


def test_a_half_sent_head_is_closed_after_the_header_timeout() -> None:
    async def test() -> None:
        async with api(header=0.5) as (doors, port, _):
            reader, writer = await connect(port, HALF)
            took, got = await closed_in(reader, 0.5 + SLACK)
            assert took >= 0.45 and got == b""
            assert doors.stats()["timed_out"] == 1 and doors.stats()["connections"] == 0
            writer.close()

    run(test)


def test_a_head_sent_a_byte_at_a_time_gets_no_more_time() -> None:
    async def test() -> None:
        async with api(header=0.5) as (doors, port, _):
            reader, writer = await connect(port)
            start = time.monotonic()
            closed = asyncio.ensure_future(closed_in(reader, 0.5 + SLACK))
            for byte in HALF * 10:
                if closed.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)
            await closed
            assert time.monotonic() - start < 0.5 + SLACK
            assert doors.stats()["timed_out"] == 1
            writer.close()

    run(test)


def test_a_keep_alive_connection_idles_for_keepalive_then_its_next_head_gets_header_timeout() -> (
    None
):
    async def test() -> None:
        async with api(header=0.4, keepalive=1.5) as (doors, port, _):
            reader, writer = await connect(port, GET)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readexactly(len(b'{"status": "ok"}'))
            await asyncio.sleep(0.6)  # idle longer than header_timeout: still open
            assert doors.stats()["connections"] == 1
            writer.write(HALF)  # the next head starts, and never ends
            took, _ = await closed_in(reader, 0.4 + SLACK)
            assert took < 0.4 + SLACK and doors.stats()["timed_out"] == 1
            writer.close()
            # Idle after a response and silent: closed after keepalive_timeout.
            reader, writer = await connect(port, GET)
            await reader.readuntil(b"\r\n\r\n")
            took, _ = await closed_in(reader, 1.5 + SLACK)
            assert took >= 1.2 and doors.stats()["timed_out"] == 2
            writer.close()

    run(test)


def test_at_the_cap_a_new_connection_closes_the_oldest_waiting_one_and_is_answered() -> None:
    async def test() -> None:
        async with api(cap=3, header=30) as (doors, port, _):
            flood = [await connect(port, HALF) for _ in range(3)]
            await poll(lambda: doors.stats()["connections"] == 3)
            assert b'"ok"' in await answer(port)  # the oldest half head made room
            took, _ = await closed_in(flood[0][0], 2)
            assert took < 2 and doors.stats()["evicted"] == 1
            for reader, writer in flood[1:]:
                assert not reader.at_eof()
                writer.close()
            writer = flood[0][1]
            writer.close()

    run(test)


def test_at_the_cap_with_every_connection_in_a_request_a_new_one_gets_503() -> None:
    async def test() -> None:
        async with api(cap=2, header=30) as (doors, port, release):
            held = [await connect(port, b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(2)]
            await poll(lambda: doors.stats()["connections"] == 2 and not doors.waiting)
            got = await answer(port)
            assert got.startswith(b"HTTP/1.1 503") and b'"error":"busy"' in got
            assert doors.stats()["refused"] == 1
            release.set()
            for reader, writer in held:
                assert b'"held": true' in await reader.readuntil(b"}")
                writer.close()

    run(test)


def test_a_body_not_sent_within_the_header_timeout_gets_408_and_a_close() -> None:
    async def test() -> None:
        async with api(header=0.5) as (_, port, _release):
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
            reader, writer = await connect(port, head + b"abc")
            took, got = await closed_in(reader, 1.0 + SLACK)
            assert got.startswith(b"HTTP/1.1 408") and took >= 0.45
            writer.close()
            whole = await answer(port, head + b"0123456789")
            assert whole.endswith(b"0123456789")

    run(test)


@pytest.mark.parametrize(
    ("limit", "in_use", "workers", "cap"),
    [
        (20_000, 120, 53, 20_000 - 120 - API_FD_RESERVE - 53 * FDS_PER_WORKER),
        (1024, 40, 2, 1024 - 40 - API_FD_RESERVE - 2 * FDS_PER_WORKER),
        (256, 40, 2, MIN_API_CONNECTIONS),  # never none at all
    ],
)
def test_the_default_cap_keeps_the_reserve_and_fds_for_each_worker(
    limit: int, in_use: int, workers: int, cap: int
) -> None:
    assert api_cap(limit, in_use, workers) == cap


class FakeBroker:
    status = "ok"


class FakeNode:
    """The node as /healthz and /api/stream see it: two workers up, no stats."""

    broker = FakeBroker()
    stopping = False

    def stats(self) -> dict[str, Any]:
        return {}

    def workers(self) -> tuple[int, int]:
        return 2, 2

    def queued_to_workers(self) -> int:
        return 0


def test_streams_take_at_most_half_the_api_and_healthz_still_answers() -> None:
    async def test() -> None:
        config = ApiConfig(port=0, max_connections=4)
        runner, port = await start_api(FakeNode(), config, AuthConfig())  # type: ignore[arg-type]
        streams = []
        try:
            for _ in range(2):
                reader, writer = await connect(port, b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                streams.append(writer)
            third = await answer(port, b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert third.startswith(b"HTTP/1.1 503") and b'"busy"' in third
            assert b'"status":"ok"' in await answer(port)
        finally:
            for writer in streams:
                writer.close()
            await runner.cleanup()

    run(test)

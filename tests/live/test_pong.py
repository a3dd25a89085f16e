"""Our own clients answer the server's heartbeat, so a quiet connection stays up.

The server pings a connection quiet for ping_interval with ``{"ev":"ping"}`` and
closes it if nothing arrives within ping_timeout; the load generator and the client
library answer ``{"op":"pong"}``. Short intervals make a few rounds pass quickly.
"""

from __future__ import annotations

import asyncio

import pytest

from manydoors.client import Client
from support.server import run_load
from support.wait import wait_for

HEARTBEAT = ("--ping-interval", "0.3", "--ping-timeout", "0.6")


@pytest.mark.parametrize("ws", [False, True], ids=["tcp", "ws"])
def test_load_generator_answers_pings_and_keeps_its_connections(serve, tmp_path, ws):
    proto = ("--protocol", "websocket") if ws else ()
    server = serve("--workers", "1", "--max-connections", "1000", *proto, *HEARTBEAT)
    code, err, report = run_load(
        *(["--ws"] if ws else []),
        *server.target(50),
        "--subscribe",
        "veg",
        "--hold",
        "3",  # ten ping intervals; unanswered, the connections would go after 0.9 s
        report=tmp_path / "report.json",
    )
    assert code == 0, err
    assert report["connections"]["final"] == 50 and not report["errors"]
    stats = server.stats()
    assert stats["pings"] >= 50 * 3
    assert stats["closed"]["ping_timeout"] == 0


def test_client_library_answers_pings(serve):
    server = serve("--workers", "1", *HEARTBEAT)

    async def main() -> None:
        async with Client("127.0.0.1", server.port(), user="alice") as alice:
            await alice.subscribe("news")
            await asyncio.to_thread(
                wait_for, lambda: server.stats()["pings"] >= 5, 10, "five pings"
            )
            assert alice.connected and alice.reconnects == 0
            await alice.publish("news", "still here")
            async with asyncio.timeout(10):
                assert (await alice.next())["data"] == "still here"

    asyncio.run(main())
    assert server.stats()["closed"]["ping_timeout"] == 0

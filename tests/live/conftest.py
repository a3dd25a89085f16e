"""Fixtures that start real things: servers, clients of them, redis-server.

Every test in tests/live is marked ``live``. Every fixture stops what it started in
its finalizer, even when the test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.client import Client
from support.redisfix import RedisCluster, RedisServer, need_redis
from support.server import Server, launch

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.live)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``manydoors serve`` with the given flags (and optional TOML text)."""
    started: list[Server] = []

    def start(
        *args: str, config: str | None = None, env: dict[str, str] | None = None, chat: bool = True
    ) -> Server:
        server = launch(tmp_path, len(started), *args, config=config, env=env, chat=chat)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Connect blocking NDJSON clients (``Client``'s arguments); all closed at the end."""
    made: list[Client] = []

    def connect(port: int, **kwargs: Any) -> Client:
        client = Client(port, **kwargs)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh standalone redis-server for one test (skipped/failed without Redis)."""
    need_redis()
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """A three-node Redis cluster shared by the tests of one module."""
    need_redis()
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

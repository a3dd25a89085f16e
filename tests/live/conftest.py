"""Fixtures that start real things: servers, clients of them, redis-server.

Every test in tests/live is marked ``live``. Every fixture stops what it started in
its finalizer, even when the test fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.client import Client
from support.nodefix import need_node
from support.pusherfix import Peers, PusherBackend, node_config
from support.redisfix import RedisCluster, RedisServer, need_redis
from support.server import Server, launch

HERE = Path(__file__).parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


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
        *args: str,
        config: str | None = None,
        env: dict[str, str] | None = None,
        chat: bool = True,
        nofile: int | None = None,
    ) -> Server:
        server = launch(
            tmp_path, len(started), *args, config=config, env=env, chat=chat, nofile=nofile
        )
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


@pytest.fixture
def pusher_backend() -> Iterator[PusherBackend]:
    """The Pusher apps' backend: auth endpoints, webhooks, a page for Chromium."""
    backend = PusherBackend()
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def pusher_node(pusher_backend: PusherBackend, serve: Callable[..., Server]) -> Server:
    """A node with a ``pusher`` service (two workers) and the apps of support/pusherfix.

    The backend is set up before ``serve`` so that it outlives the server: the node's
    last webhooks (channel_vacated) are delivered while it stops, not retried for 3 s.
    """
    return serve(config=node_config(pusher_backend.url + "/pusher/webhook"), chat=False)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """Node peers (pusher-js, Laravel Echo): each one ended in the finalizer."""
    need_node()
    started = Peers(tmp_path)
    try:
        yield started
    finally:
        started.close_all()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Debian's headless Chromium through its chromedriver (Selenium), quit at the end."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        message = f"{' and '.join(missing)} not installed: apt-get install chromium chromium-driver"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    # The paths are given, so Selenium Manager has nothing to find; offline in any case.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1440,1000",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
        options=options,
    )
    try:
        yield driver
    finally:
        driver.quit()

"""A real HTTP backend for the hook tests: an aiohttp app on 127.0.0.1 in a thread.

It goes down (its port closes: calls are refused) and comes back up on the same port.
Subclasses say which path they serve and how they answer (``handle``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class HttpBackend:
    path = "/"

    def __init__(self) -> None:
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _do(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def up(self) -> None:
        self._do(self._up())

    async def _up(self) -> None:
        app = web.Application()
        self.routes(app)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    def down(self) -> None:
        """Close the port (the next calls are refused) and every connection."""
        if self.runner is not None:
            self._do(self.runner.cleanup())
            self.runner = None

    def close(self) -> None:
        self.down()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def routes(self, app: web.Application) -> None:
        """The paths served: ``path`` by ``handle`` unless a subclass says more."""
        app.router.add_post(self.path, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

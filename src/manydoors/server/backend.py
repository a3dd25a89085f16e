"""The HTTP client of a worker's proxy hooks (see ``proxies.py``): aiohttp.

Imported by ``Proxies`` on its first call, never when the worker module loads: the
fork server preloads the worker without aiohttp. One ``ClientSession`` per worker,
made here on the loop that uses it, keeps connections to the backend alive between
calls.
"""

from __future__ import annotations

from typing import Final

import aiohttp

USER_AGENT: Final = "manydoors-proxy"
MAX_ANSWER: Final = 64 * 1024  # bytes of a backend's answer read at most


class HttpClient:
    """POSTs JSON to the backend; errors become OSError or TimeoutError."""

    __slots__ = ("session",)

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"}
            )
        try:
            async with self.session.post(
                url, data=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                got = await resp.content.read(MAX_ANSWER)
                return resp.status, got
        except aiohttp.ClientError as exc:
            raise OSError(str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

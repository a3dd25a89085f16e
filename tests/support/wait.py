"""Wait for a condition with a deadline instead of sleeping: blocking and asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

INTERVAL = 0.02  # seconds between two looks at the condition


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(INTERVAL)


async def poll(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """``wait_for`` inside an event loop: sleeps with asyncio, so the loop keeps running."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(INTERVAL)
    return value

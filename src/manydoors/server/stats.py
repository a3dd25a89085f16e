"""Per-worker counters in shared memory.

Each worker writes only its own row, so no lock is needed; the supervisor reads all
rows for /api/stats and /metrics, and workers read the CONNECTIONS column to enforce
the service-wide ``max_connections`` without a round trip. Columns are stored
contiguously (column-major) so that summing one column is a single slice.
"""

from __future__ import annotations

from typing import Final

from ..protocol.messages import ERROR_CODES

REFUSED: Final = ("server_full", "worker_full", "per_ip", "per_user")
CLOSED: Final = (
    "bad_input",  # max_bad_messages in a row (rate_limited ones included)
    "slow",
    "unauthorized",
    "hello_timeout",
    "read_timeout",
    "ping_timeout",
)
# Connections that ended in an error the server did not cause (connection_lost with an
# exception): a peer's reset, a kernel timeout (keepalive), anything else.
LOST: Final = ("reset", "timed_out", "error")
COUNTERS: Final = (
    "connections",
    "accepted",
    *(f"refused_{r}" for r in REFUSED),
    "messages_in",
    "messages_out",
    "dropped",
    "throttled",  # times reading was paused for max_bytes_per_second
    "pings",
    *(f"closed_{r}" for r in CLOSED),
    *(f"lost_{r}" for r in LOST),
    *(f"error_{code}" for code in ERROR_CODES),
)
COL: Final = {name: i for i, name in enumerate(COUNTERS)}
CONNECTIONS: Final = COL["connections"]


class StatsTable:
    """A view over a shared ``array('q')``-like buffer of ``rows x len(COUNTERS)``."""

    __slots__ = ("mv", "rows")

    def __init__(self, buffer: memoryview, rows: int) -> None:
        self.mv = buffer.cast("B").cast("q")
        self.rows = rows
        if len(self.mv) < rows * len(COUNTERS):
            raise ValueError("stats buffer too small")

    @staticmethod
    def size(rows: int) -> int:
        return rows * len(COUNTERS)

    def index(self, counter: int, row: int) -> int:
        return counter * self.rows + row

    def row(self, row: int) -> dict[str, int]:
        return {name: int(self.mv[i * self.rows + row]) for i, name in enumerate(COUNTERS)}

    def total(self, counter: int) -> int:
        start = counter * self.rows
        return sum(self.mv[start : start + self.rows])

    def clear_row(self, row: int) -> dict[str, int]:
        """Zero a dead worker's row, returning what it held (to keep totals cumulative)."""
        before = self.row(row)
        for i in range(len(COUNTERS)):
            self.mv[i * self.rows + row] = 0
        return before

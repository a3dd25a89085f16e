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
    "disconnected",  # by the HTTP API (POST /api/disconnect), whatever reason its bye gave
    "expired",  # its credentials (a JWT's exp, the connect proxy's expire_at) ran out
)
# Calls to the application's backend (proxies), by hook and outcome: ok (allowed),
# refused (the backend said no), unavailable (timeout, refused connection, 5xx, bad
# answer, or too many calls waiting).
HOOKS: Final = ("connect", "subscribe", "publish")
HOOK_OUTCOMES: Final = ("ok", "refused", "unavailable")
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
    *(f"hook_{h}_{o}" for h in HOOKS for o in HOOK_OUTCOMES),
    # Gauges, the worst since the worker started (a starved worker or broker shows here;
    # issue 18's no_answer stall): how late its sweep timer fired, and how long acks
    # held for the broker (a hello's, a sub's, and the welcomes with them) waited.
    "loop_lag_max_ms",
    "sync_wait_max_ms",
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


class Counters:
    """One worker's row of the table, with the index of every counter it bumps.

    Hot paths bump ``mv[i_x] += n`` directly (no method call per message); the parts
    of a worker share this one object.
    """

    __slots__ = (
        "i_accepted",
        "i_closed",
        "i_conn",
        "i_dropped",
        "i_error",
        "i_hook",
        "i_in",
        "i_lag",
        "i_lost",
        "i_out",
        "i_pings",
        "i_refused",
        "i_sync_wait",
        "i_throttled",
        "mv",
        "table",
    )

    def __init__(self, table: StatsTable, row: int) -> None:
        ix = {name: table.index(col, row) for name, col in COL.items()}
        self.table = table
        self.mv = table.mv
        self.i_conn = ix["connections"]
        self.i_accepted = ix["accepted"]
        self.i_in = ix["messages_in"]
        self.i_out = ix["messages_out"]
        self.i_dropped = ix["dropped"]
        self.i_throttled = ix["throttled"]
        self.i_pings = ix["pings"]
        self.i_lag = ix["loop_lag_max_ms"]
        self.i_sync_wait = ix["sync_wait_max_ms"]
        self.i_refused = {r: ix[f"refused_{r}"] for r in REFUSED}
        self.i_closed = {r: ix[f"closed_{r}"] for r in CLOSED}
        self.i_lost = {r: ix[f"lost_{r}"] for r in LOST}
        self.i_error = {code: ix[f"error_{code}"] for code in ERROR_CODES}
        self.i_hook = {(h, o): ix[f"hook_{h}_{o}"] for h in HOOKS for o in HOOK_OUTCOMES}

    def error(self, code: str) -> None:
        """Count an error event sent to a client."""
        self.mv[self.i_error[code]] += 1

    def hook(self, hook: str, outcome: str) -> None:
        """Count one call to the backend's ``hook`` that ended in ``outcome``."""
        self.mv[self.i_hook[hook, outcome]] += 1

    def worst(self, i: int, seconds: float) -> None:
        """Keep the larger of a gauge (``i``) and ``seconds``, in ms."""
        ms = int(seconds * 1000)
        if ms > self.mv[i]:
            self.mv[i] = ms

    def connections(self) -> int:
        """Open connections of the whole service (every worker's row)."""
        return self.table.total(CONNECTIONS)

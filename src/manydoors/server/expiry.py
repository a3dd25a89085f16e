"""Credentials that expire: warn a connection before, close it when the time passes.

A connection's credentials end at the ``exp`` of its JWT (auth mode "token") or the
``expire_at`` the connect proxy answered (mode "proxy"). A while before (a quarter of
the lifetime, at most ``WARN_S``) it gets ``{"ev":"refresh","in":<seconds>}``; a
``refresh`` op with new credentials moves its end; else it is closed with
``bye expired`` once the end has passed.

Memory: only connections with an end are in ``ends`` (a dict, no slot on every
connection); the warnings and the ends are deadlines grouped per tick (``Deadlines``),
each checked against ``ends`` when due, so a renewed or closed connection's old
deadlines fall through. Ticks drift behind wall time under load, so a due end is
checked against the wall clock and put back if it has not come yet: a connection is
never closed early.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from ..protocol.messages import refresh_line
from .deadlines import Deadlines
from .peer import Peer

WARN_S: Final = 30.0  # seconds before the end the warning comes, at most
SLACK: Final = 1024  # stale deadline entries tolerated beyond the live ones


class Expiry:
    """The ends of one worker's connections' credentials."""

    __slots__ = ("close", "ends", "expire_due", "stale", "tick_s", "wall", "warn_due")

    def __init__(
        self,
        tick_s: float,
        close: Callable[[Peer], None],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.tick_s = tick_s
        self.close = close  # says bye expired and closes
        self.wall = wall
        # (end in unix seconds, the tick of its deadline), only connections that have one.
        self.ends: dict[Peer, tuple[float, int]] = {}
        self.warn_due = Deadlines()
        self.expire_due = Deadlines()
        # Deadline entries of connections closed or renewed since: they would hold closed
        # connections until their (maybe hours away) tick, so past a bound they are dropped.
        self.stale = 0

    def _ticks(self, seconds: float) -> int:
        return max(1, math.ceil(seconds / self.tick_s))

    def set(self, conn: Peer, end: float | None, tick: int) -> None:
        """``conn``'s credentials end at ``end`` (None: never) from now on."""
        if end is None:
            self.forget(conn)
            return
        if conn in self.ends:
            self._staled()
        left = end - self.wall()
        warn = left - min(WARN_S, left / 4)
        due = tick + self._ticks(left)
        self.ends[conn] = (end, due)
        self.warn_due.add(tick + self._ticks(warn), conn)
        self.expire_due.add(due, conn)

    def forget(self, conn: Peer) -> None:
        if self.ends.pop(conn, None) is not None:
            self._staled()

    def _staled(self) -> None:
        """Two deadline entries (warning, end) no longer count: compact now and then."""
        self.stale += 2
        if self.stale > 2 * len(self.ends) + SLACK:
            ends = self.ends
            self.warn_due.queue = deque(
                (tick, kept)
                for tick, conns in self.warn_due.queue
                if (kept := [c for c in conns if c in ends])
            )
            self.expire_due.queue = deque(
                (tick, kept)
                for tick, conns in self.expire_due.queue
                if (kept := [c for c in conns if c in ends and ends[c][1] == tick])
            )
            self.stale = 0

    def sweep(self, tick: int) -> None:
        """Warn and close whoever is due at ``tick``."""
        if not self.ends:
            self.warn_due.queue.clear()
            self.expire_due.queue.clear()
            self.stale = 0
            return
        now = self.wall()
        ends = self.ends
        soon = WARN_S + self.tick_s
        for conn in self.warn_due.due(tick):
            got = ends.get(conn)
            # (A connection renewed since has a later end: its own warning comes then.)
            if got is not None and conn.transport is not None and now < got[0] <= now + soon:
                conn.write(refresh_line(math.ceil(got[0] - now)))
        later: list[tuple[Peer, float]] = []
        for conn in self.expire_due.due(tick):
            got = ends.get(conn)
            if got is None or got[1] != tick or conn.transport is None:
                continue  # gone, or renewed since (its new end has its own deadline)
            if got[0] > now:  # the ticks ran behind the wall clock: not yet
                later.append((conn, got[0]))
            else:
                del ends[conn]
                self.close(conn)
        for conn, end in later:
            due = tick + self._ticks(end - now)
            ends[conn] = (end, due)
            self.expire_due.add(due, conn)

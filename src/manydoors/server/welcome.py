"""A welcome that waits for the first acks, so a new connection's answers are one write.

A client that speaks first (``manydoors load``, a reconnecting client resuming its
subscriptions) sends its hello and subs right behind its connect. Their acks wait for
the broker (``Sessions.when_applied``), so the welcome went out in one write and the
acks a round trip later in another. On loopback a write is the whole TCP path of
both ends, and in a ramp profile the two writes were 43 % of a worker's CPU.

So a new connection's welcome waits: its transport is swapped for a :class:`Held`,
which queues every write (acks, a fan-out, an error, a bye) behind the welcome, in
order. uvloop makes a burst of accepted connections before it reads any of them, so
the welcome first waits one loop iteration (``Welcomes.settle``), in which a hello
sent right behind the connect is read. Then, if the worker has interest frames for
the broker (a ramp of hellos always has: each new user is a USER_ON), it waits for
the SYNCED that releases the acks and writes all of it at once; otherwise it goes
out then. A client that waits for its welcome before it speaks waits one loop
iteration more, or one broker round trip while the worker is waiting on one anyway.
Pusher's ``connection_established`` is never held: a Pusher client says nothing
before it.

Measured with the floor's C client ramping 150,000 connections: see
docs/benchmarks.md, issue 18.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .peer import Peer
    from .sessions import Sessions


class Held:
    """Stands in for a connection's transport while its welcome waits."""

    __slots__ = ("out", "real")

    def __init__(self, real: asyncio.Transport, first: bytes) -> None:
        self.real = real
        self.out: list[bytes] | None = [first]  # None once written

    def write(self, data: bytes) -> None:
        if self.out is None:
            self.real.write(data)
        else:
            self.out.append(data)

    def flush(self) -> None:
        """Write what waited, in one write; from here on writes go straight through."""
        out, self.out = self.out, None
        if out:
            self.real.write(b"".join(out))

    def close(self) -> None:
        self.flush()  # a bye or a refusal, behind the welcome
        self.real.close()

    def abort(self) -> None:
        self.out = None
        self.real.abort()

    def get_write_buffer_size(self) -> int:
        waiting = sum(map(len, self.out)) if self.out else 0
        return self.real.get_write_buffer_size() + waiting

    def __getattr__(self, name: str) -> Any:
        # pause_reading, get_extra_info, is_closing...: the real transport's own
        return getattr(self.real, name)


class Welcomes:
    """One worker's held welcomes: each waits one loop iteration, then for the broker's
    round trip if the worker has one to wait for."""

    __slots__ = ("due", "sessions", "soon")

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        # How ``settle`` is scheduled: the worker's loop.call_soon, set when it runs
        # (a test without a loop calls ``settle`` itself).
        self.soon: Callable[[Callable[[], None]], object] | None = None
        self.due: list[tuple[Peer, Held, asyncio.Transport]] = []

    def hold(self, conn: Peer, welcome: bytes) -> bool:
        """Hold ``conn``'s welcome (an event line); False: write it now."""
        transport = conn.transport
        if transport is None:
            return False
        held = Held(transport, self.sessions.frame(welcome))
        conn.transport = cast(asyncio.Transport, held)
        if not self.due and self.soon is not None:
            self.soon(self.settle)  # once a burst
        self.due.append((conn, held, transport))
        return True

    def settle(self) -> None:
        """An iteration later: with the broker's round trip to come, the welcomes wait
        for it (behind the acks that are waiting already); else they go out now."""
        due, self.due = self.due, []
        sessions = self.sessions
        wait = sessions.dirty or bool(sessions.unsynced)
        for conn, held, transport in due:
            if wait:
                sessions.when_applied(conn, functools.partial(_release, conn, held, transport))
            else:
                _release(conn, held, transport)


def _release(conn: Peer, held: Held, transport: asyncio.Transport) -> None:
    if conn.transport is cast(asyncio.Transport, held):  # else closed meanwhile
        conn.transport = transport
        held.flush()

"""A welcome that waits for the first acks, so a new connection's answers are one write.

A client that speaks first (``manydoors load``, a reconnecting client resuming its
subscriptions) sends its hello and subs right behind its connect. Their acks wait for
the broker (``Sessions.when_applied``), so the welcome went out in one write and the
acks a round trip later in another. On loopback a write is the whole TCP path of
both ends, and in a ramp profile the two writes were 43 % of a worker's CPU.

So while the worker has interest frames not yet sent to the broker (a ramp of hellos
always has: each new user is a USER_ON), a new connection's welcome waits with them:
the connection's transport is swapped for a :class:`Held`, which queues every write
(acks, a fan-out, an error, a bye) behind the welcome, in order, and the broker's
SYNCED that releases the acks writes all of it at once. A worker with nothing waiting
writes the welcome at once, as before: a held welcome costs a client that waits for
it one broker round trip, and only while the worker is already waiting on one.
Pusher's ``connection_established`` is never held: a Pusher client says nothing
before it.

Measured with the floor's C client ramping 150,000 connections into 8 workers: see
docs/benchmarks.md, issue 18.
"""

from __future__ import annotations

import asyncio
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


def hold(sessions: Sessions, conn: Peer, welcome: bytes) -> bool:
    """Hold ``conn``'s welcome (an event line) until the broker's next SYNCED, if the
    worker is waiting for one anyway; False: write it now."""
    transport = conn.transport
    if transport is None or not (sessions.dirty or sessions.unsynced):
        return False
    held = Held(transport, sessions.frame(welcome))
    conn.transport = cast(asyncio.Transport, held)

    def release() -> None:
        if conn.transport is cast(asyncio.Transport, held):  # else closed meanwhile
            conn.transport = transport
            held.flush()

    sessions.when_applied(conn, release)
    return True

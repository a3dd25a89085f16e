"""Connections by the tick of a deadline (the clock's hello and handshake queues,
the ends of credentials): no timer per connection, one sweep per tick."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .peer import Peer


class Deadlines:
    """Connections by the tick of their deadline, in tick order.

    Grouped per tick: a connection costs one list slot (8 bytes) rather than a
    (tick, connection) tuple (64 bytes), which a whole ramp of WebSocket handshakes
    held for read_timeout and then left behind as heap fragments: 1,660 -> 1,600 B a
    connection at 40,000 (``./run bench memory --connections 40000 --ws``).
    """

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: deque[tuple[int, list[Peer]]] = deque()

    def add(self, tick: int, conn: Peer) -> None:
        queue = self.queue
        if queue and queue[-1][0] == tick:
            queue[-1][1].append(conn)
        else:
            queue.append((tick, [conn]))

    def due(self, now: int) -> Iterator[Peer]:
        """Take the connections whose deadline has come."""
        queue = self.queue
        while queue and queue[0][0] <= now:
            yield from queue.popleft()[1]

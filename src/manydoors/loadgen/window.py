"""How many connections one load process keeps waiting for the server's answer.

A fixed window (512 a process, 26,000 over the 51 processes of a 1M run) is a queue
that a server greeting fewer than window / connect timeout connections a second can
never drain in time: at 2,600 answers/s the connection at the back of it waits 10 s
and counts ``no_answer`` though the server answers every one (issue 18: ``c1m --ws``
lost 87,144 of 1M this way). So the window adapts on the answers' latency, as TCP's
congestion window does on its round trips: an answer slower than a quarter of the
connect timeout halves it (once per such interval), a fast one (under an eighth)
widens it by one, between ``floor`` and ``ceiling``. A server that keeps up never
sees it move off the ceiling.
"""

from __future__ import annotations

from typing import Final

CEILING: Final = 512  # connects and unanswered greetings outstanding per process, at most
FLOOR: Final = 16


class Window:
    __slots__ = ("cut_at", "fast", "size", "slow")

    def __init__(self, connect_timeout: float) -> None:
        self.size = CEILING  # wide from the start: an idle server answers the first burst
        self.slow = connect_timeout / 4
        self.fast = connect_timeout / 8
        self.cut_at = float("-inf")  # when the window was last halved

    def answered(self, latency: float, now: float) -> None:
        """An answer came ``latency`` seconds after its connect (``now``: the clock)."""
        if latency > self.slow:
            if now - self.cut_at > self.slow:  # one cut per interval, as TCP per RTT
                self.size = max(FLOOR, self.size // 2)
                self.cut_at = now
        elif latency < self.fast and self.size < CEILING:
            self.size += 1

"""Reconnecting like real clients (``manydoors load --reconnect``): backoff and resume.

No I/O here: the agent opens and closes the sockets; this module decides when a dropped
connection dials again, what its subscription asks for, and checks what arrives.

- **When.** Every drop (a close, a reset, a ``bye``, no answer, a refused connect)
  schedules the next dial after a *full jitter* exponential backoff: a delay drawn
  uniformly in ``[0, min(cap, base * 2**attempt))``. The attempt count starts at 0 on a
  drop of a connection that was ready and is reset when it is ready again (hello and
  subscription answered). Drawing the whole delay at random, rather than adding a little
  jitter to a fixed delay, is what spreads a million clients dropped at the same instant
  over the window instead of bringing them back in synchronised waves.
- **Resume.** A connection remembers the channel's last ``seq`` it saw (one int) and
  subscribes again with ``since`` = that seq, so history fills in what was published
  while it was away (docs/protocol.md, ``sub`` with ``since``).
- **Exactly once.** Each ``msg`` seq must be the one after the last: a smaller or equal
  one is a repeat, a larger one a gap (counted by the seqs skipped); a recovery the
  server could not make (``recovered: false``) is counted, and the seqs it skips as gaps.
  Seq 0 is a message a node cut off from Redis delivered unsequenced (outside the
  channel's order, in no history: docs/scale-out.md): counted apart, the resume point
  stays where it was.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from .conns import Redialed
from .planner import AgentPlan, Lane

BASE_S: Final = 0.5
CAP_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full jitter exponential backoff: the delay before attempt n is U(0, min(cap, base*2^n))."""

    base: float = BASE_S
    cap: float = CAP_S

    def __post_init__(self) -> None:
        if not (self.base > 0 and math.isfinite(self.base)):
            raise ValueError(f"backoff base must be a positive number of seconds: {self.base}")
        if not (self.cap >= self.base and math.isfinite(self.cap)):
            raise ValueError(f"backoff cap ({self.cap}) must be at least its base ({self.base})")

    def window(self, attempt: int) -> float:
        """The longest delay before ``attempt`` (0 for the first dial after a drop)."""
        # min() before the power would still overflow a float for a huge attempt count.
        return min(self.cap, self.base * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, draw: float) -> float:
        """The delay for ``draw`` in [0, 1) (``random.random()``)."""
        return draw * self.window(attempt)


def sub_op(channel: str, since: int) -> bytes:
    """The ``sub`` op (id 2); with ``since`` when the connection has seen a seq."""
    op: dict[str, Any] = {"op": "sub", "channel": channel, "id": 2}
    if since:
        op["since"] = since
    return msgspec.json.encode(op)


class Redial:
    """One load process's dropped connections: when each dials again, and what arrived.

    Only connections in between are held here: ``queue`` (waiting out their backoff) and
    ``tries`` (dialing: connecting, or waiting for their answer). A held connection
    costs nothing here; its own state is two slots (``conns.RedialConn``).
    """

    def __init__(self, plan: AgentPlan, backoff: Backoff, rng: random.Random | None = None) -> None:
        self.backoff = backoff
        self.rng = rng or random.Random()
        # (due on the monotonic clock, order, attempt, connection): earliest first.
        self.queue: list[tuple[float, int, int, Redialed]] = []
        self.order = itertools.count()
        self.tries: dict[Redialed, int] = {}  # dialing again -> its attempt number
        # A user's lane is found from its place in the plan (lanes are filled in order),
        # so a connection dials again from the same source IP: the plan's port budget holds.
        self.first_user = plan.first_user
        self.lanes = plan.lanes
        self.ends = list(itertools.accumulate(lane.count for lane in plan.lanes))
        # What the report shows.
        self.drops: Counter[str] = Counter()  # why connections (or dials) ended
        self.attempts = 0  # dials after a drop
        self.back = 0  # connections ready again after a drop
        self.gaps = 0  # seqs that never arrived
        self.repeats = 0  # seqs that arrived again (or out of order)
        self.unsequenced = 0  # seq 0: delivered by a node cut off from Redis
        self.not_recovered = 0  # resubscriptions answered recovered: false
        self.recovered = 0  # messages the history filled in (the ok's missed)
        self.first_drop_at = 0.0  # wall clock: the first drop
        self.last_back_at = 0.0  # wall clock: the latest connection ready again
        self.back_hist: Counter[int] = Counter()  # returns by wall clock, 0.1 s buckets

    # --- when ---------------------------------------------------------------------------

    def dropped(self, conn: Redialed, reason: str, now: float) -> None:
        """``conn`` ended (or its dial failed): dial again after its backoff."""
        self.drops[reason] += 1
        if not self.first_drop_at:
            self.first_drop_at = time.time()
        attempt = self.tries.pop(conn, -1) + 1
        due = now + self.backoff.delay(attempt, self.rng.random())
        heapq.heappush(self.queue, (due, next(self.order), attempt, conn))

    def due(self, now: float, room: int) -> list[Redialed]:
        """Up to ``room`` connections whose backoff is over, earliest first, to dial now."""
        out: list[Redialed] = []
        queue = self.queue
        while queue and len(out) < room and queue[0][0] <= now:
            _, _, attempt, conn = heapq.heappop(queue)
            self.tries[conn] = attempt
            out.append(conn)
        self.attempts += len(out)
        return out

    def ready(self, conn: Redialed) -> None:
        """``conn``'s hello and subscription were answered: its backoff starts over."""
        if self.tries.pop(conn, None) is not None:
            self.back += 1
            self.last_back_at = now = time.time()
            self.back_hist[int(now * 10)] += 1

    def forget(self, conn: Redialed) -> None:
        """The run stops: ``conn`` will not dial again."""
        self.tries.pop(conn, None)

    def lane(self, user: int) -> Lane:
        return self.lanes[bisect.bisect_right(self.ends, user - self.first_user)]

    @property
    def pending(self) -> int:
        """Connections down: waiting out a backoff or dialing."""
        return len(self.queue) + len(self.tries)

    # --- what arrives -------------------------------------------------------------------

    def seen(self, conn: Redialed, seq: int) -> None:
        """A ``msg`` with ``seq`` arrived on ``conn``."""
        if seq == 0:
            self.unsequenced += 1
            return
        last = conn.seq
        if last and seq != last + 1:
            if seq <= last:
                self.repeats += 1
                return
            self.gaps += seq - last - 1
        conn.seq = seq

    def resumed(self, conn: Redialed, recovered: bool, seq: int, missed: int) -> None:
        """The answer to a ``sub`` with ``since``: the missed messages follow, or cannot."""
        if recovered:
            self.recovered += missed
            return
        self.not_recovered += 1
        if seq > conn.seq:
            self.gaps += seq - conn.seq  # published while it was away, gone from history
        conn.seq = seq  # subscribed from seq + 1 on (a smaller seq: the counter restarted)

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        """The counts (sent twice a second); ``final`` adds the returns' histogram."""
        snap = {
            "drops": dict(self.drops),
            "attempts": self.attempts,
            "reconnected": self.back,
            "pending": self.pending,
            "gaps": self.gaps,
            "repeats": self.repeats,
            "unsequenced": self.unsequenced,
            "not_recovered": self.not_recovered,
            "recovered_messages": self.recovered,
            "first_drop_at": self.first_drop_at,
            "last_back_at": self.last_back_at,
        }
        if final:
            snap["back_0.1s"] = dict(self.back_hist)
        return snap


def merge(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes' ``reconnect`` snapshots as one (sums; first drop, last return)."""
    drops: Counter[str] = Counter()
    for s in snaps:
        drops.update(s["drops"])
    total = {
        k: sum(s[k] for s in snaps)
        for k in (
            "attempts",
            "reconnected",
            "pending",
            "gaps",
            "repeats",
            "unsequenced",
            "not_recovered",
            "recovered_messages",
        )
    }
    firsts = [s["first_drop_at"] for s in snaps if s["first_drop_at"]]
    back: Counter[int] = Counter()
    for s in snaps:
        back.update({int(k): v for k, v in s.get("back_0.1s", {}).items()})
    return {
        "drops": dict(drops.most_common()),
        **total,
        "first_drop_at": min(firsts, default=None),
        "last_back_at": max((s["last_back_at"] for s in snaps), default=0.0) or None,
        # Returns per 0.1 s of wall clock (bucket k: [k, k+1) / 10 s since the epoch).
        "back_0.1s": {str(k): v for k, v in sorted(back.items())},
    }

"""Tuning constants that several packages share, so that none imports another for them.

The server's workers and the load generator's processes hold connections the same
way; the doctor's capacity arithmetic and the load planner fill port lanes the same
way. A constant lives here when two packages need the same value, next to the
measurement that chose it.
"""

from __future__ import annotations

from typing import Final

# gc.set_threshold of a process that holds connections (a worker, a load process).
# Each accept allocates a few tracked objects, so the default threshold (700) runs
# a collection every ~200 accepts and the older generations rescan every held
# connection: py-spy put 6.6 % of an accept storm in gc. Connections free by
# refcount (connection_lost breaks the transport <-> protocol cycle), so collect
# rarely.
GC_THRESHOLDS: Final = (50_000, 20, 100)

# Fill a lane (one source IP to one server port) to at most this share of the
# ephemeral port range: ports in TIME_WAIT from an earlier run and other programs'
# connections need the rest. The load planner plans with it, the doctor counts with it.
LANE_FILL: Final = 0.9

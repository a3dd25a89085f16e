"""Connections per IP and per user, counted across all workers of a service.

The kernel spreads one IP's connections over every worker (SO_REUSEPORT hashes the
whole 4-tuple), so no worker alone can enforce ``max_connections_per_ip``. The
workers share a table in memory instead: keys hash into BUCKETS buckets and each
worker counts its own connections in its own row, so nobody needs a lock (each cell
has one writer) and a bucket's total is one slice (rows are interleaved: a bucket's
cells are contiguous).

Two keys can share a bucket, so a limit may refuse early, never late: with 65,536
buckets, a million connections from a million addresses put ~15 in a bucket, far
below the default limits (1,000 per IP, 100 per user). A dead worker's row is zeroed
by the supervisor, as its connections are gone.
"""

from __future__ import annotations

import ipaddress
import zlib
from typing import Final

BUCKETS: Final = 1 << 16
_MASK: Final = BUCKETS - 1
# Bucket numbers as shared int objects: a connection keeps its IP's bucket in a slot,
# and above 256 every int would otherwise be a 28-byte object of its own.
_BUCKET_INTS: Final = tuple(range(BUCKETS))


class CountTable:
    """A service's per-bucket connection counts: ``rows`` workers x BUCKETS int32."""

    __slots__ = ("mv", "row", "rows")

    def __init__(self, buffer: memoryview, rows: int, row: int = 0) -> None:
        self.mv = buffer.cast("B").cast("i")
        self.rows = rows
        self.row = row  # the worker's own row: the only one it writes
        if len(self.mv) < rows * BUCKETS:
            raise ValueError("count table buffer too small")

    @staticmethod
    def size(rows: int) -> int:
        """Bytes of shared memory a table of ``rows`` workers needs."""
        return rows * BUCKETS * 4

    def total(self, bucket: int) -> int:
        start = bucket * self.rows
        return sum(self.mv[start : start + self.rows])

    def add(self, bucket: int, n: int) -> None:
        self.mv[bucket * self.rows + self.row] += n

    def clear_row(self, row: int) -> None:
        rows = self.rows
        self.mv[row::rows] = memoryview(bytes(BUCKETS * 4)).cast("i")


def ip_bucket(ip: str) -> int:
    """An address's bucket; IPv6 counts per /64, the block one subscriber usually gets."""
    if ":" in ip:
        try:
            key = ipaddress.IPv6Address(ip.split("%", 1)[0]).packed[:8]
        except ValueError:
            key = ip.encode()
    else:
        key = ip.encode()
    return _BUCKET_INTS[zlib.crc32(key) & _MASK]


def user_bucket(user: str) -> int:
    return zlib.crc32(user.encode()) & _MASK


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")

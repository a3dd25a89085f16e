"""Connections per IP and per user, counted across all workers of a service.

The kernel spreads one IP's connections over every worker (SO_REUSEPORT hashes the
whole 4-tuple), so no worker alone can enforce ``max_connections_per_ip``. The
workers share a table in memory instead: keys hash into BUCKETS buckets and each
worker counts its own connections in its own row, so nobody needs a lock (each cell
has one writer) and a bucket's total is one slice (rows are interleaved: a bucket's
cells are contiguous).

Two keys can share a bucket, so a limit may refuse early, never late: a million
connections from a million addresses put ~61 in each of the 16,384 IP buckets (the
limit is 1,000), a million users ~15 in each of the 65,536 user buckets (the limit
is 100). A dead worker's row is zeroed by the supervisor, as its connections are gone.

Memory: 4 bytes x buckets x workers per table, shared (PSS); but a worker that reads
a bucket maps its page, so a busy worker's RSS grows by up to the whole table.
"""

from __future__ import annotations

import ipaddress
import zlib
from typing import Final

IP_BUCKETS: Final = 1 << 14
USER_BUCKETS: Final = 1 << 16
# Bucket numbers as shared int objects: a connection keeps its IP's bucket in a slot,
# and above 256 every int would otherwise be a 28-byte object of its own.
_BUCKET_INTS: Final = tuple(range(IP_BUCKETS))


class CountTable:
    """A service's per-bucket connection counts: ``rows`` workers x ``buckets`` int32."""

    __slots__ = ("buckets", "mv", "row", "rows")

    def __init__(self, buffer: memoryview, buckets: int, rows: int, row: int = 0) -> None:
        self.mv = buffer.cast("B").cast("i")
        self.buckets = buckets
        self.rows = rows
        self.row = row  # the worker's own row: the only one it writes
        if len(self.mv) < rows * buckets:
            raise ValueError("count table buffer too small")

    @staticmethod
    def size(buckets: int, rows: int) -> int:
        """Bytes of shared memory a table of ``rows`` workers needs."""
        return rows * buckets * 4

    def total(self, bucket: int) -> int:
        start = bucket * self.rows
        return sum(self.mv[start : start + self.rows])

    def add(self, bucket: int, n: int) -> None:
        self.mv[bucket * self.rows + self.row] += n

    def clear_row(self, row: int) -> None:
        self.mv[row :: self.rows] = memoryview(bytes(self.buckets * 4)).cast("i")


def shared_bytes(rows: int) -> int:
    """Size of the shared buffer that holds a service's IP table, then its user table."""
    return CountTable.size(IP_BUCKETS, rows) + CountTable.size(USER_BUCKETS, rows)


def tables(buffer: memoryview, rows: int, row: int = 0) -> tuple[CountTable, CountTable]:
    """The IP and user tables in a buffer of ``shared_bytes(rows)``, as seen by ``row``."""
    whole = buffer.cast("B")
    split = CountTable.size(IP_BUCKETS, rows)
    return (
        CountTable(whole[:split], IP_BUCKETS, rows, row),
        CountTable(whole[split:], USER_BUCKETS, rows, row),
    )


def ip_bucket(ip: str) -> int:
    """An address's bucket; IPv6 counts per /64, the block one subscriber usually gets."""
    if ":" in ip:
        try:
            key = ipaddress.IPv6Address(ip.split("%", 1)[0]).packed[:8]
        except ValueError:
            key = ip.encode()
    else:
        key = ip.encode()
    return _BUCKET_INTS[zlib.crc32(key) & (IP_BUCKETS - 1)]


def user_bucket(user: str) -> int:
    return zlib.crc32(user.encode()) & (USER_BUCKETS - 1)


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")

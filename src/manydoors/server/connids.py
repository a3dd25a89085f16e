"""Connection ids, derived from the connection object: no slot, no map (no I/O).

The welcome names each connection ``"<pid>-<token>"`` (a Pusher ``socket_id`` would be
``"<pid>.<token>"``); the HTTP API's ``exclude`` names one to leave out of a delivery
(the sender's own). The worker must then find that connection among the recipients
without a cost to every connection, memory per connection being the key figure
(~1,490 B over TCP at 40,000 idle connections, the limit 1,536 B). The choices:

- a slot holding the id: +16 bytes a connection (8 slots fill the 112-byte size
  class, connection.py);
- a dict id -> connection in the worker: ~100 bytes a connection (the entry at the
  dict's load factor, and the key object);
- the id made from the object's address: 0 bytes. ``token`` is a keyed bijection of
  the address (and a counter), so an id neither shows the address nor repeats soon;
  ``address`` inverts it, and a delivery with an exclusion compares ``id(conn)`` with
  that address while it writes: a separate loop, taken only for such deliveries, on
  the one worker whose pid matches. Measured at 40,000 TCP connections (``./run
  bench memory``, one run each, same tree): 1,495.6 B a connection with these ids,
  1,492.8 B with the old ``"<pid>-<n>"``. Nothing is kept per connection (only the
  welcome line is longer); making the id costs ~0.7 us a welcome.

The cost of the last: an exclusion naming a connection that has closed since may skip
a newer connection that took its address (one message, in that delivery only).
"""

from __future__ import annotations

import secrets
from typing import Final

_MASK: Final = (1 << 64) - 1
# CPython objects are 16-byte aligned and user-space addresses stay below 2**48 (Linux
# x86-64 and arm64 without 5-level paging), so an address fits 44 bits; the other 20
# carry a counter so that ids do not repeat when memory is reused. An address beyond
# (5-level paging) gives an id that matches nothing: such an exclusion is a no-op.
_ADDRESS_BITS: Final = 44
_ADDRESS_MASK: Final = (1 << _ADDRESS_BITS) - 1
_COUNTER_MASK: Final = (1 << (64 - _ADDRESS_BITS)) - 1


class ConnIds:
    """One worker's connection ids: ``name`` for the welcome, ``address`` to find one."""

    __slots__ = ("k0", "k1", "k1_inverse", "k2", "k2_inverse", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.k0 = secrets.randbits(64)
        self.k1 = secrets.randbits(64) | 1  # odd: a multiplier invertible mod 2**64
        self.k2 = secrets.randbits(64) | 1
        self.k1_inverse = pow(self.k1, -1, 1 << 64)
        self.k2_inverse = pow(self.k2, -1, 1 << 64)

    def name(self, conn: object, n: int) -> str:
        """The id of ``conn``, the worker's ``n``-th connection: ``"<pid>-<token>"``."""
        return f"{self.pid}-{self.token(conn, n)}"

    def token(self, conn: object, n: int) -> int:
        plain = ((n & _COUNTER_MASK) << _ADDRESS_BITS) | ((id(conn) >> 4) & _ADDRESS_MASK)
        # xor, multiply, xorshift, multiply, xorshift: each step is invertible.
        x = ((plain ^ self.k0) * self.k1) & _MASK
        x ^= x >> 31
        x = (x * self.k2) & _MASK
        return x ^ (x >> 32)

    def address(self, token: int) -> int:
        """The ``id()`` of the connection a token of this worker names (it may be gone)."""
        x = token & _MASK
        x ^= x >> 32
        x = (x * self.k2_inverse) & _MASK
        x ^= (x >> 31) ^ (x >> 62)
        plain = ((x * self.k1_inverse) & _MASK) ^ self.k0
        return (plain & _ADDRESS_MASK) << 4

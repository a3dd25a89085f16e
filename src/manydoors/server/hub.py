"""A worker's registry: its connections, by user and by channel (no I/O).

The hub knows which users and channels this worker holds and reports the 0 -> 1 and
1 -> 0 transitions, which are exactly what the broker needs to route a message to
this worker only when it has recipients.

Memory is the key figure, so the common cases are stored flat: a user with one
connection maps straight to it (a set only appears for a second connection), and a
connection's channels are ``()`` when none (a shared constant), the channel's name
when one (no tuple: 48 bytes a connection, measured in docs/benchmarks.md), a tuple
from two to ``SMALL``, and a set beyond. A tuple of a few is smaller than a set (an
empty set is 216 bytes) but its tests and its growth are O(n): a connection in
100,000 channels took minutes to subscribe with tuples alone, O(1) a channel with
the set (issue 18).
"""

from __future__ import annotations

import sys
from typing import Final, Generic, Protocol, TypeVar

# Channels a connection keeps in a tuple; one more and they move to a set. Eight fill
# the tuple's 104 bytes, still half an empty set, and a test of eight is as fast.
SMALL: Final = 8
# A set that shrinks to this many goes back to a tuple (not at SMALL: no flapping).
SHRINK: Final = SMALL // 2

Channels = str | tuple[str, ...] | set[str]  # how a connection's channels are stored


class Member(Protocol):
    """What the hub needs of a connection."""

    user: str | None
    channels: Channels


def channels_of(conn: Member) -> tuple[str, ...] | set[str]:
    """A connection's channels, whichever way they are stored: test with ``in``,
    count with ``len``, iterate (the set itself past ``SMALL``: do not subscribe or
    unsubscribe ``conn`` while iterating; copy first)."""
    held = conn.channels
    return (held,) if isinstance(held, str) else held


M = TypeVar("M", bound=Member)


class Hub(Generic[M]):
    __slots__ = ("channels", "conns", "users")

    def __init__(self) -> None:
        self.conns: set[M] = set()
        self.channels: dict[str, set[M]] = {}
        self.users: dict[str, M | set[M]] = {}

    def __len__(self) -> int:
        return len(self.conns)

    def add(self, conn: M) -> None:
        self.conns.add(conn)

    def remove(self, conn: M) -> tuple[list[str], str | None]:
        """Forget a connection; return the channels and the user this worker lost."""
        self.conns.discard(conn)
        lost = [ch for ch in channels_of(conn) if self._leave(conn, ch)]
        conn.channels = ()
        user = conn.user
        gone = user if user is not None and self._drop_user(conn, user) else None
        return lost, gone

    def subscribe(self, conn: M, channel: str) -> bool:
        """Subscribe; True when this worker had no subscriber of the channel before."""
        held = conn.channels
        if isinstance(held, set):
            if channel in held:
                return False
            channel = sys.intern(channel)  # one string object per channel, shared by members
            held.add(channel)
        else:
            few = (held,) if isinstance(held, str) else held
            if channel in few:
                return False
            channel = sys.intern(channel)
            if not few:
                conn.channels = channel
            elif len(few) < SMALL:
                conn.channels = (*few, channel)
            else:
                conn.channels = {*few, channel}
        members = self.channels.get(channel)
        if members is None:
            self.channels[channel] = {conn}
            return True
        members.add(conn)
        return False

    def unsubscribe(self, conn: M, channel: str) -> bool:
        """Unsubscribe; True when this was the worker's last subscriber of the channel."""
        held = conn.channels
        if isinstance(held, set):
            if channel not in held:
                return False
            held.discard(channel)
            if len(held) <= SHRINK:
                conn.channels = tuple(held)
        else:
            few = (held,) if isinstance(held, str) else held
            if channel not in few:
                return False
            rest = tuple(ch for ch in few if ch != channel)
            conn.channels = rest[0] if len(rest) == 1 else rest
        return self._leave(conn, channel)

    def _leave(self, conn: M, channel: str) -> bool:
        members = self.channels.get(channel)
        if members is None:
            return False
        members.discard(conn)
        if members:
            return False
        del self.channels[channel]
        return True

    def set_user(self, conn: M, user: str) -> tuple[bool, str | None]:
        """Name the connection's user. Returns (user is new to this worker, user lost)."""
        old = conn.user
        if old == user:
            return False, None
        lost = old if old is not None and self._drop_user(conn, old) else None
        conn.user = user
        held = self.users.get(user)
        if held is None:
            self.users[user] = conn
            return True, lost
        if isinstance(held, set):
            held.add(conn)
        else:
            self.users[user] = {held, conn}
        return False, lost

    def _drop_user(self, conn: M, user: str) -> bool:
        held = self.users.get(user)
        if held is conn:
            del self.users[user]
            return True
        if isinstance(held, set):
            held.discard(conn)
            if len(held) == 1:
                self.users[user] = held.pop()
        return False

    def of_user(self, user: str) -> tuple[M, ...] | set[M]:
        held = self.users.get(user)
        if held is None:
            return ()
        return held if isinstance(held, set) else (held,)

    def census(self, channel: str) -> tuple[dict[str, int], int]:
        """The subscribers of ``channel``: ({user: connections}, anonymous ones)."""
        users: dict[str, int] = {}
        anonymous = 0
        for conn in self.channels.get(channel, ()):
            user = conn.user
            if user is None:
                anonymous += 1
            else:
                users[user] = users.get(user, 0) + 1
        return users, anonymous

"""What the supervisor and the API see of the broker: its interface and typed results.

The results are msgspec Structs; the API turns them into JSON with
``msgspec.to_builtins``. ``Published`` omits the fields a case leaves unset, so each
case keeps the JSON it always had:

============================  ==========================================
local channel / broadcast     ``{"seq": 7, "workers": 2}``
local user, command           ``{"workers": 1}``
redis channel / broadcast     ``{"seq": 7, "nodes": 3}``
redis user, command           ``{"nodes": 1}``
redis degraded (any target)   ``{"degraded": true, "workers": 2}``
============================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec
from msgspec import Raw

from ..node.link import Link


class PresenceResult(msgspec.Struct):
    """Who is subscribed to a channel: user -> connections, plus anonymous connections."""

    users: dict[str, int]
    anonymous: int = 0
    partial: bool = False  # a worker or node did not answer in time

    def merge(self, other: PresenceResult) -> None:
        """Add ``other``'s counts to these (the answers of several workers or nodes)."""
        for user, n in other.users.items():
            self.users[user] = self.users.get(user, 0) + n
        self.anonymous += other.anonymous
        self.partial = self.partial or other.partial


# Field order is the JSON key order of every case above ("degraded" came first).
class Published(msgspec.Struct, omit_defaults=True):
    """What a publish (or a command: disconnect, unsubscribe) through the API reached.

    Fields left None are not reported.
    """

    degraded: bool = False  # Redis was away: delivered on this node only
    seq: int | None = None  # the channel's (or the broadcast's) seq; None for a user
    workers: int | None = None  # this node's workers that got it (local, or degraded)
    nodes: int | None = None  # the nodes that got it from Redis


class ChannelList(msgspec.Struct):
    """Channels with their subscribers (connections), by name (``GET /api/channels``)."""

    channels: dict[str, int]
    truncated: bool = False  # more channels matched than the limit let in
    partial: bool = False  # a worker or node did not answer in time

    def merge(self, other: ChannelList) -> None:
        """Add ``other``'s counts (the answers of several workers or nodes)."""
        for channel, n in other.channels.items():
            self.channels[channel] = self.channels.get(channel, 0) + n
        self.truncated = self.truncated or other.truncated
        self.partial = self.partial or other.partial

    def cap(self, limit: int) -> None:
        """Keep the first ``limit`` channels by name, in that order; say if some went.

        Exact when each part held its own first ``limit`` (and said if it had more):
        a channel among the first ``limit`` of all is among those of every part.
        """
        names = sorted(self.channels)
        self.truncated = self.truncated or len(names) > limit
        self.channels = {name: self.channels[name] for name in names[:limit]}


class HistoryPage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A channel's recent messages, oldest first (``GET /api/history``)."""

    channel: str
    seq: int  # the channel's seq now (0: never published, or forgotten)
    # Given ``since``: the history holds every message after it (as ``recovered`` in
    # the ok of a ``sub`` with ``since``). None (left out) without ``since``.
    recovered: bool | None = None
    more: bool  # the limit left messages out: with ``since``, ask on from the last seq
    messages: list[Raw]  # the msg events, as clients got them
    partial: bool = False  # Redis was unreachable: this node's own history only

    @classmethod
    def of(
        cls,
        channel: str,
        seq: int,
        entries: Iterable[tuple[int, bytes]],
        since: int | None,
        limit: int,
    ) -> HistoryPage:
        """The page of ``entries`` (``(seq, event line)``, oldest first) to answer with.

        Without ``since``: the last ``limit`` messages. With it: the first ``limit``
        after it (page on from the last seq returned), and whether none is missing.
        """
        held = [(s, line) for s, line in entries if s <= seq]
        recovered = None
        if since is None:
            chosen = held[-limit:] if limit else []
            more = len(held) > limit
        else:
            after = [(s, line) for s, line in held if s > since]
            # Consecutive seqs, so complete when they are as many as the gap.
            recovered = since <= seq and len(after) == seq - since
            chosen = after[:limit]
            more = len(after) > limit
        # Without the newline: each one is a JSON object in the answer's array.
        messages = [Raw(line.rstrip(b"\n")) for _, line in chosen]
        return cls(channel=channel, seq=seq, recovered=recovered, more=more, messages=messages)


class BrokerStats(msgspec.Struct):
    """Broker figures for /api/stats (every key always present)."""

    kind: str  # "local" or "redis"
    status: str  # "ok", or "degraded" while messages cannot cross nodes
    channels: int  # channels with a subscriber on this node
    users: int  # users with a connection on this node
    published: int  # publishes through this node (workers and API)
    history_channels: int  # channels with recent lines kept on this node
    bad_frames: int  # worker frames that could not be decoded


class RedisStats(BrokerStats):
    """``BrokerStats`` of a node on the Redis backplane, and the Redis figures after them."""

    node: str  # this node's id in topics (random per start)
    redis: str  # the URL, without a password
    cluster: bool
    received_from_redis: int
    sent_to_redis: int
    delivered_locally_while_degraded: int
    reconnects: int
    last_error: str


class Broker(Protocol):
    """The broker as the supervisor and the API use it (``router.Router`` is the one).

    Workers report which users and channels they hold over their Link; the broker
    forwards each message only to the links that need it, encoded once.
    """

    async def start(self) -> None:
        """Connect to whatever the broker needs before workers start."""

    async def close(self) -> None:
        """Release connections and tasks."""

    @property
    def status(self) -> str:
        """``ok``, or ``degraded`` while messages cannot cross nodes."""

    def attach(self, link: Link) -> None:
        """A worker's link is up; it will report its interests as frames."""

    def detach(self, link: Link) -> None:
        """A worker is gone: forget everything it held."""

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        """A frame from a worker (interest changes, publishes, syncs)."""

    # ``exclude``: the id of a connection (its welcome's ``conn``) to leave out.

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """Deliver to every subscriber of ``channel``."""

    async def publish_channels(
        self, channels: list[str], sender: str | None, data: Raw, exclude: str | None = None
    ) -> list[Published]:
        """Publish to each of ``channels`` (each its own seq); results in that order."""

    async def publish_user(
        self, user: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """Deliver to every connection of ``user``."""

    async def broadcast(
        self, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """Deliver to every connection."""

    async def disconnect(self, user: str, reason: str) -> Published:
        """Close every connection of ``user`` (on every node) with ``bye`` ``reason``."""

    async def unsubscribe(self, user: str, channel: str) -> Published:
        """Take every connection of ``user`` (on every node) out of ``channel``."""

    async def read_history(self, channel: str, since: int | None, limit: int) -> HistoryPage:
        """Up to ``limit`` messages of ``channel``'s history (after ``since``, if given)."""

    async def list_channels(self, prefix: str, limit: int) -> ChannelList:
        """The first ``limit`` channels (by name) starting with ``prefix``, with counts."""

    async def presence(self, channel: str) -> PresenceResult:
        """Who is subscribed to ``channel`` (on every node)."""

    def stats(self) -> BrokerStats:
        """Broker figures for /api/stats."""

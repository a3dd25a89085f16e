"""What the supervisor and the API see of the broker: its interface and typed results.

The results are msgspec Structs; the API turns them into JSON with
``msgspec.to_builtins``. ``Published`` omits the fields a case leaves unset, so each
case keeps the JSON it always had:

============================  ==========================================
local channel / broadcast     ``{"seq": 7, "workers": 2}``
local user                    ``{"workers": 1}``
redis channel / broadcast     ``{"seq": 7, "nodes": 3}``
redis user                    ``{"nodes": 1}``
redis degraded (any target)   ``{"degraded": true, "workers": 2}``
============================  ==========================================
"""

from __future__ import annotations

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
    """What a publish through the API reached (fields left None are not reported)."""

    degraded: bool = False  # Redis was away: delivered on this node only
    seq: int | None = None  # the channel's (or the broadcast's) seq; None for a user
    workers: int | None = None  # this node's workers that got it (local, or degraded)
    nodes: int | None = None  # the nodes that got it from Redis


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

    async def publish_channel(self, channel: str, sender: str | None, data: Raw) -> Published:
        """Deliver to every subscriber of ``channel``."""

    async def publish_user(self, user: str, sender: str | None, data: Raw) -> Published:
        """Deliver to every connection of ``user``."""

    async def broadcast(self, sender: str | None, data: Raw) -> Published:
        """Deliver to every connection."""

    async def presence(self, channel: str) -> PresenceResult:
        """Who is subscribed to ``channel`` (on every node)."""

    def stats(self) -> BrokerStats:
        """Broker figures for /api/stats."""

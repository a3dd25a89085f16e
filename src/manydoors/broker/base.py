"""The broker interface the supervisor and the API program against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import msgspec
from msgspec import Raw

from ..node.link import Link


class PresenceResult(msgspec.Struct):
    """Who is subscribed to a channel: user -> connections, plus anonymous connections."""

    users: dict[str, int]
    anonymous: int = 0
    partial: bool = False  # a worker or node did not answer in time

    def merge(self, other: PresenceResult) -> None:
        for user, n in other.users.items():
            self.users[user] = self.users.get(user, 0) + n
        self.anonymous += other.anonymous
        self.partial = self.partial or other.partial


class Broker(ABC):
    """Routes messages between the workers of a node (and, for Redis, between nodes).

    Workers report which users and channels they hold over their Link; the broker
    forwards each message only to the links that need it, encoded once.
    """

    kind: str

    @abstractmethod
    async def start(self) -> None:
        """Connect to whatever the broker needs before workers start."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and tasks."""

    @property
    def status(self) -> str:
        """``ok``, or ``degraded`` while messages cannot cross nodes."""
        return "ok"

    @abstractmethod
    def attach(self, link: Link) -> None:
        """A worker's link is up; it will report its interests as frames."""

    @abstractmethod
    def detach(self, link: Link) -> None:
        """A worker is gone: forget everything it held."""

    @abstractmethod
    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        """A frame from a worker (interest changes, publishes, syncs)."""

    @abstractmethod
    async def publish_channel(self, channel: str, sender: str | None, data: Raw) -> dict[str, Any]:
        """Deliver to every subscriber of ``channel``; return what the API reports."""

    @abstractmethod
    async def publish_user(self, user: str, sender: str | None, data: Raw) -> dict[str, Any]:
        """Deliver to every connection of ``user``; return what the API reports."""

    @abstractmethod
    async def broadcast(self, sender: str | None, data: Raw) -> dict[str, Any]:
        """Deliver to every connection; return what the API reports."""

    @abstractmethod
    async def presence(self, channel: str) -> PresenceResult:
        """Who is subscribed to ``channel`` (on every node)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Broker figures for /api/stats."""

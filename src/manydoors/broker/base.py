"""The broker interface the supervisor and the API program against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from msgspec import Raw

from ..server.link import Link


class Broker(ABC):
    """Routes messages between the workers of a node (and, for Redis, between nodes).

    Workers report which users and channels they hold over their Link; the broker
    forwards each message only to the links that need it, encoded once.
    """

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
    def publish_channel(self, channel: str, sender: str | None, data: Raw) -> int:
        """Deliver to every subscriber of ``channel``; return how many workers were targeted."""

    @abstractmethod
    def publish_user(self, user: str, sender: str | None, data: Raw) -> int:
        """Deliver to every connection of ``user``; return how many workers were targeted."""

    @abstractmethod
    def broadcast(self, sender: str | None, data: Raw) -> int:
        """Deliver to every connection of the node; return how many workers were targeted."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Broker figures for /api/stats."""

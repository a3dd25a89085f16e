"""What carries messages between nodes, beside the node's router: the interface, and none.

A ``Backplane`` owns what a lone node and a node sharing Redis do differently: the
channels' seqs and history, how a publish travels, when a worker's SYNC may be
answered, how a ``sub`` with ``since`` recovers, presence across nodes. The router
calls it on every interest change and publish; it calls the router back (through
``Routes``) to deliver what reaches this node.

``LocalBackplane`` (kind ``local``) is the backplane of a node alone: nothing crosses
nodes, so a publish is numbered, kept in history and delivered at once. Because one
event loop applies every frame in order, a ``sub`` with ``since`` is exact here: the
missed lines are taken from history and sent to the worker on the same link, before
any later delivery of the channel, so the client sees each seq once and in order.
``redis.RedisBackplane`` keeps that property across nodes.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any, ClassVar, Protocol

from msgspec import Raw

from ..node.link import Link
from ..protocol.ipc import RECOVERED_HEAD, Kind
from ..protocol.messages import broadcast_line, dm_line, join_line, msg_line
from .base import BrokerStats, ChannelList, HistoryPage, PresenceResult, Published
from .history import History, Limits, missed


class Routes(Protocol):
    """What a backplane uses of the node's router (``router.Router``)."""

    # The node's interest tables (a backplane resubscribes them after an outage).
    channels: dict[str, set[Link]]
    users: dict[str, Link | set[Link]]

    def deliver_channel(self, channel: str, line: bytes) -> int:
        """Queue ``line`` to the workers holding subscribers of ``channel``; how many."""

    def deliver_user(self, user: str, line: bytes) -> int:
        """Queue ``line`` to the workers holding connections of ``user``; how many."""

    def deliver_all(self, line: bytes) -> int:
        """Queue ``line`` to every worker; how many."""

    def deliver(self, kind: Kind, key: str, line: bytes, exclude: str | None) -> int:
        """A ``deliver_*`` by ``kind``, leaving out the connection ``exclude`` names."""

    def tell_user(self, user: str, kind: Kind, payload: bytes) -> int:
        """Send a command frame to the workers holding connections of ``user``; how many."""

    async def node_channels(self, prefix: str, limit: int) -> ChannelList:
        """This node's first ``limit`` channels starting with ``prefix``, counted."""

    async def node_presence(self, channel: str) -> PresenceResult:
        """Presence on this node's workers."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a background task, cancelled when the router closes."""

    async def cancel_tasks(self) -> None:
        """Cancel every background task and wait for them to end."""

    def announce(self, channel: str, user: str, joined: bool) -> None:
        """``user`` joined (left) ``channel`` server-wide: tell the webhooks."""


class Backplane(ABC):
    """How messages cross nodes (or do not): the part of the broker that varies."""

    kind: ClassVar[str]
    router: Routes
    history: History  # recent lines of channels, for ``sub`` with ``since``

    def bind(self, router: Routes) -> None:
        """Called once by the router that holds this backplane."""
        self.router = router

    @abstractmethod
    async def start(self) -> None:
        """Connect to whatever is needed before workers start (raise if unreachable)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections (the router cancels the remaining tasks after)."""

    @property
    def status(self) -> str:
        """``ok``, or ``degraded`` while messages cannot cross nodes."""
        return "ok"

    # Interest changes: the node gained its first or lost its last subscriber of a
    # channel, or connection of a user (the router calls these on 0 <-> 1 only).
    @abstractmethod
    def channel_added(self, channel: str) -> None:
        """The node now holds a subscriber of ``channel``."""

    @abstractmethod
    def channel_removed(self, channel: str) -> None:
        """The node no longer holds a subscriber of ``channel``."""

    @abstractmethod
    def user_added(self, user: str) -> None:
        """The node now holds a connection of ``user``."""

    @abstractmethod
    def user_removed(self, user: str) -> None:
        """The node no longer holds a connection of ``user``."""

    @abstractmethod
    def forget(self, link: Link) -> None:
        """A worker's link is gone (before the router drops its interests)."""

    def sync(self, link: Link) -> None:
        """Everything ``link`` sent before is in effect: tell it so."""
        link.send(Kind.SYNCED)

    def joined(self, channel: str, user: str, joined: bool) -> None:
        """The node's first connection of ``user`` joined ``channel`` (or its last left).

        Alone, the node is the whole server: its subscribers hear it at once.
        """
        self.router.deliver_channel(channel, join_line(channel, user, joined))
        self.router.announce(channel, user, joined)

    @abstractmethod
    def recover(self, link: Link, channel: str, req: int, since: int) -> None:
        """Answer a ``sub`` with ``since``; the link's SUB of the channel came first."""

    @abstractmethod
    def worker_pub(self, channel: str, sender: str | None, data: Raw) -> None:
        """A worker's client published to ``channel`` (no one waits for a result)."""

    @abstractmethod
    def worker_send(self, user: str, sender: str | None, data: Raw) -> None:
        """A worker's client sent a message to ``user``."""

    # The API's publishes; ``exclude`` names a connection (``"<pid>-<token>"``) left out.

    @abstractmethod
    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """The API publishes to ``channel``."""

    @abstractmethod
    async def publish_user(
        self, user: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """The API sends to ``user``."""

    @abstractmethod
    async def broadcast(
        self, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """The API sends to every connection."""

    @abstractmethod
    async def presence(self, channel: str) -> PresenceResult:
        """Who is subscribed to ``channel`` on every node."""

    # The API's commands and reads, on every node.

    @abstractmethod
    async def disconnect(self, user: str, reason: str) -> Published:
        """Close every connection of ``user`` with ``bye`` ``reason``."""

    @abstractmethod
    async def unsubscribe(self, user: str, channel: str) -> Published:
        """Take every connection of ``user`` out of ``channel``."""

    @abstractmethod
    async def read_history(self, channel: str, since: int | None, limit: int) -> HistoryPage:
        """Up to ``limit`` messages of ``channel``'s history (after ``since``, if given)."""

    @abstractmethod
    async def list_channels(self, prefix: str, limit: int) -> ChannelList:
        """The first ``limit`` channels (by name) starting with ``prefix``, with counts."""

    def stats(self, own: BrokerStats) -> BrokerStats:
        """The router's figures ``own``, with this backplane's added."""
        return own


class LocalBackplane(Backplane):
    """No other node: seqs and history live here, and a publish is delivered at once."""

    kind = "local"

    def __init__(
        self, history_size: int = 100, history_ttl: float = 300.0, limits: Limits | None = None
    ) -> None:
        self.seqs: dict[str, int] = {}
        self.broadcast_seq = 0
        self.history = History(history_size, history_ttl, limits)

    # Nothing to connect to, and no other node to tell about interests: a channel's
    # seq and history outlive its last subscriber, so a client may recover later.
    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def channel_added(self, channel: str) -> None:
        pass

    def channel_removed(self, channel: str) -> None:
        pass

    def user_added(self, user: str) -> None:
        pass

    def user_removed(self, user: str) -> None:
        pass

    def forget(self, link: Link) -> None:
        pass

    def _channel_line(self, channel: str, sender: str | None, data: Raw) -> tuple[int, bytes]:
        seq = self.seqs.get(channel, 0) + 1
        self.seqs[channel] = seq
        line = msg_line(channel, seq, sender, data)
        self.history.add(channel, seq, line, time.monotonic())
        return seq, line

    def worker_pub(self, channel: str, sender: str | None, data: Raw) -> None:
        self.router.deliver_channel(channel, self._channel_line(channel, sender, data)[1])

    def worker_send(self, user: str, sender: str | None, data: Raw) -> None:
        self.router.deliver_user(user, dm_line(sender, data))

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        seq, line = self._channel_line(channel, sender, data)
        workers = self.router.deliver(Kind.DELIVER_CHANNEL, channel, line, exclude)
        return Published(seq=seq, workers=workers)

    async def publish_user(
        self, user: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        line = dm_line(sender, data)
        return Published(workers=self.router.deliver(Kind.DELIVER_USER, user, line, exclude))

    async def broadcast(
        self, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        self.broadcast_seq += 1
        line = broadcast_line(self.broadcast_seq, sender, data)
        workers = self.router.deliver(Kind.DELIVER_ALL, "", line, exclude)
        return Published(seq=self.broadcast_seq, workers=workers)

    async def disconnect(self, user: str, reason: str) -> Published:
        return Published(workers=self.router.tell_user(user, Kind.DISCONNECT, reason.encode()))

    async def unsubscribe(self, user: str, channel: str) -> Published:
        return Published(workers=self.router.tell_user(user, Kind.UNSUBSCRIBE, channel.encode()))

    async def read_history(self, channel: str, since: int | None, limit: int) -> HistoryPage:
        entries = self.history.entries(channel, time.monotonic())
        return HistoryPage.of(channel, self.seqs.get(channel, 0), entries, since, limit)

    async def list_channels(self, prefix: str, limit: int) -> ChannelList:
        return await self.router.node_channels(prefix, limit)

    def recover(self, link: Link, channel: str, req: int, since: int) -> None:
        seq = self.seqs.get(channel, 0)
        lines = missed(since, seq, self.history.entries(channel, time.monotonic()))
        answer_recover(link, channel, req, seq, lines)

    async def presence(self, channel: str) -> PresenceResult:
        return await self.router.node_presence(channel)


def answer_recover(link: Link, channel: str, req: int, seq: int, lines: list[bytes] | None) -> None:
    """Tell ``link`` the seq at the join and the lines missed since (None: not recovered)."""
    head = RECOVERED_HEAD.pack(req, lines is not None, seq)
    link.send(Kind.RECOVERED, channel, head + b"".join(lines or ()))

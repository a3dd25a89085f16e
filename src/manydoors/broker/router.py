"""The node's router: routing between the workers of one node, in the supervisor.

It keeps, per channel and per user, the worker links that hold recipients. A message
is encoded once into the exact line clients receive, wrapped once into a delivery
frame, and that same frame is queued to each target link: N workers cost N queue
appends and no re-encoding.

What differs between a lone node and nodes sharing Redis is the ``Backplane`` the
router holds (composed, not subclassed): seqs, history, how a publish travels, when a
SYNC may be answered, presence across nodes. The router tells it when the node gains
its first or loses its last recipient of a channel or user; the backplane calls back
``deliver_*`` for what reaches this node. The router is the facade the supervisor and
the API use (``base.Broker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Final, Generic, Protocol, Self, TypeVar

import msgspec
from msgspec import Raw

from ..node.link import Link
from ..protocol.ipc import (
    JOIN_HEAD,
    RECOVER_HEAD,
    TOKEN,
    Kind,
    encode_frame,
    exclude_head,
    request_ids,
)
from .backplane import Backplane
from .base import BrokerStats, ChannelList, HistoryPage, PresenceResult, Published

PRESENCE_TIMEOUT: Final = 2.0  # seconds to wait for every worker's (or node's) answer
SWEEP_INTERVAL: Final = 30.0  # seconds between two sweeps of expired history

_decode_envelope: Final = msgspec.json.Decoder(tuple[str | None, Raw]).decode
_decode_part: Final = msgspec.json.Decoder(tuple[dict[str, int], int]).decode
_decode_counts: Final = msgspec.json.Decoder(dict[str, int]).decode
_encode_json: Final = msgspec.json.Encoder().encode
# A delivery that leaves a connection out travels as its own kind of frame.
_EXCEPT: Final = {
    Kind.DELIVER_CHANNEL: Kind.DELIVER_CHANNEL_EXCEPT,
    Kind.DELIVER_USER: Kind.DELIVER_USER_EXCEPT,
    Kind.DELIVER_ALL: Kind.DELIVER_ALL_EXCEPT,
}


class Mergeable(Protocol):
    """An answer that adds up with the others (``PresenceResult``, ``ChannelList``)."""

    partial: bool

    def merge(self, other: Self) -> None: ...


R = TypeVar("R", bound=Mergeable)


class Answers(Generic[R]):
    """The answers of several workers (or nodes) to one question, merged into ``result``.

    Answers may arrive before the number to expect is known (Redis tells it only when
    the question's PUBLISH returns): ``expect`` then settles it.
    """

    __slots__ = ("done", "expected", "received", "result")

    def __init__(self, result: R, expected: int | None = None) -> None:
        self.expected = expected
        self.received = 0
        self.result = result
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, part: R) -> None:
        """One worker's (or node's) answer."""
        self.result.merge(part)
        self.received += 1
        self._check()

    def expect(self, expected: int) -> None:
        """How many answers complete the question, once that is known."""
        self.expected = expected
        self._check()

    def _check(self) -> None:
        complete = self.expected is not None and self.received >= self.expected
        if complete and not self.done.done():
            self.done.set_result(None)

    async def wait(self, timeout: float) -> R:
        """The merged answers; ``partial`` if some did not come within ``timeout``."""
        if not self.done.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.done), timeout)
            except TimeoutError:
                self.result.partial = True
        return self.result


class Gather(Answers[PresenceResult]):
    """Presence answers of several workers (or nodes) for one question."""

    __slots__ = ()

    def __init__(self, expected: int | None = None) -> None:
        super().__init__(PresenceResult({}), expected)


class Router:
    """Routes messages between the workers of a node, over a backplane between nodes."""

    def __init__(
        self, backplane: Backplane, events: Callable[[str, str], None] | None = None
    ) -> None:
        self.backplane = backplane
        # Told ("channel_occupied" | "channel_vacated", channel) when the node gains its
        # first or loses its last subscriber of a channel (the webhooks); None: nothing.
        self.events = events
        # Told ("join" | "leave", channel, user) when a user's first connection in the
        # whole server joins a join_leave channel, or its last leaves (the webhooks).
        self.member_events: Callable[[str, str, str], None] | None = None
        self.links: set[Link] = set()
        self.channels: dict[str, set[Link]] = {}
        # A user is almost always on one worker: store that link itself, not a set of one
        # (a million users would otherwise cost a million sets here).
        self.users: dict[str, Link | set[Link]] = {}
        # (channel, user) -> the links holding that user in that channel, for the
        # namespaces with join_leave only (the workers send JOIN/LEAVE for those alone).
        self.members: dict[tuple[str, str], set[Link]] = {}
        self.member_counts: dict[str, int] = {}  # channel -> its members on this node
        self.published = 0  # every publish through this node, from workers and the API
        self.bad_frames = 0
        self.gathers: dict[int, Gather] = {}
        self.listings: dict[int, Answers[ChannelList]] = {}  # channel counts asked of links
        self.tokens = request_ids()  # packed as u32 (TOKEN): they wrap
        self.tasks: set[asyncio.Task[Any]] = set()
        backplane.bind(self)

    @property
    def kind(self) -> str:
        """The backplane's kind: ``local`` or ``redis``."""
        return self.backplane.kind

    @property
    def status(self) -> str:
        """``ok``, or ``degraded`` while messages cannot cross nodes."""
        return self.backplane.status

    async def start(self) -> None:
        """Start sweeping history, then connect the backplane (raise if it cannot)."""
        self.spawn(self._sweep())
        await self.backplane.start()

    async def close(self) -> None:
        """Close the backplane, then cancel what is still running."""
        await self.backplane.close()
        await self.cancel_tasks()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task the router keeps a reference to and cancels on close."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel every background task and wait for them to end."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.backplane.history.sweep(time.monotonic())

    # --- links and interests ----------------------------------------------------------

    def attach(self, link: Link) -> None:
        """A worker's link is up; it will report its interests as frames."""
        self.links.add(link)

    def detach(self, link: Link) -> None:
        """A worker is gone: forget everything it held."""
        self.links.discard(link)
        self.backplane.forget(link)
        for key in [k for k, held in self.channels.items() if link in held]:
            self._unsub(key, link)
        for key in [k for k, held in self.users.items() if _holds(held, link)]:
            self._user_off(key, link)
        for channel, user in [pair for pair, held in self.members.items() if link in held]:
            self._member(link, channel, user, joined=False)

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        """A frame from a worker (interest changes, publishes, syncs, questions)."""
        if kind == Kind.PUB or kind == Kind.SEND:
            try:
                sender, data = _decode_envelope(payload)
            except msgspec.DecodeError:
                self.bad_frames += 1
                return
            self.published += 1
            if kind == Kind.PUB:
                self.backplane.worker_pub(key, sender, data)
            else:
                self.backplane.worker_send(key, sender, data)
        elif kind == Kind.PUB_EXCEPT:
            conn, _, envelope = payload.partition(b" ")
            try:
                sender, data = _decode_envelope(envelope)
                exclude = conn.decode("ascii")
            except (msgspec.DecodeError, UnicodeDecodeError):
                self.bad_frames += 1
                return
            self.published += 1
            self.spawn(self.backplane.publish_channel(key, sender, data, exclude))
        elif kind == Kind.SUB:
            held = self.channels.get(key)
            if held is None:
                self.channels[key] = {link}
                self.backplane.channel_added(key)
                if self.events is not None:
                    self.events("channel_occupied", key)
            else:
                held.add(link)
        elif kind == Kind.UNSUB:
            self._unsub(key, link)
        elif kind == Kind.USER_ON:
            held_by = self.users.get(key)
            if held_by is None:
                self.users[key] = link
                self.backplane.user_added(key)
            elif isinstance(held_by, set):
                held_by.add(link)
            elif held_by is not link:
                self.users[key] = {held_by, link}
        elif kind == Kind.USER_OFF:
            self._user_off(key, link)
        elif kind == Kind.SYNC:
            self.backplane.sync(link)
        elif kind == Kind.RECOVER and len(payload) == RECOVER_HEAD.size:
            req, since = RECOVER_HEAD.unpack(payload)
            self.backplane.recover(link, key, req, since)
        elif kind == Kind.PRESENCE and len(payload) == TOKEN.size:
            self.spawn(self._answer_presence(link, key, TOKEN.unpack(payload)[0]))
        elif kind == Kind.PRESENCE_PART and len(payload) > TOKEN.size:
            gather = self.gathers.get(TOKEN.unpack_from(payload)[0])
            try:
                users, anonymous = _decode_part(payload[TOKEN.size :])
            except msgspec.DecodeError:
                self.bad_frames += 1
                return
            if gather is not None:
                gather.add(PresenceResult(users, anonymous))
        elif kind == Kind.JOIN_ASK and len(payload) > JOIN_HEAD.size:
            req, limit = JOIN_HEAD.unpack_from(payload)
            try:
                member = payload[JOIN_HEAD.size :].decode()
            except UnicodeDecodeError:
                self.bad_frames += 1
                return
            # Decided here, in the order the workers' frames arrive: of members joining
            # at once, exactly those that fit get in (on this node; nodes sharing Redis
            # each count their own).
            room = (key, member) in self.members or self.member_counts.get(key, 0) < limit
            if room:
                self._member(link, key, member, joined=True)
            link.send(Kind.JOINED, key, TOKEN.pack(req) + (b"\x01" if room else b"\x00"))
        elif kind == Kind.JOIN or kind == Kind.LEAVE:
            try:
                user = payload.decode()
            except UnicodeDecodeError:
                self.bad_frames += 1
                return
            self._member(link, key, user, joined=kind == Kind.JOIN)
        elif kind == Kind.CHANNELS_PART and len(payload) > TOKEN.size:
            listing = self.listings.get(TOKEN.unpack_from(payload)[0])
            try:
                counts = _decode_counts(payload[TOKEN.size :])
            except msgspec.DecodeError:
                self.bad_frames += 1
                return
            if listing is not None:
                listing.add(ChannelList(counts))
        else:
            self.bad_frames += 1

    def announce(self, channel: str, user: str, joined: bool) -> None:
        """The backplane's word that ``user`` joined (left) ``channel`` server-wide."""
        if self.member_events is not None:
            self.member_events("join" if joined else "leave", channel, user)

    def _member(self, link: Link, channel: str, user: str, joined: bool) -> None:
        """A worker's first (last) connection of ``user`` in ``channel``: the node's?"""
        pair = (channel, user)
        held = self.members.get(pair)
        if joined:
            if held is None:
                self.members[pair] = {link}
                self.member_counts[channel] = self.member_counts.get(channel, 0) + 1
                self.backplane.joined(channel, user, True)
            else:
                held.add(link)
        elif held is not None and link in held:
            held.discard(link)
            if not held:
                del self.members[pair]
                left = self.member_counts.pop(channel, 1) - 1
                if left:
                    self.member_counts[channel] = left
                self.backplane.joined(channel, user, False)

    def _unsub(self, channel: str, link: Link) -> None:
        held = self.channels.get(channel)
        if held is not None:
            held.discard(link)
            if not held:
                del self.channels[channel]
                self.backplane.channel_removed(channel)
                if self.events is not None:
                    self.events("channel_vacated", channel)

    def _user_off(self, user: str, link: Link) -> None:
        held = self.users.get(user)
        if held is link:
            del self.users[user]
            self.backplane.user_removed(user)
        elif isinstance(held, set):
            held.discard(link)
            if len(held) == 1:
                self.users[user] = held.pop()

    # --- publishing (the API's) and delivering ----------------------------------------

    # ``exclude``: a connection id (``"<pid>-<token>"``, from its welcome) left out.

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """Deliver to every subscriber of ``channel``."""
        self.published += 1
        return await self.backplane.publish_channel(channel, sender, data, exclude)

    async def publish_channels(
        self, channels: list[str], sender: str | None, data: Raw, exclude: str | None = None
    ) -> list[Published]:
        """Publish to each of ``channels`` (each its own seq); results in that order."""
        self.published += len(channels)
        bp = self.backplane
        if exclude is not None:  # on Redis a round trip each: one at a time, not 100 at once
            return [await bp.publish_channel(c, sender, data, exclude) for c in channels]
        # Gathered: the Redis backplane sends them all in one pipelined round trip.
        asks = [bp.publish_channel(channel, sender, data) for channel in channels]
        return list(await asyncio.gather(*asks))

    async def publish_user(
        self, user: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """Deliver to every connection of ``user``."""
        self.published += 1
        return await self.backplane.publish_user(user, sender, data, exclude)

    async def broadcast(
        self, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        """Deliver to every connection."""
        self.published += 1
        return await self.backplane.broadcast(sender, data, exclude)

    # --- the API's commands and reads (on every node) ---------------------------------

    async def disconnect(self, user: str, reason: str) -> Published:
        """Close every connection of ``user`` with ``bye`` ``reason``."""
        return await self.backplane.disconnect(user, reason)

    async def unsubscribe(self, user: str, channel: str) -> Published:
        """Take every connection of ``user`` out of ``channel``."""
        return await self.backplane.unsubscribe(user, channel)

    async def read_history(self, channel: str, since: int | None, limit: int) -> HistoryPage:
        """Up to ``limit`` messages of ``channel``'s history (after ``since``, if given)."""
        return await self.backplane.read_history(channel, since, limit)

    async def list_channels(self, prefix: str, limit: int) -> ChannelList:
        """The first ``limit`` channels (by name) starting with ``prefix``, with counts."""
        return await self.backplane.list_channels(prefix, limit)

    def tell_user(self, user: str, kind: Kind, payload: bytes) -> int:
        """Send a command frame to the workers holding connections of ``user``; how many."""
        held = self.users.get(user)
        if held is None:
            return 0
        targets = held if isinstance(held, set) else (held,)
        frame = encode_frame(kind, user, payload)
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    async def node_channels(self, prefix: str, limit: int) -> ChannelList:
        """This node's first ``limit`` channels starting with ``prefix``, counted.

        The router knows which workers hold each channel, not how many connections:
        it picks the names, then asks each worker holding some of them for its counts.
        """
        matching = (name for name in self.channels if name.startswith(prefix))
        picked = heapq.nsmallest(limit + 1, matching)
        truncated = len(picked) > limit
        asks: dict[Link, list[str]] = {}
        for name in picked[:limit]:
            for link in self.channels[name]:
                asks.setdefault(link, []).append(name)
        if not asks:
            return ChannelList({}, truncated)
        token = next(self.tokens)
        listing = self.listings[token] = Answers(ChannelList({}, truncated), len(asks))
        try:
            for link, names in asks.items():
                link.send(Kind.CHANNELS_ASK, "", TOKEN.pack(token) + _encode_json(names))
            result = await listing.wait(PRESENCE_TIMEOUT)
        finally:
            del self.listings[token]
        result.cap(limit)  # sorted by name
        return result

    def deliver_channel(self, channel: str, line: bytes) -> int:
        """Queue ``line`` to the workers holding subscribers of ``channel``; how many."""
        targets = self.channels.get(channel)
        if not targets:
            return 0
        frame = encode_frame(Kind.DELIVER_CHANNEL, channel, line)
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    def deliver_user(self, user: str, line: bytes) -> int:
        """Queue ``line`` to the workers holding connections of ``user``; how many."""
        held = self.users.get(user)
        if held is None:
            return 0
        targets = held if isinstance(held, set) else (held,)
        frame = encode_frame(Kind.DELIVER_USER, user, line)
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    def deliver_all(self, line: bytes) -> int:
        """Queue ``line`` to every worker; how many."""
        frame = encode_frame(Kind.DELIVER_ALL, "", line)
        for link in self.links:
            link.send_frame(frame)
        return len(self.links)

    def deliver(self, kind: Kind, key: str, line: bytes, exclude: str | None) -> int:
        """``deliver_channel``, ``_user`` or ``_all`` (by ``kind``), leaving out the
        connection ``exclude`` names, if any. Off the hot path: API publishes only."""
        head = None if exclude is None else exclude_head(exclude)
        if head is None:
            if kind == Kind.DELIVER_CHANNEL:
                return self.deliver_channel(key, line)
            if kind == Kind.DELIVER_USER:
                return self.deliver_user(key, line)
            return self.deliver_all(line)
        targets: Collection[Link]
        if kind == Kind.DELIVER_CHANNEL:
            targets = self.channels.get(key, ())
        elif kind == Kind.DELIVER_USER:
            held = self.users.get(key)
            targets = () if held is None else held if isinstance(held, set) else (held,)
        else:
            targets = self.links
        # Every target gets the same frame; only the worker of the id's pid looks for it.
        frame = encode_frame(_EXCEPT[kind], key, head + line)
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    # --- presence and figures ---------------------------------------------------------

    async def node_presence(self, channel: str) -> PresenceResult:
        """Presence on this node's workers."""
        links = list(self.channels.get(channel, ()))
        if not links:
            return PresenceResult({})
        token = next(self.tokens)
        gather = self.gathers[token] = Gather(len(links))
        try:
            for link in links:
                link.send(Kind.PRESENCE_ASK, channel, TOKEN.pack(token))
            return await gather.wait(PRESENCE_TIMEOUT)
        finally:
            del self.gathers[token]

    async def presence(self, channel: str) -> PresenceResult:
        """Who is subscribed to ``channel`` (on every node)."""
        return await self.backplane.presence(channel)

    async def _answer_presence(self, link: Link, channel: str, req: int) -> None:
        result = await self.presence(channel)
        link.send(Kind.PRESENCE_DONE, channel, TOKEN.pack(req) + _encode_json(result))

    def stats(self) -> BrokerStats:
        """Broker figures for /api/stats (the backplane adds its own)."""
        backplane = self.backplane
        own = BrokerStats(
            kind=backplane.kind,
            status=backplane.status,
            channels=len(self.channels),
            users=len(self.users),
            published=self.published,
            history_channels=len(backplane.history),
            bad_frames=self.bad_frames,
        )
        return backplane.stats(own)


def _holds(held: Link | set[Link], link: Link) -> bool:
    return link in held if isinstance(held, set) else held is link

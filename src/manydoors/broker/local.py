"""The embedded broker: routing between the workers of one node, in the supervisor.

It keeps, per channel and per user, the set of worker links that hold recipients, the
sequence number and recent history of each channel. A publish is encoded once into
the exact line clients receive, wrapped once into a delivery frame, and that same
frame is queued to each target link: N workers cost N queue appends and no
re-encoding.

Because one event loop applies every frame in order, a ``sub`` with ``since`` is
exact here: the missed lines are taken from history and sent to the worker on the
same link, before any later delivery of the channel, so the client sees each seq
once and in order. The Redis broker builds on this class and keeps that property.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Coroutine
from typing import Any, Final

import msgspec
from msgspec import Raw

from ..protocol.ipc import RECOVER_HEAD, RECOVERED_HEAD, TOKEN, Kind, encode_frame
from ..protocol.messages import broadcast_line, dm_line, msg_line
from ..node.link import Link
from .base import Broker, PresenceResult
from .history import History, missed

PRESENCE_TIMEOUT: Final = 2.0  # seconds to wait for every worker's (or node's) answer
SWEEP_INTERVAL: Final = 30.0  # seconds between two sweeps of expired history

_decode_envelope: Final = msgspec.json.Decoder(tuple[str | None, Raw]).decode
_decode_part: Final = msgspec.json.Decoder(tuple[dict[str, int], int]).decode
_encode_json: Final = msgspec.json.Encoder().encode


class Gather:
    """Presence answers of several workers (or nodes) for one question.

    Answers may arrive before the number to expect is known (Redis tells it only when
    the question's PUBLISH returns): ``expect`` then settles it.
    """

    __slots__ = ("done", "expected", "received", "result")

    def __init__(self, expected: int | None = None) -> None:
        self.expected = expected
        self.received = 0
        self.result = PresenceResult({})
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, part: PresenceResult) -> None:
        self.result.merge(part)
        self.received += 1
        self._check()

    def expect(self, expected: int) -> None:
        self.expected = expected
        self._check()

    def _check(self) -> None:
        complete = self.expected is not None and self.received >= self.expected
        if complete and not self.done.done():
            self.done.set_result(None)

    async def wait(self, timeout: float) -> PresenceResult:
        if not self.done.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.done), timeout)
            except TimeoutError:
                self.result.partial = True
        return self.result


class LocalBroker(Broker):
    kind = "local"

    def __init__(self, history_size: int = 100, history_ttl: float = 300.0) -> None:
        self.links: set[Link] = set()
        self.channels: dict[str, set[Link]] = {}
        # A user is almost always on one worker: store that link itself, not a set of one
        # (a million users would otherwise cost a million sets here).
        self.users: dict[str, Link | set[Link]] = {}
        self.seqs: dict[str, int] = {}
        self.broadcast_seq = 0
        self.history = History(history_size, history_ttl)
        self.published = 0
        self.bad_frames = 0
        self.gathers: dict[int, Gather] = {}
        self.tokens = itertools.count(1)
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.spawn(self._sweep())

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task the broker keeps a reference to and cancels on close."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.history.sweep(time.monotonic())

    # --- links and interests ----------------------------------------------------------

    def attach(self, link: Link) -> None:
        self.links.add(link)

    def detach(self, link: Link) -> None:
        self.links.discard(link)
        for key in [k for k, held in self.channels.items() if link in held]:
            self._unsub(key, link)
        for key in [k for k, held in self.users.items() if _holds(held, link)]:
            self._user_off(key, link)

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        if kind == Kind.PUB or kind == Kind.SEND:
            try:
                sender, data = _decode_envelope(payload)
            except msgspec.DecodeError:
                self.bad_frames += 1
                return
            if kind == Kind.PUB:
                self.pub_channel(key, sender, data)
            else:
                self.pub_user(key, sender, data)
        elif kind == Kind.SUB:
            held = self.channels.get(key)
            if held is None:
                self.channels[key] = {link}
                self.channel_added(key)
            else:
                held.add(link)
        elif kind == Kind.UNSUB:
            self._unsub(key, link)
        elif kind == Kind.USER_ON:
            held_by = self.users.get(key)
            if held_by is None:
                self.users[key] = link
                self.user_added(key)
            elif isinstance(held_by, set):
                held_by.add(link)
            elif held_by is not link:
                self.users[key] = {held_by, link}
        elif kind == Kind.USER_OFF:
            self._user_off(key, link)
        elif kind == Kind.SYNC:
            self.sync(link)
        elif kind == Kind.RECOVER and len(payload) == RECOVER_HEAD.size:
            req, since = RECOVER_HEAD.unpack(payload)
            self.recover(link, key, req, since)
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
        else:
            self.bad_frames += 1

    def _unsub(self, channel: str, link: Link) -> None:
        held = self.channels.get(channel)
        if held is not None:
            held.discard(link)
            if not held:
                del self.channels[channel]
                self.channel_removed(channel)

    def _user_off(self, user: str, link: Link) -> None:
        held = self.users.get(user)
        if held is link:
            del self.users[user]
            self.user_removed(user)
        elif isinstance(held, set):
            held.discard(link)
            if len(held) == 1:
                self.users[user] = held.pop()

    # Hooks: the node gained or lost its first/last subscriber of a channel or
    # connection of a user (the Redis broker subscribes and unsubscribes there).
    def channel_added(self, channel: str) -> None:
        pass

    def channel_removed(self, channel: str) -> None:
        pass

    def user_added(self, user: str) -> None:
        pass

    def user_removed(self, user: str) -> None:
        pass

    def sync(self, link: Link) -> None:
        """Everything ``link`` sent before is in effect: tell it so."""
        link.send(Kind.SYNCED)

    # --- publishing -------------------------------------------------------------------

    def pub_channel(self, channel: str, sender: str | None, data: Raw) -> dict[str, Any]:
        seq = self.seqs.get(channel, 0) + 1
        self.seqs[channel] = seq
        self.published += 1
        line = msg_line(channel, seq, sender, data)
        self.history.add(channel, seq, line, time.monotonic())
        return {"seq": seq, "workers": self.deliver_channel(channel, line)}

    def pub_user(self, user: str, sender: str | None, data: Raw) -> dict[str, Any]:
        self.published += 1
        return {"workers": self.deliver_user(user, dm_line(sender, data))}

    async def publish_channel(self, channel: str, sender: str | None, data: Raw) -> dict[str, Any]:
        return self.pub_channel(channel, sender, data)

    async def publish_user(self, user: str, sender: str | None, data: Raw) -> dict[str, Any]:
        return self.pub_user(user, sender, data)

    async def broadcast(self, sender: str | None, data: Raw) -> dict[str, Any]:
        self.broadcast_seq += 1
        self.published += 1
        line = broadcast_line(self.broadcast_seq, sender, data)
        return {"seq": self.broadcast_seq, "workers": self.deliver_all(line)}

    def deliver_channel(self, channel: str, line: bytes) -> int:
        targets = self.channels.get(channel)
        if not targets:
            return 0
        frame = encode_frame(Kind.DELIVER_CHANNEL, channel, line)
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    def deliver_user(self, user: str, line: bytes) -> int:
        held = self.users.get(user)
        if held is None:
            return 0
        targets = held if isinstance(held, set) else (held,)
        frame = encode_frame(Kind.DELIVER_USER, user, line)
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    def deliver_all(self, line: bytes) -> int:
        frame = encode_frame(Kind.DELIVER_ALL, "", line)
        for link in self.links:
            link.send_frame(frame)
        return len(self.links)

    # --- history and presence ---------------------------------------------------------

    def recover(self, link: Link, channel: str, req: int, since: int) -> None:
        """Answer a ``sub`` with ``since``; the link's SUB of the channel came first."""
        seq = self.seqs.get(channel, 0)
        lines = missed(since, seq, self.history.entries(channel, time.monotonic()))
        answer_recover(link, channel, req, seq, lines)

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
        return await self.node_presence(channel)

    async def _answer_presence(self, link: Link, channel: str, req: int) -> None:
        result = await self.presence(channel)
        link.send(Kind.PRESENCE_DONE, channel, TOKEN.pack(req) + _encode_json(result))

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "status": self.status,
            "channels": len(self.channels),
            "users": len(self.users),
            "published": self.published,
            "history_channels": len(self.history),
            "bad_frames": self.bad_frames,
        }


def answer_recover(link: Link, channel: str, req: int, seq: int, lines: list[bytes] | None) -> None:
    head = RECOVERED_HEAD.pack(req, lines is not None, seq)
    link.send(Kind.RECOVERED, channel, head + b"".join(lines or ()))


def _holds(held: Link | set[Link], link: Link) -> bool:
    return link in held if isinstance(held, set) else held is link

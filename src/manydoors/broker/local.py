"""The embedded broker: routing between the workers of one node, in the supervisor.

It keeps, per channel and per user, the set of worker links that hold recipients, and
the sequence number of each channel. A publish is encoded once into the exact line
clients receive, wrapped once into a delivery frame, and that same frame is queued
to each target link: N workers cost N queue appends and no re-encoding.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from msgspec import Raw

from ..protocol.ipc import Kind, encode_frame
from ..protocol.messages import broadcast_line, dm_line, msg_line
from ..server.link import Link
from .base import Broker

_decode_envelope: Final = msgspec.json.Decoder(tuple[str | None, Raw]).decode


class LocalBroker(Broker):
    def __init__(self) -> None:
        self.links: set[Link] = set()
        self.channels: dict[str, set[Link]] = {}
        # A user is almost always on one worker: store that link itself, not a set of one
        # (a million users would otherwise cost a million sets here).
        self.users: dict[str, Link | set[Link]] = {}
        self.seqs: dict[str, int] = {}
        self.broadcast_seq = 0
        self.published = 0
        self.bad_frames = 0

    def attach(self, link: Link) -> None:
        self.links.add(link)

    def detach(self, link: Link) -> None:
        self.links.discard(link)
        for key in [k for k, held in self.channels.items() if link in held]:
            _forget(self.channels, key, link)
        for key in [k for k, held in self.users.items() if _holds(held, link)]:
            _forget_user(self.users, key, link)

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        if kind == Kind.PUB or kind == Kind.SEND:
            try:
                sender, data = _decode_envelope(payload)
            except msgspec.DecodeError:
                self.bad_frames += 1
                return
            if kind == Kind.PUB:
                self.publish_channel(key, sender, data)
            else:
                self.publish_user(key, sender, data)
        elif kind == Kind.SUB:
            self.channels.setdefault(key, set()).add(link)
        elif kind == Kind.UNSUB:
            _forget(self.channels, key, link)
        elif kind == Kind.USER_ON:
            held = self.users.get(key)
            if held is None:
                self.users[key] = link
            elif isinstance(held, set):
                held.add(link)
            elif held is not link:
                self.users[key] = {held, link}
        elif kind == Kind.USER_OFF:
            _forget_user(self.users, key, link)
        elif kind == Kind.SYNC:
            link.send(Kind.SYNCED)
        else:
            self.bad_frames += 1

    def publish_channel(self, channel: str, sender: str | None, data: Raw) -> int:
        seq = self.seqs.get(channel, 0) + 1
        self.seqs[channel] = seq
        self.published += 1
        targets = self.channels.get(channel)
        if not targets:
            return 0
        frame = encode_frame(Kind.DELIVER_CHANNEL, channel, msg_line(channel, seq, sender, data))
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    def publish_user(self, user: str, sender: str | None, data: Raw) -> int:
        self.published += 1
        held = self.users.get(user)
        if held is None:
            return 0
        targets = held if isinstance(held, set) else (held,)
        frame = encode_frame(Kind.DELIVER_USER, user, dm_line(sender, data))
        for link in targets:
            link.send_frame(frame)
        return len(targets)

    def broadcast(self, sender: str | None, data: Raw) -> int:
        self.broadcast_seq += 1
        self.published += 1
        frame = encode_frame(Kind.DELIVER_ALL, "", broadcast_line(self.broadcast_seq, sender, data))
        for link in self.links:
            link.send_frame(frame)
        return len(self.links)

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "channels": len(self.channels),
            "users": len(self.users),
            "published": self.published,
            "bad_frames": self.bad_frames,
        }


def _forget(table: dict[str, set[Link]], key: str, link: Link) -> None:
    held = table.get(key)
    if held is not None:
        held.discard(link)
        if not held:
            del table[key]


def _holds(held: Link | set[Link], link: Link) -> bool:
    return link in held if isinstance(held, set) else held is link


def _forget_user(users: dict[str, Link | set[Link]], user: str, link: Link) -> None:
    held = users.get(user)
    if held is link:
        del users[user]
    elif isinstance(held, set):
        held.discard(link)
        if len(held) == 1:
            users[user] = held.pop()

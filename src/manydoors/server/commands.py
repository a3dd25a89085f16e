"""What the server does to a worker's connections on the HTTP API's behalf.

The router sends these frames only to the workers that hold the user (or the
channel) concerned, on every node: ``DISCONNECT`` and ``UNSUBSCRIBE`` act on every
connection of a user, ``CHANNELS_ASK`` counts this worker's subscribers of some
channels, and the ``DELIVER_*_EXCEPT`` deliveries leave one connection out (the API's
``exclude``: see connids.py). ``Worker.on_frame`` hands them here, after its hot
branches: a plain delivery never passes through this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

import msgspec

from ..protocol.ipc import EXCLUDE, TOKEN, Kind
from ..protocol.messages import unsubscribed_line
from ..protocol.wire import Wire
from .admission import Admission
from .hub import Hub, channels_of
from .membership import Uplink
from .peer import Peer
from .sessions import Sessions

_decode_names: Final = msgspec.json.Decoder(list[str]).decode
_encode_json: Final = msgspec.json.Encoder().encode


class Commands:
    """The API's commands and questions to one worker's connections."""

    __slots__ = ("admission", "fanout", "hub", "sessions", "wire")

    def __init__(
        self,
        hub: Hub[Peer],
        admission: Admission,
        sessions: Sessions,
        wire: Wire,
        fanout: Callable[[Iterable[Peer], bytes], int],
    ) -> None:
        self.hub = hub
        self.admission = admission
        self.sessions = sessions
        self.wire = wire
        self.fanout = fanout  # the worker's: one write of the same bytes per recipient

    def on_frame(self, link: Uplink, kind: int, key: str, payload: bytes) -> int | None:
        """A command frame from the broker (the kinds 28 to 33); returns the
        deliveries of a ``DELIVER_*_EXCEPT`` (None for the others)."""
        if kind == Kind.DISCONNECT:
            self.disconnect(key, payload.decode())
        elif kind == Kind.UNSUBSCRIBE:
            self.unsubscribe(key, payload.decode())
        elif kind == Kind.CHANNELS_ASK and len(payload) >= TOKEN.size:
            counts = self.count(_decode_names(payload[TOKEN.size :]))
            link.send(Kind.CHANNELS_PART, "", payload[: TOKEN.size] + _encode_json(counts))
        elif len(payload) >= EXCLUDE.size:
            return self.deliver_except(kind, key, payload)
        return None

    def disconnect(self, user: str, reason: str) -> None:
        """Say ``bye`` with ``reason`` to every connection of ``user`` and close them."""
        for conn in list(self.hub.of_user(user)):
            self.admission.close(conn, "disconnected", bye=reason)

    def unsubscribe(self, user: str, channel: str) -> None:
        """Take every connection of ``user`` out of ``channel``; tell each one."""
        sessions = self.sessions
        waiting: set[Peer] = set()
        if channel in sessions.pending:  # a sub with since, its history on the way
            waiting = {conn for conn, ch, _ in sessions.recovering.values() if ch == channel}
        line = unsubscribed_line(channel)
        for conn in list(self.hub.of_user(user)):
            if channel in channels_of(conn) or conn in waiting:
                sessions.drop(conn, channel)
                conn.write(line)

    def count(self, names: list[str]) -> dict[str, int]:
        """This worker's subscribers of each of ``names`` (those it has any of)."""
        held = self.hub.channels
        return {name: len(held[name]) for name in names if name in held}

    def deliver_except(self, kind: int, key: str, payload: bytes) -> int:
        """A delivery that leaves out the connection the EXCLUDE head names.

        Every worker holding recipients gets it; only the one whose pid is in the id
        looks for that connection, comparing object ids while it goes through them.
        """
        pid, token = EXCLUDE.unpack_from(payload)
        data = self.wire.frame(payload[EXCLUDE.size :])
        hub = self.hub
        members: Iterable[Peer]
        if kind == Kind.DELIVER_CHANNEL_EXCEPT:
            members = hub.channels.get(key, ())
        elif kind == Kind.DELIVER_USER_EXCEPT:
            members = hub.of_user(key)
        elif kind == Kind.DELIVER_ALL_EXCEPT:
            members = hub.conns
        else:
            return 0
        admission = self.admission
        if pid == admission.pid:
            skip = admission.ids.address(token)
            members = [conn for conn in members if id(conn) != skip]
        return self.fanout(members, data)

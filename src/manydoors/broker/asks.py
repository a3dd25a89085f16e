"""Questions one node asks the others through Redis, and its answers to theirs.

Presence and channel lists span nodes. The asker publishes a question (with its node
id and a token) on a topic: the channel's for presence (only the nodes holding its
subscribers hear it), the broadcast topic for a channel list (every node). Each node
that hears it answers on the asker's own topic, and the asker gathers the answers until
it has as many as the PUBLISH reached, or PRESENCE_TIMEOUT (the answer is then
``partial``). While Redis is away a node answers for itself alone, ``partial``.
"""

from __future__ import annotations

import itertools
from typing import Any, Final, Protocol

import msgspec

from .backplane import Routes
from .base import ChannelList, PresenceResult
from .keys import BROADCAST, channel_topic, node_topic
from .router import PRESENCE_TIMEOUT, Answers, Gather

_encode_json: Final = msgspec.json.Encoder().encode
_decode_part: Final = msgspec.json.Decoder(PresenceResult).decode
_decode_channels: Final = msgspec.json.Decoder(ChannelList).decode


class Plane(Protocol):
    """What the questions use of the Redis backplane."""

    redis: Any  # redis.asyncio.Redis or RedisCluster
    cluster: bool
    node: str
    degraded: bool
    router: Routes

    def lost_command(self, exc: Exception) -> None: ...


class Asks:
    """The node's questions in flight (by token) and its answers to other nodes."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.presences: dict[int, Gather] = {}
        self.listings: dict[int, Answers[ChannelList]] = {}
        self.tokens = itertools.count(1)

    async def _publish(self, topic: str, message: bytes) -> int:
        redis = self.plane.redis
        return int(await (redis.spublish if self.plane.cluster else redis.publish)(topic, message))

    # --- asking ------------------------------------------------------------------------

    async def presence(self, channel: str) -> PresenceResult:
        plane = self.plane
        if not plane.degraded:
            token = next(self.tokens)
            gather = self.presences[token] = Gather()
            try:
                question = b"p%s %d" % (plane.node.encode(), token)
                # The nodes subscribed to the channel each answer.
                gather.expect(await self._publish(channel_topic(channel), question))
                return await gather.wait(PRESENCE_TIMEOUT)
            except Exception as exc:
                plane.lost_command(exc)
            finally:
                del self.presences[token]
        result = await plane.router.node_presence(channel)
        result.partial = True
        return result

    async def channels(self, prefix: str, limit: int) -> ChannelList:
        """Each node answers with its own first ``limit``; their sum is cut to ``limit``."""
        plane = self.plane
        if not plane.degraded:
            token = next(self.tokens)
            listing = self.listings[token] = Answers(ChannelList({}))
            try:
                question = b"l%s %d %d %s" % (plane.node.encode(), token, limit, prefix.encode())
                listing.expect(await self._publish(BROADCAST, question))
                result = await listing.wait(PRESENCE_TIMEOUT)
            except Exception as exc:
                plane.lost_command(exc)
            else:
                result.cap(limit)
                return result
            finally:
                del self.listings[token]
        result = await plane.router.node_channels(prefix, limit)
        result.partial = True
        return result

    def answered(self, payload: bytes) -> None:
        """An answer on this node's topic: r<token> <presence> or k<token> <channels>."""
        space = payload.index(b" ")
        token = int(payload[1:space])
        if payload[:1] == b"r":
            gather = self.presences.get(token)
            if gather is not None:
                gather.add(_decode_part(payload[space + 1 :]))
        elif payload[:1] == b"k":
            listing = self.listings.get(token)
            if listing is not None:
                listing.add(_decode_channels(payload[space + 1 :]))

    # --- answering ---------------------------------------------------------------------

    def presence_asked(self, channel: str, question: bytes) -> None:
        """p<node> <token> on the channel's topic: this node's part."""
        asker, token = question[1:].split(b" ", 1)
        self.plane.router.spawn(self._answer_presence(channel, asker.decode(), int(token)))

    def channels_asked(self, question: bytes) -> None:
        """l<node> <token> <limit> <prefix> on the broadcast topic: this node's channels."""
        asker, token, limit, prefix = question[1:].split(b" ", 3)
        answer = self._answer_channels(asker.decode(), int(token), int(limit), prefix.decode())
        self.plane.router.spawn(answer)

    async def _answer_presence(self, channel: str, asker: str, token: int) -> None:
        part = await self.plane.router.node_presence(channel)
        await self._reply(asker, b"r%d %s" % (token, _encode_json(part)))

    async def _answer_channels(self, asker: str, token: int, limit: int, prefix: str) -> None:
        part = await self.plane.router.node_channels(prefix, limit)
        await self._reply(asker, b"k%d %s" % (token, _encode_json(part)))

    async def _reply(self, asker: str, message: bytes) -> None:
        try:
            await self._publish(node_topic(asker), message)
        except Exception as exc:
            self.plane.lost_command(exc)

"""The Pusher protocol's client events, on the node's sessions.

A Pusher connection's messages (``pusher:subscribe``, ``pusher:unsubscribe``,
``pusher:signin``, ``pusher:ping``, ``client-*``) become the node's own operations:
the hub, the interest frames, the held acks, history and presence of ``Sessions``,
under the node names of the connection's app (``names.py``). What is Pusher's alone
is here: the auth signatures, the presence members (a user id and its info, from the
subscription's ``channel_data``), cache channels, client events and signin.

``pusher_internal:subscription_succeeded`` is held like a native ``ok``: until the
broker has applied the SUB (a message published right after it cannot be missed).
A presence channel's then carries the members, asked of every worker and node; a
cache channel's is followed by the channel's last event, replayed by the broker in
order with live deliveries (a history of one), or ``pusher:cache_miss``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol, cast

import msgspec
from msgspec import Raw

from ..broker.base import PresenceResult
from ..broker.history import LAST
from ..config import AppConfig
from ..namespaces import Namespaces
from ..protocol.ipc import JOIN_HEAD, RECOVER_HEAD, TOKEN, Kind, missed_lines
from ..protocol.messages import ProtocolError
from ..server.hub import Hub, channels_of
from ..server.limits import CountTable
from ..server.membership import Membership
from ..server.peer import Peer
from ..server.sessions import Sessions
from . import frames, names, signing

MAX_USER_ID: Final = 128  # characters of a presence member's or signed-in user's id
MAX_USER_INFO: Final = 1024  # bytes of a presence member's user_info (Pusher: 1 KB)

_encode_json: Final = msgspec.json.Encoder().encode
_decode_presence: Final = msgspec.json.Decoder(PresenceResult).decode
_user_data: Final = msgspec.json.Decoder(frames.UserData)
_channel_data: Final = msgspec.json.Decoder(frames.ChannelData)


class PusherPeer(Peer, Protocol):
    """A Pusher connection (``connection.PusherConnection``) as the sessions see it."""

    app: AppConfig | None  # None until the upgrade named a known app
    sid: str  # the socket id, "<pid>.<token>"


class Unsubscribe(msgspec.Struct):
    channel: str


class PusherMembership(Membership):
    """Presence members: who each connection is in each presence channel it is in.

    The node's JOIN and LEAVE carry the member (``frames.member_key``: its user id and
    info): the router and the backplane tell a member's first join and last leave
    server-wide, which the Pusher wire turns into member_added and member_removed.
    """

    __slots__ = ("counts", "member_of")

    def __init__(self, hub: Hub[Peer], namespaces: Namespaces, service: str) -> None:
        super().__init__(hub, namespaces, service, frozenset())
        self.member_of: dict[tuple[Peer, str], str] = {}  # (conn, channel) -> member
        self.counts: dict[tuple[str, str], int] = {}  # (channel, member) -> its conns here

    def add(self, conn: Peer, channel: str, member: str) -> None:
        """``conn`` is ``member`` in the presence ``channel``: JOIN if first here."""
        if (conn, channel) in self.member_of:
            return
        self.member_of[conn, channel] = member
        pair = (channel, member)
        n = self.counts.get(pair, 0)
        self.counts[pair] = n + 1
        if n == 0 and self.link is not None:
            self.link.send(Kind.JOIN, channel, member.encode())

    def joined(self, conn: Peer, channel: str) -> None:
        """Nothing: a Pusher member is known from its subscription (``add``)."""

    def left(self, conn: Peer, channel: str) -> None:
        member = self.member_of.pop((conn, channel), None)
        if member is None:
            return
        pair = (channel, member)
        n = self.counts[pair] - 1
        if n:
            self.counts[pair] = n
            return
        del self.counts[pair]
        if self.link is not None:
            self.link.send(Kind.LEAVE, channel, member.encode())

    def leave_all(self, conn: Peer) -> None:
        """Nothing: a signin does not change who a connection is in presence channels."""

    def forget(self, conn: Peer) -> None:
        """``conn`` has ended: it leaves every presence channel it was in."""
        for channel in channels_of(conn):
            self.left(conn, channel)

    def others(self, channel: str, line: bytes, conns: Iterable[Peer]) -> Iterable[Peer]:
        """The recipients of a ``join`` line but the joining member's own connections."""
        member = frames.joined_member(line)
        if member is None:
            return conns
        return [c for c in conns if self.member_of.get((c, channel)) != member]


class PusherSessions(Sessions):
    """The Pusher client events of one worker's connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # those of Sessions
        super().__init__(*args, **kwargs)
        self.members = self.pusher = PusherMembership(self.hub, self.namespaces, self.service)
        self.asks: dict[int, Callable[[PresenceResult], None]] = {}  # presence, by request
        self.caches: dict[int, tuple[str, str | None]] = {}  # cache joins: (name, member)
        self.seats: dict[int, tuple[Peer, str, str, str]] = {}  # JOIN_ASKs: (conn, node, ...)
        # Client events of each connection this second (few connections send them).
        self.client_events: dict[Peer, int] = {}
        self.second = 0
        # Each app's connections on every worker of the service, in the bucket of the
        # app's index (for the apps' max_connections; None when no app has one).
        self.quotas: CountTable | None = None
        self.apps: dict[str, int] = {}  # app id -> its index (its bucket)

    def let_in(self, conn: Peer, app: AppConfig) -> bool:
        """Count ``conn`` against its app's max_connections (False: the app is full)."""
        quotas = self.quotas
        if quotas is None or not app.max_connections:
            return True
        bucket = self.apps[app.id]
        if quotas.total(bucket) >= app.max_connections:
            self.counters.error("too_many_connections")
            return False
        quotas.add(bucket, 1)
        return True

    # --- messages in -------------------------------------------------------------------

    def handle(self, conn: Peer, message: bytes) -> None:
        conn.mark = self.clock.tick
        try:
            event = frames.decode(message)
        except frames.FrameError as exc:
            self.reject(conn, ProtocolError("bad_json", str(exc)))
            return
        conn.sent = sent = conn.sent + 1
        if sent > self.msgs_per_tick:
            self.reject(conn, ProtocolError("rate_limited", self.rate_reason))
            return
        if self.strikes:
            self.strikes.pop(conn, None)
        c = self.counters
        c.mv[c.i_in] += 1
        peer = cast(PusherPeer, conn)
        name = event.event
        try:
            if name == "pusher:ping":
                self.say(conn, frames.PONG)
            elif name == "pusher:pong":
                pass  # handle() has already reset the heartbeat clock
            elif name == "pusher:subscribe":
                self.pusher_subscribe(peer, frames.data_of(event.data, frames.SubscribeData))
            elif name == "pusher:unsubscribe":
                channel = frames.data_of(event.data, Unsubscribe).channel
                if peer.app is not None:
                    self.drop(conn, names.channel(peer.app.id, channel))
            elif name == "pusher:signin":
                self.signin(peer, frames.data_of(event.data, frames.SigninData))
            elif name.startswith("client-"):
                self.client_event(peer, event)
            else:
                why = f"unknown event {name[:64]!r} (pusher:subscribe, client-..., ...)"
                self.reject(conn, ProtocolError("unknown_op", why))
        except frames.FrameError as exc:
            self.reject(conn, ProtocolError("bad_field", f"{name[:64]}: {exc}"))

    def say(self, conn: Peer, data: bytes) -> None:
        """Write Pusher frames to ``conn`` while it is open."""
        if conn.transport is not None:
            conn.transport.write(data)

    def refuse(self, conn: Peer, channel: str, why: str, status: int) -> None:
        """A subscription failed: the channel's subscription error (counted)."""
        self.counters.error("forbidden" if status in (401, 403) else "bad_field")
        self.say(conn, frames.subscription_error(channel[: names.MAX_CHANNEL], why, status))

    def release(self, conn: Peer, why: str = "closed") -> None:
        app = cast(PusherPeer, conn).app
        if app is not None and app.max_connections and self.quotas is not None:
            self.quotas.add(self.apps[app.id], -1)
        self.pusher.forget(conn)
        self.client_events.pop(conn, None)
        super().release(conn, why)

    # --- subscriptions -----------------------------------------------------------------

    def pusher_subscribe(self, conn: PusherPeer, sub: frames.SubscribeData) -> None:
        app, name = conn.app, sub.channel
        if app is None:
            return
        if not names.valid(name):
            self.refuse(conn, name, "invalid channel name (A-Z a-z 0-9 _-=@,.; up to 164)", 400)
            return
        node = names.channel(app.id, name)
        if node in channels_of(conn):
            self.refuse(conn, name, "already subscribed to this channel", 400)
            return
        member: str | None = None
        if name.startswith(names.SERVER_TO_USER):
            if conn.user != names.user(app.id, name[len(names.SERVER_TO_USER) :]):
                self.refuse(conn, name, "sign in as this user first (pusher:signin)", 403)
                return
        elif names.is_private(name):
            data = sub.channel_data if names.is_presence(name) else None
            if names.is_presence(name) and data is None:
                self.refuse(conn, name, "a presence channel needs channel_data", 400)
                return
            expected = signing.channel_auth(app.key, app.secret, conn.sid, name, data)
            if not signing.check_auth(sub.auth, expected):
                why = "invalid signature: auth must be key:HMAC-SHA256(secret, socket_id:channel)"
                self.refuse(conn, name, why, 401)
                return
            if data is not None:
                member = self.member(conn, name, data)
                if member is None:
                    return
        if len(channels_of(conn)) >= self.max_subscriptions:
            why = f"a connection may be in at most {self.max_subscriptions} channels"
            self.refuse(conn, name, why, 403)
            return
        if member is None:
            self.enter_channel(conn, node, name, None)
        elif self.link is not None:
            # The router lets the member in only if the channel has room: of members
            # joining at once exactly those that fit get in, and a refused one is
            # never announced.
            req = next(self.requests)
            self.seats[req] = (conn, node, name, member)
            head = JOIN_HEAD.pack(req, app.max_presence_members)
            self.link.send(Kind.JOIN_ASK, node, head + member.encode())

    def seated(self, channel: str, payload: bytes) -> None:
        """The router's answer to JOIN_ASK: in (the router counts it a member), or not."""
        seat = self.seats.pop(TOKEN.unpack_from(payload)[0], None)
        if seat is None:
            return
        conn, node, name, member = seat
        if payload[TOKEN.size :] != b"\x01":
            limit = getattr(cast(PusherPeer, conn).app, "max_presence_members", 0)
            why = f"the presence channel is full (max_presence_members {limit})"
            self.refuse(conn, name, why, 403)
        elif conn.transport is None or node in channels_of(conn):
            # Gone (or in) meanwhile: the router's count of it is ours to undo.
            if (node, member) not in self.pusher.counts and self.link is not None:
                self.link.send(Kind.LEAVE, node, member.encode())
        else:
            self.enter_channel(conn, node, name, member)

    def enter_channel(self, conn: Peer, node: str, name: str, member: str | None) -> None:
        """Put ``conn`` in ``node`` (allowed); subscription_succeeded once applied."""
        if names.is_cache(name):
            self.cache_join(conn, node, name, member)
            return
        if self.hub.subscribe(conn, node) and node not in self.pending:
            self._interest(Kind.SUB, node)
        if member is not None:
            self.pusher.add(conn, node, member)
        self.when_applied(conn, lambda: self.succeed(conn, node, name, member, b""))

    def ask_presence(self, node: str, then: Callable[[PresenceResult], None]) -> None:
        """Ask every worker (and node) who is in ``node``; ``then`` gets the answer."""
        if self.link is not None:
            req = next(self.requests)
            self.asks[req] = then
            self.link.send(Kind.PRESENCE, node, TOKEN.pack(req))

    def member(self, conn: Peer, channel: str, data: str) -> str | None:
        """The member a presence subscription's channel_data names (None: refused)."""
        try:
            got = _channel_data.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.refuse(conn, channel, f"bad channel_data: {exc}", 400)
            return None
        user_id = str(got.user_id)
        if not user_id or len(user_id) > MAX_USER_ID:
            self.refuse(conn, channel, f"user_id must be 1 to {MAX_USER_ID} characters", 400)
            return None
        if len(got.user_info) > MAX_USER_INFO:
            self.refuse(conn, channel, f"user_info over {MAX_USER_INFO} bytes", 400)
            return None
        return frames.member_key(user_id, got.user_info)

    def succeed(self, conn: Peer, node: str, name: str, member: str | None, cached: bytes) -> None:
        """subscription_succeeded (then ``cached``); for presence, with the members."""
        if conn.transport is None or node not in channels_of(conn):
            return  # closed or unsubscribed meanwhile
        if member is None:
            self.say(conn, frames.subscribed(name) + cached)
            return
        self.ask_presence(node, lambda got: self.members_known(conn, node, name, got, cached))

    def members_known(
        self, conn: Peer, node: str, name: str, got: PresenceResult, cached: bytes
    ) -> None:
        if conn.transport is None or (conn, node) not in self.pusher.member_of:
            return
        info: dict[str, Raw] = {}
        for key in got.users:
            member = frames.member(key)
            info[str(member.user_id)] = member.user_info
        presence = {"ids": list(info), "hash": info, "count": len(info)}
        self.say(conn, frames.subscribed(name, presence) + cached)

    def presence_done(self, channel: str, payload: bytes) -> None:
        ask = self.asks.pop(TOKEN.unpack_from(payload)[0], None)
        if ask is not None:
            ask(_decode_presence(payload[TOKEN.size :]))

    def presence_part(self, channel: str) -> bytes:
        """This worker's members of ``channel`` (by member), or its connections."""
        users: dict[str, int] = {}
        anonymous = 0
        member_of = self.pusher.member_of
        for conn in self.hub.channels.get(channel, ()):
            member = member_of.get((conn, channel))
            if member is None:
                anonymous += 1
            else:
                users[member] = users.get(member, 0) + 1
        return _encode_json((users, anonymous))

    def cache_join(self, conn: Peer, node: str, name: str, member: str | None) -> None:
        """Join a cache channel once the broker has sent its last event (or none)."""
        link = self.link
        if link is None:
            return
        if node not in self.hub.channels and node not in self.pending:
            link.send(Kind.SUB, node)
        self.pending[node] = self.pending.get(node, 0) + 1
        req = next(self.requests)
        self.recovering[req] = (conn, node, None)
        self.caches[req] = (name, member)
        link.send(Kind.RECOVER, node, RECOVER_HEAD.pack(req, LAST))

    def recovered(self, channel: str, payload: bytes) -> None:
        cache = self.caches.pop(TOKEN.unpack_from(payload)[0], None)
        taken = self.take_recovery(channel, payload)
        if taken is None or cache is None:
            return
        conn = taken[0]
        if channel in channels_of(conn):
            return  # subscribed meanwhile
        name, member = cache
        self.hub.subscribe(conn, channel)  # the broker knows our interest already
        if member is not None:
            self.pusher.add(conn, channel, member)
        lines = missed_lines(payload)
        if lines:
            cached = self.frame(lines[-1])
            self.counters.mv[self.counters.i_out] += 1
        else:
            cached = frames.text("pusher:cache_miss", {}, name)
            self.tell(cast(PusherPeer, conn), "cache_miss", {"channel": name})
        self.succeed(conn, channel, name, member, cached)

    # --- signin and client events ------------------------------------------------------

    def signin(self, conn: PusherPeer, data: frames.SigninData) -> None:
        app = conn.app
        if app is None:
            return
        expected = signing.user_auth(app.key, app.secret, conn.sid, data.user_data)
        if not signing.check_auth(data.auth, expected):
            why = "invalid signin: auth must be key:HMAC-SHA256(secret, socket_id::user::user_data)"
            self.admission.fail(conn, "unauthorized", why, "unauthorized")
            return
        try:
            user_id = _user_data.decode(data.user_data).id
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.reject(conn, ProtocolError("bad_field", f"pusher:signin: bad user_data: {exc}"))
            return
        if not user_id or len(user_id) > MAX_USER_ID:
            why = f"pusher:signin: user_data's id must be 1 to {MAX_USER_ID} characters"
            self.reject(conn, ProtocolError("bad_field", why))
            return
        self.enter(conn, names.user(app.id, user_id), None, None, None)
        done = frames.text("pusher:signin_success", {"user_data": data.user_data})
        self.when_applied(conn, lambda: self.say(conn, done))

    def client_event(self, conn: PusherPeer, event: frames.Incoming) -> None:
        """A ``client-*`` event: relayed to the channel's other subscribers."""
        app, name = conn.app, event.channel
        if app is None:
            return
        why = None
        node = names.channel(app.id, name) if name is not None else ""
        if not app.enable_client_events:
            why = "client events are not enabled for this app (enable_client_events)"
        elif name is None or not names.is_private(name):
            why = "client events are only for private and presence channels"
        elif names.is_encrypted(name):
            why = "client events are not supported on encrypted channels"
        elif node not in channels_of(conn):
            why = f"subscribe to {name} before sending client events on it"
        elif len(event.data) > app.max_event_bytes:
            why = f"event data over max_event_bytes ({app.max_event_bytes})"
            self.reject(conn, ProtocolError("too_long", why))
            return
        if why is not None:
            self.forbid(conn, why, None)
            return
        assert name is not None
        now = int(time.monotonic())
        if now != self.second:
            self.second = now
            self.client_events.clear()
        n = self.client_events[conn] = self.client_events.get(conn, 0) + 1
        if n > app.max_client_events_per_second:
            self.counters.error("rate_limited")
            limit = app.max_client_events_per_second
            self.say(
                conn, frames.error(f"client event rejected: over {limit}/s", frames.RATE_LIMITED)
            )
            return
        member = self.pusher.member_of.get((conn, node))
        user_id = None if member is None else str(frames.member(member).user_id)
        body = frames.published(event.event, name, event.data, user_id)
        if self.link is not None:
            head = conn.sid.replace(".", "-").encode() + b" "
            self.link.send(Kind.PUB_EXCEPT, node, head + _encode_json((None, Raw(body))))
        hook: dict[str, object] = {"channel": name, "event": event.event, "socket_id": conn.sid}
        hook["data"] = Raw(event.data) if len(event.data) else None
        if user_id is not None:
            hook["user_id"] = user_id
        self.tell(conn, "client_event", hook)

    def tell(self, conn: PusherPeer, event: str, body: dict[str, object]) -> None:
        """A webhook event of the connection's app, if the app wants it."""
        app = conn.app
        if app is None or app.webhook_url is None or event not in app.webhook_events:
            return
        if self.link is not None:
            self.link.send(Kind.EVENT, f"pusher_{event}", _encode_json({"app_id": app.id, **body}))

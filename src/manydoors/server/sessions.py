"""Client ops, handled once for every wire: hello, sub, unsub, pub, send, presence, ping.

A connection class only frames: it hands each complete client message (an NDJSON
line, a WebSocket text frame's payload) to ``Sessions.handle``. Everything a client
may ask is decided here: authentication, rights on private channels, limits, and the
worker's interest frames to the broker (only the 0 -> 1 and 1 -> 0 transitions of
the users and channels this worker holds).

Ops that need the application's backend (auth mode "proxy", namespaces with
``subscribe = "proxy"`` or ``publish_proxy``) ask it through ``Proxies`` and are
answered when it answers; ``refresh`` renews credentials that end (``expiry.py``).

An ``ok`` that depends on the broker (hello, sub) is held until the broker has applied
the interest frames sent before it (a SYNC round trip), so a client that got ``ok``
for a sub cannot miss a message published right after.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

import msgspec

from ..broker.base import PresenceResult
from ..config import AuthConfig, HooksConfig, NamespaceConfig, ServiceConfig
from ..namespaces import Namespaces
from ..protocol.ipc import RECOVER_HEAD, RECOVERED_HEAD, TOKEN, Kind, missed_lines, request_ids
from ..protocol.messages import (
    PONG,
    ClientOp,
    Hello,
    OpId,
    Ping,
    PongOp,
    Presence,
    PresenceOp,
    ProtocolError,
    Pub,
    Recovered,
    Refresh,
    Send,
    Sub,
    Unsub,
    decode_op,
    encode,
    error_line,
    ok_line,
    page,
    pong_line,
)
from ..protocol.wire import Wire
from .admission import Admission
from .clock import Clock
from .hub import Hub, channels_of
from .membership import Membership, Uplink, address
from .peer import Peer
from .proxies import (
    Answer,
    ConnectCall,
    ConnectReply,
    Proxies,
    PublishCall,
    PublishReply,
    SubscribeCall,
)
from .rights import Rights
from .stats import Counters
from .tokens import TokenError, Verifier

_encode_json: Final = msgspec.json.Encoder().encode
_decode_presence: Final = msgspec.json.Decoder(PresenceResult).decode


class Sessions:
    """The client ops of one worker's connections."""

    def __init__(
        self,
        service: ServiceConfig,
        auth: AuthConfig,
        hub: Hub[Peer],
        admission: Admission,
        clock: Clock,
        counters: Counters,
        wire: Wire,
        namespaces: Namespaces | None = None,
        events: frozenset[str] = frozenset(),
        hooks: HooksConfig | None = None,
        slot: int = 0,
    ) -> None:
        self.hub = hub
        self.admission = admission
        self.clock = clock
        self.counters = counters
        self.frame = wire.frame
        self.link: Uplink | None = None  # set once the worker's link is up
        self.max_bad_messages = service.max_bad_messages
        self.max_subscriptions = service.max_subscriptions
        self.msgs_per_tick = clock.msgs_per_tick
        self.rate_reason = f"more than {service.max_messages_per_second:g} messages/s"
        self.verifier = Verifier(auth) if auth.mode == "token" else None
        self.authed = auth.mode != "none"  # a hello must prove who the client is
        self.proxy_auth = auth.mode == "proxy"
        self.namespaces = namespaces or Namespaces(NamespaceConfig())
        self.rights = Rights(self.namespaces, service.allow_send, self.authed)
        self.service = service.name
        self.slot = slot
        hooks = hooks or HooksConfig()
        asks = hooks.connect_url or hooks.subscribe_url or hooks.publish_url
        self.proxies = Proxies(hooks, counters) if asks else None
        self.members = Membership(hub, self.namespaces, service.name, events)
        # Consecutive bad messages of the connections that sent one lately: rare, so
        # kept here rather than in a slot of every connection.
        self.strikes: dict[Peer, int] = {}
        # Acks that wait for the broker to apply our interest frames: batches sent, with
        # the time their SYNC went out (oldest first), and those not yet sent.
        self.dirty = False
        self.waiting: deque[tuple[float, list[tuple[Peer, bytes | Callable[[], None]]]]] = deque()
        self.unsynced: list[tuple[Peer, bytes | Callable[[], None]]] = []  # since the last write
        # Requests to the broker that a client waits for, by request id.
        self.requests = request_ids()
        self.recovering: dict[int, tuple[Peer, str, OpId]] = {}
        # presence questions: (asker, op id, page after, page size)
        self.presences: dict[int, tuple[Peer, OpId, str | None, int]] = {}
        # Channels with a connection waiting for its history: the worker keeps its
        # interest in them even while the hub holds no subscriber.
        self.pending: dict[str, int] = {}
        # Each op's handler, by its class: one dict lookup (isinstance was 2-4 calls).
        self.ops: dict[type, Callable[[Peer, Any], None]] = {
            Pub: self.publish,
            Sub: self.subscribe,
            Send: self.send,
            Hello: self.hello,
            Unsub: self.unsubscribe,
            PresenceOp: self.presence,
            Refresh: self.refresh,
            Ping: self.ping,
            PongOp: lambda conn, op: None,  # handle() has reset the heartbeat clock
        }

    # --- messages in -------------------------------------------------------------------

    def handle(self, conn: Peer, message: bytes) -> None:
        """One complete client message (a line, or a text frame's payload)."""
        conn.mark = self.clock.tick
        try:
            op = decode_op(message)
        except ProtocolError as exc:
            self.reject(conn, exc)
            return
        conn.sent = sent = conn.sent + 1
        if sent > self.msgs_per_tick:
            op_id = getattr(op, "id", None)
            self.reject(conn, ProtocolError("rate_limited", self.rate_reason, op_id))
            return
        if self.strikes:
            self.strikes.pop(conn, None)
        c = self.counters
        c.mv[c.i_in] += 1
        if conn.user is None and self.authed and not isinstance(op, Hello | Ping | PongOp):
            c.error("unauthorized")
            conn.write(error_line("unauthorized", "say hello with a token first", op.id))
            return
        self.dispatch(conn, op)

    def dispatch(self, conn: Peer, op: ClientOp) -> None:
        self.ops[type(op)](conn, op)

    def ping(self, conn: Peer, op: Ping) -> None:
        conn.write(PONG if op.id is None else pong_line(op.id))

    def reject(self, conn: Peer, exc: ProtocolError) -> None:
        """Answer a bad message; close a client that keeps sending them."""
        self.counters.error(exc.code)
        conn.write(error_line(exc.code, exc.reason, exc.op_id))
        strikes = self.strikes[conn] = self.strikes.get(conn, 0) + 1
        if strikes >= self.max_bad_messages:
            self.admission.close(conn, "bad_input")

    def release(self, conn: Peer, why: str = "closed") -> None:
        """A connection has ended (``why``): forget it everywhere; tell the broker."""
        if conn.user is not None:
            self.members.leave_all(conn)  # nothing to do without channels
            self.members.event("disconnect", conn, why)
        lost, gone = self.hub.remove(conn)
        self.admission.leave(conn)
        self.clock.forget(conn)
        self.strikes.pop(conn, None)
        self.rights.grants.pop(conn, None)
        link = self.link
        if link is not None:
            for channel in lost:
                if channel not in self.pending:
                    link.send(Kind.UNSUB, channel)
            if gone is not None:
                link.send(Kind.USER_OFF, gone)

    # --- ops ---------------------------------------------------------------------------

    def hello(self, conn: Peer, op: Hello) -> None:
        user = op.user
        if self.proxy_auth:
            self.ask_connect(conn, op)
            return
        channels: frozenset[str] | None = None
        expires: float | None = None
        if self.verifier is not None:
            try:
                if op.token is None:
                    raise TokenError("hello needs a token")
                grant = self.verifier.verify(op.token)
                if user not in (None, grant.user):
                    raise TokenError("user differs from the token's sub")
            except TokenError as exc:
                self.admission.fail(conn, "unauthorized", str(exc), "unauthorized", op.id)
                return
            user, channels, expires = grant.user, grant.channels, grant.expires
        elif user is None:
            self.counters.error("missing_field")
            conn.write(error_line("missing_field", "missing field 'user'", op.id))
            return
        self.enter(conn, user, channels, expires, op.id)

    def enter(
        self,
        conn: Peer,
        user: str,
        channels: frozenset[str] | None,
        expires: float | None,
        op_id: OpId,
    ) -> None:
        """``conn`` is ``user`` now (with the ``channels`` its credentials grant, until
        ``expires``)."""
        self.grant(conn, channels)
        if not self.admission.take_user(conn, user):
            return
        if self.authed:
            self.clock.expires(conn, expires)
        old = conn.user
        if old is not None and old != user:
            self.members.leave_all(conn)
        new, lost = self.hub.set_user(conn, user)
        self._interest(Kind.USER_OFF, lost)
        self._interest(Kind.USER_ON, user if new else None)
        if old != user:
            for channel in channels_of(conn):
                self.members.joined(conn, channel)
            self.members.event("connect", conn)
        self.ok_when_applied(conn, op_id)

    def grant(self, conn: Peer, channels: frozenset[str] | None) -> None:
        if channels is not None:
            if channels:
                self.rights.grants[conn] = channels
            else:
                self.rights.grants.pop(conn, None)

    def ask_connect(self, conn: Peer, op: Hello | Refresh) -> None:
        """Auth mode "proxy": the backend says who the client is (hello), or renews its
        credentials (refresh: the same user, a new token)."""
        if self.proxies is None or self.proxies.urls["connect"] is None:  # fail closed
            why = "auth mode proxy without a connect_url"
            self.admission.fail(conn, "unauthorized", why, "unauthorized", op.id)
            return
        renew = isinstance(op, Refresh)
        data = msgspec.Raw(b"null") if isinstance(op, Refresh) else op.data
        call = ConnectCall(op.token, data, address(conn), self.service, self.slot)
        wanted = conn.user if isinstance(op, Refresh) else op.user

        def answered(answer: Answer) -> None:
            if conn.transport is None:  # closed while the backend was thinking
                return
            if answer.outcome == "unavailable":
                self.unavailable(conn, answer, op.id)
            elif answer.outcome == "refused":
                self.admission.fail(conn, "unauthorized", answer.reason, "unauthorized", op.id)
            else:
                reply: ConnectReply = answer.reply
                assert reply.user is not None  # judge() made sure
                if wanted not in (None, reply.user) or (renew and conn.user != wanted):
                    why = "user differs from the backend's"
                    self.admission.fail(conn, "unauthorized", why, "unauthorized", op.id)
                elif reply.expire_at is not None and reply.expire_at <= time.time():
                    why = "credentials expired (expire_at)"
                    self.admission.fail(conn, "unauthorized", why, "unauthorized", op.id)
                elif renew:
                    self.renewed(conn, frozenset(reply.channels), reply.expire_at, op.id)
                else:
                    channels = frozenset(reply.channels)
                    self.enter(conn, reply.user, channels, reply.expire_at, op.id)

        self.proxies.ask("connect", _encode_json(call), answered)

    def refresh(self, conn: Peer, op: Refresh) -> None:
        """New credentials for the same user before the old ones end."""
        if not self.authed:
            self.forbid(conn, "auth mode none: there are no credentials to refresh", op.id)
        elif self.proxy_auth:
            self.ask_connect(conn, op)
        else:
            assert self.verifier is not None
            try:
                grant = self.verifier.verify(op.token)
                if grant.user != conn.user:
                    raise TokenError("a refresh token must be for the same user (sub)")
            except TokenError as exc:
                self.admission.fail(conn, "unauthorized", str(exc), "unauthorized", op.id)
                return
            self.renewed(conn, grant.channels, grant.expires, op.id)

    def renewed(
        self, conn: Peer, channels: frozenset[str], expires: float | None, op_id: OpId
    ) -> None:
        """A refresh was accepted: new grants and end, the channels held are kept."""
        self.grant(conn, channels)
        self.clock.expires(conn, expires)
        self.ok(conn, op_id)

    def _answered(
        self, conn: Peer, op_id: OpId, allowed: Callable[[Answer], None]
    ) -> Callable[[Answer], None]:
        """The backend's answer to a sub or pub of ``conn``: ``allowed`` when it allows."""

        def answered(answer: Answer) -> None:
            if conn.transport is None:  # closed while the backend was thinking
                return
            if answer.outcome == "unavailable":
                self.unavailable(conn, answer, op_id)
            elif answer.outcome == "refused":
                self.forbid(conn, answer.reason, op_id)
            else:
                allowed(answer)

        return answered

    def unavailable(self, conn: Peer, answer: Answer, op_id: OpId) -> None:
        """The backend gave no usable answer: say so; the connection stays open."""
        self.counters.error("unavailable")
        conn.write(error_line("unavailable", answer.reason, op_id))

    def subscribe(self, conn: Peer, op: Sub) -> None:
        channel = op.channel
        if self.forbid(conn, self.rights.subscribe(conn, channel), op.id):
            return
        if self._full(conn, channel, op.id):
            return
        if channel not in channels_of(conn) and self.namespaces(channel).subscribe == "proxy":
            self.ask_subscribe(conn, op)
            return
        self.join(conn, op)

    def _full(self, conn: Peer, channel: str, op_id: OpId) -> bool:
        """``conn`` is in max_subscriptions channels already (answered so)."""
        held = channels_of(conn)
        if channel not in held and len(held) >= self.max_subscriptions:
            self.counters.error("too_many_subscriptions")
            reason = f"a connection may be in at most {self.max_subscriptions} channels"
            conn.write(error_line("too_many_subscriptions", reason, op_id))
            return True
        return False

    def ask_subscribe(self, conn: Peer, op: Sub) -> None:
        """A namespace with subscribe = "proxy": the backend says if ``conn`` may join."""
        if self.proxies is None or self.proxies.urls["subscribe"] is None:
            self.forbid(conn, "subscribe = proxy without a subscribe_url", op.id)  # fail closed
            return
        user = conn.user

        def allowed(answer: Answer) -> None:
            if conn.user != user:  # a new hello meanwhile: the answer was for another
                self.forbid(conn, "the connection's user changed; subscribe again", op.id)
            elif not self._full(conn, op.channel, op.id):
                self.join(conn, op)

        call = SubscribeCall(user, op.channel, self.service)
        self.proxies.ask("subscribe", _encode_json(call), self._answered(conn, op.id, allowed))

    def join(self, conn: Peer, op: Sub) -> None:
        """Put ``conn`` in the channel (the rights, and the backend if asked, allow it)."""
        channel = op.channel
        held = channels_of(conn)
        if op.since is not None and channel not in held:
            self.recover(conn, channel, op.since, op.id)
            return
        if channel not in held:
            if self.hub.subscribe(conn, channel) and channel not in self.pending:
                self._interest(Kind.SUB, channel)
            self.members.joined(conn, channel)
        self.ok_when_applied(conn, op.id)

    def unsubscribe(self, conn: Peer, op: Unsub) -> None:
        self.drop(conn, op.channel)
        self.ok(conn, op.id)

    def drop(self, conn: Peer, channel: str) -> None:
        """Take ``conn`` out of ``channel`` (its own unsub, or the server's)."""
        # Walked only with a recovery in flight: a dict's walk costs all it ever held.
        held = self.recovering if channel in self.pending else {}
        for req in [r for r, (c, ch, _) in held.items() if c is conn and ch == channel]:
            # Its answer will find nobody waiting; the sub is acked now, before the unsub.
            self.ok(conn, self.recovering.pop(req)[2])
        if channel not in channels_of(conn):
            return
        if self.hub.unsubscribe(conn, channel) and channel not in self.pending:
            self._interest(Kind.UNSUB, channel)
        self.members.left(conn, channel)

    def publish(self, conn: Peer, op: Pub) -> None:
        ns = self.namespaces(op.channel)  # resolved once for the rights and the proxy
        if self.forbid(conn, self.rights.publish(conn, op.channel, ns), op.id):
            return
        if ns.publish_proxy:
            self.ask_publish(conn, op)
            return
        if self.link is not None:
            self.link.send(Kind.PUB, op.channel, _encode_json((conn.user, op.data)))
        self.ok(conn, op.id)

    def ask_publish(self, conn: Peer, op: Pub) -> None:
        """A namespace with publish_proxy: the backend may refuse the pub or replace data."""
        if self.proxies is None or self.proxies.urls["publish"] is None:
            self.forbid(conn, "publish_proxy without a publish_url", op.id)  # fail closed
            return
        user = conn.user

        def allowed(answer: Answer) -> None:
            reply: PublishReply = answer.reply
            data = reply.data if len(reply.data) else op.data  # the backend may replace it
            if self.link is not None:
                self.link.send(Kind.PUB, op.channel, _encode_json((user, data)))
            self.ok(conn, op.id)

        call = PublishCall(user, op.channel, op.data, self.service)
        self.proxies.ask("publish", _encode_json(call), self._answered(conn, op.id, allowed))

    def send(self, conn: Peer, op: Send) -> None:
        if self.forbid(conn, self.rights.send(), op.id):
            return
        if self.link is not None:
            self.link.send(Kind.SEND, op.user, _encode_json((conn.user, op.data)))
        self.ok(conn, op.id)

    def forbid(self, conn: Peer, why: str | None, op_id: OpId) -> bool:
        """Answer ``forbidden`` with the reason the rights gave (None: allowed)."""
        if why is None:
            return False
        self.counters.error("forbidden")
        conn.write(error_line("forbidden", why, op_id))
        return True

    # --- acks after the broker ---------------------------------------------------------

    def ok(self, conn: Peer, op_id: OpId) -> None:
        if op_id is not None:
            conn.write(ok_line(op_id))

    def ok_when_applied(self, conn: Peer, op_id: OpId) -> None:
        """Ack only once the broker has applied our interest frames sent so far.

        Otherwise a client could get ``ok`` for a sub, publish through the API at once,
        and miss its own message because our SUB frame was still in flight.
        """
        if op_id is not None:
            self.when_applied(conn, ok_line(op_id))

    def when_applied(self, conn: Peer, then: bytes | Callable[[], None]) -> None:
        """Write ``then`` (an event line) to ``conn``, or call it, once the broker has
        applied our interest frames sent so far."""
        if self.dirty or self.unsynced:
            # One SYNC per link write covers every ack since the last: a ramp of hellos
            # costs the broker one round trip per Link.COALESCE_S, not one per connection.
            if not self.unsynced and self.link is not None:
                self.link.at_flush(self.sync)
            self.unsynced.append((conn, then))
        elif self.waiting:
            self.waiting[-1][1].append((conn, then))
        elif isinstance(then, bytes):
            conn.write(then)
        else:
            then()

    def sync(self) -> None:
        """Ask the broker to echo SYNCED once it has applied what we sent before."""
        self.dirty = False
        if self.link is not None:
            self.link.send(Kind.SYNC)
        self.waiting.append((time.monotonic(), self.unsynced))
        self.unsynced = []

    def synced(self) -> int:
        """The broker's SYNCED: the oldest batch of held acks goes out (how many)."""
        if not self.waiting:
            return 0
        sent, batch = self.waiting.popleft()
        self.counters.worst(self.counters.i_sync_wait, time.monotonic() - sent)
        # A connection's acks go in one write (a list each: += was O(n^2)).
        acks: dict[Peer, list[bytes]] = {}
        calls: list[Callable[[], None]] = []
        for conn, then in batch:
            if type(then) is bytes:
                lines = acks.get(conn)
                if lines is None:
                    acks[conn] = [then]
                else:
                    lines.append(then)
            else:
                calls.append(cast(Callable[[], None], then))
        frame = self.frame
        for conn, lines in acks.items():
            transport = conn.transport
            if transport is not None:
                transport.write(frame(lines[0]) if len(lines) == 1 else b"".join(map(frame, lines)))
        for call in calls:
            call()
        return len(acks) + len(calls)

    def _interest(self, kind: Kind, key: str | None) -> None:
        if key is not None and self.link is not None:
            self.link.send(kind, key)
            self.dirty = True

    # --- history and presence ----------------------------------------------------------

    def recover(self, conn: Peer, channel: str, since: int, op_id: OpId) -> None:
        """Join ``channel`` only once the broker has sent what the client missed.

        The broker answers on the link, in order with the channel's deliveries: every
        seq up to its answer comes from history, every later one live, each once.
        """
        link = self.link
        if link is None:
            return
        if channel not in self.hub.channels and channel not in self.pending:
            link.send(Kind.SUB, channel)
        self.pending[channel] = self.pending.get(channel, 0) + 1
        req = next(self.requests)
        self.recovering[req] = (conn, channel, op_id)
        link.send(Kind.RECOVER, channel, RECOVER_HEAD.pack(req, since))

    def take_recovery(self, channel: str, payload: bytes) -> tuple[Peer, OpId] | None:
        """The connection (and op id) a RECOVERED answer is for, if it is still there."""
        req = RECOVERED_HEAD.unpack_from(payload)[0]
        left = self.pending.get(channel, 1) - 1
        if left > 0:
            self.pending[channel] = left
        else:
            self.pending.pop(channel, None)
        conn, _, op_id = self.recovering.pop(req, (None, channel, None))
        if conn is None or conn.transport is None:
            if not left and channel not in self.hub.channels and self.link is not None:
                self.link.send(Kind.UNSUB, channel)
            return None
        return conn, op_id

    def recovered(self, channel: str, payload: bytes) -> None:
        """The broker's answer to ``recover``: the ack, then the missed lines."""
        taken = self.take_recovery(channel, payload)
        if taken is None:
            return
        conn, op_id = taken
        if channel in channels_of(conn):
            self.ok(conn, op_id)  # subscribed meanwhile: it has been receiving live
            return
        _, ok, seq = RECOVERED_HEAD.unpack_from(payload)
        self.hub.subscribe(conn, channel)  # the broker knows our interest already
        self.members.joined(conn, channel)
        lines = missed_lines(payload)
        frame = self.frame
        out = [frame(encode(Recovered(op_id, bool(ok), seq, len(lines))))]
        out.extend(frame(line) for line in lines)
        assert conn.transport is not None  # take_recovery made sure
        conn.transport.write(b"".join(out))
        self.counters.mv[self.counters.i_out] += len(lines)

    def presence(self, conn: Peer, op: PresenceOp) -> None:
        if self.link is not None and not self.forbid(
            conn, self.rights.presence(conn, op.channel), op.id
        ):
            req = next(self.requests)
            size = self.namespaces(op.channel).max_presence_members
            self.presences[req] = (conn, op.id, op.after, size)
            self.link.send(Kind.PRESENCE, op.channel, TOKEN.pack(req))

    def presence_done(self, channel: str, payload: bytes) -> None:
        """The broker's answer to ``presence``, from every worker (and node)."""
        asked = self.presences.pop(TOKEN.unpack_from(payload)[0], None)
        if asked is not None:
            got = _decode_presence(payload[TOKEN.size :])
            conn, op_id, after, size = asked
            users, more = page(got.users, after, size)
            conn.write(encode(Presence(channel, users, got.anonymous, op_id, got.partial, more)))

    def presence_part(self, channel: str) -> bytes:
        """This worker's subscribers of ``channel``: ([{user: connections}, anonymous])."""
        return _encode_json(self.hub.census(channel))

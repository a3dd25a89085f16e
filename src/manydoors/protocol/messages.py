"""Message schema (sans-I/O): client ops in, server events out.

Client ops are decoded and validated by msgspec in one pass into typed Structs.
``data`` stays ``msgspec.Raw``: the server never decodes a payload, it copies the
client's bytes into the outgoing event, so relaying costs no JSON round trip.
Server events are encoded once per message and the same bytes are written to every
recipient.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Raw, Struct

# A name has no control characters. \Z, not $: msgspec matches with re.search, where $
# also matches before a final \n.
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+\Z")]
# JSON can only carry a control character in a string as an escape (msgspec rejects a
# raw one), so a client op without a backslash is decoded without the pattern, whose
# regex search was 3-6 % of a worker in a ramp; ``_strict`` checks the others, with the
# same ops under Name.
_OpName = Annotated[str, Meta(min_length=1, max_length=128)]
OpId = int | str | None


class Hello(Struct, tag="hello", tag_field="op"):
    # With auth mode "token" the user comes from the token's ``sub`` claim; with
    # "proxy", from the backend, which gets ``token`` and ``data`` (raw JSON) as sent.
    user: _OpName | None = None
    token: Annotated[str, Meta(max_length=8192)] | None = None
    id: OpId = None
    data: Raw = Raw(b"null")


class Sub(Struct, tag="sub", tag_field="op"):
    channel: _OpName
    id: OpId = None
    # The last seq the client saw: replay what it missed from the channel's history.
    since: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None


class Unsub(Struct, tag="unsub", tag_field="op"):
    channel: _OpName
    id: OpId = None


class Pub(Struct, tag="pub", tag_field="op"):
    channel: _OpName
    data: Raw
    id: OpId = None


class Send(Struct, tag="send", tag_field="op"):
    user: _OpName
    data: Raw
    id: OpId = None


class Refresh(Struct, tag="refresh", tag_field="op"):
    """New credentials before the old ones end: a JWT (mode "token"), or a token for the
    backend's connect hook (mode "proxy"), for the same user."""

    token: Annotated[str, Meta(max_length=8192)]
    id: OpId = None


class Ping(Struct, tag="ping", tag_field="op"):
    id: OpId = None


class PresenceOp(Struct, tag="presence", tag_field="op"):
    channel: _OpName
    id: OpId = None
    after: _OpName | None = None  # the page after this user id (the answer's ``next``)


class PongOp(Struct, tag="pong", tag_field="op"):
    """A client's answer to the server's ``{"ev":"ping"}``: it only proves it is alive."""


ClientOp = Hello | Sub | Unsub | Pub | Send | Ping | PresenceOp | PongOp | Refresh
OPS: Final = ("hello", "sub", "unsub", "pub", "send", "ping", "presence", "pong", "refresh")
PRIVATE: Final = "$"  # channels starting with it need a token's ``channels`` claim


class ProtocolError(Exception):
    """A client input the server rejects; ``code`` is stable, ``reason`` is for humans."""

    def __init__(self, code: str, reason: str, op_id: OpId = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.op_id = op_id


# Every error code the server can send, so stats can count them in fixed slots.
ERROR_CODES: Final = (
    "bad_json",
    "not_object",
    "unknown_op",
    "missing_field",
    "bad_field",
    "too_long",
    "server_full",
    "bad_frame",
    "bad_handshake",
    "too_many_subscriptions",
    "unauthorized",  # a bad or expired token, or no hello in time (auth mode "token")
    "forbidden",  # a private ($) channel the token does not grant
    "rate_limited",
    "too_many_connections",  # max_connections_per_ip / _per_user
    "read_timeout",  # a message or handshake started and not finished in time
    "unavailable",  # the application's backend did not answer (a proxy hook): try again
)

_op_decoder: Final[msgspec.json.Decoder[ClientOp]] = msgspec.json.Decoder(ClientOp)


def _strict_op(op: type[Struct]) -> type[Struct]:
    """``op`` with every name field under the control-character pattern (Name)."""

    def strict(tp: object) -> object:
        if tp == _OpName:
            return Name
        args = typing.get_args(tp)
        if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
            return functools.reduce(operator.or_, map(strict, args))
        return tp

    info = op.__struct_config__
    fields = [
        (f.name, strict(f.type)) if f.required else (f.name, strict(f.type), f.default)
        for f in msgspec.structs.fields(op)
    ]
    return msgspec.defstruct(op.__name__, fields, tag=info.tag, tag_field=info.tag_field)


_strict: Final = msgspec.json.Decoder(
    functools.reduce(operator.or_, map(_strict_op, typing.get_args(ClientOp)))
)


class _IdOnly(Struct):
    id: OpId = None


_id_decoder: Final = msgspec.json.Decoder(_IdOnly)


def _salvage_id(line: bytes) -> OpId:
    """Best effort: the id of an op that failed validation, so the error can carry it."""
    try:
        return _id_decoder.decode(line).id
    except (msgspec.DecodeError, RecursionError):
        return None


def decode_op(line: bytes) -> ClientOp:
    """Decode one line into a client op or raise ProtocolError with a specific code."""
    if not line.isascii():
        # msgspec would raise UnicodeDecodeError for a bad name and copy bad bytes of
        # ``data`` verbatim into the events every recipient gets: check UTF-8 first.
        try:
            line.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("bad_json", f"not valid UTF-8 (byte {exc.start})") from None
    try:
        if b"\\" in line:
            _strict.decode(line)  # a control character in a name: the error says where
        return _op_decoder.decode(line)
    except msgspec.ValidationError as exc:
        raise _classify(str(exc), line) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad_json", f"not valid JSON: {exc}") from None
    except RecursionError:  # ~1,000 nested arrays fit in a 2 KB line
        raise ProtocolError("bad_json", "JSON nested too deeply") from None


def _classify(msg: str, line: bytes) -> ProtocolError:
    # msgspec's messages are stable and documented by example; map them to codes.
    op_id = _salvage_id(line)
    if msg.startswith("Expected `object`"):
        return ProtocolError("not_object", "a message must be a JSON object", op_id)
    if msg == "Object missing required field `op`":
        return ProtocolError("missing_field", "missing field 'op'", op_id)
    if msg.endswith("- at `$.op`"):
        known = ", ".join(OPS)
        return ProtocolError("unknown_op", f"unknown or invalid op (known: {known})", op_id)
    if msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        return ProtocolError("missing_field", f"missing field '{field}'", op_id)
    return ProtocolError("bad_field", msg.replace("`$.", "`"), op_id)


# --- server events -------------------------------------------------------------------


class Welcome(Struct, tag="welcome", tag_field="ev"):
    conn: str
    service: str
    worker: int


class Msg(Struct, tag="msg", tag_field="ev"):
    channel: str
    seq: int
    from_: str | None = msgspec.field(name="from")
    data: Raw


class Dm(Struct, tag="dm", tag_field="ev"):
    from_: str | None = msgspec.field(name="from")
    data: Raw


class Broadcast(Struct, tag="broadcast", tag_field="ev"):
    seq: int
    from_: str | None = msgspec.field(name="from")
    data: Raw


class Ok(Struct, tag="ok", tag_field="ev"):
    id: OpId


class Recovered(Struct, tag="ok", tag_field="ev"):
    """The ack of a ``sub`` with ``since``: the missed messages follow it, in order."""

    id: OpId
    recovered: bool
    seq: int  # the channel's seq when the client joined: later messages arrive live
    missed: int  # how many ``msg`` events follow this ack


class Presence(Struct, tag="presence", tag_field="ev", omit_defaults=True):
    channel: str
    users: dict[str, int]  # user -> connections subscribed
    anonymous: int  # subscribed connections that said no hello
    id: OpId = None
    partial: bool = False  # a worker or node did not answer in time
    next: str | None = None  # more members: ask again with ``after`` = this


class Error(Struct, tag="error", tag_field="ev", omit_defaults=True):
    code: str
    reason: str
    id: OpId = None


class Pong(Struct, tag="pong", tag_field="ev", omit_defaults=True):
    id: OpId = None


class RefreshSoon(Struct, tag="refresh", tag_field="ev"):
    """The connection's credentials end in ``in`` seconds: send a ``refresh`` op."""

    in_: int = msgspec.field(name="in")


class Bye(Struct, tag="bye", tag_field="ev"):
    reason: str


class Join(Struct, tag="join", tag_field="ev"):
    """A user's first connection has joined a channel (namespaces with join_leave)."""

    channel: str
    user: str


class Unsubscribed(Struct, tag="unsubscribed", tag_field="ev"):
    """The server took this connection out of a channel (the HTTP API's unsubscribe)."""

    channel: str


class Leave(Struct, tag="leave", tag_field="ev"):
    """A user's last connection has left a channel."""

    channel: str
    user: str


_enc: Final = msgspec.json.Encoder()
PONG: Final = b'{"ev":"pong"}\n'
PING: Final = b'{"ev":"ping"}\n'  # the server's heartbeat; answer with {"op":"pong"}


Event = (
    Welcome
    | Msg
    | Dm
    | Broadcast
    | Ok
    | Recovered
    | Presence
    | Pong
    | Error
    | Bye
    | Join
    | Leave
    | Unsubscribed
    | RefreshSoon
)


def encode(event: Event) -> bytes:
    """One event as one NDJSON line."""
    return _enc.encode(event) + b"\n"


def msg_line(channel: str, seq: int, sender: str | None, data: Raw) -> bytes:
    return encode(Msg(channel, seq, sender, data))


def dm_line(sender: str | None, data: Raw) -> bytes:
    return encode(Dm(sender, data))


def broadcast_line(seq: int, sender: str | None, data: Raw) -> bytes:
    return encode(Broadcast(seq, sender, data))


def pong_line(op_id: OpId) -> bytes:
    return encode(Pong(op_id))


def error_line(code: str, reason: str, op_id: OpId = None) -> bytes:
    return encode(Error(code, reason, op_id))


# The acks of small integer ids, the commonest of all (a hello's 1, a sub's 2): made
# once, not encoded for every connection.
_OK_LINES: Final = tuple(_enc.encode(Ok(i)) + b"\n" for i in range(64))


def ok_line(op_id: OpId) -> bytes:
    if type(op_id) is int and 0 <= op_id < 64:
        return _OK_LINES[op_id]
    return encode(Ok(op_id))


def page(users: dict[str, int], after: str | None, size: int) -> tuple[dict[str, int], str | None]:
    """Members in user id order after ``after``, at most ``size``; and the next cursor."""
    ids = sorted(u for u in users if after is None or u > after)
    shown = ids[:size]
    return {u: users[u] for u in shown}, shown[-1] if len(ids) > size else None


def refresh_line(seconds: int) -> bytes:
    """``refresh``: the credentials end in ``seconds``."""
    return encode(RefreshSoon(seconds))


def bye_line(reason: str) -> bytes:
    return encode(Bye(reason))


def join_line(channel: str, user: str, joined: bool) -> bytes:
    """``join`` (or ``leave``) of ``user`` in ``channel``."""
    return encode(Join(channel, user) if joined else Leave(channel, user))


def unsubscribed_line(channel: str) -> bytes:
    """``unsubscribed`` from ``channel``."""
    return encode(Unsubscribed(channel))

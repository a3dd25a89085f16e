"""Pusher protocol 7 on the wire (no I/O): client events in, server frames out.

Every Pusher message is one WebSocket text frame holding ``{"event", "channel"?,
"data"}``. Server frames carry ``data`` as a JSON string (pusher-js parses it),
``pusher:error`` as an object, as Pusher does.

The node speaks NDJSON event lines; ``wire`` is the Pusher ``Wire`` that turns each into
its Pusher frame, once per worker for a fan-out. A message published to an app's
channel carries the whole Pusher frame (as JSON) as its ``data``: framing it is taking
that object out and putting a header in front. ``join``/``leave`` of a presence
channel become ``pusher_internal:member_added``/``member_removed``; ``welcome``
becomes ``pusher:connection_established`` (its ``conn``, ``pid-token``, becomes the
socket id ``pid.token``); an ``error`` and the ``bye`` of a close become
``pusher:error`` with the code pusher-js acts on, then a close frame with that code.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from msgspec import Raw, Struct

from ..protocol.messages import PING as NDJSON_PING
from ..protocol.websocket import encode_close, encode_text
from ..protocol.wire import Wire
from . import names

VERSIONS: Final = range(5, 8)  # protocol versions accepted (pysher says 6), as Pusher

# Close codes (pusher-js: 4000-4099 do not reconnect, 4100-4199 back off, 4200-4299
# reconnect at once).
APP_UNKNOWN: Final = 4001
OVER_QUOTA: Final = 4004
PATH_NOT_FOUND: Final = 4005
BAD_VERSION: Final = 4006
UNSUPPORTED_VERSION: Final = 4007
NO_VERSION: Final = 4008
UNAUTHORIZED: Final = 4009
OVER_CAPACITY: Final = 4100
RECONNECT: Final = 4200
PONG_MISSED: Final = 4201
INACTIVE: Final = 4202
RATE_LIMITED: Final = 4301  # an error only: the connection stays

# The close code for each reason the node closes a connection with (stats.CLOSED).
_CLOSE: Final = {
    "shutdown": RECONNECT,
    "ping_timeout": PONG_MISSED,
    "read_timeout": INACTIVE,
    "slow": OVER_CAPACITY,
    "bad_input": OVER_CAPACITY,
    "unauthorized": UNAUTHORIZED,
    "hello_timeout": UNAUTHORIZED,
    "expired": UNAUTHORIZED,
    "over_quota": OVER_QUOTA,
}
# The pusher:error code of each node error code; None: an error the connection survives.
_ERROR: Final[dict[str, int | None]] = {
    "server_full": OVER_CAPACITY,
    "too_many_connections": OVER_CAPACITY,
    "rate_limited": RATE_LIMITED,
    "unauthorized": UNAUTHORIZED,
    "read_timeout": INACTIVE,
    "unavailable": OVER_CAPACITY,
}


def close_code(reason: str) -> int:
    """The close code for a bye ``reason``; any other (the API's disconnect and
    terminate_connections give their own) is 4009: pusher-js must not reconnect."""
    return _CLOSE.get(reason, UNAUTHORIZED)


# --- client events in ----------------------------------------------------------------


class Incoming(Struct):
    """One client message: ``pusher:*`` or a ``client-*`` event."""

    event: str
    data: Raw = Raw(b"null")
    channel: str | None = None


class SubscribeData(Struct):
    channel: str
    auth: str | None = None
    channel_data: str | None = None


class SigninData(Struct):
    user_data: str
    auth: str


class UserData(Struct):
    """A signin's ``user_data`` (a JSON string): an ``id`` and anything else."""

    id: str


class ChannelData(Struct):
    """A presence channel's ``channel_data`` (a JSON string)."""

    user_id: str | int
    user_info: Raw = Raw(b"null")


class FrameError(Exception):
    """A client message that is not a Pusher event; the message says why."""


_incoming: Final = msgspec.json.Decoder(Incoming)
_encode: Final = msgspec.json.Encoder().encode


def decode(payload: bytes) -> Incoming:
    try:
        return _incoming.decode(payload)
    except msgspec.ValidationError as exc:
        raise FrameError(f"not a Pusher event: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise FrameError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise FrameError("JSON nested too deeply") from None


def data_of(raw: Raw, kind: type[Any]) -> Any:
    """An event's ``data`` as ``kind``: given as an object, or as a JSON string of one."""
    try:
        text = msgspec.json.decode(raw)
        if isinstance(text, str):
            return msgspec.json.decode(text, type=kind)
        return msgspec.convert(text, kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise FrameError(f"bad data: {exc}") from None
    except RecursionError:
        raise FrameError("JSON nested too deeply") from None


# --- server frames out ---------------------------------------------------------------


def text(event: str, data: object, channel: str | None = None) -> bytes:
    """A server frame with ``data`` given as a JSON string (str: already JSON)."""
    body: dict[str, object] = {"event": event}
    if channel is not None:
        body["channel"] = channel
    body["data"] = data if isinstance(data, str) else _encode(data).decode()
    return encode_text(_encode(body))


def error(message: str, code: int | None = None) -> bytes:
    """``pusher:error``: ``code`` None for an error the connection survives."""
    return encode_text(
        _encode({"event": "pusher:error", "data": {"code": code, "message": message}})
    )


def published(event: str, channel: str, data: Raw, user_id: str | None = None) -> bytes:
    """The JSON of a frame an app's channel carries (a message's ``data`` on the node)."""
    body: dict[str, object] = {"event": event, "channel": channel, "data": data}
    if user_id is not None:
        body["user_id"] = user_id
    return _encode(body)


def api_data(data: str) -> Raw:
    """An HTTP API event's ``data`` (a string, as Pusher's REST API takes it)."""
    return Raw(_encode(data))


PONG: Final = encode_text(b'{"event":"pusher:pong","data":{}}')
PING: Final = encode_text(b'{"event":"pusher:ping","data":{}}')


def subscribed(channel: str, presence: dict[str, Any] | None = None) -> bytes:
    """``pusher_internal:subscription_succeeded`` (with the members, for presence)."""
    return text(
        "pusher_internal:subscription_succeeded",
        {"presence": presence} if presence is not None else {},
        channel,
    )


def subscription_error(channel: str, message: str, status: int) -> bytes:
    """Both names pusher-js and the protocol use: the channel's error, then the
    internal event (a client that knows neither drops them)."""
    data = {
        "type": "AuthError" if status in (401, 403) else "SubscriptionError",
        "error": message,
        "status": status,
    }
    return text("pusher:subscription_error", data, channel) + text(
        "pusher_internal:subscription_error", data, channel
    )


# --- the wire: node event lines -> Pusher frames -------------------------------------


class _Line(Struct):
    """The fields of any node event line a Pusher client may be sent."""

    ev: str
    channel: str | None = None
    data: Raw = Raw(b"null")
    user: str | None = None
    conn: str | None = None
    code: str | None = None
    reason: str | None = None


_line: Final = msgspec.json.Decoder(_Line)
_member: Final = msgspec.json.Decoder(ChannelData)


def member_key(user_id: str, user_info: Raw) -> str:
    """A presence member as the node names it: its user id and info, as JSON."""
    return _encode({"user_id": user_id, "user_info": user_info}).decode()


def member(key: str) -> ChannelData:
    return _member.decode(key)


def joined_member(line: bytes) -> str | None:
    """The member of a ``join`` event line (None for any other line)."""
    if not line.startswith(b'{"ev":"join"'):
        return None
    return _line.decode(line).user


def _frame(activity_timeout: int, line: bytes) -> bytes:
    event = _line.decode(line)
    ev = event.ev
    if ev in ("msg", "dm"):
        return encode_text(event.data)
    if ev in ("join", "leave") and event.channel is not None and event.user is not None:
        channel = names.outer(event.channel)
        if ev == "join":
            return text("pusher_internal:member_added", event.user, channel)
        user_id = str(member(event.user).user_id)
        return text("pusher_internal:member_removed", {"user_id": user_id}, channel)
    if ev == "welcome" and event.conn is not None:
        socket_id = event.conn.replace("-", ".")
        return text(
            "pusher:connection_established",
            {"socket_id": socket_id, "activity_timeout": activity_timeout},
        )
    if ev == "error" and event.code is not None:
        return error(event.reason or event.code, _ERROR.get(event.code))
    if ev == "bye" and event.reason is not None:
        return error(event.reason, close_code(event.reason))
    return b""  # the native protocol's acks, presence answers, ...: not Pusher's


def _close(reason: str) -> bytes:
    return encode_close(close_code(reason), reason)


def wire(ping_interval: float) -> Wire:
    """The Pusher wire of a service (its ``activity_timeout``: the ping interval)."""
    activity = round(ping_interval) if ping_interval >= 1 else 120

    def frame(line: bytes) -> bytes:
        return PING if line == NDJSON_PING else _frame(activity, line)

    return Wire("pusher", frame, PING, _close, upgrade=True)

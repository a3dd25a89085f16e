"""The Pusher Channels protocol (version 7) as the load generator speaks it (no I/O).

Both sides of a Pusher app that a benchmark needs: a client's frames (the connection
path, ``pusher:subscribe``, ``pusher:pong``; every server frame decoded into its
``event``, ``channel`` and raw ``data``) and the server library's one call, a signed
``POST /apps/{id}/events`` of Pusher's REST API.

A load connection keeps no Pusher state: the pong and a public channel's subscribe are
built once per process, and a private channel's auth is signed from the socket id as
``pusher:connection_established`` brings it, then dropped.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from dataclasses import dataclass
from typing import Final

import msgspec

from ..pusher.signing import channel_auth, sign
from . import wsclient

PROTOCOL: Final = 7
EVENT: Final = "load"  # the name of the events the controller publishes and times
ESTABLISHED: Final = "pusher:connection_established"
SUBSCRIBED: Final = "pusher_internal:subscription_succeeded"
SUBSCRIPTION_ERRORS: Final = ("pusher:subscription_error", "pusher_internal:subscription_error")
PING: Final = "pusher:ping"
ERROR: Final = "pusher:error"
PONG: Final = wsclient.masked_text(b'{"event":"pusher:pong","data":{}}')


@dataclass(frozen=True, slots=True)
class PusherApp:
    """The app the load connects to; ``id`` and ``secret`` only to publish (and for
    ``private-`` channels, the secret)."""

    key: str
    id: str | None = None
    secret: str | None = None


class Event(msgspec.Struct):
    """A server frame: ``data`` is a JSON string (most), an object (ping, error)."""

    event: str
    channel: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"")  # empty: absent


class Established(msgspec.Struct):
    socket_id: str


class ErrorData(msgspec.Struct):
    code: int | None = None
    message: str = ""


class SubscriptionError(msgspec.Struct):
    status: int | None = None
    error: str = ""


decode_event: Final = msgspec.json.Decoder(Event).decode
_decode_str: Final = msgspec.json.Decoder(str).decode
_decode_established: Final = msgspec.json.Decoder(Established).decode
_decode_error: Final = msgspec.json.Decoder(ErrorData).decode
_decode_sub_error: Final = msgspec.json.Decoder(SubscriptionError).decode
_encode: Final = msgspec.json.Encoder().encode


def path(key: str) -> str:
    """The connection URL's path and query, as pusher-js sends them."""
    return f"/app/{key}?protocol={PROTOCOL}&client=manydoors-load&version=1"


def upgrade(key: str) -> bytes:
    return wsclient.upgrade_request("load", 0, path(key))


def inner(data: msgspec.Raw) -> bytes | str:
    """What an event's ``data`` holds: a JSON string's text, else the JSON itself.

    Raises msgspec.DecodeError on a malformed string.
    """
    raw = bytes(data)
    return _decode_str(raw) if raw[:1] == b'"' else raw


def socket_id(data: msgspec.Raw) -> str:
    """The socket id of ``pusher:connection_established``; raises msgspec.DecodeError."""
    return _decode_established(inner(data)).socket_id


def error_name(data: msgspec.Raw) -> str:
    """A ``pusher:error`` as an error count's name: ``pusher <code>: <message>``."""
    try:
        err = _decode_error(inner(data))
    except msgspec.DecodeError:
        return "pusher_error"
    code = "error" if err.code is None else str(err.code)
    return f"pusher {code}: {err.message}" if err.message else f"pusher {code}"


def subscription_error_name(data: msgspec.Raw) -> str:
    """A subscription's refusal as an error count's name: ``subscription_error <status>``."""
    try:
        err = _decode_sub_error(inner(data))
    except msgspec.DecodeError:
        return "subscription_error"
    name = f"subscription_error {err.status}" if err.status is not None else "subscription_error"
    return f"{name}: {err.error}" if err.error else name


def subscribe(channel: str, auth: str | None = None) -> bytes:
    """``pusher:subscribe`` as a masked text frame."""
    data: dict[str, str] = {"channel": channel}
    if auth is not None:
        data["auth"] = auth
    return wsclient.masked_text(_encode({"event": "pusher:subscribe", "data": data}))


def needs_auth(channel: str) -> bool:
    return channel.startswith(("private-", "presence-"))


def subscribe_signed(app: PusherApp, channel: str, sid: str) -> bytes:
    """``pusher:subscribe`` to a private channel, with the auth an app's endpoint gives."""
    assert app.secret is not None
    return subscribe(channel, channel_auth(app.key, app.secret, sid, channel, None))


# --- the REST API ----------------------------------------------------------------------------


def signed_query(method: str, path: str, body: bytes, app: PusherApp, now: float) -> str:
    """The query string of a signed REST request (as the Pusher server libraries sign)."""
    assert app.secret is not None
    params = {
        "auth_key": app.key,
        "auth_timestamp": str(int(now)),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body, usedforsecurity=False).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = sign(app.secret, f"{method}\n{path}\n{query}")
    return f"{query}&auth_signature={signature}"


def event_body(channel: str, data: str, name: str = EVENT) -> bytes:
    """The body of ``POST /apps/{id}/events``: ``data`` is a string, as Pusher takes it."""
    return _encode({"name": name, "channels": [channel], "data": data})


def events_path(app: PusherApp) -> str:
    assert app.id is not None
    return f"/apps/{app.id}/events"


def publish(api: str, app: PusherApp, channel: str, data: str, timeout: float) -> bytes:
    """Trigger an event (``POST /apps/{id}/events``); the answer's body.

    Raises what urllib raises (HTTPError for a status other than 2xx).
    """
    body = event_body(channel, data)
    where = events_path(app)
    query = signed_query("POST", where, body, app, time.time())
    req = urllib.request.Request(
        f"{api.rstrip('/')}{where}?{query}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())

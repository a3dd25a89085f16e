"""Pusher's signatures (no I/O): channel and user auth, REST requests, webhooks.

Every one is a hex HMAC-SHA256 under the app's secret:
- a private channel's ``auth``: ``key:HMAC(secret, "socket_id:channel")``, a presence
  channel's adds ``":channel_data"``;
- a signin's ``auth``: ``key:HMAC(secret, "socket_id::user::user_data")``;
- a REST request: ``HMAC(secret, "METHOD\\npath\\nquery")``, the query's parameters
  lower-cased, sorted, without ``auth_signature``, ``body_md5`` the body's MD5;
- a webhook: ``X-Pusher-Signature`` = ``HMAC(secret, body)``.
Compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

MAX_SKEW: Final = 600  # seconds a REST request's auth_timestamp may be from now


class SignatureError(Exception):
    """A signature or a signed request is wrong; the message says what."""


def sign(secret: str, text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def channel_auth(key: str, secret: str, socket_id: str, channel: str, data: str | None) -> str:
    """The ``auth`` string an auth endpoint answers for a private or presence channel."""
    text = f"{socket_id}:{channel}" if data is None else f"{socket_id}:{channel}:{data}"
    return f"{key}:{sign(secret, text)}"


def user_auth(key: str, secret: str, socket_id: str, user_data: str) -> str:
    """The ``auth`` string of a ``pusher:signin``."""
    return f"{key}:{sign(secret, f'{socket_id}::user::{user_data}')}"


def check_auth(given: object, expected: str) -> bool:
    """Is ``given`` (from a client) the ``expected`` auth string?"""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def check_request(
    method: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    key: str,
    secret: str,
    now: float,
) -> None:
    """Verify a signed REST request; raise SignatureError saying what is wrong.

    ``query`` is the decoded query string; a multi-valued mapping (aiohttp's) yields
    each pair, so a parameter given twice is seen and refused: which of the two the
    signature covered would be a guess.
    """
    params: dict[str, str] = {}
    for name, value in query.items():
        lower = name.lower()
        if lower in params:
            raise SignatureError(f"query parameter {lower} is given more than once")
        params[lower] = value
    if params.get("auth_key") != key:
        raise SignatureError("auth_key is missing or not this app's key")
    version = params.get("auth_version")
    if version is not None and version != "1.0":
        raise SignatureError("auth_version must be 1.0")
    stamp = params.get("auth_timestamp", "")
    # ASCII digits only: str.isdigit() also says yes to "²", which int() refuses, and
    # a few digits at most (int() of thousands of digits is refused too, and slow).
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise SignatureError("auth_timestamp is missing or not a number of seconds")
    if abs(now - int(stamp)) > MAX_SKEW:
        raise SignatureError(
            f"auth_timestamp is more than {MAX_SKEW} s from the server's time {int(now)}"
        )
    if body:
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if params.get("body_md5") != md5:
            raise SignatureError("body_md5 is missing or not the MD5 of the body")
    given = params.get("auth_signature", "")
    signed = "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "auth_signature")
    expected = sign(secret, f"{method.upper()}\n{path}\n{signed}")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise SignatureError(
            "auth_signature does not match (HMAC-SHA256 of the method, path and sorted query)"
        )


def webhook_signature(secret: str, body: bytes) -> str:
    """``X-Pusher-Signature`` of a webhook body."""
    return sign(secret, body)

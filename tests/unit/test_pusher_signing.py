"""Pusher's signatures (pusher/signing.py) against the PyPI ``pusher`` library and the
worked example of Pusher's HTTP API reference: requests the library signs pass, any
change to them fails with the reason, and what we sign the library accepts."""

from __future__ import annotations

import json
import time
from typing import Any

import pusher
import pytest
from multidict import MultiDict

from manydoors.pusher.signing import (
    MAX_SKEW,
    SignatureError,
    channel_auth,
    check_request,
    user_auth,
    webhook_signature,
)

APP_ID, KEY, SECRET = "1001", "app-key", "app-secret"
SOCKET_ID = "1234.5678"


def library() -> Any:
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, ssl=False, host="127.0.0.1")


def signed(method: str, *args: Any, **kwargs: Any) -> Any:
    """The library's request (method, path, query, body), signed now, never sent."""
    return getattr(library()._pusher_client, method).make_request(*args, **kwargs)


def check(req: Any, **changes: Any) -> None:
    fields: dict[str, Any] = {
        "method": req.method,
        "path": req.path,
        "query": dict(req.query_params),
        "body": req.body,
        "key": KEY,
        "secret": SECRET,
        "now": time.time(),
    }
    fields.update(changes)
    check_request(**fields)


# --- REST requests ------------------------------------------------------------------------


def test_the_worked_example_of_pusher_s_reference_verifies() -> None:
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    query = {
        "auth_key": "278d425bdf160c739803",
        "auth_timestamp": "1353088179",
        "auth_version": "1.0",
        "body_md5": "ec365a775a4cd0599faeb73354201b6f",
        "auth_signature": "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c",
    }
    key, secret = "278d425bdf160c739803", "7ad3773142a6692b25b8"
    check_request("POST", "/apps/3/events", query, body, key, secret, 1353088179 + 10)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("trigger", (["chat", "news"], "said", {"text": "hi"}, SOCKET_ID)),
        ("trigger_batch", ([{"channel": "chat", "name": "said", "data": "x"}],)),
        ("channels_info", ("presence-", ["user_count"])),
        ("channel_info", ("presence-room", ["user_count", "subscription_count"])),
        ("users_info", ("presence-room",)),
        ("terminate_user_connections", ("alice",)),
    ],
)
def test_every_request_the_library_signs_verifies(method: str, args: tuple[Any, ...]) -> None:
    check(signed(method, *args))


def test_a_changed_body_fails_on_its_md5() -> None:
    req = signed("trigger", "chat", "said", "hi")
    with pytest.raises(SignatureError, match="body_md5"):
        check(req, body=req.body.replace(b"hi", b"ho"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": "another-secret"}, "auth_signature does not match"),
        ({"method": "GET"}, "auth_signature does not match"),
        ({"path": "/apps/1002/events"}, "auth_signature does not match"),
        ({"key": "another-key"}, "auth_key"),
        ({"skew": MAX_SKEW + 5}, "auth_timestamp is more than 600 s"),
        ({"skew": -MAX_SKEW - 5}, "auth_timestamp is more than 600 s"),
    ],
)
def test_a_request_signed_otherwise_fails_with_the_reason(
    change: dict[str, Any], reason: str
) -> None:
    req = signed("trigger", "chat", "said", "hi")
    if "skew" in change:  # the server's clock that far from the request's time
        change = {"now": int(req.query_params["auth_timestamp"]) + change["skew"]}
    with pytest.raises(SignatureError, match=reason):
        check(req, **change)


def test_a_timestamp_within_the_skew_either_way_passes() -> None:
    req = signed("channels_info")
    stamp = int(req.query_params["auth_timestamp"])
    check(req, now=stamp + MAX_SKEW)
    check(req, now=stamp - MAX_SKEW)


def test_a_query_parameter_added_after_signing_fails() -> None:
    req = signed("channels_info")
    query = dict(req.query_params, filter_by_prefix="presence-")
    with pytest.raises(SignatureError, match="auth_signature"):
        check(req, query=query)


@pytest.mark.parametrize("stamp", ["", "12.5", "-100", "²³", "1" * 5000, "0x10"])
def test_a_timestamp_that_is_not_whole_ascii_seconds_fails_cleanly(stamp: str) -> None:
    req = signed("channels_info")
    with pytest.raises(SignatureError, match="auth_timestamp is missing or not a number"):
        check(req, query=dict(req.query_params, auth_timestamp=stamp))


def test_a_parameter_given_twice_fails_even_in_another_case() -> None:
    req = signed("channels_info")
    twice = MultiDict(req.query_params)
    twice.add("auth_key", KEY)
    with pytest.raises(SignatureError, match="auth_key is given more than once"):
        check(req, query=twice)
    cased = dict(req.query_params, AUTH_KEY=KEY)
    with pytest.raises(SignatureError, match="given more than once"):
        check(req, query=cased)


def test_upper_case_parameter_names_are_signed_lower_cased() -> None:
    req = signed("channels_info")
    query = {k.upper(): v for k, v in req.query_params.items()}
    check(req, query=query)


def test_another_auth_version_or_a_missing_signature_fails() -> None:
    req = signed("channels_info")
    with pytest.raises(SignatureError, match="auth_version"):
        check(req, query=dict(req.query_params, auth_version="2.0"))
    without = {k: v for k, v in req.query_params.items() if k != "auth_signature"}
    with pytest.raises(SignatureError, match="auth_signature"):
        check(req, query=without)


# --- channel and user auth, webhooks --------------------------------------------------------


def test_channel_auth_is_what_the_library_s_authenticate_answers() -> None:
    lib = library()
    assert (
        channel_auth(KEY, SECRET, SOCKET_ID, "private-chat", None)
        == (lib.authenticate("private-chat", SOCKET_ID)["auth"])
    )
    member = {"user_id": "alice", "user_info": {"name": "Alice"}}
    answer = lib.authenticate("presence-room", SOCKET_ID, member)
    mine = channel_auth(KEY, SECRET, SOCKET_ID, "presence-room", answer["channel_data"])
    assert mine == answer["auth"]


def test_user_auth_is_what_the_library_s_authenticate_user_answers() -> None:
    answer = library().authenticate_user(SOCKET_ID, {"id": "alice", "name": "Alice"})
    assert user_auth(KEY, SECRET, SOCKET_ID, answer["user_data"]) == answer["auth"]


def test_the_library_validates_a_webhook_we_sign_and_refuses_a_changed_one() -> None:
    body = json.dumps({"time_ms": int(time.time() * 1000), "events": []}).encode()
    signature = webhook_signature(SECRET, body)
    assert library().validate_webhook(KEY, signature, body) is not None
    assert library().validate_webhook(KEY, signature, body + b" ") is None
    assert library().validate_webhook(KEY, webhook_signature("other", body), body) is None

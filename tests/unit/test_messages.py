"""Message schema: client ops decoded and classified, server events encoded."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from manydoors.protocol.messages import (
    ERROR_CODES,
    OPS,
    PONG,
    Broadcast,
    Bye,
    Dm,
    Error,
    Hello,
    Msg,
    Ok,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    Pub,
    Recovered,
    Send,
    Sub,
    Unsub,
    Welcome,
    broadcast_line,
    bye_line,
    decode_op,
    dm_line,
    encode,
    error_line,
    msg_line,
    ok_line,
    pong_line,
)


def error_of(line: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_op(line)
    return info.value


def one_json_line(line: bytes) -> Any:
    """The line is exactly one NDJSON line; return its decoded object."""
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    return json.loads(line)


# --- decoding each op ------------------------------------------------------------------


def test_hello_decodes_with_user_token_and_id() -> None:
    op = decode_op(b'{"op":"hello","user":"alice","token":"t0k","id":1}')
    assert op == Hello(user="alice", token="t0k", id=1)


def test_hello_token_and_id_are_optional() -> None:
    assert decode_op(b'{"op":"hello","user":"alice"}') == Hello(user="alice", token=None, id=None)


def test_sub_decodes() -> None:
    assert decode_op(b'{"op":"sub","channel":"news","id":"s1"}') == Sub(channel="news", id="s1")


def test_unsub_decodes() -> None:
    assert decode_op(b'{"op":"unsub","channel":"news"}') == Unsub(channel="news", id=None)


def test_pub_decodes_and_keeps_data_as_the_clients_raw_bytes() -> None:
    op = decode_op(b'{"op":"pub","channel":"news","data":{"b": [1, 2.50]},"id":3}')
    assert isinstance(op, Pub)
    assert (op.channel, op.id) == ("news", 3)
    assert bytes(op.data) == b'{"b": [1, 2.50]}'  # not re-encoded: spacing and 2.50 kept


def test_send_decodes_and_keeps_data_raw() -> None:
    op = decode_op(b'{"op":"send","user":"bob","data":"hi \\u00e9"}')
    assert isinstance(op, Send)
    assert op.user == "bob"
    assert bytes(op.data) == b'"hi \\u00e9"'


@pytest.mark.parametrize("data", [b"null", b"0", b"true", b'""', b"[]", b"{}"])
def test_any_json_value_is_valid_data(data: bytes) -> None:
    op = decode_op(b'{"op":"pub","channel":"c","data":' + data + b"}")
    assert isinstance(op, Pub)
    assert bytes(op.data) == data


def test_ping_decodes_with_and_without_id() -> None:
    assert decode_op(b'{"op":"ping"}') == Ping(id=None)
    assert decode_op(b'{"op":"ping","id":42}') == Ping(id=42)


def test_every_documented_op_decodes() -> None:
    lines = {
        "hello": b'{"op":"hello","user":"u"}',
        "sub": b'{"op":"sub","channel":"c"}',
        "unsub": b'{"op":"unsub","channel":"c"}',
        "pub": b'{"op":"pub","channel":"c","data":1}',
        "send": b'{"op":"send","user":"u","data":1}',
        "ping": b'{"op":"ping"}',
        "presence": b'{"op":"presence","channel":"c"}',
        "pong": b'{"op":"pong"}',
        "refresh": b'{"op":"refresh","token":"t"}',
    }
    assert set(lines) == set(OPS)
    for line in lines.values():
        decode_op(line)


def test_sub_since_must_be_a_non_negative_integer() -> None:
    assert decode_op(b'{"op":"sub","channel":"c","since":7}') == Sub(channel="c", since=7)
    for bad in (b"-1", b'"7"', b"1.5"):
        with pytest.raises(ProtocolError) as err:
            decode_op(b'{"op":"sub","channel":"c","since":%s}' % bad)
        assert err.value.code == "bad_field"


def test_recovery_ack_and_presence_events_encode_as_documented() -> None:
    assert encode(Recovered(3, True, 12, 2)) == (
        b'{"ev":"ok","id":3,"recovered":true,"seq":12,"missed":2}\n'
    )
    assert encode(Presence("veg", {"ann": 2}, 1, id=4)) == (
        b'{"ev":"presence","channel":"veg","users":{"ann":2},"anonymous":1,"id":4}\n'
    )


def test_field_order_does_not_matter() -> None:
    assert decode_op(b'{"id":7,"channel":"c","op":"sub"}') == Sub(channel="c", id=7)


def test_unknown_fields_are_ignored() -> None:
    assert decode_op(b'{"op":"ping","extra":{"x":1}}') == Ping(id=None)


def test_whitespace_around_the_object_is_accepted() -> None:
    assert decode_op(b'  {"op" : "ping"}\t') == Ping(id=None)


def test_id_may_be_a_string_or_an_integer_or_null() -> None:
    assert decode_op(b'{"op":"ping","id":"abc"}') == Ping(id="abc")
    assert decode_op(b'{"op":"ping","id":-5}') == Ping(id=-5)
    assert decode_op(b'{"op":"ping","id":null}') == Ping(id=None)


def test_unicode_names_are_accepted() -> None:
    assert decode_op('{"op":"sub","channel":"été/новости"}'.encode()) == Sub(
        channel="été/новости", id=None
    )
    assert decode_op(b'{"op":"sub","channel":"\\u00e9t\\u00e9"}') == Sub(channel="été", id=None)


def test_a_name_of_128_characters_is_accepted() -> None:
    name = "n" * 128
    assert decode_op(b'{"op":"sub","channel":"' + name.encode() + b'"}') == Sub(channel=name)


# --- errors: bad_json ----------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b'{"op":"ping"',
        b'{"op":"ping",}',
        b'{"op":"ping"} {"op":"ping"}',
        b'{"op":"ping"} trailing',
        b"{'op':'ping'}",
        b'{"op":"sub","channel":"a\x01b"}',  # a raw control character inside a string
    ],
)
def test_malformed_json_is_bad_json(line: bytes) -> None:
    assert error_of(line).code == "bad_json"


@pytest.mark.parametrize(
    "line",
    [
        b"\xff\xfe",
        b'{"op":"hello","user":"\xff"}',
        b'{"op":"hello","user":"al\xc3"}',  # truncated multi-byte sequence
        b'{"op":"hello","user":"\xed\xa0\x80"}',  # an encoded surrogate
        b'{"op":"\xff"}',
        b'{"op":"ping","id":"\xff"}',
        b'{"op":"sub","channel":"c","x":"\xff","id":1}',
    ],
)
def test_invalid_utf8_is_bad_json(line: bytes) -> None:
    err = error_of(line)
    assert err.code == "bad_json"
    assert err.op_id is None


@pytest.mark.parametrize(
    "line",
    [
        b'{"op":"pub","channel":"c","data":"\xff"}',
        b'{"op":"send","user":"u","data":{"\xff":1}}',
    ],
)
def test_invalid_utf8_in_data_is_bad_json_and_never_relayed(line: bytes) -> None:
    # data is copied verbatim into every recipient's event: it must be valid UTF-8 too
    assert error_of(line).code == "bad_json"


def test_bad_json_carries_no_id() -> None:
    assert error_of(b'{"op":"ping","id":5').op_id is None


# --- errors: not_object, unknown_op, missing_field -----------------------------------


@pytest.mark.parametrize("line", [b"[]", b'[{"op":"ping"}]', b'"ping"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_not_object(line: bytes) -> None:
    err = error_of(line)
    assert err.code == "not_object"
    assert err.op_id is None


@pytest.mark.parametrize("op", [b'"nope"', b'"HELLO"', b'""', b"5", b"null", b'["sub"]'])
def test_an_unknown_or_invalid_op_is_unknown_op(op: bytes) -> None:
    err = error_of(b'{"op":' + op + b',"id":9}')
    assert err.code == "unknown_op"
    assert err.op_id == 9


def test_unknown_op_reason_lists_the_known_ops() -> None:
    reason = error_of(b'{"op":"nope"}').reason
    for op in OPS:
        assert op in reason


def test_a_missing_op_is_missing_field() -> None:
    err = error_of(b'{"channel":"c","id":"x"}')
    assert err.code == "missing_field"
    assert "op" in err.reason
    assert err.op_id == "x"


def test_an_empty_object_is_missing_field_op() -> None:
    err = error_of(b"{}")
    assert err.code == "missing_field"
    assert err.reason == "missing field 'op'"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b'{"op":"sub","id":1}', "channel"),
        (b'{"op":"unsub","id":1}', "channel"),
        (b'{"op":"pub","channel":"c","id":1}', "data"),
        (b'{"op":"pub","data":1,"id":1}', "channel"),
        (b'{"op":"send","data":1,"id":1}', "user"),
        (b'{"op":"send","user":"u","id":1}', "data"),
    ],
)
def test_a_missing_required_field_is_missing_field_naming_it(line: bytes, field: str) -> None:
    err = error_of(line)
    assert err.code == "missing_field"
    assert err.reason == f"missing field '{field}'"
    assert err.op_id == 1


# --- errors: bad_field ---------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b'{"op":"hello","user":5,"id":1}',
        b'{"op":"hello","user":"u","token":5,"id":1}',
        b'{"op":"sub","channel":["c"],"id":1}',
        b'{"op":"unsub","channel":{},"id":1}',
        b'{"op":"pub","channel":true,"data":1,"id":1}',
        b'{"op":"send","user":1.5,"data":1,"id":1}',
    ],
)
def test_a_field_of_the_wrong_type_is_bad_field(line: bytes) -> None:
    err = error_of(line)
    assert err.code == "bad_field"
    assert err.op_id == 1


@pytest.mark.parametrize("field", ["user", "channel"])
def test_bad_field_reason_names_the_field_without_the_json_path(field: str) -> None:
    op = "hello" if field == "user" else "sub"
    reason = error_of(f'{{"op":"{op}","{field}":5}}'.encode()).reason
    assert f"`{field}`" in reason
    assert "$." not in reason


@pytest.mark.parametrize("bad_id", [b"true", b"1.5", b"[1]", b'{"a":1}'])
def test_an_id_of_the_wrong_type_is_bad_field_without_an_id(bad_id: bytes) -> None:
    err = error_of(b'{"op":"ping","id":' + bad_id + b"}")
    assert err.code == "bad_field"
    assert err.op_id is None


def test_an_empty_name_is_bad_field() -> None:
    err = error_of(b'{"op":"sub","channel":"","id":1}')
    assert err.code == "bad_field"
    assert err.op_id == 1


def test_a_name_over_128_characters_is_bad_field() -> None:
    err = error_of(b'{"op":"hello","user":"' + b"u" * 129 + b'","id":1}')
    assert err.code == "bad_field"
    assert err.op_id == 1


def test_name_length_counts_characters_not_bytes() -> None:
    name = "é" * 128  # 256 bytes of UTF-8
    assert decode_op(b'{"op":"sub","channel":"' + name.encode() + b'"}') == Sub(channel=name)


@pytest.mark.parametrize("escape", [b"\\u0000", b"\\u0001", b"\\n", b"\\t", b"\\r", b"\\u001f"])
def test_a_name_with_a_control_character_is_bad_field(escape: bytes) -> None:
    err = error_of(b'{"op":"sub","channel":"a' + escape + b'b","id":1}')
    assert err.code == "bad_field"
    assert err.op_id == 1


@pytest.mark.parametrize(
    "line",
    [
        b'{"op":"hello","user":"a\\u0007"}',
        b'{"op":"unsub","channel":"a\\u0007"}',
        b'{"op":"pub","channel":"a\\u0007","data":1}',
        b'{"op":"send","user":"a\\u0007","data":1}',
        b'{"op":"presence","channel":"x","after":"a\\u0007"}',
    ],
)
def test_every_name_field_refuses_a_control_character(line: bytes) -> None:
    # Checked only for lines with an escape (messages.py): every op's names are.
    assert error_of(line).code == "bad_field"


def test_an_escape_that_is_no_control_character_is_a_name() -> None:
    assert decode_op(b'{"op":"sub","channel":"a\\\\b\\u00e9"}') == Sub(channel="a\\bé")


def test_a_name_with_only_a_control_character_is_bad_field() -> None:
    assert error_of(b'{"op":"hello","user":"\\n"}').code == "bad_field"


# --- the id is salvaged into errors ----------------------------------------------------


@pytest.mark.parametrize("op_id", [0, 17, "req-1", "é"])
def test_a_validation_error_carries_the_ops_id(op_id: int | str) -> None:
    line = json.dumps({"op": "sub", "channel": 5, "id": op_id}, ensure_ascii=False).encode()
    assert error_of(line).op_id == op_id


def test_an_error_without_an_id_carries_none() -> None:
    assert error_of(b'{"op":"sub","channel":5}').op_id is None


def test_protocol_error_is_an_exception_with_code_reason_and_id() -> None:
    err = ProtocolError("bad_field", "why", 3)
    assert isinstance(err, Exception)
    assert (err.code, err.reason, err.op_id, str(err)) == ("bad_field", "why", 3, "why")


def test_every_code_decode_op_raises_is_a_known_error_code() -> None:
    lines = [
        b"x",
        b"[]",
        b'{"op":"x"}',
        b"{}",
        b'{"op":"sub"}',
        b'{"op":"sub","channel":1}',
        b'{"op":"sub","channel":"\xff"}',
    ]
    codes = {error_of(line).code for line in lines}
    assert codes == {"bad_json", "not_object", "unknown_op", "missing_field", "bad_field"}
    assert codes <= set(ERROR_CODES)


def test_error_codes_are_the_documented_ones() -> None:
    assert set(ERROR_CODES) == {
        "bad_json",
        "not_object",
        "unknown_op",
        "missing_field",
        "bad_field",
        "too_long",
        "server_full",
        "bad_frame",  # WebSocket: a frame the service does not take (binary, protocol error)
        "bad_handshake",  # WebSocket: the HTTP upgrade was refused
        "too_many_subscriptions",  # a sub beyond the service's max_subscriptions
        "unauthorized",  # auth mode token: a bad or missing token, no hello in time
        "forbidden",  # a $ channel the token does not grant
        "rate_limited",  # over max_messages_per_second
        "too_many_connections",  # max_connections_per_ip / per_user
        "read_timeout",  # a message or handshake not finished within read_timeout
        "unavailable",  # the backend gave no usable answer to a proxy hook
    }


def test_hello_may_leave_the_user_to_its_token() -> None:
    # The worker asks for a user unless auth mode "token" takes it from the token.
    assert decode_op(b'{"op":"hello","token":"t.t.t"}') == Hello(user=None, token="t.t.t")
    assert decode_op(b'{"op":"hello","user":null}') == Hello(user=None)


# --- encoding server events --------------------------------------------------------------


def test_welcome_encodes_as_one_line() -> None:
    assert one_json_line(encode(Welcome("123-1", "chat", 0))) == {
        "ev": "welcome",
        "conn": "123-1",
        "service": "chat",
        "worker": 0,
    }


def test_msg_line_has_channel_seq_from_and_data() -> None:
    line = msg_line("news", 7, "alice", msgspec.Raw(b'{"text":"hi"}'))
    assert one_json_line(line) == {
        "ev": "msg",
        "channel": "news",
        "seq": 7,
        "from": "alice",
        "data": {"text": "hi"},
    }


def test_from_is_spelled_from_and_is_null_without_a_sender() -> None:
    for line in (
        msg_line("c", 1, None, msgspec.Raw(b"1")),
        dm_line(None, msgspec.Raw(b"1")),
        broadcast_line(1, None, msgspec.Raw(b"1")),
    ):
        obj = one_json_line(line)
        assert "from" in obj
        assert obj["from"] is None
        assert b'"from_"' not in line


def test_dm_line_has_from_and_data() -> None:
    assert one_json_line(dm_line("bob", msgspec.Raw(b"[1,2]"))) == {
        "ev": "dm",
        "from": "bob",
        "data": [1, 2],
    }


def test_broadcast_line_has_seq_from_and_data() -> None:
    assert one_json_line(broadcast_line(3, "ops", msgspec.Raw(b'"restart"'))) == {
        "ev": "broadcast",
        "seq": 3,
        "from": "ops",
        "data": "restart",
    }


@pytest.mark.parametrize(
    "data",
    [b'{"b": [1, 2.50]}', b'"caf\\u00e9"', '"café"'.encode(), b"1e3", b"null", b'{"z":1,"a":2}'],
)
def test_data_is_copied_verbatim_into_every_event(data: bytes) -> None:
    raw = msgspec.Raw(data)
    for line in (msg_line("c", 1, "a", raw), dm_line("a", raw), broadcast_line(1, "a", raw)):
        assert line.endswith(b',"data":' + data + b"}\n")


def test_data_decoded_from_a_client_is_relayed_byte_for_byte() -> None:
    op = decode_op(b'{"op":"pub","channel":"c","data":{ "k" : [ 1 ,2 ] }}')
    assert isinstance(op, Pub)
    assert msg_line("c", 1, "u", op.data) == (
        b'{"ev":"msg","channel":"c","seq":1,"from":"u","data":{ "k" : [ 1 ,2 ] }}\n'
    )


def test_data_with_a_newline_escape_stays_on_one_line() -> None:
    op = decode_op(b'{"op":"pub","channel":"c","data":"a\\nb"}')
    assert isinstance(op, Pub)
    assert one_json_line(msg_line("c", 1, None, op.data))["data"] == "a\nb"


def test_ok_line_echoes_the_id() -> None:
    assert one_json_line(ok_line(5)) == {"ev": "ok", "id": 5}
    assert one_json_line(ok_line("a")) == {"ev": "ok", "id": "a"}


def test_pong_line_echoes_the_id_or_leaves_it_out() -> None:
    assert one_json_line(pong_line(9)) == {"ev": "pong", "id": 9}
    assert one_json_line(pong_line("p")) == {"ev": "pong", "id": "p"}
    assert pong_line(None) == b'{"ev":"pong"}\n'


def test_pong_constant_is_the_pong_without_id() -> None:
    assert pong_line(None) == PONG
    assert one_json_line(PONG) == {"ev": "pong"}


def test_error_line_has_code_reason_and_id_when_given() -> None:
    assert one_json_line(error_line("bad_field", "why", "r1")) == {
        "ev": "error",
        "code": "bad_field",
        "reason": "why",
        "id": "r1",
    }


def test_error_line_leaves_out_a_missing_id() -> None:
    assert one_json_line(error_line("bad_json", "why")) == {
        "ev": "error",
        "code": "bad_json",
        "reason": "why",
    }


def test_error_line_escapes_a_reason_with_newlines() -> None:
    assert one_json_line(error_line("bad_json", "a\nb"))["reason"] == "a\nb"


def test_error_line_for_a_real_protocol_error_is_one_line() -> None:
    err = error_of(b'{"op":"sub","channel":"a\\nb","id":1}')
    assert one_json_line(error_line(err.code, err.reason, err.op_id))["id"] == 1


def test_bye_line_has_the_reason() -> None:
    assert one_json_line(bye_line("shutdown")) == {"ev": "bye", "reason": "shutdown"}


def test_encode_takes_every_event_struct() -> None:
    raw = msgspec.Raw(b"0")
    events = [
        Welcome("c", "s", 1),
        Msg("c", 1, None, raw),
        Dm(None, raw),
        Broadcast(1, None, raw),
        Ok(1),
        Pong(),
        Error("bad_json", "r"),
        Bye("slow"),
    ]
    names = [one_json_line(encode(ev))["ev"] for ev in events]
    assert names == ["welcome", "msg", "dm", "broadcast", "ok", "pong", "error", "bye"]


def test_event_keys_come_in_a_stable_order_starting_with_ev() -> None:
    line = msg_line("c", 2, "u", msgspec.Raw(b"0"))
    assert list(json.loads(line)) == ["ev", "channel", "seq", "from", "data"]
    assert line.startswith(b'{"ev":"msg",')


def test_non_ascii_names_are_encoded_as_utf8() -> None:
    line = msg_line("новости", 1, "é", msgspec.Raw(b"0"))
    assert one_json_line(line)["channel"] == "новости"
    line.decode("utf-8")

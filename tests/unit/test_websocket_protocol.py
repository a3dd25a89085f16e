"""WebSocket sans-I/O core: the opening handshake, client frames in, server frames out."""

from __future__ import annotations

import struct

import pytest

from manydoors.protocol import websocket
from manydoors.protocol.websocket import (
    Binary,
    Close,
    Event,
    HandshakeError,
    ProtocolFail,
    Text,
    WsFrameParser,
    WsPing,
    WsPong,
    accept_key,
    encode_binary,
    encode_close,
    encode_ping,
    encode_pong,
    encode_text,
    error_response,
    parse_handshake,
    text_header,
)

LIMIT = 1 << 20
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
# RFC 6455 section 1.3 (websockets and wsproto compute the same value).
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = b"\x37\xfa\x21\x3d"


def request(*lines: str, method: str = "GET", version: str = "1.1") -> bytes:
    head = [f"{method} /chat HTTP/{version}", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


GOOD = (
    "Host: server.example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY.decode()}",
    "Sec-WebSocket-Version: 13",
)


def without(name: str) -> list[str]:
    return [line for line in GOOD if not line.startswith(name + ":")]


def replaced(name: str, value: str) -> list[str]:
    return [*without(name), f"{name}: {value}"]


def refusal(req: bytes) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        parse_handshake(req)
    return info.value


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bytes | None = MASK, rsv: int = 0
) -> bytes:
    """A client frame, masked byte by byte (independent of the parser's XOR trick)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed(*chunks: bytes, limit: int = LIMIT) -> list[Event]:
    parser = WsFrameParser()
    out: list[Event] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk, limit))
    return out


# --- handshake ---------------------------------------------------------------------------


def test_the_rfc_example_key_gets_the_rfc_example_accept() -> None:
    assert accept_key(KEY) == ACCEPT


def test_a_valid_upgrade_request_gets_a_101_with_the_accept_key() -> None:
    req = request(*GOOD)
    result = parse_handshake(req)
    assert result is not None
    response, consumed, target = result
    assert target == b"/chat"
    assert response == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n"
    )
    assert consumed == len(req)


def test_upgrade_and_connection_are_case_insensitive_token_lists() -> None:
    lines = [
        *without("Upgrade"),
        "upgrade: WebSocket",
    ]
    lines = [line for line in lines if not line.startswith("Connection:")]
    lines += ["connection: keep-alive, UPGRADE"]
    assert parse_handshake(request(*lines)) is not None


def test_an_incomplete_request_head_gives_none() -> None:
    req = request(*GOOD)
    for cut in range(len(req)):
        assert parse_handshake(req[:cut]) is None, cut


def test_bytes_after_the_head_are_not_consumed() -> None:
    req = request(*GOOD)
    first_frame = frame(1, b"hi")
    result = parse_handshake(req + first_frame)
    assert result is not None
    _, consumed, _ = result
    assert consumed == len(req)
    assert feed((req + first_frame)[consumed:]) == [Text(b"hi")]


def test_a_head_over_max_bytes_is_refused_with_431() -> None:
    incomplete = request(*GOOD)[:-2] + b"X-Pad: " + b"a" * 9000
    with pytest.raises(HandshakeError) as info:
        parse_handshake(incomplete)
    assert info.value.status == 431
    complete = request(*GOOD, "X-Pad: " + "a" * 300)
    with pytest.raises(HandshakeError) as info:
        parse_handshake(complete, max_bytes=256)
    assert info.value.status == 431


def test_a_head_of_exactly_max_bytes_is_accepted() -> None:
    req = request(*GOOD)
    assert parse_handshake(req, max_bytes=len(req)) is not None


@pytest.mark.parametrize(
    ("req", "status"),
    [
        (request(*GOOD, method="POST"), 405),
        (request(*GOOD, version="1.0"), 400),
        (request(*without("Host")), 400),
        (request(*without("Upgrade")), 400),
        (request(*replaced("Upgrade", "h2c")), 400),
        (request(*without("Connection")), 400),
        (request(*replaced("Connection", "keep-alive")), 400),
        (request(*without("Sec-WebSocket-Key")), 400),
        (request(*replaced("Sec-WebSocket-Key", "not base64!")), 400),
        (request(*replaced("Sec-WebSocket-Key", "c2hvcnQ=")), 400),  # base64 of 5 bytes
        (request(*GOOD, "Sec-WebSocket-Key: " + KEY.decode()), 400),  # two keys
        (request(*without("Sec-WebSocket-Version")), 400),
        (request(*replaced("Sec-WebSocket-Version", "8")), 426),
        (b"NONSENSE\r\n\r\n", 400),
    ],
    ids=[
        "post",
        "http10",
        "no-host",
        "no-upgrade",
        "upgrade-h2c",
        "no-connection",
        "connection-keepalive",
        "no-key",
        "key-not-base64",
        "key-wrong-length",
        "two-keys",
        "no-version",
        "version-8",
        "garbage",
    ],
)
def test_an_invalid_upgrade_request_is_refused_with_its_status(req: bytes, status: int) -> None:
    assert refusal(req).status == status


def test_a_wrong_version_answer_names_version_13() -> None:
    answer = error_response(refusal(request(*replaced("Sec-WebSocket-Version", "8"))))
    assert answer.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer


def test_an_error_answer_is_a_complete_response_that_closes() -> None:
    exc = refusal(request(*without("Sec-WebSocket-Key")))
    answer = error_response(exc)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close" in head
    assert f"\r\nContent-Length: {len(body)}".encode() in head
    assert body == exc.reason.encode() + b"\n"


def test_a_non_get_answer_allows_get() -> None:
    answer = error_response(refusal(request(*GOOD, method="POST")))
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET\r\n" in answer


# --- frames in ---------------------------------------------------------------------------


def test_a_masked_text_frame_is_one_text_event() -> None:
    # RFC 6455 5.7: a single-frame masked text message "Hello".
    rfc = bytes.fromhex("818537fa213d7f9f4d5158")
    assert feed(rfc) == [Text(b"Hello")]


def test_a_binary_frame_is_one_binary_event() -> None:
    assert feed(frame(2, bytes(range(256)))) == [Binary(bytes(range(256)))]


def test_empty_messages_come_out_empty() -> None:
    assert feed(frame(1), frame(2), frame(9)) == [Text(b""), Binary(b""), WsPing(b"")]


def test_ping_and_pong_carry_their_payload() -> None:
    assert feed(frame(9, b"are you there"), frame(10, b"yes")) == [
        WsPing(b"are you there"),
        WsPong(b"yes"),
    ]


def test_a_text_message_in_three_fragments_with_a_ping_between_is_reassembled() -> None:
    text = "héllo wörld ✓".encode()
    # Cut inside multi-byte characters so validation must carry state across fragments.
    a, b = text[:2], text[2:10]
    c = text[10:]
    events = feed(
        frame(1, a, fin=False), frame(9, b"p"), frame(0, b, fin=False), frame(0, c, fin=True)
    )
    assert events == [WsPing(b"p"), Text(text)]


def test_a_fragmented_binary_message_is_reassembled() -> None:
    events = feed(frame(2, b"\xff\x00", fin=False), frame(0, b"\xfe", fin=True))
    assert events == [Binary(b"\xff\x00\xfe")]


def test_frames_split_at_every_byte_boundary_come_out_whole() -> None:
    stream = (
        frame(1, "ünïcode".encode(), fin=False)
        + frame(9, b"ping")
        + frame(0, b" tail")
        + frame(2, b"x" * 300)
        + frame(8, struct.pack("!H", 1000) + b"bye")
    )
    expected = [
        WsPing(b"ping"),
        Text("ünïcode tail".encode()),
        Binary(b"x" * 300),
        Close(1000, "bye"),
    ]
    for cut in range(len(stream) + 1):
        assert feed(stream[:cut], stream[cut:]) == expected, cut
    assert feed(*(stream[i : i + 1] for i in range(len(stream)))) == expected


def test_16_bit_and_64_bit_lengths_are_read() -> None:
    medium = bytes(range(256)) * 4 + b"end"  # 1027 bytes
    large = b"L" * 70_000
    assert feed(frame(2, medium), frame(2, large)) == [Binary(medium), Binary(large)]
    assert feed(frame(2, b"m" * 126), frame(2, b"n" * 65535), frame(2, b"o" * 65536)) == [
        Binary(b"m" * 126),
        Binary(b"n" * 65535),
        Binary(b"o" * 65536),
    ]


def test_a_large_frame_in_small_chunks_comes_out_whole() -> None:
    data = frame(1, b"a" * 200_000)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert feed(*chunks) == [Text(b"a" * 200_000)]


def test_an_idle_parser_holds_nothing() -> None:
    parser = WsFrameParser()
    data = frame(1, b"hello")
    parser.feed(data[:4], LIMIT)
    assert parser.buffered == 4
    parser.feed(data[4:], LIMIT)
    assert parser.buffered == 0
    assert parser._buf is websocket._EMPTY  # the shared constant, not a buffer of its own
    assert parser._frag is None


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(1, b"hi", mask=None), 1002),
        (frame(1, b"hi", rsv=0x40), 1002),
        (frame(1, b"hi", rsv=0x20), 1002),
        (frame(1, b"hi", rsv=0x10), 1002),
        (frame(3, b"hi"), 1002),
        (frame(7, b"hi"), 1002),
        (frame(11, b"hi"), 1002),
        (frame(15, b"hi"), 1002),
        (frame(9, b"p", fin=False), 1002),
        (frame(9, b"p" * 126), 1002),
        (frame(10, b"p" * 126), 1002),
        (frame(8, b"\x03\xe8" + b"r" * 124), 1002),
        (frame(0, b"orphan"), 1002),
        (frame(1, b"a", fin=False) + frame(1, b"b"), 1002),
        (frame(1, b"a", fin=False) + frame(2, b"b"), 1002),
        (frame(8, b"\x03"), 1002),
        (frame(1, b"\xff"), 1007),
        (frame(1, b"ok\xed\xa0\x80"), 1007),  # an encoded surrogate
        (frame(1, "é".encode()[:1]), 1007),  # truncated character in a whole message
        (frame(1, b"a", fin=False) + frame(0, b"\xc3", fin=True), 1007),  # truncated at the end
        (frame(1, b"a", fin=False) + frame(0, b"\xff", fin=False), 1007),  # fails before the end
        (frame(8, b"\x03\xe8\xff"), 1007),
    ],
    ids=[
        "unmasked",
        "rsv1",
        "rsv2",
        "rsv3",
        "opcode3",
        "opcode7",
        "opcode11",
        "opcode15",
        "fragmented-ping",
        "ping-126",
        "pong-126",
        "close-126",
        "continuation-without-start",
        "text-inside-fragmented",
        "binary-inside-fragmented",
        "close-body-1-byte",
        "text-invalid-utf8",
        "text-surrogate",
        "text-truncated",
        "fragmented-text-truncated",
        "fragmented-text-invalid-early",
        "close-reason-invalid-utf8",
    ],
)
def test_a_protocol_violation_fails_the_connection_with_its_code(data: bytes, code: int) -> None:
    events = feed(data)
    assert len(events) == 1
    assert isinstance(events[-1], ProtocolFail)
    assert events[-1].code == code


def test_a_64_bit_length_with_the_top_bit_set_fails_with_1002() -> None:
    data = struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + MASK
    assert [type(e) for e in feed(data)] == [ProtocolFail]
    assert feed(data)[0] == ProtocolFail(1002, "64-bit length with top bit set")


def test_a_violation_is_reported_from_the_header_before_the_payload_arrives() -> None:
    assert [type(e) for e in feed(frame(1, b"x" * 1000, mask=None)[:2])] == [ProtocolFail]


def test_a_message_over_max_message_fails_with_1009_before_its_payload_arrives() -> None:
    big = frame(2, b"x" * 101)
    assert feed(big[:8], limit=100) == [ProtocolFail(1009, "message over 100 bytes")]
    assert feed(frame(2, b"x" * 100), limit=100) == [Binary(b"x" * 100)]


def test_a_fragmented_message_over_max_message_in_total_fails_with_1009() -> None:
    parts = frame(1, b"a" * 60, fin=False) + frame(0, b"b" * 30, fin=False) + frame(0, b"c" * 11)
    events = feed(parts, limit=100)
    assert events == [ProtocolFail(1009, "message over 100 bytes")]
    exact = frame(1, b"a" * 60, fin=False) + frame(0, b"b" * 40)
    assert feed(exact, limit=100) == [Text(b"a" * 60 + b"b" * 40)]


def test_control_frames_do_not_count_against_max_message() -> None:
    assert feed(frame(9, b"p" * 125), limit=10) == [WsPing(b"p" * 125)]


def test_events_before_a_violation_are_kept_and_input_after_it_ignored() -> None:
    parser = WsFrameParser()
    events = parser.feed(frame(1, b"ok") + frame(1, b"no", mask=None) + frame(1, b"lost"), LIMIT)
    assert events == [Text(b"ok"), ProtocolFail(1002, "client frame not masked")]
    assert parser.done
    assert parser.feed(frame(1, b"later"), LIMIT) == []
    assert parser.buffered == 0


def test_a_close_with_code_and_reason_is_read_and_ends_parsing() -> None:
    parser = WsFrameParser()
    data = frame(8, struct.pack("!H", 1001) + "going away ✓".encode()) + frame(1, b"after")
    assert parser.feed(data, LIMIT) == [Close(1001, "going away ✓")]
    assert parser.done
    assert parser.feed(frame(1, b"later"), LIMIT) == []


def test_an_empty_close_has_no_code() -> None:
    assert feed(frame(8)) == [Close(None, "")]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1014, 3000, 4999])
def test_a_valid_close_code_is_accepted(code: int) -> None:
    assert feed(frame(8, struct.pack("!H", code))) == [Close(code, "")]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_an_invalid_close_code_fails_with_1002(code: int) -> None:
    assert feed(frame(8, struct.pack("!H", code))) == [
        ProtocolFail(1002, f"invalid close code {code}")
    ]


# --- frames out --------------------------------------------------------------------------


def test_encoders_produce_the_rfc_bytes_for_small_payloads() -> None:
    assert encode_text(b"Hello") == bytes.fromhex("810548656c6c6f")  # RFC 6455 5.7
    assert encode_text(b"") == b"\x81\x00"
    assert encode_binary(b"\x00\x01") == b"\x82\x02\x00\x01"
    assert encode_ping(b"Hello") == bytes.fromhex("890548656c6c6f")
    assert encode_pong(b"Hello") == bytes.fromhex("8a0548656c6c6f")
    assert encode_close(1000) == b"\x88\x02\x03\xe8"
    assert encode_close(1002, "bad") == b"\x88\x05\x03\xeabad"
    assert text_header(125) == b"\x81\x7d"


def test_encoders_use_16_bit_lengths_from_126_to_65535() -> None:
    assert text_header(126) == b"\x81\x7e\x00\x7e"
    assert text_header(65535) == b"\x81\x7e\xff\xff"
    body = b"a" * 256
    assert encode_text(body) == b"\x81\x7e\x01\x00" + body  # RFC 6455 5.7: 256 bytes


def test_encoders_use_64_bit_lengths_from_65536() -> None:
    body = b"b" * 65536
    assert text_header(65536) == b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"
    assert encode_binary(body) == b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + body


def test_header_plus_body_is_the_encoded_frame() -> None:
    for n in (0, 125, 126, 65535, 65536):
        body = b"z" * n
        assert text_header(n) + body == encode_text(body)


def test_a_control_payload_over_125_bytes_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_ping(b"p" * 126)
    with pytest.raises(ValueError):
        encode_pong(b"p" * 126)


def test_a_long_close_reason_is_cut_at_a_character_edge() -> None:
    out = encode_close(1000, "é" * 100)
    assert len(out) <= 2 + 125
    (event,) = feed(bytes((0x88, 0x80 | (len(out) - 2))) + b"\0\0\0\0" + out[2:])
    assert isinstance(event, Close)
    assert event.reason == "é" * 61


def test_server_frames_round_trip_through_a_masking_client() -> None:
    # What a client would send back: the same payloads, masked.
    for n in (0, 3, 125, 126, 1000, 65536):
        payload = bytes(i % 251 for i in range(n))
        assert feed(frame(2, payload, mask=b"\xaa\x55\x0f\xf0")) == [Binary(payload)]

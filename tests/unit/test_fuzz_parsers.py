"""Property-based tests of the sans-I/O parsers: any bytes, any chunking, no surprises.

Each parser is fed (a) arbitrary or mutated bytes, where the only allowed outcomes are
its documented results or its documented error, and (b) valid input built by a small
reference encoder here, split at arbitrary points, which must come out unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from manydoors.protocol.framing import TOO_LONG, LineFramer
from manydoors.protocol.ipc import MAX_PAYLOAD, FrameError, IpcParser, Kind, encode_frame
from manydoors.protocol.messages import (
    ERROR_CODES,
    Hello,
    Ping,
    PongOp,
    PresenceOp,
    ProtocolError,
    Pub,
    Send,
    Sub,
    Unsub,
    decode_op,
)
from manydoors.protocol.websocket import (
    Binary,
    Close,
    Event,
    ProtocolFail,
    Text,
    WsFrameParser,
    WsPing,
    WsPong,
)

FUZZ = settings(
    max_examples=int(os.environ.get("MANYDOORS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates give empty chunks)."""
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return split_at(data, cuts)


# --- LineFramer ------------------------------------------------------------------------

# Newlines and carriage returns are common so that lines, \r\n and overlong lines occur.
stream_bytes = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"x", b"yz", b"\x00", b"\xff", b"a" * 7]),
    max_size=60,
).map(b"".join) | st.binary(max_size=200)


def expected_lines(stream: bytes, limit: int) -> list[bytes | object]:
    """The framer's documented output for the whole stream, computed without it."""
    *complete, tail = stream.split(b"\n")
    out: list[bytes | object] = []
    for line in complete:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            out.append(TOO_LONG if len(line) > limit else line)
    # An unterminated line is reported once it is over the limit; a trailing \r may
    # be the first half of \r\n and does not count yet.
    if len(tail) > limit + 1 or (len(tail) == limit + 1 and not tail.endswith(b"\r")):
        out.append(TOO_LONG)
    return out


@st.composite
def framer_case(draw: st.DrawFn) -> tuple[bytes, list[bytes], int]:
    stream = draw(stream_bytes)
    return stream, chunked(draw, stream), draw(st.integers(0, 24))


@FUZZ
@given(framer_case())
@example((b"abc\r", [b"abc", b"\r", b""], 3))
@example((b"abcd\r\nef\n", [b"ab", b"cd", b"\r", b"\nef\n"], 3))
@example((b"abcdef\nxy\n", [b"abcd", b"ef", b"\nxy\n"], 3))
def test_framer_lines_do_not_depend_on_chunking(case: tuple[bytes, list[bytes], int]) -> None:
    stream, chunks, limit = case
    framer = LineFramer()
    out: list[bytes | object] = []
    for chunk in chunks:
        out.extend(framer.feed_lines(chunk, limit))
        # State stays bounded: at most the limit plus a pending \r.
        assert framer.buffered <= limit + 1
    assert out == expected_lines(stream, limit)
    assert all(line is TOO_LONG or (line and b"\n" not in line) for line in out)


@FUZZ
@given(st.integers(2, 16), st.integers(0, 300), st.data())
def test_an_overlong_line_is_reported_once(limit: int, extra: int, data: st.DataObject) -> None:
    line = b"q" * (limit + 1 + extra)
    chunks = chunked(data.draw, line + b"\nok\n")
    framer = LineFramer()
    out = [x for chunk in chunks for x in framer.feed_lines(chunk, limit)]
    assert out == [TOO_LONG, b"ok"]
    assert framer.buffered == 0


# --- decode_op -------------------------------------------------------------------------

OP_TYPES = (Hello, Sub, Unsub, Pub, Send, Ping, PresenceOp, PongOp)


def decode_or_error(line: bytes) -> None:
    """decode_op's contract: a client op, or ProtocolError with a known code."""
    try:
        op = decode_op(line)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES, exc.code
    else:
        assert isinstance(op, OP_TYPES)


@FUZZ
@given(st.binary(max_size=300))
@example(b'{"op":"hello","user":"\\ud800"}')
@example(b'{"op":"hello","user":"\xc3("}')
@example(b'{"op":"sub","channel":"a","since":-1}')
@example(b'{"op":"ping","id":123456789012345678901234567890}')
@example(b'{"op":7}')
@example(b"[]")
def test_decode_op_on_arbitrary_bytes_returns_an_op_or_a_protocol_error(line: bytes) -> None:
    decode_or_error(line)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
field_names = st.sampled_from(["op", "user", "channel", "data", "id", "token", "since", "x"])


@FUZZ
@given(
    st.dictionaries(field_names, json_values)
    | st.dictionaries(field_names, json_values).map(lambda d: {**d, "op": "pub"}),
    st.sampled_from([None, *("hello", "sub", "unsub", "pub", "send", "ping", "presence")]),
)
def test_decode_op_on_arbitrary_json_objects_returns_an_op_or_a_protocol_error(
    obj: dict[str, Any], op: str | None
) -> None:
    if op is not None:
        obj = {**obj, "op": op}
    decode_or_error(json.dumps(obj).encode())


# Deep nesting: msgspec raises RecursionError, which decode_op lets through. A ~2 KB
# line is far below the 64 KiB line limit, so any client can send it.


@FUZZ
@given(st.integers(1, 5000), st.sampled_from(["data", "x"]))
@example(1000, "data")
@example(1000, "x")
def test_decode_op_on_deeply_nested_json_returns_an_op_or_a_protocol_error(
    depth: int, field: str
) -> None:
    line = b'{"op":"pub","channel":"a","%s":%s%s}' % (field.encode(), b"[" * depth, b"]" * depth)
    decode_or_error(line)


# Names: 1-128 characters, no control characters (the pattern of messages.Name).
name_chars = st.characters(min_codepoint=0x20, exclude_categories=("Cs",))
names = st.text(name_chars, min_size=1, max_size=128)
op_ids = st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=6), inner)
    ),
    max_leaves=12,
)


def with_id(op: str, **fields: Any) -> st.SearchStrategy[dict[str, Any]]:
    """A dict strategy for ``op``: required fields always, ``id`` sometimes."""
    return st.fixed_dictionaries({"op": st.just(op), **fields}, optional={"id": op_ids})


valid_ops = st.one_of(
    with_id("hello", user=names).flatmap(
        lambda d: st.fixed_dictionaries(
            {k: st.just(v) for k, v in d.items()},
            optional={"token": st.none() | st.text(st.characters(exclude_categories=("Cs",)))},
        )
    ),
    with_id("sub", channel=names).flatmap(
        lambda d: st.fixed_dictionaries(
            {k: st.just(v) for k, v in d.items()},
            optional={"since": st.none() | st.integers(0, 2**63 - 1)},
        )
    ),
    with_id("unsub", channel=names),
    with_id("pub", channel=names, data=finite_json),
    with_id("send", user=names, data=finite_json),
    with_id("ping"),
    with_id("presence", channel=names),
)
OP_CLASS = {
    "hello": Hello,
    "sub": Sub,
    "unsub": Unsub,
    "pub": Pub,
    "send": Send,
    "ping": Ping,
    "presence": PresenceOp,
}


@FUZZ
@given(valid_ops, st.booleans())
def test_valid_ops_round_trip(fields: dict[str, Any], ascii_only: bool) -> None:
    line = json.dumps(fields, ensure_ascii=ascii_only).encode()
    op = decode_op(line)
    assert type(op) is OP_CLASS[fields["op"]]
    for name, value in fields.items():
        if name == "op":
            continue
        got = getattr(op, name)
        if name == "data":
            assert json.loads(bytes(got)) == value
        else:
            assert got == value, name


@FUZZ
@given(names, st.characters(max_codepoint=0x1F), st.sampled_from(["hello", "sub"]))
@example("abc", "\n", "hello")
@example("news", "\n", "sub")
def test_names_with_control_characters_are_rejected(name: str, ctl: str, op: str) -> None:
    field = "user" if op == "hello" else "channel"
    line = json.dumps({"op": op, field: name + ctl}).encode()
    with pytest.raises(ProtocolError) as info:
        decode_op(line)
    assert info.value.code == "bad_field"


# --- WsFrameParser ---------------------------------------------------------------------

MAX_MESSAGE = 1 << 20


def client_frame(fin: bool, opcode: int, payload: bytes, mask: bytes, wide: int = 0) -> bytes:
    """One masked client frame. ``wide`` forces the 16-bit (1) or 64-bit (2) length."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126 and not wide:
        head = bytes((first, 0x80 | n))
    elif n < 0x10000 and wide != 2:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


utf8_chars = st.characters(exclude_categories=("Cs",))
masks = st.binary(min_size=4, max_size=4)
control_payloads = st.binary(max_size=125)
interleaved = st.lists(st.tuples(st.sampled_from([9, 10]), control_payloads, masks), max_size=2)


@st.composite
def data_message(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A text or binary message, maybe fragmented with pings/pongs in between."""
    if draw(st.booleans()):
        opcode, payload = 1, draw(st.text(utf8_chars, max_size=300)).encode()
    else:
        opcode, payload = 2, draw(st.binary(max_size=300))
    cuts = draw(st.lists(st.integers(0, len(payload)), max_size=4))
    parts = split_at(payload, cuts)
    wire = b""
    events: list[Event] = []
    for i, part in enumerate(parts):
        fin = i == len(parts) - 1
        wire += client_frame(
            fin, opcode if i == 0 else 0, part, draw(masks), draw(st.integers(0, 2))
        )
        if not fin:
            for ctl_op, ctl_payload, ctl_mask in draw(interleaved):
                wire += client_frame(True, ctl_op, ctl_payload, ctl_mask)
                events.append(WsPing(ctl_payload) if ctl_op == 9 else WsPong(ctl_payload))
    events.append(Text(payload) if opcode == 1 else Binary(payload))
    return wire, events


@st.composite
def control_message(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    opcode = draw(st.sampled_from([9, 10]))
    payload = draw(control_payloads)
    event: Event = WsPing(payload) if opcode == 9 else WsPong(payload)
    return client_frame(True, opcode, payload, draw(masks)), [event]


close_codes = st.integers(1000, 1003) | st.integers(1007, 1014) | st.integers(3000, 4999)


@st.composite
def close_message(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    if draw(st.booleans()):
        return client_frame(True, 8, b"", draw(masks)), [Close(None, "")]
    code = draw(close_codes)
    reason = draw(st.text(utf8_chars, max_size=30).filter(lambda r: len(r.encode()) <= 123))
    body = code.to_bytes(2, "big") + reason.encode()
    return client_frame(True, 8, body, draw(masks)), [Close(code, reason)]


@st.composite
def ws_stream(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    messages = draw(st.lists(data_message() | control_message(), max_size=6))
    if draw(st.booleans()):
        messages.append(draw(close_message()))
    wire = b"".join(w for w, _ in messages)
    return wire, [e for _, events in messages for e in events]


def feed_ws(chunks: list[bytes], max_message: int = MAX_MESSAGE) -> tuple[WsFrameParser, list]:
    parser = WsFrameParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk, max_message))
    return parser, events


@FUZZ
@given(ws_stream(), st.data())
def test_valid_client_frames_come_out_as_the_original_messages(
    stream: tuple[bytes, list[Event]], data: st.DataObject
) -> None:
    wire, expected = stream
    parser, events = feed_ws(chunked(data.draw, wire))
    assert events == expected
    ends_with_close = bool(expected) and isinstance(expected[-1], Close)
    assert parser.done == ends_with_close
    if not ends_with_close:
        assert parser.buffered == 0


def check_ws_events(parser: WsFrameParser, events: list[Event]) -> None:
    """Only a Close or ProtocolFail ends the stream, it comes last, and it is final."""
    for event in events[:-1]:
        assert not isinstance(event, Close | ProtocolFail)
    ended = bool(events) and isinstance(events[-1], Close | ProtocolFail)
    assert parser.done == ended
    if ended:
        assert parser.feed(b"\x81\x80\x00\x00\x00\x00", MAX_MESSAGE) == []
    for event in events:
        if isinstance(event, Text):
            event.payload.decode()  # text is always valid UTF-8
        if isinstance(event, ProtocolFail):
            assert event.code in (1002, 1007, 1009)


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 200), st.data())
def test_arbitrary_bytes_never_raise(raw: bytes, max_message: int, data: st.DataObject) -> None:
    parser, events = feed_ws(chunked(data.draw, raw), max_message)
    check_ws_events(parser, events)


@FUZZ
@given(
    ws_stream(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 400),
    st.data(),
)
def test_mutated_client_frames_never_raise(
    stream: tuple[bytes, list[Event]],
    flips: list[tuple[int, int]],
    max_message: int,
    data: st.DataObject,
) -> None:
    wire = bytearray(stream[0] or b"\x81\x80abcd")
    for at, value in flips:
        wire[at % len(wire)] = value
    parser, events = feed_ws(chunked(data.draw, bytes(wire)), max_message)
    check_ws_events(parser, events)


# --- IpcParser -------------------------------------------------------------------------

ipc_frames = st.lists(
    st.tuples(
        st.sampled_from(list(Kind)),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
        st.binary(max_size=200),
    ),
    max_size=8,
)


@FUZZ
@given(ipc_frames, st.data())
def test_ipc_frames_round_trip_under_any_chunking(
    frames: list[tuple[Kind, str, bytes]], data: st.DataObject
) -> None:
    wire = b"".join(encode_frame(kind, key, payload) for kind, key, payload in frames)
    parser = IpcParser()
    out = [frame for chunk in chunked(data.draw, wire) for frame in parser.feed(chunk)]
    assert out == [(int(kind), key, payload) for kind, key, payload in frames]
    assert parser.feed(b"") == []


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=12))
@example(b"\x05\x00\x00\xff\xff\xff\xff", [])  # payload length over MAX_PAYLOAD
@example(b"\x05\x00\x01\x00\x00\x00\x00\xff", [3])  # key not UTF-8
def test_ipc_garbage_parses_or_raises_frame_error(raw: bytes, cuts: list[int]) -> None:
    parser = IpcParser()
    try:
        for chunk in split_at(raw, cuts):
            for kind, key, payload in parser.feed(chunk):
                assert 0 <= kind <= 255
                assert isinstance(key, str)
                assert len(payload) <= MAX_PAYLOAD
    except FrameError:
        pass

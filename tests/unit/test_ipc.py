"""Worker <-> broker frames: encode_frame and IpcParser."""

from __future__ import annotations

import struct

import pytest

from manydoors.protocol.ipc import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    FrameError,
    IpcParser,
    Kind,
    encode_frame,
)

FRAMES: list[tuple[Kind, str, bytes]] = [
    (Kind.SUB, "news", b""),
    (Kind.PUB, "news", b'["alice",{"text":"hi"}]'),
    (Kind.SYNC, "", b""),
    (Kind.USER_ON, "été-ユーザー", b""),
    (Kind.DELIVER_CHANNEL, "новости", b'{"ev":"msg","seq":1}\n'),
    (Kind.DELIVER_ALL, "", b"\x00\xff binary \n is fine"),
    (Kind.READY, "12345", b""),
]


def stream() -> bytes:
    return b"".join(encode_frame(kind, key, payload) for kind, key, payload in FRAMES)


def test_header_is_kind_keylen_paylen_in_network_order() -> None:
    frame = encode_frame(Kind.PUB, "ab", b"xyz")
    assert HEADER_SIZE == 7
    assert frame == bytes([Kind.PUB]) + b"\x00\x02" + b"\x00\x00\x00\x03" + b"ab" + b"xyz"


def test_key_length_counts_utf8_bytes() -> None:
    frame = encode_frame(Kind.SUB, "é")
    assert struct.unpack_from("!BHI", frame) == (Kind.SUB, 2, 0)
    assert frame[HEADER_SIZE:] == "é".encode()


def test_key_and_payload_default_to_empty() -> None:
    assert encode_frame(Kind.SYNCED) == bytes([Kind.SYNCED]) + b"\x00" * 6


def test_one_frame_round_trips() -> None:
    assert IpcParser().feed(encode_frame(Kind.SEND, "bob", b"[null,1]")) == [
        (Kind.SEND, "bob", b"[null,1]")
    ]


def test_parsed_kind_compares_equal_to_the_enum() -> None:
    ((kind, _, _),) = IpcParser().feed(encode_frame(Kind.UNSUB, "c"))
    assert kind == Kind.UNSUB
    assert Kind(kind) is Kind.UNSUB


def test_several_frames_in_one_chunk_come_out_in_order() -> None:
    assert IpcParser().feed(stream()) == FRAMES


def test_unicode_keys_round_trip() -> None:
    keys = ["é", "новости", "频道", "🚪" * 10, "a/b:c"]
    data = b"".join(encode_frame(Kind.SUB, key) for key in keys)
    assert [key for _, key, _ in IpcParser().feed(data)] == keys


def test_a_stream_split_at_every_byte_boundary_round_trips() -> None:
    data = stream()
    for cut in range(len(data) + 1):
        parser = IpcParser()
        got = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert got == FRAMES, cut


def test_a_stream_fed_one_byte_at_a_time_round_trips() -> None:
    data = stream()
    parser = IpcParser()
    got = []
    for i in range(len(data)):
        got += parser.feed(data[i : i + 1])
    assert got == FRAMES


def test_a_stream_cut_at_every_pair_of_boundaries_round_trips() -> None:
    data = encode_frame(Kind.PUB, "ké", b"payload") + encode_frame(Kind.SYNC)
    want = [(Kind.PUB, "ké", b"payload"), (Kind.SYNC, "", b"")]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            parser = IpcParser()
            got = parser.feed(data[:i]) + parser.feed(data[i:j]) + parser.feed(data[j:])
            assert got == want, (i, j)


def test_an_incomplete_header_yields_nothing_yet() -> None:
    parser = IpcParser()
    frame = encode_frame(Kind.SUB, "c")
    assert parser.feed(frame[: HEADER_SIZE - 1]) == []
    assert parser.feed(frame[HEADER_SIZE - 1 :]) == [(Kind.SUB, "c", b"")]


def test_feeding_nothing_yields_nothing() -> None:
    parser = IpcParser()
    assert parser.feed(b"") == []
    parser.feed(encode_frame(Kind.SUB, "c")[:3])
    assert parser.feed(b"") == []


def test_a_large_payload_round_trips() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    frame = encode_frame(Kind.DELIVER_USER, "u", payload)
    parser = IpcParser()
    assert parser.feed(frame[:100_000]) == []
    assert parser.feed(frame[100_000:]) == [(Kind.DELIVER_USER, "u", payload)]


def test_payloads_are_bytes_not_views_into_the_buffer() -> None:
    parser = IpcParser()
    ((_, _, first),) = parser.feed(encode_frame(Kind.PUB, "c", b"one"))
    parser.feed(encode_frame(Kind.PUB, "c", b"two"))
    assert type(first) is bytes
    assert first == b"one"


def test_a_payload_over_the_maximum_raises_frame_error() -> None:
    header = struct.pack("!BHI", Kind.PUB, 1, MAX_PAYLOAD + 1)
    with pytest.raises(FrameError):
        IpcParser().feed(header)  # raised from the header alone, before any payload


def test_a_payload_over_the_maximum_after_good_frames_raises_frame_error() -> None:
    bad = struct.pack("!BHI", Kind.DELIVER_ALL, 0, 2**32 - 1)
    parser = IpcParser()
    assert parser.feed(encode_frame(Kind.SYNC)) == [(Kind.SYNC, "", b"")]
    with pytest.raises(FrameError):
        parser.feed(bad[:4])
        parser.feed(bad[4:])


def test_a_payload_of_exactly_the_maximum_is_waited_for() -> None:
    header = struct.pack("!BHI", Kind.PUB, 0, MAX_PAYLOAD)
    assert IpcParser().feed(header + b"x" * 10) == []


def test_a_key_that_is_not_utf8_raises_frame_error() -> None:
    frame = struct.pack("!BHI", Kind.SUB, 2, 0) + b"\xff\xfe"
    with pytest.raises(FrameError):
        IpcParser().feed(frame)


def test_frame_error_is_an_exception() -> None:
    assert issubclass(FrameError, Exception)


def test_kinds_are_distinct_bytes() -> None:
    values = [kind.value for kind in Kind]
    assert len(set(values)) == len(values)
    assert all(0 < v < 256 for v in values)

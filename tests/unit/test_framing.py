"""LineFramer: bytes in, complete lines (or TOO_LONG markers) out."""

from __future__ import annotations

import pytest

from manydoors.protocol.framing import TOO_LONG, LineFramer

LIMIT = 64 * 1024


def feed_all(chunks: list[bytes], limit: int = LIMIT) -> list[bytes | object]:
    framer = LineFramer()
    out: list[bytes | object] = []
    for chunk in chunks:
        out.extend(framer.feed_lines(chunk, limit))
    return out


def test_one_complete_line_comes_out_without_its_newline() -> None:
    assert feed_all([b'{"op":"ping"}\n']) == [b'{"op":"ping"}']


def test_a_line_without_newline_is_held_back() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b'{"op":"pi', LIMIT) == []
    assert framer.buffered == len(b'{"op":"pi')


def test_a_line_split_across_chunks_is_joined() -> None:
    assert feed_all([b'{"op":', b'"ping"', b"}\n"]) == [b'{"op":"ping"}']


def test_a_line_split_at_every_byte_boundary_comes_out_whole() -> None:
    data = b'{"op":"sub","channel":"news"}\n{"op":"ping"}\n'
    for cut in range(len(data) + 1):
        assert feed_all([data[:cut], data[cut:]]) == [
            b'{"op":"sub","channel":"news"}',
            b'{"op":"ping"}',
        ], cut


def test_a_line_fed_one_byte_at_a_time_comes_out_whole() -> None:
    data = b"hello world\n"
    assert feed_all([data[i : i + 1] for i in range(len(data))]) == [b"hello world"]


def test_several_lines_in_one_chunk_come_out_in_order() -> None:
    assert feed_all([b"a\nbb\nccc\n"]) == [b"a", b"bb", b"ccc"]


def test_a_chunk_can_finish_one_line_hold_several_and_start_another() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"fir", LIMIT) == []
    assert framer.feed_lines(b"st\nsecond\nthird\nfou", LIMIT) == [b"first", b"second", b"third"]
    assert framer.buffered == 3
    assert framer.feed_lines(b"rth\n", LIMIT) == [b"fourth"]
    assert framer.buffered == 0


def test_crlf_line_endings_are_accepted() -> None:
    assert feed_all([b"a\r\nbb\r\n"]) == [b"a", b"bb"]


def test_crlf_split_between_chunks_is_accepted() -> None:
    assert feed_all([b"abc\r", b"\ndef\r", b"\n"]) == [b"abc", b"def"]


def test_only_one_trailing_cr_is_stripped() -> None:
    assert feed_all([b"abc\r\r\n"]) == [b"abc\r"]


def test_a_cr_inside_a_line_is_kept() -> None:
    assert feed_all([b"a\rb\n"]) == [b"a\rb"]


def test_empty_lines_are_skipped() -> None:
    assert feed_all([b"\n\n\r\na\n\n\r\n\nb\n\n"]) == [b"a", b"b"]


def test_a_keepalive_newline_alone_yields_nothing() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"\n", LIMIT) == []
    assert framer.feed_lines(b"\r\n", LIMIT) == []
    assert framer.buffered == 0


def test_feeding_nothing_yields_nothing_and_keeps_the_partial_line() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"", LIMIT) == []
    framer.feed_lines(b"abc", LIMIT)
    assert framer.feed_lines(b"", LIMIT) == []
    assert framer.buffered == 3
    assert framer.feed_lines(b"\n", LIMIT) == [b"abc"]


def test_a_line_exactly_at_the_limit_passes() -> None:
    assert feed_all([b"x" * 10 + b"\n"], limit=10) == [b"x" * 10]


def test_a_line_exactly_at_the_limit_passes_when_split() -> None:
    assert feed_all([b"x" * 6, b"x" * 4, b"\n"], limit=10) == [b"x" * 10]


def test_a_line_at_the_limit_with_crlf_passes() -> None:
    assert feed_all([b"x" * 10 + b"\r\n"], limit=10) == [b"x" * 10]


def test_a_line_at_the_limit_with_crlf_passes_whatever_the_chunk_boundary() -> None:
    # The \r of \r\n is not part of the line, even while it waits for its \n.
    line = b"x" * 10 + b"\r\n"
    for cut in range(len(line) + 1):
        assert feed_all([line[:cut], line[cut:]], limit=10) == [b"x" * 10], cut


def test_a_line_one_byte_over_the_limit_is_too_long() -> None:
    assert feed_all([b"x" * 11 + b"\n"], limit=10) == [TOO_LONG]


def test_a_cr_that_turns_out_not_to_end_the_line_still_counts() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"x" * 10 + b"\r", 10) == []
    assert framer.feed_lines(b"y", 10) == [TOO_LONG]
    assert framer.feed_lines(b"\nok\n", 10) == [b"ok"]


def test_a_too_long_complete_line_does_not_hide_its_neighbours() -> None:
    assert feed_all([b"a\n" + b"x" * 11 + b"\nb\n"], limit=10) == [b"a", TOO_LONG, b"b"]


def test_a_partial_line_crossing_the_limit_is_reported_as_soon_as_it_crosses() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"x" * 8, 10) == []
    assert framer.feed_lines(b"x" * 2, 10) == []  # exactly at the limit: may still end
    assert framer.feed_lines(b"x", 10) == [TOO_LONG]  # crossed: no need to wait for \n


def test_a_first_chunk_over_the_limit_is_reported_at_once() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"x" * 11, 10) == [TOO_LONG]
    assert framer.buffered == 0


def test_the_rest_of_a_too_long_line_is_discarded_across_many_chunks() -> None:
    framer = LineFramer()
    out = framer.feed_lines(b"x" * 11, 10)
    for _ in range(5):
        out += framer.feed_lines(b"y" * 1000, 10)
        assert framer.buffered == 0  # nothing of the oversized line is kept
    out += framer.feed_lines(b"zzz\n", 10)
    assert out == [TOO_LONG]


def test_parsing_resumes_after_the_newline_that_ends_a_too_long_line() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"x" * 11, 10) == [TOO_LONG]
    assert framer.feed_lines(b"y" * 50, 10) == []
    assert framer.feed_lines(b"yy\nok\nnext", 10) == [b"ok"]
    assert framer.buffered == 4
    assert framer.feed_lines(b"\n", 10) == [b"next"]


def test_the_discarded_tail_may_end_in_the_same_chunk_with_crlf() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"x" * 11, 10) == [TOO_LONG]
    assert framer.feed_lines(b"yyy\r\nok\r\n", 10) == [b"ok"]


def test_a_new_line_after_a_too_long_one_gets_the_full_limit() -> None:
    framer = LineFramer()
    framer.feed_lines(b"x" * 20 + b"\n", 10)
    assert framer.feed_lines(b"y" * 10, 10) == []
    assert framer.feed_lines(b"\n", 10) == [b"y" * 10]


def test_every_too_long_line_gets_exactly_one_marker() -> None:
    data = (b"x" * 25 + b"\n") * 3 + b"ok\n"
    for size in (1, 3, 7, 10, 11, 26, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert feed_all(chunks, limit=10) == [TOO_LONG, TOO_LONG, TOO_LONG, b"ok"], size


def test_too_long_marker_is_a_singleton_with_a_readable_repr() -> None:
    assert repr(TOO_LONG) == "TOO_LONG"
    assert feed_all([b"x" * 11 + b"\n"], limit=10)[0] is TOO_LONG


def test_buffered_is_zero_for_a_new_framer() -> None:
    assert LineFramer().buffered == 0


def test_buffered_counts_the_bytes_of_the_incomplete_line_only() -> None:
    framer = LineFramer()
    framer.feed_lines(b"done\npart", LIMIT)
    assert framer.buffered == 4
    framer.feed_lines(b"ial", LIMIT)
    assert framer.buffered == 7


def test_buffered_is_zero_while_discarding_a_too_long_line() -> None:
    framer = LineFramer()
    framer.feed_lines(b"x" * 11, 10)
    assert framer.buffered == 0


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_tiny_limits_are_enforced(limit: int) -> None:
    assert feed_all([b"a" * limit + b"\n" + b"b" * (limit + 1) + b"\n"], limit=limit) == [
        b"a" * limit,
        TOO_LONG,
    ]


def test_framers_do_not_share_state() -> None:
    one, two = LineFramer(), LineFramer()
    one.feed_lines(b"abc", LIMIT)
    assert two.buffered == 0
    assert two.feed_lines(b"xyz\n", LIMIT) == [b"xyz"]
    assert one.feed_lines(b"\n", LIMIT) == [b"abc"]

"""History and missed(): the sans-I/O core of ``sub`` with ``since`` (callers pass ``now``)."""

from __future__ import annotations

from manydoors.broker.history import History, missed


def line(seq: int) -> bytes:
    return b'{"seq":%d}\n' % seq


def filled(size: int, ttl: float, seqs: range, channel: str = "veg", now: float = 0.0) -> History:
    history = History(size, ttl)
    for seq in seqs:
        history.add(channel, seq, line(seq), now)
    return history


def test_history_keeps_the_last_size_messages_of_each_channel_oldest_first():
    history = filled(3, 300, range(1, 8))
    history.add("fruit", 1, line(1), 0.0)
    assert list(history.entries("veg", 0.0)) == [(5, line(5)), (6, line(6)), (7, line(7))]
    assert list(history.entries("fruit", 0.0)) == [(1, line(1))]
    assert len(history) == 2


def test_unknown_channel_has_no_entries():
    assert list(History(3, 300).entries("nowhere", 0.0)) == []


def test_history_size_zero_stores_nothing():
    history = filled(0, 300, range(1, 5))
    assert len(history) == 0
    assert list(history.entries("veg", 0.0)) == []


def test_channel_history_expires_ttl_after_its_last_message_not_its_first():
    history = History(10, 300)
    history.add("veg", 1, line(1), 0.0)
    history.add("veg", 2, line(2), 200.0)  # refreshes the whole channel
    assert [s for s, _ in history.entries("veg", 499.0)] == [1, 2]
    assert list(history.entries("veg", 501.0)) == []
    assert len(history) == 0  # an expired channel found by entries() is dropped


def test_a_message_after_expiry_starts_a_fresh_history():
    history = History(10, 300)
    history.add("veg", 1, line(1), 0.0)
    history.add("veg", 2, line(2), 1000.0)  # seq 1 expired at 300
    assert [s for s, _ in history.entries("veg", 1000.0)] == [2]
    assert missed(0, 2, history.entries("veg", 1000.0)) is None


def test_sweep_drops_expired_channels_and_counts_them():
    history = History(10, 300)
    history.add("old", 1, line(1), 0.0)
    history.add("also-old", 1, line(1), 1.0)
    history.add("fresh", 1, line(1), 250.0)
    assert history.sweep(299.0) == 0
    assert history.sweep(302.0) == 2
    assert len(history) == 1
    assert [s for s, _ in history.entries("fresh", 302.0)] == [1]
    assert history.sweep(1000.0) == 1
    assert len(history) == 0


def test_forget_drops_one_channel():
    history = filled(5, 300, range(1, 3))
    history.add("fruit", 1, line(1), 0.0)
    history.forget("veg")
    history.forget("never-seen")  # no error
    assert list(history.entries("veg", 0.0)) == []
    assert len(history) == 1


def test_missed_returns_the_lines_after_since_up_to_seq_in_order():
    entries = [(s, line(s)) for s in range(1, 11)]
    assert missed(4, 7, entries) == [line(5), line(6), line(7)]
    assert missed(0, 10, entries) == [line(s) for s in range(1, 11)]


def test_missed_nothing_when_since_is_the_current_seq():
    assert missed(5, 5) == []
    assert missed(5, 5, [(4, line(4)), (5, line(5))]) == []
    assert missed(0, 0) == []


def test_missed_is_none_when_history_does_not_reach_back_to_since():
    history = filled(3, 300, range(1, 8))  # holds 5, 6, 7
    assert missed(4, 7, history.entries("veg", 0.0)) == [line(5), line(6), line(7)]
    assert missed(3, 7, history.entries("veg", 0.0)) is None  # seq 4 was trimmed


def test_missed_is_none_with_a_gap_in_the_middle():
    assert missed(0, 4, [(1, line(1)), (2, line(2)), (4, line(4))]) is None


def test_missed_is_none_when_since_is_from_the_future():
    entries = [(s, line(s)) for s in range(1, 4)]
    assert missed(4, 3, entries) is None
    assert missed(100, 3) is None


def test_missed_ignores_entries_outside_the_range():
    entries = [(s, line(s)) for s in range(1, 11)]
    assert missed(2, 4, entries) == [line(3), line(4)]


def test_missed_merges_two_sources_in_seq_order_whatever_their_order():
    # As the Redis broker does: what Redis stored plus what this node saw since.
    stored = [(5, line(5)), (3, line(3))]
    local = [(6, line(6)), (4, line(4)), (5, line(5))]  # overlap counts once
    assert missed(2, 6, stored, local) == [line(3), line(4), line(5), line(6)]
    assert missed(2, 6, local, stored) == [line(3), line(4), line(5), line(6)]
    assert missed(2, 7, stored, local) is None  # neither holds 7


def test_missed_accepts_a_live_history_and_generators():
    history = filled(10, 300, range(1, 6))
    extra = ((s, line(s)) for s in (6, 7))
    assert missed(3, 7, history.entries("veg", 0.0), extra) == [line(s) for s in (4, 5, 6, 7)]

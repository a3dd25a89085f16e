"""The load generator's adaptive window (loadgen/window.py)."""

from __future__ import annotations

from manydoors.loadgen.window import CEILING, FLOOR, Window


def test_slow_answers_halve_the_window_once_an_interval_down_to_its_floor() -> None:
    w = Window(connect_timeout=10)  # slow: > 2.5 s, fast: < 1.25 s
    assert w.size == CEILING
    w.answered(3.0, now=100.0)
    assert w.size == CEILING // 2
    w.answered(3.0, now=101.0)  # within 2.5 s of the last cut: the same congestion
    assert w.size == CEILING // 2
    w.answered(3.0, now=103.0)
    assert w.size == CEILING // 4
    for i in range(20):
        w.answered(9.0, now=110.0 + 3 * i)
    assert w.size == FLOOR


def test_fast_answers_widen_it_by_one_each_up_to_the_ceiling_and_middling_ones_keep_it() -> None:
    w = Window(connect_timeout=10)
    w.answered(5.0, now=0.0)
    size = w.size
    w.answered(2.0, now=1.0)  # between fast and slow: no change
    assert w.size == size
    for _ in range(10):
        w.answered(0.01, now=2.0)
    assert w.size == size + 10
    for _ in range(2 * CEILING):
        w.answered(0.01, now=3.0)
    assert w.size == CEILING

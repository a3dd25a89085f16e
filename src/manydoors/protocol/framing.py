"""Newline-delimited framing (sans-I/O).

A TCP client sends one JSON object per line. The framer turns the byte chunks the
kernel hands us into complete lines, enforcing a maximum line length so that a
client cannot make the server buffer without bound.
"""

from __future__ import annotations

from typing import Final


class _TooLong:
    """Marker yielded in place of a line that exceeded the limit (its bytes are dropped)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = _TooLong()

_EMPTY: Final = b""


class LineFramer:
    """Splits a byte stream into lines without the trailing newline.

    State is one attribute: the partial line (``b""`` when none, which is a shared
    constant, so an idle connection pays nothing for it) or ``None`` while the rest of
    an oversized line is being discarded.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial: bytes | None = _EMPTY

    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete line."""
        return len(self._partial) if self._partial else 0

    def feed_lines(self, data: bytes, limit: int) -> list[bytes | _TooLong]:
        """Feed received bytes; return the complete lines (or TOO_LONG markers).

        Empty lines (keep-alive newlines, ``\\r\\n`` leftovers) are skipped. A line
        longer than ``limit`` bytes yields one TOO_LONG marker, reported as soon as
        the limit is crossed, and its remaining bytes up to the newline are dropped.
        """
        partial = self._partial
        parts = data.split(b"\n")
        tail = parts.pop()
        out: list[bytes | _TooLong] = []
        if parts:
            first = parts[0]
            if partial is None:
                parts[0] = _EMPTY  # the end of a line we were discarding
            elif partial:
                parts[0] = partial + first
            for line in parts:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    continue
                out.append(TOO_LONG if len(line) > limit else line)
            partial = _EMPTY
        if partial is None:
            self._partial = None  # still inside an oversized line
        else:
            pending = partial + tail if partial else tail
            size = len(pending)
            # A trailing \r may be the first half of \r\n, which does not count.
            if size > limit and (size > limit + 1 or not pending.endswith(b"\r")):
                out.append(TOO_LONG)
                self._partial = None
            else:
                self._partial = pending
        return out

"""The --plot PNG: write_plot renders full and empty load reports into a valid image."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

from manydoors.loadgen.report import write_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sample(t: float, open_: int, ready: int, errors: int) -> dict[str, Any]:
    """One timeline entry as Controller.sample() records it."""
    return {
        "t": t,
        "open": open_,
        "ready": ready,
        "attempted": open_ + errors,
        "errors": errors,
        "rss_bytes": open_ * 1_300,
    }


def full_report() -> dict[str, Any]:
    """A report shaped like Controller.report(): ramp with errors, two broadcasts."""
    timeline = [
        sample(0.5, 0, 0, 0),
        sample(1.0, 4_000, 3_500, 0),
        sample(1.5, 8_000, 7_900, 12),
        sample(2.0, 9_988, 9_988, 12),
    ]
    return {
        "connections": {"target": 10_000, "peak": 9_988, "final": 9_988},
        "connect_ms": {"p50": 0.3, "p90": 1.1, "p99": 2.4, "max": 1000.0},
        "rate_achieved": 5_012,
        "deliveries": [
            {
                "n": 1,
                "expected": 9_988,
                "received": 9_988,
                "p50_ms": 12.0,
                "p99_ms": 40.0,
                "max_ms": 44.0,
                "per_second": 222_000,
            },
            {
                "n": 2,
                "expected": 9_988,
                "received": 9_900,
                "p50_ms": 0.0,
                "p99_ms": 3.0,
                "max_ms": 5.0,
                "per_second": 1_650_000,
            },
        ],
        "timeline": timeline,
        "histograms": {
            # Bucket 0 (under 0.1 ms) must not break the log axis; 10000 is a SYN retransmit.
            "connect_0.1ms": {"0": 50, "2": 3_000, "3": 4_000, "11": 2_800, "24": 126, "10000": 12},
            "delivery_ms": {
                "1": {"5": 100, "12": 5_000, "30": 4_788, "44": 100},
                "2": {"0": 6_000, "1": 3_000, "3": 850, "5": 50},
            },
        },
    }


def empty_report() -> dict[str, Any]:
    """Nothing connected: no samples, no connects, no broadcasts, no rate."""
    return {
        "connections": {"target": 1_000, "peak": 0, "final": 0},
        "connect_ms": {"p50": None, "p90": None, "p99": None, "max": None},
        "rate_achieved": None,
        "deliveries": [],
        "timeline": [],
        "histograms": {"connect_0.1ms": {}, "delivery_ms": {}},
    }


def png_size(path: Path) -> tuple[int, int]:
    """Check the PNG structure (signature, chunk CRCs, IHDR first, IEND last); return w, h."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        pos += 12 + length
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert b"IDAT" in kinds
    return width, height


def test_full_report_renders_a_png_of_at_least_600_by_400(tmp_path: Path) -> None:
    out = tmp_path / "load.png"
    write_plot(full_report(), str(out))
    width, height = png_size(out)
    assert width >= 600
    assert height >= 400


def test_empty_report_with_no_deliveries_still_renders(tmp_path: Path) -> None:
    out = tmp_path / "empty.png"
    write_plot(empty_report(), str(out))
    width, height = png_size(out)
    assert width >= 600
    assert height >= 400


def test_report_missing_histograms_and_timeline_keys_still_renders(tmp_path: Path) -> None:
    report = empty_report()
    del report["histograms"], report["timeline"]
    out = tmp_path / "sparse.png"
    write_plot(report, str(out))
    assert png_size(out)[0] >= 600

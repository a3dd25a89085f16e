"""Parse the address arguments of ``load`` and ``doctor``: targets, port and IP ranges.

Pure text to tuples, no I/O. The load planner and the doctor both take them from the
command line; they live here so that neither package imports the other.
"""

from __future__ import annotations

import ipaddress


class PlanError(ValueError):
    """The requested load cannot be planned; the message shows the arithmetic."""


def parse_target(text: str) -> tuple[tuple[str, int], ...]:
    """``127.0.0.1:7000`` or ``127.0.0.1:7000-7003``."""
    host, sep, ports = text.rpartition(":")
    if not sep or not host:
        raise PlanError(f"target {text!r}: expected HOST:PORT or HOST:PORT-PORT")
    try:
        lo_s, dash, hi_s = ports.partition("-")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo  # "7000-" is a typo, not port 7000
    except ValueError:
        raise PlanError(f"target {text!r}: ports must be numbers") from None
    if not 0 < lo <= hi <= 65535:
        raise PlanError(f"target {text!r}: port range must be within 1-65535")
    return tuple((host, p) for p in range(lo, hi + 1))


def parse_port_range(text: str) -> tuple[int, int]:
    """``40000-40009`` (or one port)."""
    lo_s, dash, hi_s = text.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
    except ValueError:
        raise PlanError(f"port range {text!r}: expected LO-HI") from None
    if not 0 < lo <= hi <= 65535:
        raise PlanError(f"port range {text!r}: must be within 1-65535, low to high")
    return lo, hi


def parse_ip_range(text: str) -> tuple[str, ...]:
    """``127.0.1.1-127.0.1.64``, a single address, or a comma-separated list of either."""
    out: list[str] = []
    for part in text.split(","):
        lo_s, dash, hi_s = part.strip().partition("-")
        try:
            lo = ipaddress.ip_address(lo_s)
            hi = ipaddress.ip_address(hi_s) if dash else lo
        except ValueError as exc:
            raise PlanError(f"source IPs {part!r}: {exc}") from None
        if int(hi) < int(lo) or lo.version != hi.version:
            raise PlanError(f"source IPs {part!r}: the range is empty")
        # ip_address(int) would make an IPv4 address of a small IPv6 one (::1 -> 0.0.0.1)
        out.extend(str(type(lo)(i)) for i in range(int(lo), int(hi) + 1))
    return tuple(out)

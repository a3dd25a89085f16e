"""``manydoors top``: a live terminal view of a running server, from its HTTP API."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from .apiclient import get_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="live view of a running server")
    p.add_argument("--api", default="http://127.0.0.1:7080", help="the server's API URL")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--connections", type=int, default=10, help="live connections to sample")
    p.add_argument("--once", action="store_true", help="print one frame as text and exit")


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str, dt: float) -> str:
    if before is None or dt <= 0:
        return "-"
    return f"{(now[key] - before[key]) / dt:,.0f}/s"


def render(
    stats: dict[str, Any],
    conns: list[dict[str, Any]],
    before: dict[str, Any] | None = None,
    dt: float = 0.0,
) -> Group:
    """One frame: totals and rates, services and workers, and a sample of connections."""
    totals = Table(title="manydoors", show_header=True)
    for col in ("connections", "accepted", "refused", "in", "out", "dropped", "uptime"):
        totals.add_column(col, justify="right")
    refused = sum(stats["refused"].values())
    totals.add_row(
        f"{stats['connections']:,}",
        f"{stats['accepted']:,} ({_rate(stats, before, 'accepted', dt)})",
        f"{refused:,}",
        f"{stats['messages_in']:,} ({_rate(stats, before, 'messages_in', dt)})",
        f"{stats['messages_out']:,} ({_rate(stats, before, 'messages_out', dt)})",
        f"{stats['dropped']:,}",
        f"{stats['uptime_s']:,.0f} s",
    )
    workers = Table(title="services and workers")
    for col in ("service", "worker", "pid", "connections", "fds / limit", "RSS MiB", "restarts"):
        workers.add_column(col, justify="left" if col == "service" else "right")
    for svc in stats["services"]:
        name = f"{svc['name']} {svc['protocol']} {svc['host']}:{svc['port']}"
        for w in svc["workers"]:
            workers.add_row(
                name,
                str(w["slot"]),
                str(w["pid"]),
                f"{w['connections']:,}",
                f"{w['fds'] or 0:,} / {w['fd_limit']:,}",
                f"{(w['rss_bytes'] or 0) / 2**20:.1f}",
                str(w["restarts"]),
            )
            name = ""
    sample = Table(title=f"a sample of live connections ({len(conns)})")
    for col in ("proto", "client", "server", "service/worker", "user", "channels"):
        sample.add_column(col)
    for c in conns:
        proto, src, sport, dst, dport = c["tuple"]
        sample.add_row(
            proto,
            f"{src}:{sport}",
            f"{dst}:{dport}",
            f"{c['service']}/{c['worker']}",
            c["user"] or "-",
            ", ".join(c["channels"]) or "-",
        )
    return Group(totals, workers, sample)


def fetch(api: str, limit: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    stats = get_json(f"{api}/api/stats", timeout=10)
    conns = get_json(f"{api}/api/connections?limit={limit}", timeout=10)["connections"]
    return stats, conns


def run(args: argparse.Namespace) -> int:
    api = args.api.rstrip("/")
    try:
        stats, conns = fetch(api, args.connections)
    except OSError as exc:
        print(f"top: cannot reach {api}: {exc}", file=sys.stderr)
        return 1
    console = Console()
    if args.once:
        console.print(render(stats, conns))
        return 0
    before, t_before = stats, time.monotonic()
    with Live(render(stats, conns), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(args.interval)
                try:
                    stats, conns = fetch(api, args.connections)
                except OSError as exc:
                    live.console.print(f"[red]{api}: {exc}")
                    continue
                now = time.monotonic()
                live.update(render(stats, conns, before, now - t_before))
                before, t_before = stats, now
        except KeyboardInterrupt:
            return 0

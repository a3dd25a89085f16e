"""``./run demo``: the server on its embedded default, a few thousand clients, messages, stats.

Starts ``manydoors serve`` (chat on 127.0.0.1:7000, API on 127.0.0.1:7080), opens
connections with the load generator, publishes through the API, prints the stats, and
shows how to talk to the server by hand. On a terminal it keeps the server up until
Ctrl-C so you can try ``nc``; otherwise it stops it.

The API is protected by a key made up for the run (``MANYDOORS_API_KEY``, which the
server, the load generator and the demo's own requests all read), as in production.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .apiclient import get_json as _get
from .apiclient import post_json as _post
from .launch import NotStarted, serving


def stats_table(stats: dict[str, Any]) -> Table:
    table = Table(title="manydoors /api/stats")
    for col in ("service", "worker", "pid", "connections", "fds / limit", "RSS MiB"):
        table.add_column(col, justify="right" if col != "service" else "left")
    for svc in stats["services"]:
        for w in svc["workers"]:
            table.add_row(
                f"{svc['name']} {svc['host']}:{svc['port']}",
                str(w["slot"]),
                str(w["pid"]),
                f"{w['connections']:,}",
                f"{w['fds']:,} / {w['fd_limit']:,}",
                f"{(w['rss_bytes'] or 0) / 2**20:.1f}",
            )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="manydoors demo")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the server running afterwards (default: on a terminal)",
    )
    args = parser.parse_args(argv)
    keep = sys.stdin.isatty() if args.keep is None else args.keep
    console = Console()
    try:
        # Children (server, load generator) inherit the key; apiclient sends it.
        os.environ.setdefault("MANYDOORS_API_KEY", secrets.token_urlsafe(24))
        with serving(ready_timeout=60, stop_timeout=15) as (server, info):
            return _show(console, args.connections, keep, server, info)
    except NotStarted:
        console.print("[red]the server did not start (is port 7000 or 7080 taken?)")
        return 1


def _show(console: Console, connections: int, keep: bool, server: Any, info: dict[str, Any]) -> int:
    api = info["api"]
    port = info["services"]["chat"]["port"]
    console.rule(f"{connections:,} clients say hello and subscribe to 'demo'")
    load = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "manydoors",
            "load",
            "--target",
            f"127.0.0.1:{port}",
            "--connections",
            str(connections),
            "--rate",
            "5000",
            "--subscribe",
            "demo",
            "--api",
            api,
            "--broadcasts",
            "3",
            "--hold",
            "3",
        ],
    )
    while _get(f"{api}/api/stats")["connections"] < connections:
        if load.poll() is not None:
            break
        time.sleep(0.1)
    answer = _post(f"{api}/api/publish", {"channel": "demo", "data": {"hello": "world"}})
    console.print(f'POST {api}/api/publish {{"channel":"demo",...}} -> {answer}')
    stats = _get(f"{api}/api/stats")
    console.print(stats_table(stats))
    console.print(
        f"connections {stats['connections']:,}  accepted {stats['accepted']:,}  "
        f"messages in {stats['messages_in']:,}  out {stats['messages_out']:,}  "
        f"dropped {stats['dropped']:,}"
    )
    load.wait()
    console.rule("talk to it yourself")
    auth = f"Authorization: Bearer {os.environ['MANYDOORS_API_KEY']}"
    console.print(
        f"  nc 127.0.0.1 {port}\n"
        '  {"op":"hello","user":"alice","id":1}\n'
        '  {"op":"sub","channel":"demo","id":2}\n'
        f'  curl -H "{auth}" -d \'{{"channel":"demo","data":"hi"}}\' {api}/api/publish\n'
        f"  curl {api}/api/stats   curl {api}/metrics",
        soft_wrap=True,
    )
    if keep:
        console.print("[bold]server running; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            server.wait()
    return load.returncode or 0


if __name__ == "__main__":
    sys.exit(main())

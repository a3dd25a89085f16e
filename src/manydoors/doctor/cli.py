"""``manydoors doctor``: flags to a scenario, the checks, a table or JSON.

``doctor plan`` is the 5-tuple arithmetic alone; ``doctor measure`` measures what a
connection costs here and stores it for the capacity estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ServiceConfig
from ..node.addresses import PlanError, parse_ip_range, parse_port_range, parse_target
from ..node.procfs import read_ints, sysctl_path
from .advice import FAIL, OK, WARN, Check, NotRoot, apply, checks, plan_apply, report
from .capacity import (
    BACKLOG,
    ROLES,
    Capacity,
    Costs,
    Scenario,
    capacity,
    default_store,
    gib,
    load_costs,
    port_lanes,
    save_costs,
)
from .limits import GetRlimit, read_limits
from .measure import MAX_PAIRS, measure

_STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="which limit stops this machine, and how to raise it")
    p.add_argument("--target", type=int, default=1_000_000, help="connections to hold")
    p.add_argument("--role", choices=ROLES, default="server", help="both: load and server here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--apply", action="store_true", help="raise (never lower) the sysctls (root)")
    p.add_argument("--dry-run", action="store_true", help="with --apply: print, write nothing")
    p.add_argument("--root", default="/", help="read /proc and /sys below this path")
    p.add_argument("--pid", type=int, help="a running manydoors server (default: found in /proc)")
    p.add_argument("--backlog", type=int, default=BACKLOG, help="the services' listen backlog")
    p.add_argument("--server", default="127.0.0.1:7000", help="HOST:PORT[-PORT] clients reach")
    p.add_argument("--source-ips", help="client source addresses (default: loopback, as needed)")
    p.add_argument("--store", help=f"measured costs (default {default_store()})")
    p.add_argument(
        "--ping-interval",
        type=float,
        default=ServiceConfig().ping_interval,
        help="the services' heartbeat in seconds (0: off): its CPU at the target",
    )
    dsub = p.add_subparsers(dest="doctor_command")
    plan = dsub.add_parser("plan", help="the 5-tuple arithmetic: how many connections fit")
    plan.add_argument("--clients", required=True, help="source IPs, e.g. 127.0.1.1-127.0.1.40")
    plan.add_argument("--server", required=True, help="HOST:PORT or HOST:PORT-PORT")
    plan.add_argument("--connections", type=int, help="say whether this many fit")
    plan.add_argument("--source-ports", metavar="LO-HI", help="instead of ip_local_port_range")
    plan.add_argument("--root", default="/", help="read the port range below this path")
    meas = dsub.add_parser("measure", help="measure kernel and user bytes per connection")
    meas.add_argument("--pairs", type=int, default=2000, help=f"loopback pairs (<= {MAX_PAIRS})")
    meas.add_argument("--store", help=f"where to keep the figures (default {default_store()})")


def main(
    argv: Sequence[str], *, euid: int | None = None, getrlimit: GetRlimit = resource.getrlimit
) -> int:
    """``manydoors doctor ARGV`` with the euid and rlimit reader injectable (tests)."""
    parser = argparse.ArgumentParser(prog="manydoors")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["doctor", *argv]), euid=euid, getrlimit=getrlimit)


def run(
    args: argparse.Namespace,
    *,
    euid: int | None = None,
    getrlimit: GetRlimit = resource.getrlimit,
) -> int:
    try:
        if args.doctor_command == "plan":
            return run_plan(args)
        if args.doctor_command == "measure":
            return run_measure(args)
        return run_checks(args, os.geteuid() if euid is None else euid, getrlimit)
    except (PlanError, ValueError) as exc:
        print(f"doctor: {exc}", file=sys.stderr)
        return 2


def run_checks(args: argparse.Namespace, euid: int, getrlimit: GetRlimit) -> int:
    if args.target < 1 or args.backlog < 1:
        raise ValueError("--target and --backlog must be at least 1")
    if args.dry_run and not args.apply:
        raise ValueError("--dry-run goes with --apply")
    limits = read_limits(args.root, getrlimit=getrlimit, server_pid=args.pid)
    if args.pid is not None and limits.server is None:
        where = Path(args.root) / "proc" / str(args.pid) / "limits"
        raise ValueError(f"no limits for pid {args.pid}: cannot read {where}")
    scen = Scenario(
        target=args.target,
        role=args.role,
        backlog=args.backlog,
        servers=parse_target(args.server),
        source_ips=len(parse_ip_range(args.source_ips)) if args.source_ips else None,
        ping_interval=args.ping_interval,
    )
    costs = load_costs(Path(args.store) if args.store else None)
    cap = capacity(limits, scen, costs)
    found = checks(limits, scen, cap, costs)
    if args.json:
        print(json.dumps(report(cap, found), indent=1))
    else:
        _print_table(cap, found, costs)
    if args.apply:
        out = sys.stderr if args.json else sys.stdout
        try:
            lines = apply(args.root, plan_apply(args.root, found), euid=euid, dry_run=args.dry_run)
        except NotRoot as exc:
            print(f"doctor: {exc}", file=sys.stderr)
            return 2
        for line in lines:
            print(line, file=out)
        return 0
    short = cap.binding.connections < args.target
    return 1 if short or any(c.status == FAIL for c in found) else 0


def _cell(check: Check, value: int | str | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, int):
        return gib(value) if check.unit == "bytes" else f"{value:,}"
    return value


def _print_table(cap: Capacity, found: list[Check], costs: Costs) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # a pipe or a file: do not squeeze to 80 columns
    scen = cap.scenario
    table = Table(title=f"manydoors doctor: {scen.target:,} connections, role {scen.role}")
    for column in ("limit", "current", "needed", "status", "why", "fix"):
        table.add_column(column, overflow="fold")
    for c in found:
        # Text, not markup: fixes contain "[Service]".
        table.add_row(
            Text(c.name),
            Text(_cell(c, c.current)),
            Text(_cell(c, c.needed)),
            Text(c.status, style=_STYLE[c.status]),
            Text(c.why),
            Text(c.fix),
        )
    console.print(table)
    b = cap.binding
    lines = [
        f"server side can hold {cap.server:,} connections now "
        f"({cap.processes['server']:,} processes); client side can open {cap.client:,} "
        f"({cap.processes['client']:,} processes)",
        f"binds first: {b.name} ({b.side}) at {b.connections:,} = {b.why}",
        f"cost per connection: {costs.source}",
    ]
    if "default" in costs.source:
        lines[-1] += "; `manydoors doctor measure` measures this machine"
    if b.connections < scen.target:
        lines.append(f"short of the target by {scen.target - b.connections:,}")
    for line in lines:
        console.print(Text(line))


def run_plan(args: argparse.Namespace) -> int:
    ips = parse_ip_range(args.clients)
    targets = parse_target(args.server)
    if args.source_ports:
        ports = parse_port_range(args.source_ports)
    else:
        found = read_ints(args.root, sysctl_path("net.ipv4.ip_local_port_range"))
        if not found or len(found) != 2:
            raise ValueError(f"cannot read the port range under {args.root}")
        ports = (found[0], found[1])
    lane, total, why = port_lanes(ports, len(ips), len(targets), bool(args.source_ports))
    print(f"{why} = {total:,} connections")
    if args.connections is not None:
        if total >= args.connections:
            print(f"enough for {args.connections:,}")
        else:
            need = -(-args.connections // max(1, lane * len(targets)))
            print(
                f"short of {args.connections:,} by {args.connections - total:,}: use at least "
                f"{need:,} source IPs, or more server ports, or a wider port range"
            )
            return 1
    return 0


def run_measure(args: argparse.Namespace) -> int:
    store = Path(args.store) if args.store else default_store()
    result = measure(args.pairs)
    for note in result.notes:
        print(f"measure: {note}")
    if result.kernel_per_pair is None and result.user_floor is None:
        print("measure: nothing measured; the defaults stay in use", file=sys.stderr)
        return 1
    costs = result.costs(load_costs(store))  # a figure not measured now keeps its value
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save_costs(costs, store, measured_at=stamp, pairs=result.pairs, tcp_object=result.tcp_object)
    print(
        f"kernel {costs.kernel_per_socket:,} B per socket ({costs.kernel_per_pair:,} B per "
        f"loopback pair), server user space {costs.server_user:,} B per connection "
        f"(uvloop floor {result.user_floor or '?'} B + manydoors), load generator "
        f"{costs.load_user:,} B (default); stored in {store}"
    )
    return 0

"""``manydoors load``: flags to a plan and options, then the controller."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
from typing import Any

from ..doctor.capacity import startup_warning
from .controller import Controller, LoadOptions, read_port_range
from .errors import explain
from .planner import PlanError, make_plan, parse_ip_range, parse_port_range, parse_target
from .pusherclient import PusherApp, needs_auth
from .reconnect import BASE_S, CAP_S, Backoff


def add_parser(sub: Any) -> None:
    p = sub.add_parser("load", help="open, hold and exercise many connections")
    p.add_argument("--target", default="127.0.0.1:7000", help="HOST:PORT or HOST:PORT-PORT")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10_000, help="new connections per second")
    p.add_argument("--hold", type=float, default=0, help="seconds to hold after the ramp")
    p.add_argument("--source-ips", help="e.g. 127.0.1.1-127.0.1.64 (default: as needed)")
    p.add_argument("--processes", default="auto", help="'auto' or a number")
    p.add_argument("--fd-limit", type=int, help="per-process fd limit (default: hard limit)")
    p.add_argument("--subscribe", metavar="CHANNEL", help="each connection subscribes")
    p.add_argument(
        "--raw",
        action="store_true",
        help="only connect and hold (no hello; without --tls it never reads, so the "
        "server's heartbeat closes it unless the server has --ping-interval 0)",
    )
    p.add_argument("--ws", action="store_true", help="speak WebSocket to a websocket service")
    p.add_argument(
        "--pusher",
        action="store_true",
        help="speak Pusher protocol 7 (WebSocket) to a pusher service: connect to "
        "/app/KEY, subscribe (--subscribe), answer pings; --broadcasts trigger events "
        "through the Pusher REST API at --api (needs --app-id and --app-secret)",
    )
    p.add_argument("--app-key", help="the Pusher app's key (--pusher)")
    p.add_argument("--app-id", help="the Pusher app's id (--pusher --broadcasts)")
    p.add_argument(
        "--app-secret",
        help="the Pusher app's secret: signs REST calls and private- channel auth "
        "(default: $MANYDOORS_APP_<ID>_SECRET)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS (with --ws: wss). The server's certificate is NOT verified: "
        "this measures your own server, typically on loopback with a self-signed certificate",
    )
    p.add_argument("--api", help="server API URL, for --broadcasts")
    p.add_argument(
        "--broadcasts",
        type=int,
        default=0,
        help="messages to publish and time; a publish that fails is reported and the run "
        "goes on (exit code 1)",
    )
    p.add_argument(
        "--delivery-timeout",
        type=float,
        default=30,
        help="seconds a broadcast's publish, and then its deliveries, may take",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10,
        help="seconds a connect, and then the server's answer to the hello, may take",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        choices=range(20),
        metavar="0-19",
        help="the load processes' nice value, as a node's workers (worker_nice): on one "
        "machine they then compete with the workers as equals, and neither starves the "
        "node's router",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60,
        help="end the ramp when its counts have not moved for this many seconds, hold "
        "what is open and report where it stalled",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="as real clients: on a close, reset, bye or no answer, dial again after a "
        "jittered exponential backoff, say hello and resubscribe with since (the last seq "
        "seen); the report counts drops, returns, and each seq's gaps and repeats",
    )
    p.add_argument(
        "--backoff",
        metavar="BASE,CAP",
        default=f"{BASE_S:g},{CAP_S:g}",
        help="--reconnect: seconds; attempt n waits U(0, min(CAP, BASE*2^n)) (full jitter)",
    )
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of the run here")
    p.add_argument(
        "--source-ports",
        metavar="LO-HI",
        help="ephemeral ports of the load's own sockets (default: ip_local_port_range)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start even when the plan cannot reach the count (to see the kernel refuse)",
    )


def pusher_app(args: argparse.Namespace) -> PusherApp | str | None:
    """The Pusher app of --pusher (None without it), or what is wrong with the flags."""
    if not args.pusher:
        given = [f for f in ("app_key", "app_id", "app_secret") if getattr(args, f)]
        if given:
            return f"--{given[0].replace('_', '-')} goes with --pusher"
        return None
    if not args.app_key:
        return "--pusher needs --app-key"
    if args.raw:
        return "--pusher and --raw do not go together (a Pusher client answers pings)"
    secret = args.app_secret
    if secret is None and args.app_id:
        secret = os.environ.get(f"MANYDOORS_APP_{args.app_id.upper()}_SECRET")
    channel = args.subscribe
    if args.broadcasts and not (args.app_id and secret and channel):
        return "--pusher --broadcasts needs --app-id, --app-secret and --subscribe"
    if channel and needs_auth(channel):
        if channel.startswith("presence-"):
            return "--pusher: presence channels are not supported (public and private- are)"
        if not secret:
            return f"--pusher: {channel} is private: its auth needs --app-secret"
    return PusherApp(args.app_key, args.app_id, secret)


def reconnect_backoff(args: argparse.Namespace, pusher: PusherApp | None) -> Backoff | str | None:
    """The backoff of --reconnect (None without it), or what is wrong with the flags."""
    if not args.reconnect:
        return None
    if args.raw:
        return "--reconnect and --raw do not go together (--raw does not read: it sees no drop)"
    if pusher is not None:
        return "--reconnect does not speak --pusher yet"
    try:
        base, cap = (float(x) for x in args.backoff.split(","))
        return Backoff(base, cap)
    except ValueError as exc:
        return f"--backoff BASE,CAP: {exc}"


def run(args: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_limit = min(args.fd_limit or hard, hard)
    warning = startup_warning("client", args.connections, fd_limit=fd_limit)
    if warning:
        print(f"load: warning: {warning}", file=sys.stderr)
    if args.broadcasts and not args.api:
        print("load: --broadcasts needs --api", file=sys.stderr)
        return 2
    if args.broadcasts > 60:
        print("load: at most 60 --broadcasts per run", file=sys.stderr)
        return 2
    pusher = pusher_app(args)
    if isinstance(pusher, str):
        print(f"load: {pusher}", file=sys.stderr)
        return 2
    backoff = reconnect_backoff(args, pusher)
    if isinstance(backoff, str):
        print(f"load: {backoff}", file=sys.stderr)
        return 2
    if args.connect_timeout <= 0 or args.stall_timeout <= 0:
        print("load: --connect-timeout and --stall-timeout must be positive", file=sys.stderr)
        return 2
    try:
        processes = None if args.processes == "auto" else int(args.processes)
        source_ports = parse_port_range(args.source_ports) if args.source_ports else None
        plan = make_plan(
            args.connections,
            parse_target(args.target),
            source_ports or read_port_range(),
            fd_limit,
            parse_ip_range(args.source_ips) if args.source_ips else None,
            processes,
            explicit_ports=source_ports is not None,
            force=args.force,
        )
    except (PlanError, ValueError) as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    opts = LoadOptions(
        rate=args.rate,
        hold=args.hold,
        hello=not args.raw and pusher is None,
        subscribe=args.subscribe,
        api=args.api,
        broadcasts=args.broadcasts,
        delivery_timeout=args.delivery_timeout,
        connect_timeout=args.connect_timeout,
        fd_limit=fd_limit,
        source_ports=source_ports,
        ws=args.ws or pusher is not None,
        tls=args.tls,
        stall_timeout=args.stall_timeout,
        pusher=pusher,
        reconnect=backoff,
        nice=args.nice,
    )
    controller = Controller(plan, opts, live=sys.stderr.isatty())
    report = controller.run()
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        from .report import write_plot  # matplotlib only when asked for

        write_plot(report, args.plot)
    c = report["connections"]
    print(
        f"load: peak {c['peak']:,} of {c['target']:,}, ready {c['ready']:,}, "
        f"rate {report['rate_achieved']}/s, connect p99 {report['connect_ms']['p99']} ms",
        file=sys.stderr,
    )
    stalled = report["stalled_at"]
    if stalled:
        print(
            f"load: the ramp stalled after {stalled['after_seconds']:.0f} s at open "
            f"{stalled['open']:,} ready {stalled['ready']:,}: nothing moved for "
            f"{stalled['still_seconds']:.0f} s (--stall-timeout)",
            file=sys.stderr,
        )
    for name, count in sorted(report["errors"].items(), key=lambda kv: -kv[1]):
        print(f"load: {count:>9,} {name}: {explain(name)}", file=sys.stderr)
    for d in report["deliveries"]:
        if d["error"]:
            print(f"load: message {d['n']}: publish failed: {d['error']}", file=sys.stderr)
            continue
        print(
            f"load: message {d['n']}: {d['received']:,}/{d['expected']:,} "
            f"p50 {d['p50_ms']} ms p99 {d['p99_ms']} ms, {d['per_second']:,}/s",
            file=sys.stderr,
        )
    redial = report.get("reconnect")
    if redial is not None:
        drops = ", ".join(f"{v:,} {k}" for k, v in redial["drops"].items()) or "none"
        print(
            f"load: reconnect: drops {drops}; {redial['attempts']:,} dials, "
            f"{redial['reconnected']:,} back, {redial['pending']:,} still down; "
            f"{redial['recovered_messages']:,} messages from history, gaps "
            f"{redial['gaps']:,}, repeats {redial['repeats']:,}, not recovered "
            f"{redial['not_recovered']:,}, unsequenced {redial['unsequenced']:,}",
            file=sys.stderr,
        )
    if controller.interrupted:
        name = signal.Signals(controller.interrupted).name
        where = f": report in {args.report}" if args.report else ""
        print(f"load: interrupted by {name}{where}", file=sys.stderr)
        return 128 + controller.interrupted  # as a shell reports a death by that signal
    # A failed publish fails the run even when nobody was ready to miss it.
    complete = (
        c["peak"] == c["target"]
        and not report["publish_failed"]
        and all(d["received"] == d["expected"] for d in report["deliveries"])
    )
    if redial is not None:  # drops are expected; every one back, every seq once, are not
        complete = complete and c["final"] == c["target"] == c["ready"] and not redial["pending"]
        complete = complete and not (redial["gaps"] or redial["repeats"] or redial["not_recovered"])
    return 0 if complete and not report["errors"] and not report["stalled"] else 1

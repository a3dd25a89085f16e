"""``manydoors serve | load`` — the command line. ``main(argv) -> int`` is callable from tests."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import config as cfg
from . import options, top


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the connection server")
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    for opt in (*options.SERVICE_OPTIONS, *options.GLOBAL_OPTIONS):
        switch = {"nargs": "?", "const": "true"} if opt.switch else {}
        p.add_argument(
            opt.flag,
            dest=opt.key,
            metavar=opt.key.split(".")[-1].upper(),
            help=f"{opt.help} (env {opt.env})",
            **switch,
        )
    p.add_argument(
        "--ready-file", metavar="FILE", help="write JSON with the bound ports and pids once ready"
    )


def serve(args: argparse.Namespace) -> int:
    import uvloop

    from .server.errors import StartupError
    from .server.supervisor import Supervisor

    toml_text = None
    if args.config:
        try:
            with open(args.config) as f:
                toml_text = f.read()
        except OSError as exc:
            print(f"manydoors: cannot read config {args.config}: {exc.strerror}", file=sys.stderr)
            return 2
    flags = {
        o.key: getattr(args, o.key) for o in (*options.SERVICE_OPTIONS, *options.GLOBAL_OPTIONS)
    }
    try:
        config = options.load(toml_text, os.environ, flags)
    except cfg.ConfigError as exc:
        print(f"manydoors: config error: {exc}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(Supervisor(config).run(args.ready_file))
    except StartupError as exc:
        print(f"manydoors: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="manydoors", description="Hold a million TCP connections and push messages down them."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from .doctor import cli as doctor_cli
    from .loadgen import cli as load_cli

    load_cli.add_parser(sub)
    doctor_cli.add_parser(sub)
    top.add_parser(sub)
    args = parser.parse_args(argv)
    commands = {"serve": serve, "load": load_cli.run, "doctor": doctor_cli.run, "top": top.run}
    return int(commands[args.command](args))


def entry() -> None:
    sys.exit(main())

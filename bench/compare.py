"""One commit measured against another in one invocation (issue 15's gate).

    ./run bench compare [--old c67414b] [--new HEAD] [--rounds 2] [--connections 100000]
                        [--peers manydoors-tcp,manydoors-ws] [--name compare]
                        [--rate N] [--broadcasts N] [--messages N]

Checks out both commits with ``git worktree add --detach`` in a temporary directory
and, in each round, runs each checkout's own ``bench/peers.py`` (its server, load
generator and bench script: ``PYTHONPATH=<checkout>/src``, cwd the checkout) back to
back: old then new in odd rounds, new then old in even ones, so that neither always
goes first. ``--rate``, ``--broadcasts`` and ``--messages`` are passed on to
``peers.py`` when given (else its defaults). The worktrees are removed at the end,
also on failure or Ctrl-C.

Per peer and side, each run's figures: broadcast time to all and deliveries/s (each
the mean of that run's broadcasts), 1:1 messages/s, user-space memory per connection,
accept rate, server CPU seconds per million deliveries; their means over the rounds;
and the ratio of the means, with the min and max of the per-round ratios. Every ratio
reads "> 1: new is better": old/new for the figures where lower is better (time,
memory, CPU), new/old for the rates. The gate (issue 15: new/old at least 0.95 on the
broadcast and the 1:1 rate) is checked on the ratios of the means.

Prints progress to stderr and the Markdown table to stdout; writes
bench/results/NAME.json (with every run's rows from ``peers.py``). A run that fails
(exit status, no results file, a row with an error, not every connection held or
message delivered, or figures from another commit) ends it with exit status 1 and the
reason; what was measured until then is saved, with the error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from _common import machine, save

HERE = os.path.dirname(os.path.abspath(__file__))
GATE = 0.95  # issue 15: new/old at least this on the broadcast and the 1:1 rate
DEFAULT_OLD = "c67414b"  # the commit before the restructuring


class RunFailed(RuntimeError):
    """A run of peers.py failed or left no usable results."""


# --- the figures compared -------------------------------------------------------------------


def _mean_of(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    lower_is_better: bool
    get: Callable[[dict[str, Any]], float | None]
    fmt: Callable[[float], str]
    gate: bool = False


FIGURES = [
    Figure(
        "broadcast_time_to_all_ms",
        "broadcast: time to all, ms (mean of the broadcasts)",
        True,
        lambda r: _mean_of([b.get("time_to_all_ms") for b in r.get("broadcast", [])]),
        lambda v: f"{v:,.1f}",
        gate=True,
    ),
    Figure(
        "broadcast_per_second",
        "broadcast: deliveries/s (mean of the broadcasts)",
        False,
        lambda r: _mean_of([b.get("per_second") for b in r.get("broadcast", [])]),
        lambda v: f"{v:,.0f}",
        gate=True,
    ),
    Figure(
        "one_to_one_per_second",
        "1:1 messages/s",
        False,
        lambda r: r.get("one_to_one", {}).get("per_second"),
        lambda v: f"{v:,.0f}",
        gate=True,
    ),
    Figure(
        "memory_per_connection_bytes",
        "memory per connection, B",
        True,
        lambda r: r.get("memory", {}).get("per_connection_bytes"),
        lambda v: f"{v:,.0f}",
    ),
    Figure(
        "accept_per_second",
        "accept rate, connections/s",
        False,
        lambda r: r.get("accept", {}).get("rate_per_s"),
        lambda v: f"{v:,.0f}",
    ),
    Figure(
        "cpu_s_per_million_deliveries",
        "server CPU s per 1M deliveries",
        True,
        lambda r: r.get("cpu", {}).get("per_million_deliveries_s"),
        lambda v: f"{v:.2f}",
    ),
]


def ratio(fig: Figure, old: float | None, new: float | None) -> float | None:
    """> 1: new is better (old/new where lower is better, new/old for rates)."""
    if old is None or new is None:
        return None
    num, den = (old, new) if fig.lower_is_better else (new, old)
    return num / den if den else None


# --- git ------------------------------------------------------------------------------------


def git(root: str, *args: str) -> str:
    done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def resolve(root: str, rev: str) -> dict[str, str]:
    try:
        sha = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RunFailed:
        raise RunFailed(f"{rev!r} names no commit in {root}") from None
    return {
        "rev": rev,
        "commit": sha,
        "short": git(root, "rev-parse", "--short", sha),
        "subject": git(root, "log", "-1", "--format=%s", sha),
    }


# --- one run of a checkout's peers.py -------------------------------------------------------

_child: subprocess.Popen[bytes] | None = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C: peers.py stops its servers and load on SIGINT, so that is what it gets.
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGINT)
    raise KeyboardInterrupt


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """After an interrupt: let peers.py stop its servers (it had SIGINT), else end it."""
    for sig, wait in ((None, 120.0), (signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        if sig is not None:
            print(f"compare: peers.py (pid {proc.pid}) still running: {sig.name}", file=sys.stderr)
            proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            continue  # a second Ctrl-C: go on to the next signal


def check_code(checkout: str, env: dict[str, str]) -> None:
    """The checkout's src/ is what a process with ``env`` imports (not /work's install)."""
    cmd = [sys.executable, "-c", "import manydoors; print(manydoors.__file__)"]
    done = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True)
    path = os.path.realpath(done.stdout.strip())
    if done.returncode != 0 or not path.startswith(os.path.realpath(checkout) + os.sep):
        raise RunFailed(
            f"PYTHONPATH={env['PYTHONPATH']} imports manydoors from {path or done.stderr!r}, "
            f"not from {checkout}"
        )


def run_side(
    side: dict[str, Any], checkout: str, name: str, args: argparse.Namespace
) -> dict[str, Any]:
    """``peers.py`` of ``checkout``; its results JSON, checked."""
    global _child
    env = {**os.environ, "PYTHONPATH": os.path.join(checkout, "src")}
    script = os.path.join(checkout, "bench", "peers.py")
    results = os.path.join(checkout, "bench", "results", f"{name}.json")
    cmd = [sys.executable, script, "--peers", args.peers, "--connections", str(args.connections)]
    for flag in ("rate", "broadcasts", "messages"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag}", str(value)]
    cmd += ["--name", name]
    if os.path.exists(results):
        os.remove(results)
    # peers.py prints its table on stdout: to our stderr, beside its progress.
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=sys.stderr)
    _child = proc
    try:
        code = proc.wait()
    except BaseException:
        _reap(proc)
        raise
    finally:
        _child = None
    if code != 0:
        raise RunFailed(f"{name}: peers.py exited {code}")
    if not os.path.exists(results):
        raise RunFailed(f"{name}: peers.py wrote no {results}")
    with open(results) as f:
        out: dict[str, Any] = json.load(f)
    src = out.get("source") or {}
    if src.get("commit") != side["commit"] or src.get("src_dirty"):
        raise RunFailed(f"{name}: measured {src}, not commit {side['commit']} clean")
    rows = {r.get("peer"): r for r in out.get("rows", [])}
    for key in args.peer_keys:
        problem = row_problem(rows.get(key))
        if problem:
            raise RunFailed(f"{name}: {key}: {problem}")
    return out


def row_problem(row: dict[str, Any] | None) -> str | None:
    """Why a row's figures cannot be compared, or None."""
    if row is None:
        return "no row in the results"
    if "error" in row:
        return f"error: {row['error']}"
    conns = row.get("connections", {})
    if not conns.get("held") or conns["held"] < conns.get("requested", conns.get("asked", 0)):
        return f"not every connection held: {conns}"
    short = [b for b in row.get("broadcast", []) if b["received"] < b["expected"]]
    if not row.get("broadcast") or short:
        return f"broadcasts missing or incomplete: {row.get('broadcast')}"
    one = row.get("one_to_one", {})
    if "error" in one or not one.get("per_second") or one["received"] < one["messages"]:
        return f"1:1 failed or incomplete: {one}"
    return None


# --- aggregate and table --------------------------------------------------------------------


def aggregate(runs: list[dict[str, Any]], keys: list[str], rounds: int) -> dict[str, Any]:
    """Per peer and figure: each side's per-round values and mean, and the ratios."""
    by: dict[tuple[str, int, str], dict[str, Any]] = {}
    for run in runs:
        for row in run["rows"]:
            by[(run["side"], run["round"], row.get("peer"))] = row
    peers: dict[str, Any] = {}
    for key in keys:
        figs: dict[str, Any] = {}
        for fig in FIGURES:
            entry: dict[str, Any] = {"label": fig.label, "lower_is_better": fig.lower_is_better}
            for side in ("old", "new"):
                vals = []
                for r in range(1, rounds + 1):
                    row = by.get((side, r, key))
                    vals.append(None if row is None else fig.get(row))
                entry[side] = {"rounds": vals, "mean": _mean_of(vals)}
            entry["ratio"] = ratio(fig, entry["old"]["mean"], entry["new"]["mean"])
            per_round = [
                ratio(fig, o, n)
                for o, n in zip(entry["old"]["rounds"], entry["new"]["rounds"], strict=True)
            ]
            entry["round_ratios"] = per_round
            known = [x for x in per_round if x is not None]
            entry["ratio_min"] = min(known) if known else None
            entry["ratio_max"] = max(known) if known else None
            figs[fig.key] = entry
        gated = {f.key: figs[f.key]["ratio"] for f in FIGURES if f.gate}
        peers[key] = {
            "figures": figs,
            "gate": {
                "ratios": gated,
                "pass": all(v is not None and v >= GATE for v in gated.values()),
            },
        }
    return peers


def markdown(result: dict[str, Any]) -> str:
    old, new = result["old"], result["new"]
    m = result["machine"]
    lines = [
        f"old {old['short']} ({old['rev']}: {old['subject']}) against "
        f"new {new['short']} ({new['rev']}: {new['subject']}); "
        f"{result['settings']['rounds']} round(s) at {result['settings']['connections']:,} "
        f"connections, order per round: "
        + ", ".join(" then ".join(o) for o in result["settings"]["order"]),
        f"machine: {m['cores']} cores, {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"fd limit {m['fd_limit'][0]:,}/{m['fd_limit'][1]:,}, Python {m['python']}, "
        f"{m['date']}",
        "",
        "ratio: > 1 means new is better (old/new for time, memory and CPU, where lower is "
        "better; new/old for the rates); of the means over the rounds, then the min-max of "
        "the per-round ratios",
        "",
        f"| peer | figure | old {old['short']}: per round | old mean "
        f"| new {new['short']}: per round | new mean | ratio (> 1: new better) "
        "| per-round ratio min-max |",
        "|" + " --- |" * 8,
    ]

    def num(fig: Figure, v: float | None) -> str:
        return "-" if v is None else fig.fmt(v)

    def rat(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for key, peer in result["peers"].items():
        for fig in FIGURES:
            e = peer["figures"][fig.key]
            cells = [
                key,
                fig.label + (", gate" if fig.gate else ""),
                " / ".join(num(fig, v) for v in e["old"]["rounds"]),
                num(fig, e["old"]["mean"]),
                " / ".join(num(fig, v) for v in e["new"]["rounds"]),
                num(fig, e["new"]["mean"]),
                rat(e["ratio"]),
                "-" if e["ratio_min"] is None else f"{rat(e['ratio_min'])}-{rat(e['ratio_max'])}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    gates = []
    for key, peer in result["peers"].items():
        g = peer["gate"]
        low = [k for k, v in g["ratios"].items() if v is None or v < GATE]
        gates.append(f"{key} " + ("pass" if g["pass"] else "FAIL (" + ", ".join(low) + ")"))
    verdict = "not decided: the runs are incomplete" if result.get("error") else "; ".join(gates)
    lines += [
        "",
        f"gate (issue 15: ratio of the means at least {GATE} on broadcast time to all, "
        "broadcast deliveries/s and 1:1 messages/s): " + verdict,
    ]
    notes = [
        f"{run['side']} round {run['round']}: {row.get('peer')}: {n}"
        for run in result["runs"]
        for row in run["rows"]
        for n in row.get("notes", [])
    ]
    if notes:
        lines += ["", "notes from peers.py:", *(f"- {n}" for n in notes)]
    if result.get("error"):
        lines += ["", f"INCOMPLETE: {result['error']}"]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description="one commit against another, bench/peers.py")
    p.add_argument("--old", default=DEFAULT_OLD, help=f"the old revision (default {DEFAULT_OLD})")
    p.add_argument("--new", default="HEAD", help="the new revision (default HEAD)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--peers", default="manydoors-tcp,manydoors-ws")
    p.add_argument("--rate", type=int, help="passed to peers.py (else its default)")
    p.add_argument("--broadcasts", type=int, help="passed to peers.py (else its default)")
    p.add_argument("--messages", type=int, help="1:1 messages, passed to peers.py")
    p.add_argument("--name", default="compare", help="results file bench/results/NAME.json")
    args = p.parse_args()
    args.peer_keys = [k.strip() for k in args.peers.split(",") if k.strip()]
    args.peers = ",".join(args.peer_keys)
    if args.rounds < 1 or not args.peer_keys:
        p.error("--rounds must be at least 1 and --peers name at least one peer")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        root = git(HERE, "rev-parse", "--show-toplevel")
        sides = {"old": resolve(root, args.old), "new": resolve(root, args.new)}
    except RunFailed as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    order = [["old", "new"] if r % 2 else ["new", "old"] for r in range(1, args.rounds + 1)]
    result: dict[str, Any] = {
        "machine": machine(),
        "old": sides["old"],
        "new": sides["new"],
        "settings": {
            "rounds": args.rounds,
            "connections": args.connections,
            "peers": args.peer_keys,
            "order": order,
            "passed_to_peers_py": {k: getattr(args, k) for k in ("rate", "broadcasts", "messages")},
        },
        "ratio": "> 1: new is better; old/new for time, memory and CPU (lower is better), "
        "new/old for the rates; of the means over the rounds, min/max of the per-round ones",
        "gate": GATE,
        "runs": [],
    }
    for label, s in sides.items():
        print(f"compare: {label} = {s['short']} ({s['rev']}): {s['subject']}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="manydoors-compare-")
    added: list[str] = []
    code = 0
    try:
        checkouts = {}
        for label, s in sides.items():
            path = os.path.join(tmp, label)
            git(root, "worktree", "add", "--detach", path, s["commit"])
            added.append(path)
            check_code(path, {**os.environ, "PYTHONPATH": os.path.join(path, "src")})
            checkouts[label] = path
        for r, labels in enumerate(order, start=1):
            for i, label in enumerate(labels, start=1):
                name = f"compare-{label}-{r}"
                print(
                    f"compare: === round {r}/{args.rounds}, {i}/2: {label} "
                    f"({sides[label]['short']}) -> {name} ===",
                    file=sys.stderr,
                    flush=True,
                )
                t0 = time.monotonic()
                out = run_side(sides[label], checkouts[label], name, args)
                took = time.monotonic() - t0
                print(f"compare: {name} done in {took:.0f} s", file=sys.stderr, flush=True)
                result["runs"].append(
                    {
                        "side": label,
                        "round": r,
                        "position": i,
                        "name": name,
                        "seconds": round(took, 1),
                        "machine": out.get("machine"),
                        "settings": out.get("settings"),
                        "rows": out.get("rows", []),
                    }
                )
    except RunFailed as exc:
        result["error"] = str(exc)
        code = 1
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        code = 130
    finally:
        for path in added:
            done = subprocess.run(
                ["git", "-C", root, "worktree", "remove", "--force", path],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(f"compare: could not remove worktree {path}: {done.stderr}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "-C", root, "worktree", "prune"], capture_output=True)
    result["peers"] = aggregate(result["runs"], args.peer_keys, args.rounds)
    result["markdown"] = markdown(result)
    path = save(args.name, result)
    print(result["markdown"])
    print(f"compare: saved {os.path.relpath(path, os.path.dirname(HERE))}", file=sys.stderr)
    if code:
        print(f"compare: FAILED: {result['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

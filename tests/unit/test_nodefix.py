"""tests/support/nodefix.py: a test that needs Node or tests/node's packages says which
command adds them (skip; fail in CI), and every such test in tests/live asks first."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from support import nodefix

LIVE = Path(__file__).resolve().parents[1] / "live"


def node_dir(tmp_path: Path, installed: tuple[str, ...] = ()) -> Path:
    """A tests/node look-alike: package.json with ws and pusher-js, and ``installed``."""
    deps = {"ws": "^8.18.0", "pusher-js": "^8.6.0"}
    (tmp_path / "package.json").write_text(json.dumps({"dependencies": deps}))
    for name in installed:
        (tmp_path / "node_modules" / name).mkdir(parents=True)
        (tmp_path / "node_modules" / name / "package.json").write_text("{}")
    return tmp_path


def test_missing_node_modules_are_named_with_the_command_that_installs_them(
    tmp_path: Path,
) -> None:
    reason = nodefix.node_missing(node_dir(tmp_path), node=None)
    assert reason is not None
    assert "pusher-js, ws" in reason and "cd tests/node && npm ci" in reason
    half = nodefix.node_missing(node_dir(tmp_path, ("ws",)), node=None)
    assert half is not None and "lacks pusher-js:" in half


def test_a_missing_node_program_names_the_packages_to_install(tmp_path: Path) -> None:
    reason = nodefix.node_missing(node_dir(tmp_path), node="no-such-node-program")
    assert reason is not None and "apt-get install nodejs npm" in reason


def test_nothing_is_missing_once_every_package_is_installed(tmp_path: Path) -> None:
    assert nodefix.node_missing(node_dir(tmp_path, ("ws", "pusher-js")), node=None) is None


@pytest.mark.parametrize("ci", ["", "1", "true"])
def test_need_node_skips_and_fails_in_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setattr(nodefix, "NODE_DIR", node_dir(tmp_path))
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="npm ci"):
        nodefix.need_node(node=None)


def _needs_node(test: ast.FunctionDef) -> bool:
    """The test runs Node, reads tests/node, or has Chromium load pusher-js from there."""
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    argv0 = {  # ["node", script, ...]
        n.elts[0].value
        for n in ast.walk(test)
        if isinstance(n, ast.List) and n.elts and isinstance(n.elts[0], ast.Constant)
    }
    args = {a.arg for a in test.args.args}
    return (
        bool(names & {"NODE_DIR", "PUSHER_JS_WEB"})
        or "node" in argv0
        or {"browser", "pusher_backend"} <= args
    )


def _asks(test: ast.FunctionDef) -> bool:
    """It calls need_node, or takes the ``peers`` fixture (which does)."""
    calls = {
        n.func.id
        for n in ast.walk(test)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    return "need_node" in calls or "peers" in {a.arg for a in test.args.args}


def test_every_live_test_that_needs_node_asks_for_it_first() -> None:
    unasked = []
    for path in sorted(LIVE.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        tests = [
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
        unasked += [f"{path.name}::{t.name}" for t in tests if _needs_node(t) and not _asks(t)]
    assert unasked == [], "call support.nodefix.need_node() first"

"""Node.js for the interop tests: tests/node's packages (``ws``, pusher-js, Laravel Echo,
the npm ``pusher`` library), installed by ``./run test`` with ``npm ci`` when node and
npm are there and tests/node/node_modules is missing or older than its lock file.

A test that runs Node or loads a file from node_modules calls :func:`need_node` first:
without them it is skipped with the command that adds them, and fails in CI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parents[1] / "node"  # tests/node
INSTALL = "cd tests/node && npm ci"  # what ./run test runs when npm is installed
APT = "apt-get install nodejs npm"


def node_packages(node_dir: Path = NODE_DIR) -> list[str]:
    """The packages tests/node/package.json depends on."""
    return sorted(json.loads((node_dir / "package.json").read_text())["dependencies"])


def node_missing(node_dir: Path = NODE_DIR, node: str | None = "node") -> str | None:
    """Why the Node tests cannot run here, with the command that fixes it; None if they can.

    ``node``: the program to look for on PATH (None: only the packages are needed, as
    for pusher-js's web build that Chromium loads).
    """
    if node is not None and shutil.which(node) is None:
        return f"node is not installed: {APT}, then {INSTALL}"
    modules = node_dir / "node_modules"
    absent = [p for p in node_packages(node_dir) if not (modules / p / "package.json").is_file()]
    if absent:
        return (
            f"tests/node/node_modules lacks {', '.join(absent)}: {INSTALL}"
            " (./run test does it when npm is installed)"
        )
    return None


def need_node(node: str | None = "node") -> None:
    """Skip the calling test without Node or tests/node's packages; fail in CI instead."""
    reason = node_missing(NODE_DIR, node)
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must provide it", pytrace=False)
    pytest.skip(reason)

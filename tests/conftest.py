"""Shared by tests/unit and tests/live; the fixtures that start things are in live/conftest.py.

tests/unit starts no process and opens no socket but socketpairs; tests/live starts
real servers, load generators, redis-server, Chromium and Node, and its tests are
marked ``live`` (``pytest -m "not live"`` runs the unit tests alone).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.certfix import Certs


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A self-signed certificate and key in ``tmp_path`` (and a key that does not match)."""
    return Certs(tmp_path)

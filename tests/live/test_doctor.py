"""The doctor's measure on this machine: it opens real loopback connection pairs."""

from __future__ import annotations

import contextlib
import json
import os

from manydoors.cli import main as manydoors_main
from manydoors.doctor.capacity import load_costs


def test_measure_opens_pairs_stores_figures_and_closes_everything(tmp_path, capsys):
    def sockets() -> int:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(link.startswith("socket:") for link in links)

    before = sockets()
    store = tmp_path / "measured.json"
    code = manydoors_main(["doctor", "measure", "--pairs", "1000", "--store", str(store)])
    assert sockets() == before
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(store.read_text())
    assert data["pairs"] == 1000
    assert 200 <= data["server_user"] <= 100_000
    assert data["kernel_per_pair"] >= data["kernel_per_socket"] > 0
    assert f"stored in {store}" in out
    assert load_costs(store).source.startswith("measured")

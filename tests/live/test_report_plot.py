"""The report module in a fresh interpreter: matplotlib only comes with --plot."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_module_does_not_import_matplotlib() -> None:
    # A fresh interpreter: this test process has already imported matplotlib.
    code = "import sys, manydoors.loadgen.report; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"

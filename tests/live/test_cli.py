"""The CLI called in-process against a port that is really taken."""

from __future__ import annotations

import socket

from manydoors.cli import main


def test_port_in_use_is_a_clear_startup_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--api-port", "0"]) == 1
    assert f"cannot listen on 127.0.0.1:{port}: is in use" in capsys.readouterr().err

"""The CLI called in-process: ``main(argv) -> int``."""

from __future__ import annotations

from manydoors.cli import main


def test_config_error_exits_2_with_a_reason(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[service]]\nname = "x"\nprotocol = "udp"\n')
    assert main(["serve", "--config", str(bad)]) == 2
    assert "protocol 'udp'" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_load_refuses_a_plan_that_cannot_reach_the_count(capsys):
    code = main(
        ["load", "--connections", "100000", "--source-ips", "127.0.1.1", "--target", "127.0.0.1:1"]
    )
    assert code == 2
    assert "Use at least" in capsys.readouterr().err


def test_load_warns_at_start_when_a_machine_limit_binds_before_the_target(capsys):
    # Far beyond what this machine's memory allows: the doctor's one-line warning comes
    # first, then the plan refuses (one source IP) before any process starts.
    code = main(
        [
            "load",
            "--connections",
            "50000000",
            "--source-ips",
            "127.0.1.1",
            "--target",
            "127.0.0.1:1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "load: warning:" in err and "binds at" in err and "manydoors doctor" in err

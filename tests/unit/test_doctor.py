"""The doctor on fake /proc trees: what it reads, computes, advises and applies."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from manydoors.cli import main as manydoors_main
from manydoors.doctor import cli as doctor_cli
from manydoors.doctor.advice import Check, checks
from manydoors.doctor.capacity import (
    PROCESS_BASELINE_BYTES,
    Costs,
    Scenario,
    capacity,
    load_costs,
    save_costs,
    startup_warning,
)
from manydoors.doctor.limits import find_server, read_limits, systemd_unit

# A healthy machine like the reference box: 2 cores, ~23.5 GiB, default port range.
HEALTHY = {
    "proc/sys/fs/nr_open": "1048576\n",
    "proc/sys/fs/file-max": "9223372036854775807\n",
    "proc/sys/fs/file-nr": "10000\t0\t9223372036854775807\n",
    "proc/sys/net/ipv4/ip_local_port_range": "32768\t60999\n",
    "proc/sys/net/core/somaxconn": "4096\n",
    "proc/sys/net/ipv4/tcp_max_syn_backlog": "4096\n",
    "proc/sys/net/ipv4/tcp_syncookies": "1\n",
    "proc/sys/net/core/netdev_max_backlog": "8192\n",
    "proc/sys/net/ipv4/tcp_mem": "287901\t2000000\t2500000\n",
    "proc/sys/net/ipv4/tcp_rmem": "4096\t131072\t33554432\n",
    "proc/sys/net/ipv4/tcp_wmem": "4096\t16384\t4194304\n",
    "proc/sys/net/ipv4/tcp_tw_reuse": "2\n",
    "proc/sys/kernel/osrelease": "6.18.44-fc-v595\n",
    "proc/meminfo": (
        "MemTotal:       24684096 kB\nMemFree:        23000000 kB\n"
        "MemAvailable:   23000000 kB\nSlab:             400000 kB\n"
    ),
    "proc/net/softnet_stat": "0000aaaa 00000000 00000001\n0000bbbb 00000000 00000002\n",
    "proc/net/sockstat": "sockets: used 300\nTCP: inuse 20 orphan 0 tw 3 alloc 25 mem 4\n",
    "proc/self/cgroup": "0::/user.slice/user-1000.slice/session-2.scope\n",
    "sys/devices/system/cpu/online": "0-1\n",
}
RLIMIT_HIGH = (600_000, 600_000)  # one process per core holds 500,000 + reserve
RLIMIT_HERE = (20_000, 20_000)  # the reference machine


def make_root(tmp_path: Path, **changes: str | None) -> Path:
    """A fake root: HEALTHY with ``changes`` (key: a path with / as __, value None deletes)."""
    root = tmp_path / "root"
    files = dict(HEALTHY)
    for key, text in changes.items():
        rel = key.replace("__", "/")
        if text is None:
            files.pop(rel, None)
        else:
            files[rel] = text
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def sysctl(key: str) -> str:
    return "proc__sys__" + key.replace(".", "__")


def getrlimit(value: tuple[int, int]):
    return lambda _resource: value


def add_server(root: Path, pid: int, limit: int, unit: str | None = None) -> None:
    proc = root / "proc" / str(pid)
    proc.mkdir(parents=True)
    (proc / "cmdline").write_bytes(b"/venv/bin/python\0-m\0manydoors\0serve\0--port\x007000\0")
    (proc / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        "Max processes             94344                94344                processes \n"
        f"Max open files            {limit:<20} {limit:<20} files     \n"
    )
    cgroup = f"0::/system.slice/{unit}\n" if unit else "0::/\n"
    (proc / "cgroup").write_text(cgroup)


def run_checks(
    root: Path,
    target: int = 1_000_000,
    role: str = "server",
    rlimit: tuple[int, int] = RLIMIT_HIGH,
    **scenario: object,
) -> dict[str, Check]:
    limits = read_limits(root, getrlimit=getrlimit(rlimit))
    scen = Scenario(target=target, role=role, **scenario)
    return {c.name: c for c in checks(limits, scen, capacity(limits, scen), Costs())}


def status(root: Path, name: str, **kwargs: object) -> str:
    return run_checks(root, **kwargs)[name].status


def doctor(root: Path, *argv: str, rlimit=RLIMIT_HERE, euid=0) -> int:
    args = ["--root", str(root), "--store", str(root / "no-measurements.json"), *argv]
    return doctor_cli.main(args, euid=euid, getrlimit=getrlimit(rlimit))


# --- reading -------------------------------------------------------------------------


def test_reads_every_limit_from_a_fake_proc(tmp_path):
    limits = read_limits(make_root(tmp_path), getrlimit=getrlimit((1024, 20_000)))
    assert (limits.this.soft, limits.this.hard, limits.this.systemd_unit) == (1024, 20_000, None)
    assert limits.port_range == (32768, 60999)
    assert limits.file_in_use == 10_000
    assert limits.tcp_mem == (287901, 2_000_000, 2_500_000)
    assert limits.mem_available == 23_000_000 * 1024
    assert limits.cores == 2
    assert limits.kernel_version == (6, 18)
    assert limits.netdev_dropped == 0
    assert limits.tcp_in_use == 20
    assert limits.conntrack_max is None
    assert limits.server is None


def test_missing_files_read_as_none_instead_of_crashing(tmp_path):
    limits = read_limits(tmp_path, getrlimit=getrlimit(RLIMIT_HERE))
    assert limits.port_range is None and limits.somaxconn is None and limits.cores is None
    found = run_checks(tmp_path)
    assert found["net.core.somaxconn"].status == "warn"
    assert "could not read" in found["net.core.somaxconn"].why


def test_finds_the_running_server_but_not_its_forkserver_children(tmp_path):
    root = make_root(tmp_path)
    child = root / "proc/90"
    child.mkdir(parents=True)
    worker = b"from multiprocessing.forkserver import main; main(['manydoors.server.worker'])"
    (child / "cmdline").write_bytes(b"python\0-c\0" + worker + b"\0")
    add_server(root, 123, 4096, unit="chat.service")
    assert find_server(root) == 123
    server = read_limits(root, getrlimit=getrlimit(RLIMIT_HERE)).server
    assert server is not None
    assert (server.pid, server.hard, server.systemd_unit) == (123, 4096, "chat.service")


def test_a_shell_in_a_scope_below_a_service_is_not_a_service(tmp_path):
    scope = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-1.scope\n"
    user_unit = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/web.service\n"
    assert systemd_unit(make_root(tmp_path / "a", proc__self__cgroup=scope), "self") is None
    root = make_root(tmp_path / "b", proc__self__cgroup=user_unit)
    assert systemd_unit(root, "self") == "web.service"


def test_systemd_is_seen_from_invocation_id_when_the_cgroup_names_no_unit(tmp_path):
    root = make_root(tmp_path, proc__self__cgroup="0::/\n")
    (root / "proc/self/environ").write_bytes(b"PATH=/bin\0INVOCATION_ID=abc123\0")
    assert read_limits(root, getrlimit=getrlimit(RLIMIT_HERE)).this.systemd_unit == ""


def test_a_memory_cgroup_limit_lowers_available_memory(tmp_path):
    root = make_root(tmp_path, proc__self__cgroup="0::/box\n")
    (root / "sys/fs/cgroup/box").mkdir(parents=True)
    (root / "sys/fs/cgroup/box/memory.max").write_text(f"{4 << 30}\n")
    (root / "sys/fs/cgroup/box/memory.current").write_text(f"{1 << 30}\n")
    limits = read_limits(root, getrlimit=getrlimit(RLIMIT_HERE))
    assert limits.mem_available == 3 << 30
    assert limits.cgroup_memory_limit == 4 << 30


# --- checks: ok, warn and fail of each ------------------------------------------------


def test_fd_limit_ok_warn_and_fail(tmp_path):
    root = make_root(tmp_path)
    assert status(root, "RLIMIT_NOFILE", rlimit=RLIMIT_HIGH) == "ok"
    warn = run_checks(root, rlimit=RLIMIT_HERE)["RLIMIT_NOFILE"]
    assert warn.status == "warn"
    assert "51 processes on 2 cores" in warn.why  # 1,000,000 / (20,000 - 64)
    assert warn.needed == 500_064  # one process per core
    assert "ulimit -Hn 500064" in warn.fix
    assert status(root, "RLIMIT_NOFILE", rlimit=(4096, 4096)) == "fail"  # 250 > 64 processes


def test_a_systemd_unit_with_a_low_limit_nofile_fails_with_a_drop_in_fix(tmp_path):
    root = make_root(tmp_path)
    add_server(root, 4242, 4096, unit="manydoors.service")
    check = run_checks(root)["RLIMIT_NOFILE (server pid 4242)"]
    assert (check.status, check.current) == ("fail", 4096)
    assert "/etc/systemd/system/manydoors.service.d/90-manydoors.conf" in check.fix
    assert "[Service]\\nLimitNOFILE=500064" in check.fix
    assert check.fix.startswith("prlimit --pid 4242 --nofile=500064:500064")
    assert check.cannot is not None and "systemd unit manydoors.service" in check.cannot


def test_in_a_container_the_fd_fix_is_the_runtimes_ulimit(tmp_path):
    root = make_root(tmp_path, **{".dockerenv": ""})
    check = run_checks(root, rlimit=RLIMIT_HERE)["RLIMIT_NOFILE"]
    assert check.fix == "start the container with --ulimit nofile=500064:500064"
    assert check.cannot is not None and "docker container runtime" in check.cannot


def test_a_limit_nofile_above_nr_open_raises_nr_open_first(tmp_path):
    root = make_root(tmp_path, **{sysctl("fs.nr_open"): "1048576\n"})
    check = run_checks(root, target=4_000_000, rlimit=RLIMIT_HERE)["RLIMIT_NOFILE"]
    assert check.fix.startswith("sysctl -w fs.nr_open=2000064; then ulimit -Hn 2000064")


def test_nr_open_ok_warn_and_fail(tmp_path):
    assert status(make_root(tmp_path / "a"), "fs.nr_open") == "ok"
    assert status(make_root(tmp_path / "b", **{sysctl("fs.nr_open"): "400000"}), "fs.nr_open") == (
        "warn"
    )
    assert status(make_root(tmp_path / "c", **{sysctl("fs.nr_open"): "10000"}), "fs.nr_open") == (
        "fail"
    )


def test_file_max_ok_warn_and_fail(tmp_path):
    assert status(make_root(tmp_path / "a"), "fs.file-max") == "ok"
    warn = make_root(tmp_path / "b", **{sysctl("fs.file-max"): "1050000"})  # < 10 % spare
    assert status(warn, "fs.file-max") == "warn"
    fail = make_root(tmp_path / "c", **{sysctl("fs.file-max"): "800000"})
    check = run_checks(fail)["fs.file-max"]
    assert (check.status, check.needed) == ("fail", 10_000 + 1_100_000)
    assert check.fix.startswith("sysctl -w fs.file-max=1110000; persist: echo ")
    assert run_checks(make_root(tmp_path / "d"), role="both")["fs.file-max"].needed == (
        10_000 + 2_200_000  # both ends here: two fds per connection
    )


def _meminfo(available_kb: int) -> str:
    return f"MemTotal: 24684096 kB\nMemAvailable: {available_kb} kB\n"


def test_memory_ok_warn_and_fail(tmp_path):
    assert status(make_root(tmp_path / "a"), "memory") == "ok"
    need = 1_000_000 * (4_800 + 1_593) + 2 * PROCESS_BASELINE_BYTES  # 2 processes of 600k
    warn = make_root(tmp_path / "b", proc__meminfo=_meminfo(int(need / 0.9 / 1024)))
    assert status(warn, "memory") == "warn"
    fail = make_root(tmp_path / "c", proc__meminfo=_meminfo(2_000_000))
    check = run_checks(fail)["memory"]
    assert (check.status, check.needed) == ("fail", need)
    assert check.fix.startswith("add memory")


def test_somaxconn_below_the_configured_backlog_warns_and_far_below_fails(tmp_path):
    assert status(make_root(tmp_path / "a"), "net.core.somaxconn") == "ok"
    low = make_root(tmp_path / "b", **{sysctl("net.core.somaxconn"): "2048"})
    check = run_checks(low)["net.core.somaxconn"]
    assert (check.status, check.needed) == ("warn", 4096)
    assert check.fix.startswith("sysctl -w net.core.somaxconn=4096;")
    assert "/etc/sysctl.d/90-manydoors.conf" in check.fix
    assert status(low, "net.core.somaxconn", backlog=2048) == "ok"
    old = make_root(tmp_path / "c", **{sysctl("net.core.somaxconn"): "128"})
    assert status(old, "net.core.somaxconn") == "fail"


def test_syn_backlog_warns_with_syncookies_and_fails_without(tmp_path):
    name = "net.ipv4.tcp_max_syn_backlog"
    assert status(make_root(tmp_path / "a"), name) == "ok"
    assert status(make_root(tmp_path / "b", **{sysctl(name): "2048"}), name) == "warn"
    off = {sysctl(name): "2048", sysctl("net.ipv4.tcp_syncookies"): "0"}
    check = run_checks(make_root(tmp_path / "c", **off))[name]
    assert check.status == "fail" and "drops SYNs" in check.why


def test_netdev_backlog_fails_only_when_packets_were_dropped(tmp_path):
    name = "net.core.netdev_max_backlog"
    drops = "0000aaaa 000004a1 0\n0000bbbb 00000200 0\n"  # 1,185 + 512 dropped
    assert status(make_root(tmp_path / "a"), name) == "ok"
    assert status(make_root(tmp_path / "b", **{sysctl(name): "1000"}), name) == "warn"
    raised = make_root(tmp_path / "c", proc__net__softnet_stat=drops)
    assert status(raised, name) == "warn"
    both = make_root(tmp_path / "d", proc__net__softnet_stat=drops, **{sysctl(name): "1000"})
    check = run_checks(both)[name]
    assert check.status == "fail" and "1,697 packets dropped" in check.why


def test_tcp_mem_ok_above_the_need_and_only_warns_below_it(tmp_path):
    name = "net.ipv4.tcp_mem"
    assert status(make_root(tmp_path / "a"), name) == "ok"
    pressure = make_root(tmp_path / "b", **{sysctl(name): "287901 383869 1200000"})
    assert status(pressure, name) == "warn"
    low = make_root(tmp_path / "c", **{sysctl(name): "287901 383869 575802"})
    check = run_checks(low)[name]
    # Measured: a 1M broadcast stayed out of memory pressure with these values.
    assert (check.status, check.needed) == ("warn", "287901 1000000 1250000")


def test_port_range_ok_narrow_warns_and_too_few_source_ips_fail(tmp_path):
    name = "net.ipv4.ip_local_port_range"
    ok = run_checks(make_root(tmp_path / "a"), role="client")[name]
    # 1,000,000 / 25,408 per lane: 40 loopback source IPs, picked by the load generator.
    assert (ok.status, ok.needed) == ("ok", "40 loopback source IPs (chosen by load)")
    narrow = make_root(tmp_path / "b", **{sysctl(name): "60000 60999"})
    assert status(narrow, name, role="client") == "warn"
    one_ip = run_checks(make_root(tmp_path / "c"), role="client", source_ips=1)[name]
    assert one_ip.status == "fail"
    assert "--source-ips 127.0.1.1-127.0.1.40" in one_ip.fix
    assert status(make_root(tmp_path / "d"), name, role="client", source_ips=40) == "ok"


def test_tw_reuse_loopback_only_is_fine_for_loopback_but_warns_elsewhere(tmp_path):
    name = "net.ipv4.tcp_tw_reuse"
    assert status(make_root(tmp_path / "a"), name, role="client") == "ok"
    remote = (("10.0.0.5", 7000),)
    assert status(make_root(tmp_path / "b"), name, role="client", servers=remote) == "warn"
    off = make_root(tmp_path / "c", **{sysctl(name): "0"})
    assert status(off, name, role="client") == "warn"
    assert status(make_root(tmp_path / "d", **{sysctl(name): "1"}), name, role="client") == "ok"


def _conntrack(tmp_path: Path, count: int, inuse: int, limit: int = 262_144) -> Path:
    return make_root(
        tmp_path,
        **{
            sysctl("net.netfilter.nf_conntrack_max"): str(limit),
            sysctl("net.netfilter.nf_conntrack_count"): str(count),
            "proc__net__sockstat": f"TCP: inuse {inuse} orphan 0 tw 0 alloc 0 mem 0\n",
        },
    )


def test_conntrack_is_checked_only_when_loaded_and_fails_when_it_tracks(tmp_path):
    name = "net.netfilter.nf_conntrack_max"
    assert name not in run_checks(make_root(tmp_path / "a"))
    # An empty table with a million sockets open: nothing is tracked (the reference box).
    assert status(_conntrack(tmp_path / "b", 0, 1_000_000), name) == "ok"
    assert status(_conntrack(tmp_path / "c", 0, 10), name) == "warn"  # cannot tell yet
    check = run_checks(_conntrack(tmp_path / "d", 5_000, 5_000))[name]
    assert (check.status, check.needed) == ("fail", 5_000 + 1_100_000)
    limits = read_limits(_conntrack(tmp_path / "e", 5_000, 5_000), getrlimit=getrlimit(RLIMIT_HIGH))
    assert capacity(limits, Scenario()).binding.name == "nf_conntrack_max"


def test_kernel_versions_for_client_and_server(tmp_path):
    def root(release: str, sub: str) -> Path:
        return make_root(tmp_path / sub, **{sysctl("kernel.osrelease"): release})

    assert status(root("6.18.44-fc-v595", "a"), "kernel", role="client") == "ok"
    assert status(root("5.15.0-91-generic", "b"), "kernel", role="client") == "warn"
    assert status(root("4.1.12", "c"), "kernel", role="client") == "fail"
    assert status(root("4.1.12", "d"), "kernel", role="server") == "ok"
    assert status(root("3.2.0", "e"), "kernel", role="server") == "fail"


# --- capacity -------------------------------------------------------------------------


def test_server_capacity_arithmetic_and_the_limit_that_binds_first(tmp_path):
    root = make_root(
        tmp_path,
        proc__meminfo=_meminfo(4_000_000),  # 4,096,000,000 B
        **{sysctl("fs.file-max"): "2466183", sysctl("fs.file-nr"): "326295 0 2466183"},
    )
    limits = read_limits(root, getrlimit=getrlimit(RLIMIT_HERE))
    cap = capacity(limits, Scenario(target=1_000_000))
    bounds = {b.name: b.connections for b in cap.bounds}
    assert bounds["RLIMIT_NOFILE"] == 64 * (20_000 - 64)  # 32 processes per core x 2
    assert bounds["fs.file-max"] == 2_466_183 - 326_295
    assert cap.processes["server"] == 51
    memory = (4_096_000_000 - 51 * PROCESS_BASELINE_BYTES) // (4_800 + 1_593)
    assert bounds["memory"] == memory
    assert cap.binding.name == "memory" and cap.server == memory


def test_both_ends_on_one_box_pay_the_pair_cost_and_two_fds(tmp_path):
    root = make_root(tmp_path, **{sysctl("fs.file-max"): "1000000"})
    limits = read_limits(root, getrlimit=getrlimit(RLIMIT_HERE))
    cap = capacity(limits, Scenario(target=1_000_000, role="both"))
    bounds = {(b.name, b.side): b.connections for b in cap.bounds}
    assert bounds[("fs.file-max", "server")] == (1_000_000 - 10_000) // 2
    procs = 2 * 51
    per = 10_159 + 1_593 + 1_047
    assert bounds[("memory", "client")] == (23_000_000 * 1024 - procs * 11_500_000) // per
    assert cap.binding.name == "fs.file-max"
    assert cap.server == cap.client == 495_000


def test_client_capacity_is_source_ips_times_server_ports_times_lane(tmp_path):
    limits = read_limits(make_root(tmp_path), getrlimit=getrlimit(RLIMIT_HERE))
    scen = Scenario(target=1_000_000, role="client", source_ips=10)
    cap = capacity(limits, scen)
    assert cap.client == 10 * 1 * int(28_232 * 0.9)
    assert cap.binding.name == "ip_local_port_range"
    assert "10 source IPs x 1 server ports x 25,408 ports per lane" in cap.binding.why


def test_measured_costs_from_the_store_replace_the_defaults(tmp_path):
    store = tmp_path / "measured.json"
    assert load_costs(store) == Costs()
    save_costs(Costs(kernel_per_socket=6_000, server_user=2_000), store, measured_at="now")
    costs = load_costs(store)
    assert (costs.kernel_per_socket, costs.server_user, costs.load_user) == (6_000, 2_000, 1_047)
    assert costs.source.startswith("measured now")
    store.write_text("not json")
    assert load_costs(store) == Costs()


def test_startup_warning_names_the_binding_limit_only_when_it_binds_first(tmp_path):
    root = make_root(tmp_path)
    fake = getrlimit(RLIMIT_HERE)
    assert startup_warning("server", 100_000, str(root), getrlimit=fake, costs=Costs()) is None
    line = startup_warning("server", 5_000_000, str(root), getrlimit=fake, costs=Costs())
    assert line is not None and "\n" not in line
    assert line.startswith("RLIMIT_NOFILE binds at 1,275,904 connections, before the target")
    assert "manydoors doctor --target 5000000 --role server" in line


# --- the command ----------------------------------------------------------------------


def test_json_report_has_exactly_the_documented_shape(tmp_path, capsys):
    root = make_root(tmp_path)
    # The heartbeat's share depends on this machine's cores: off here, tested below.
    assert doctor(root, "--json", "--role", "both", "--ping-interval", "0", rlimit=RLIMIT_HIGH) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"target", "max_connections", "binding_limit", "checks"}
    assert report["target"] == 1_000_000
    assert set(report["max_connections"]) == {"server", "client"}
    assert all(isinstance(n, int) for n in report["max_connections"].values())
    assert isinstance(report["binding_limit"], str)
    keys = {"name", "current", "needed", "status", "why", "fix"}
    assert all(set(c) == keys for c in report["checks"])
    assert {c["status"] for c in report["checks"]} == {"ok"}


def test_table_output_and_exit_code_1_when_a_check_fails(tmp_path, capsys):
    root = make_root(tmp_path, **{sysctl("net.core.somaxconn"): "128"})
    assert doctor(root, "--target", "200000", "--backlog", "4096") == 1
    out = capsys.readouterr().out
    assert "net.core.somaxconn" in out and "fail" in out
    assert "binds first: RLIMIT_NOFILE (server) at 1,275,904" in out


def test_bad_flags_exit_2_with_a_reason(tmp_path, capsys):
    assert doctor(make_root(tmp_path), "--target", "0") == 2
    assert doctor(make_root(tmp_path), "--pid", "99999") == 2
    assert "no limits for pid 99999" in capsys.readouterr().err


def test_plan_prints_the_five_tuple_arithmetic(tmp_path, capsys):
    root = make_root(tmp_path)
    argv = ["doctor", "plan", "--clients", "127.0.1.1-127.0.1.40"]
    argv += ["--server", "127.0.0.1:7000-7003", "--root", str(root)]
    assert manydoors_main(argv) == 0
    assert capsys.readouterr().out == (
        "40 source IPs x 4 server ports x 25,408 ports per lane (ip_local_port_range "
        "32768-60999 = 28,232 ports, filled to 90%) = 4,065,280 connections\n"
    )
    assert manydoors_main([*argv, "--connections", "5000000"]) == 1
    assert "use at least 50 source IPs" in capsys.readouterr().out
    assert manydoors_main([*argv, "--source-ports", "40000-40999"]) == 0
    assert capsys.readouterr().out.startswith(
        "40 source IPs x 4 server ports x 1,000 ports per lane (--source-ports 40000-40999 "
        "= 1,000 ports, filled to 100%) = 160,000 connections"
    )


def test_apply_dry_run_prints_the_changes_and_writes_nothing(tmp_path, capsys):
    root = make_root(tmp_path, **{sysctl("net.core.somaxconn"): "1024"})
    assert doctor(root, "--apply", "--dry-run", euid=1000) == 0  # no root needed
    out = capsys.readouterr().out
    assert "would set net.core.somaxconn: 1024 -> 4096" in out
    assert "net.core.somaxconn = 4096" in out  # the /etc/sysctl.d line
    assert "cannot change: RLIMIT_NOFILE hard limit 20,000" in out
    assert (root / "proc/sys/net/core/somaxconn").read_text() == "1024"


def test_apply_refuses_without_root_and_writes_nothing(tmp_path, capsys):
    root = make_root(tmp_path, **{sysctl("net.core.somaxconn"): "1024"})
    assert doctor(root, "--apply", euid=1000) == 2
    assert "must run as root (euid is 1000)" in capsys.readouterr().err
    assert (root / "proc/sys/net/core/somaxconn").read_text() == "1024"


def test_apply_raises_what_the_target_needs_and_never_lowers(tmp_path, capsys):
    root = make_root(
        tmp_path,
        **{
            sysctl("net.core.somaxconn"): "1024",
            sysctl("net.ipv4.tcp_mem"): "900000 383869 575802",
            sysctl("net.ipv4.ip_local_port_range"): "40000 49999",
            sysctl("net.ipv4.tcp_tw_reuse"): "2",
            sysctl("fs.nr_open"): "2000000",
        },
    )
    remote = ["--server", "10.0.0.5:7000", "--source-ips", "10.0.1.1-10.0.1.50"]
    code = doctor(root, "--apply", "--role", "both", *remote)
    assert code == 0

    def read(key: str) -> str:
        return (root / "proc/sys" / key.replace(".", "/")).read_text().strip()

    assert read("net.core.somaxconn") == "4096"
    assert read("net.ipv4.tcp_mem") == "900000 2000000 2500000"  # low value kept, not lowered
    assert read("net.ipv4.ip_local_port_range") == "10000 65535"  # widened both ways
    assert read("net.ipv4.tcp_tw_reuse") == "2"  # 1 would be lower: left alone
    assert read("fs.nr_open") == "2000000"  # already above the 500,064 needed
    out = capsys.readouterr().out
    assert "set net.core.somaxconn: 1024 -> 4096" in out
    assert "left alone: net.ipv4.tcp_tw_reuse stays 2: it would lower it" in out
    assert "cannot change: RLIMIT_NOFILE" in out


def test_doctor_on_the_real_machine_agrees_with_getrlimit_and_the_port_range(tmp_path, capsys):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = read_limits("/")
    assert (limits.this.soft, limits.this.hard) == (soft, hard)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = (int(v) for v in f.read().split())
    assert limits.port_range == (lo, hi)
    store = str(tmp_path / "none.json")
    manydoors_main(["doctor", "--json", "--role", "client", "--store", store])
    found = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert found["RLIMIT_NOFILE"]["current"] == hard
    assert found["net.ipv4.ip_local_port_range"]["current"] == f"{lo} {hi}"


@pytest.mark.parametrize("role", ["server", "client", "both"])
def test_every_role_reports_on_an_empty_root_without_crashing(tmp_path, capsys, role):
    assert doctor(tmp_path, "--role", role, "--json") in (0, 1)
    assert json.loads(capsys.readouterr().out)["target"] == 1_000_000


def test_the_heartbeat_check_says_what_the_pings_cost_and_the_interval_that_fits() -> None:
    from manydoors.doctor.advice import check_heartbeat
    from manydoors.doctor.capacity import Scenario

    busy = check_heartbeat(Scenario(target=1_000_000, ping_interval=25, cores=2))
    assert busy.status == "warn"  # 40,000 pings/s x 13 us = 26 % of 2 cores
    assert "40,000 pings/s" in busy.why and "26% of 2 cores" in busy.why
    assert busy.needed == ">= 65 s" and "ping_interval = 65" in busy.fix
    assert check_heartbeat(Scenario(target=1_000_000, ping_interval=65, cores=2)).status == "ok"
    assert check_heartbeat(Scenario(target=1_000_000, ping_interval=5, cores=2)).status == "fail"
    assert check_heartbeat(Scenario(target=1_000_000, ping_interval=0, cores=2)).current == "off"

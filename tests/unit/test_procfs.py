"""The /proc reader over a fake tree under tmp_path: each answer, and None when a file is gone.

"Unreadable" is a directory where the file should be: the tests run as root, for whom
a chmod 000 file is still readable.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from manydoors.node import procfs

PID = 4242

# /proc/PID/stat of a process whose command name holds a space and a ")".
STAT = (
    f"{PID} (we (i)rd) S 17 4242 4242 0 -1 4194560 900 0 0 0 "
    "250 130 0 0 20 0 3 0 98765 3133440 382 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 "
    "1 0 0 0 0 0\n"
)
STATUS = "Name:\tworker\nState:\tS (sleeping)\nVmRSS:\t    2048 kB\n"
STATM = "12000 300 150 20 0 900 0\n"
SMAPS_ROLLUP = (
    "55e9d1ad9000-7ffc97fa9000 ---p 00000000 00:00 0                          [rollup]\n"
    "Rss:                1704 kB\n"
    "Pss:                 313 kB\n"
    "Pss_Anon:            200 kB\n"
    "Shared_Clean:       1200 kB\n"
)
LIMITS = (
    "Limit                     Soft Limit           Hard Limit           Units     \n"
    "Max cpu time              unlimited            unlimited            seconds   \n"
    "Max open files            20000                1048576              files     \n"
    "Max locked memory         8388608              8388608              bytes     \n"
)
MAPS = (
    "55e9d1ad9000-55e9d1adb000 r--p 00000000 08:01 1 /usr/bin/python3\n"
    "55e9d1adb000-55e9d1adf000 r-xp 00002000 08:01 1 /usr/bin/python3\n"
    "7ffc97f88000-7ffc97fa9000 rw-p 00000000 00:00 0 [stack]\n"
)
MEMINFO = (
    "MemTotal:       16318480 kB\n"
    "MemFree:         1022332 kB\n"
    "MemAvailable:    9876543 kB\n"
    "HugePages_Total:       4\n"
    "Hugepagesize:       2048 kB\n"
)
SOCKSTAT = "sockets: used 21\nTCP: inuse 4 orphan 1 tw 316 alloc 5 mem 28\nUDP: inuse 0 mem 0\n"


def put(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def unreadable(root: Path, rel: str) -> None:
    """A directory where the file should be: open() fails with IsADirectoryError."""
    (root / rel).mkdir(parents=True)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A fake root with one process, PID, and the machine-wide files."""
    for rel, text in {
        f"proc/{PID}/stat": STAT,
        f"proc/{PID}/status": STATUS,
        f"proc/{PID}/statm": STATM,
        f"proc/{PID}/smaps_rollup": SMAPS_ROLLUP,
        f"proc/{PID}/limits": LIMITS,
        f"proc/{PID}/maps": MAPS,
        f"proc/{PID}/task/{PID}/children": "101 102 ",
        f"proc/{PID}/task/{PID + 1}/children": "103\n",
        f"proc/{PID}/task/{PID + 2}/children": "",
        "proc/meminfo": MEMINFO,
        "proc/net/sockstat": SOCKSTAT,
        "proc/loadavg": "0.52 1.25 2.00 3/812 21053\n",
        "proc/sys/net/core/somaxconn": "4096\n",
        "proc/sys/net/ipv4/tcp_mem": "190000\t253000\t380000\n",
        "proc/sys/net/ipv4/ip_local_port_range": "32768\t60999\n",
        "proc/sys/fs/nr_open": "1048576\n",
    }.items():
        put(tmp_path, rel, text)
    fd = tmp_path / f"proc/{PID}/fd"
    fd.mkdir()
    for n in range(5):
        (fd / str(n)).write_text("")
    return tmp_path


# --- generic readers ---------------------------------------------------------------------


def test_read_text_gives_the_file_and_none_when_missing_or_unreadable(proc: Path) -> None:
    assert procfs.read_text(proc, "proc/loadavg") == "0.52 1.25 2.00 3/812 21053\n"
    assert procfs.read_text(str(proc), "proc/loadavg") is not None  # str or PathLike root
    assert procfs.read_text(proc, "proc/nothing") is None
    unreadable(proc, "proc/adir")
    assert procfs.read_text(proc, "proc/adir") is None


def test_read_text_of_a_path_with_a_nul_byte_is_none_not_an_error(proc: Path) -> None:
    assert procfs.read_text(proc, "proc/load\0avg") is None


def test_read_text_replaces_bytes_that_are_not_utf8(proc: Path) -> None:
    (proc / "proc/binary").write_bytes(b"ok \xff\xfe end")
    assert procfs.read_text(proc, "proc/binary") == "ok \ufffd\ufffd end"


def test_read_ints_splits_on_any_whitespace(proc: Path) -> None:
    assert procfs.read_ints(proc, "proc/sys/net/ipv4/tcp_mem") == (190000, 253000, 380000)
    assert procfs.read_ints(proc, "proc/sys/net/core/somaxconn") == (4096,)


def test_read_ints_is_none_for_a_missing_empty_or_non_numeric_file(proc: Path) -> None:
    assert procfs.read_ints(proc, "proc/sys/net/core/nothing") is None
    put(proc, "proc/sys/empty", "\n")
    assert procfs.read_ints(proc, "proc/sys/empty") is None
    put(proc, "proc/sys/words", "1 two 3\n")
    assert procfs.read_ints(proc, "proc/sys/words") is None


def test_read_int_is_the_first_integer(proc: Path) -> None:
    assert procfs.read_int(proc, "proc/sys/net/ipv4/ip_local_port_range") == 32768
    assert procfs.read_int(proc, "proc/sys/fs/nr_open") == 1048576
    assert procfs.read_int(proc, "proc/sys/fs/nothing") is None


def test_sysctl_path_maps_dots_to_directories_under_proc_sys() -> None:
    assert procfs.sysctl_path("net.core.somaxconn") == "proc/sys/net/core/somaxconn"
    assert procfs.sysctl_path("fs.nr_open") == "proc/sys/fs/nr_open"


def test_sysctl_reads_the_integers_below_the_root(proc: Path) -> None:
    assert procfs.sysctl("net.ipv4.tcp_mem", proc) == (190000, 253000, 380000)
    assert procfs.sysctl("net.core.somaxconn", root=proc) == (4096,)
    assert procfs.sysctl("net.netfilter.nf_conntrack_max", proc) is None  # no conntrack


# --- one process -------------------------------------------------------------------------


def test_pids_lists_the_numeric_entries_lowest_first(proc: Path) -> None:
    for pid in (12, 3, 700):
        (proc / f"proc/{pid}").mkdir()
    assert procfs.pids(proc) == [3, 12, 700, PID]  # not meminfo, net, sys


def test_pids_is_empty_without_a_proc_directory(tmp_path: Path) -> None:
    assert procfs.pids(tmp_path) == []


def test_open_fds_counts_the_entries_of_the_fd_directory(proc: Path) -> None:
    assert procfs.open_fds(PID, proc) == 5
    assert procfs.open_fds(str(PID), root=proc) == 5


def test_open_fds_is_none_for_a_process_that_is_gone(proc: Path) -> None:
    assert procfs.open_fds(PID + 100, proc) is None


def test_rss_is_the_second_field_of_statm_in_pages(proc: Path) -> None:
    assert procfs.rss(PID, proc) == 300 * procfs.PAGE


def test_rss_is_none_when_statm_is_missing_empty_or_garbled(proc: Path) -> None:
    assert procfs.rss(PID + 100, proc) is None
    put(proc, f"proc/{PID}/statm", "")
    assert procfs.rss(PID, proc) is None
    put(proc, f"proc/{PID}/statm", "12000\n")
    assert procfs.rss(PID, proc) is None
    put(proc, f"proc/{PID}/statm", "12000 lots\n")
    assert procfs.rss(PID, proc) is None


def test_rss_pss_reads_smaps_rollup_in_bytes(proc: Path) -> None:
    # Pss_Anon and Shared_Clean are not Pss or Rss.
    assert procfs.rss_pss(PID, proc) == (1704 * 1024, 313 * 1024)


def test_rss_pss_is_none_without_smaps_rollup_and_zero_for_absent_lines(proc: Path) -> None:
    assert procfs.rss_pss(PID + 100, proc) is None
    unreadable(proc, f"proc/{PID + 1}/smaps_rollup")
    assert procfs.rss_pss(PID + 1, proc) is None
    put(proc, f"proc/{PID}/smaps_rollup", "Rss:  8 kB\n")
    assert procfs.rss_pss(PID, proc) == (8 * 1024, 0)


def test_mappings_counts_the_lines_of_maps(proc: Path) -> None:
    assert procfs.mappings(PID, proc) == 3
    put(proc, f"proc/{PID}/maps", "")
    assert procfs.mappings(PID, proc) == 0  # a kernel thread maps nothing
    assert procfs.mappings(PID + 100, proc) is None


def test_stat_starts_at_the_state_after_a_command_name_with_spaces_and_parens(
    proc: Path,
) -> None:
    fields = procfs.stat(PID, proc)
    assert fields is not None
    assert fields[0] == "S"  # state
    assert fields[1] == "17"  # ppid
    assert (fields[11], fields[12]) == ("250", "130")  # utime, stime
    assert fields[19] == "98765"  # start time


def test_stat_is_none_when_missing_empty_or_without_a_command_name(proc: Path) -> None:
    assert procfs.stat(PID + 100, proc) is None
    put(proc, f"proc/{PID + 1}/stat", "")
    assert procfs.stat(PID + 1, proc) is None
    put(proc, f"proc/{PID + 2}/stat", "1 S 0 0\n")
    assert procfs.stat(PID + 2, proc) is None


def test_cpu_seconds_is_user_plus_system_time_in_clock_ticks(proc: Path) -> None:
    assert procfs.cpu_seconds(PID, proc) == pytest.approx((250 + 130) / procfs.CLK_TCK)


def test_cpu_seconds_is_none_for_a_missing_or_short_stat(proc: Path) -> None:
    assert procfs.cpu_seconds(PID + 100, proc) is None
    put(proc, f"proc/{PID}/stat", f"{PID} (x) S 1 2 3\n")
    assert procfs.cpu_seconds(PID, proc) is None


def test_started_is_the_start_time_in_ticks_since_boot(proc: Path) -> None:
    assert procfs.started(PID, proc) == 98765


def test_started_is_none_for_a_missing_short_or_garbled_stat(proc: Path) -> None:
    assert procfs.started(PID + 100, proc) is None
    put(proc, f"proc/{PID}/stat", f"{PID} (x) S 1 2 3\n")
    assert procfs.started(PID, proc) is None
    put(proc, f"proc/{PID}/stat", f"{PID} (x) " + "S 1 " + "0 " * 17 + "soon\n")
    assert procfs.started(PID, proc) is None


def test_children_collects_the_children_of_every_thread(proc: Path) -> None:
    assert sorted(procfs.children(PID, proc)) == [101, 102, 103]


def test_children_skips_a_thread_without_a_children_file(proc: Path) -> None:
    (proc / f"proc/{PID}/task/{PID + 3}").mkdir()  # the thread exited while listing
    assert sorted(procfs.children(PID, proc)) == [101, 102, 103]


def test_children_is_empty_for_a_process_that_is_gone(proc: Path) -> None:
    assert procfs.children(PID + 100, proc) == []


def test_parse_limits_file_reads_max_open_files() -> None:
    assert procfs.parse_limits_file(LIMITS) == (20000, 1048576)


def test_parse_limits_file_turns_unlimited_into_rlim_infinity() -> None:
    text = "Max open files            unlimited            unlimited            files\n"
    assert procfs.parse_limits_file(text) == (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def test_parse_limits_file_is_none_without_or_with_a_garbled_line() -> None:
    assert procfs.parse_limits_file("") is None
    assert procfs.parse_limits_file("Max cpu time  unlimited  unlimited  seconds\n") is None
    assert procfs.parse_limits_file("Max open files  1024\n") is None
    assert procfs.parse_limits_file("Max open files  many  1024  files\n") is None


def test_nofile_reads_the_limits_of_the_process(proc: Path) -> None:
    assert procfs.nofile(PID, proc) == (20000, 1048576)
    assert procfs.nofile(PID + 100, proc) is None


# --- the machine -------------------------------------------------------------------------


def test_meminfo_is_in_bytes_and_counts_without_a_unit_stay_counts(proc: Path) -> None:
    info = procfs.meminfo(proc)
    assert info == {
        "MemTotal": 16318480 * 1024,
        "MemFree": 1022332 * 1024,
        "MemAvailable": 9876543 * 1024,
        "HugePages_Total": 4,
        "Hugepagesize": 2048 * 1024,
    }


def test_meminfo_is_empty_when_missing_and_skips_lines_without_a_number(
    tmp_path: Path,
) -> None:
    assert procfs.meminfo(tmp_path) == {}
    put(tmp_path, "proc/meminfo", "MemTotal:  100 kB\nBogus line\nOdd:  n/a\n\n")
    assert procfs.meminfo(tmp_path) == {"MemTotal": 100 * 1024}


def test_tcp_sockstat_reads_the_tcp_line(proc: Path) -> None:
    assert procfs.tcp_sockstat(proc) == {"inuse": 4, "orphan": 1, "tw": 316, "alloc": 5, "mem": 28}


def test_tcp_sockstat_is_empty_when_missing_or_without_a_tcp_line(tmp_path: Path) -> None:
    assert procfs.tcp_sockstat(tmp_path) == {}
    put(tmp_path, "proc/net/sockstat", "sockets: used 2\n\nUDP: inuse 0 mem 0\n")
    assert procfs.tcp_sockstat(tmp_path) == {}


def test_loadavg_is_the_three_averages(proc: Path) -> None:
    assert procfs.loadavg(proc) == [0.52, 1.25, 2.0]


def test_loadavg_is_none_when_missing_empty_or_garbled(tmp_path: Path) -> None:
    assert procfs.loadavg(tmp_path) is None
    put(tmp_path, "proc/loadavg", "")
    assert procfs.loadavg(tmp_path) is None
    put(tmp_path, "proc/loadavg", "high higher highest 1/2 3\n")
    assert procfs.loadavg(tmp_path) is None


def test_the_real_proc_of_this_process() -> None:
    fds = procfs.open_fds()
    rss = procfs.rss()
    assert fds is not None and fds > 0
    assert rss is not None and rss > 0
    assert procfs.rss(os.getpid()) is not None
    assert procfs.started("self") == procfs.started(os.getpid())

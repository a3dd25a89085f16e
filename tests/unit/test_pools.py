"""Pool sizing, the start-up TLS check and the fd limits; binding sockets is live territory."""

from __future__ import annotations

import math
import os
import resource
import socket
from pathlib import Path

import pytest

from manydoors.config import Config, ServiceConfig
from manydoors.server import pools
from manydoors.server.errors import StartupError
from manydoors.server.pools import SLACK, check_tls, fd_limits, plan, pool_size
from manydoors.server.stats import StatsTable
from support.certfix import Certs


def test_slack_is_five_percent() -> None:
    assert SLACK == 1.05


def test_pool_size_covers_max_connections_with_slack() -> None:
    service = ServiceConfig(max_connections=100_000, workers=1)
    # 1,064 fds - 64 reserved = 1,000 a worker; 105,000 connections with the slack.
    assert pool_size(service, 1064, 64) == 105


def test_pool_size_rounds_up_a_partial_worker() -> None:
    service = ServiceConfig(max_connections=1001, workers=1)
    assert pool_size(service, 1100, 100) == math.ceil(1001 * SLACK / 1000) == 2


def test_pool_size_counts_the_slack_a_pool_sized_exactly_would_miss() -> None:
    # 20 workers x 1,000 fds hold 20,000 exactly, but not 20,000 x 1.05.
    service = ServiceConfig(max_connections=20_000, workers=1)
    assert pool_size(service, 1000 + 64, 64) == 21


def test_pool_size_is_never_fewer_than_the_workers_asked() -> None:
    service = ServiceConfig(max_connections=10, workers=6)
    assert pool_size(service, 100_064, 64) == 6


def test_pool_size_gives_more_than_asked_when_the_fds_need_it() -> None:
    service = ServiceConfig(max_connections=1_000_000, workers=2)
    assert pool_size(service, 20_064, 64) == 53  # 1.05M / 20,000 = 52.5


def test_pool_size_auto_asks_for_one_worker_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    service = ServiceConfig(max_connections=10, workers=None)
    assert pool_size(service, 100_064, 64) == 8


def test_pool_size_auto_still_covers_max_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    service = ServiceConfig(max_connections=100_000, workers=None)
    assert pool_size(service, 10_064, 64) == 11  # 105,000 / 10,000, more than 4 cores


def test_pool_size_auto_with_an_unknown_core_count_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    service = ServiceConfig(max_connections=10, workers=None)
    assert pool_size(service, 100_064, 64) == 1


def test_plan_sizes_each_service_at_the_fd_limit_minus_the_reserve() -> None:
    chat = ServiceConfig(name="chat", port=7000, max_connections=50_000, workers=1)
    feed = ServiceConfig(name="feed", port=7001, max_connections=10, workers=3)
    config = Config(services=(chat, feed), fd_reserve=100)
    assert plan(config, 10_100) == [(chat, 6), (feed, 3)]  # 52,500 / 10,000 -> 6


def test_plan_keeps_the_order_of_the_services() -> None:
    names = ("c", "a", "b")
    config = Config(
        services=tuple(ServiceConfig(name=n, port=7000 + i, workers=1) for i, n in enumerate(names))
    )
    assert [s.name for s, _ in plan(config, 1_000_000)] == list(names)


# --- TLS -----------------------------------------------------------------------------------


def tls_config(cert: str | Path, key: str | Path) -> Config:
    return Config(services=(ServiceConfig(name="secure", tls_cert=str(cert), tls_key=str(key)),))


def test_check_tls_passes_a_good_certificate_and_key(certs: Certs) -> None:
    check_tls(tls_config(certs.cert, certs.key))


def test_check_tls_passes_services_without_tls() -> None:
    check_tls(Config())


def test_check_tls_names_the_service_and_a_missing_certificate(
    certs: Certs, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.pem"
    with pytest.raises(StartupError) as info:
        check_tls(tls_config(missing, certs.key))
    assert "secure" in str(info.value)
    assert str(missing) in str(info.value)


def test_check_tls_names_a_missing_key(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "nokey.pem"
    with pytest.raises(StartupError) as info:
        check_tls(tls_config(certs.cert, missing))
    assert str(missing) in str(info.value)


def test_check_tls_names_a_key_that_is_not_the_certificates(certs: Certs) -> None:
    with pytest.raises(StartupError, match="does not match") as info:
        check_tls(tls_config(certs.cert, certs.other_key))
    assert str(certs.other_key) in str(info.value)


def test_check_tls_checks_every_service(certs: Certs, tmp_path: Path) -> None:
    good = ServiceConfig(name="good", port=7000, tls_cert=str(certs.cert), tls_key=str(certs.key))
    bad = ServiceConfig(
        name="bad", port=7001, tls_cert=str(tmp_path / "x.pem"), tls_key=str(certs.key)
    )
    with pytest.raises(StartupError) as info:
        check_tls(Config(services=(good, bad)))
    assert str(info.value).startswith("service bad: ")
    assert str(tmp_path / "x.pem") in str(info.value)


def test_check_tls_error_does_not_chain_the_tls_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError) as info:
        check_tls(tls_config(tmp_path / "c.pem", tmp_path / "k.pem"))
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- fd limits (over a fake ``resource``: the process's own limits stay as they are) --------


class FakeResource:
    """getrlimit/setrlimit of RLIMIT_NOFILE, recording every set."""

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE

    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)
        self.sets: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        self.sets.append(limits)
        self.limits = limits


@pytest.fixture
def fake_resource(monkeypatch: pytest.MonkeyPatch) -> FakeResource:
    fake = FakeResource(1024, 65536)
    monkeypatch.setattr(pools, "resource", fake)
    return fake


def test_fd_limits_raises_the_soft_limit_to_the_hard_one(fake_resource: FakeResource) -> None:
    assert fd_limits(Config()) == (65536, 65536)
    assert fake_resource.sets == [(65536, 65536)]


def test_fd_limits_leaves_a_soft_limit_already_at_the_hard_one(
    fake_resource: FakeResource,
) -> None:
    fake_resource.limits = (65536, 65536)
    assert fd_limits(Config()) == (65536, 65536)
    assert fake_resource.sets == []


def test_fd_limits_caps_the_worker_limit_at_config_fd_limit(fake_resource: FakeResource) -> None:
    assert fd_limits(Config(fd_limit=5000)) == (5000, 65536)


def test_fd_limits_never_gives_more_than_the_hard_limit(fake_resource: FakeResource) -> None:
    assert fd_limits(Config(fd_limit=1_000_000)) == (65536, 65536)


def test_a_new_slot_has_no_process_link_or_restarts() -> None:
    a, b = socket.socketpair()
    try:
        slot = pools.Slot(3, a)
        assert (slot.process, slot.link, slot.ready, slot.restarts, slot.base_fds) == (
            None,
            None,
            False,
            0,
            0,
        )
    finally:
        a.close()
        b.close()


def test_pool_retired_counters_start_empty_and_are_per_pool() -> None:
    buffer = bytearray(StatsTable.size(1) * 8)
    table = StatsTable(memoryview(buffer), 1)
    one = pools.Pool(ServiceConfig(), 7000, [], table, buffer)
    two = pools.Pool(ServiceConfig(), 7000, [], table, buffer)
    one.retired["accepted"] += 1
    assert one.retired == {"accepted": 1}
    assert two.retired == {}
    assert one.counts is None


def test_a_hard_fd_limit_within_the_reserve_is_a_clear_startup_error() -> None:
    config = Config()
    with pytest.raises(StartupError, match=r"fd limit \(64\) leaves no room beside fd_reserve"):
        plan(config, config.fd_reserve)
    assert plan(config, config.fd_reserve + 2)  # one fd a worker: still a plan

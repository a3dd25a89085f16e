"""Load plan: targets, source IP ranges, and the split over lanes and processes."""

from __future__ import annotations

import ipaddress
import math

import pytest

from manydoors.loadgen.planner import (
    LANE_FILL,
    SPARSE_LANE,
    Plan,
    PlanError,
    default_source_ips,
    make_plan,
    parse_ip_range,
    parse_target,
)

PORTS = (32768, 60999)  # the Linux default ephemeral range
CAPACITY = int((60999 - 32768 + 1) * LANE_FILL)
ONE = parse_target("127.0.0.1:7000")


def plan_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(PlanError) as info:
        make_plan(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def check_invariants(plan: Plan) -> None:
    """What every plan must satisfy, whatever its inputs."""
    lanes = [lane for agent in plan.agents for lane in agent.lanes]
    assert sum(agent.count for agent in plan.agents) == plan.connections
    assert sum(lane.count for lane in lanes) == plan.connections
    assert all(lane.count > 0 for lane in lanes)
    # a (source, target) pair split over two agents still fits in one port range
    per_pair: dict[tuple[str, str, int], int] = {}
    for lane in lanes:
        key = (lane.src, lane.dst, lane.port)
        per_pair[key] = per_pair.get(key, 0) + lane.count
    assert all(n <= plan.lane_capacity for n in per_pair.values())
    assert {(dst, port) for _, dst, port in per_pair} <= set(plan.targets)
    assert {src for src, _, _ in per_pair} <= set(plan.source_ips)
    # users u<first_user>.. are contiguous across agents and never overlap
    first = 0
    for index, agent in enumerate(plan.agents):
        assert agent.index == index
        assert agent.first_user == first
        first += agent.count
    assert first == plan.connections


# --- parse_target ----------------------------------------------------------------------


def test_parse_target_single_port() -> None:
    assert parse_target("127.0.0.1:7000") == (("127.0.0.1", 7000),)


def test_parse_target_port_range_is_inclusive() -> None:
    assert parse_target("10.0.0.5:7000-7003") == (
        ("10.0.0.5", 7000),
        ("10.0.0.5", 7001),
        ("10.0.0.5", 7002),
        ("10.0.0.5", 7003),
    )


def test_parse_target_range_of_one_port() -> None:
    assert parse_target("127.0.0.1:7000-7000") == (("127.0.0.1", 7000),)


def test_parse_target_ports_at_the_ends_of_the_range() -> None:
    assert parse_target("h:1") == (("h", 1),)
    assert parse_target("h:65535") == (("h", 65535),)


def test_parse_target_splits_at_the_last_colon() -> None:
    assert parse_target("::1:7000") == (("::1", 7000),)


@pytest.mark.parametrize("text", ["127.0.0.1", ":7000", "", "7000"])
def test_parse_target_without_host_or_port_is_an_error(text: str) -> None:
    with pytest.raises(PlanError, match="HOST:PORT"):
        parse_target(text)


@pytest.mark.parametrize("text", ["h:x", "h:", "h:70a0", "h:1-2-3", "h:-5", "h:7000-x", "h:7000-"])
def test_parse_target_with_a_non_numeric_port_is_an_error(text: str) -> None:
    with pytest.raises(PlanError, match="numbers"):
        parse_target(text)


@pytest.mark.parametrize("text", ["h:0", "h:65536", "h:7003-7000", "h:0-5", "h:65535-65536"])
def test_parse_target_with_a_port_out_of_range_is_an_error(text: str) -> None:
    with pytest.raises(PlanError, match="1-65535"):
        parse_target(text)


def test_plan_error_is_a_value_error() -> None:
    assert issubclass(PlanError, ValueError)


# --- parse_ip_range --------------------------------------------------------------------


def test_parse_ip_range_single_address() -> None:
    assert parse_ip_range("127.0.1.1") == ("127.0.1.1",)


def test_parse_ip_range_is_inclusive() -> None:
    assert parse_ip_range("127.0.1.1-127.0.1.4") == (
        "127.0.1.1",
        "127.0.1.2",
        "127.0.1.3",
        "127.0.1.4",
    )


def test_parse_ip_range_crosses_octet_boundaries() -> None:
    assert parse_ip_range("127.0.1.254-127.0.2.1") == (
        "127.0.1.254",
        "127.0.1.255",
        "127.0.2.0",
        "127.0.2.1",
    )


def test_parse_ip_range_comma_separated_parts_with_spaces() -> None:
    assert parse_ip_range("127.0.1.1, 10.0.0.1-10.0.0.2") == ("127.0.1.1", "10.0.0.1", "10.0.0.2")


def test_parse_ip_range_ipv6_stays_ipv6() -> None:
    assert parse_ip_range("::1") == ("::1",)
    assert parse_ip_range("fd00::1-fd00::3") == ("fd00::1", "fd00::2", "fd00::3")
    assert parse_ip_range("::1-::2") == ("::1", "::2")


def test_parse_ip_range_large_range_counts_right() -> None:
    ips = parse_ip_range("127.1.0.0-127.1.3.255")
    assert len(ips) == 1024
    assert len(set(ips)) == 1024


@pytest.mark.parametrize("text", ["x", "", "127.0.1", "127.0.1.1-", "127.0.1.1,", "256.0.0.1"])
def test_parse_ip_range_rejects_bad_addresses(text: str) -> None:
    with pytest.raises(PlanError, match="source IPs"):
        parse_ip_range(text)


@pytest.mark.parametrize("text", ["127.0.1.4-127.0.1.1", "127.0.0.1-::1", "::1-127.0.0.1"])
def test_parse_ip_range_rejects_empty_or_mixed_ranges(text: str) -> None:
    with pytest.raises(PlanError, match="empty"):
        parse_ip_range(text)


# --- make_plan: counts -----------------------------------------------------------------


def test_a_small_plan_is_one_process_one_lane() -> None:
    plan = make_plan(100, ONE, PORTS, fd_limit=1000)
    check_invariants(plan)
    assert len(plan.agents) == 1
    (agent,) = plan.agents
    assert agent.first_user == 0
    assert [(lane.src, lane.dst, lane.port, lane.count) for lane in agent.lanes] == [
        ("127.0.1.1", "127.0.0.1", 7000, 100)
    ]


def test_lane_capacity_is_the_port_range_filled_to_lane_fill() -> None:
    plan = make_plan(1, ONE, PORTS, fd_limit=1000)
    assert plan.lane_capacity == CAPACITY == 25408
    assert plan.port_range == PORTS


@pytest.mark.parametrize(
    ("connections", "fd_limit", "targets"),
    [
        (1, 100, "127.0.0.1:7000"),
        (7, 70, "127.0.0.1:7000"),
        (999, 100, "127.0.0.1:7000-7002"),
        (10_001, 1000, "127.0.0.1:7000"),
        (123_457, 20_000, "127.0.0.1:7000-7003"),
        (1_000_000, 20_000, "127.0.0.1:7000"),
    ],
)
def test_counts_add_up_exactly(connections: int, fd_limit: int, targets: str) -> None:
    plan = make_plan(connections, parse_target(targets), PORTS, fd_limit)
    check_invariants(plan)
    assert plan.connections == connections


def test_processes_auto_is_connections_over_fds_per_process_rounded_up() -> None:
    for connections, fd_limit in [(1_000_000, 20_000), (19_936, 20_000), (19_937, 20_000)]:
        plan = make_plan(connections, ONE, PORTS, fd_limit)
        assert len(plan.agents) == math.ceil(connections / (fd_limit - 64))
    assert len(make_plan(1_000_000, ONE, PORTS, 20_000).agents) == 51


def test_processes_auto_honours_fd_reserve() -> None:
    assert len(make_plan(1000, ONE, PORTS, fd_limit=200, fd_reserve=100).agents) == 10


def test_no_process_exceeds_its_fd_budget() -> None:
    plan = make_plan(1_000_000, ONE, PORTS, fd_limit=20_000)
    assert max(agent.count for agent in plan.agents) <= 20_000 - 64


def test_processes_are_balanced_within_one() -> None:
    plan = make_plan(100_003, ONE, PORTS, fd_limit=10_000)
    counts = [agent.count for agent in plan.agents]
    assert max(counts) - min(counts) <= 1


def test_explicit_processes_above_the_minimum_are_used() -> None:
    plan = make_plan(1000, ONE, PORTS, fd_limit=20_000, processes=4)
    check_invariants(plan)
    assert [agent.count for agent in plan.agents] == [250, 250, 250, 250]
    assert [agent.first_user for agent in plan.agents] == [0, 250, 500, 750]


def test_too_few_explicit_processes_is_an_error_showing_the_arithmetic() -> None:
    message = plan_error(1_000_000, ONE, PORTS, 20_000, processes=10)
    assert "10 load processes x 19,936 fds = 199,360 < 1,000,000" in message
    assert "--processes 51" in message


def test_exactly_enough_explicit_processes_is_fine() -> None:
    plan = make_plan(1_000_000, ONE, PORTS, 20_000, processes=51)
    check_invariants(plan)
    assert len(plan.agents) == 51


# --- make_plan: lanes and users --------------------------------------------------------


def test_every_lane_is_within_lane_capacity_with_given_source_ips() -> None:
    ips = parse_ip_range("127.0.1.1-127.0.1.40")
    plan = make_plan(1_000_000, ONE, PORTS, 20_000, source_ips=ips)
    check_invariants(plan)
    assert plan.source_ips == ips


def test_lanes_are_filled_evenly() -> None:
    ips = parse_ip_range("127.0.1.1-127.0.1.4")
    plan = make_plan(10, parse_target("127.0.0.1:7000-7001"), PORTS, 1000, source_ips=ips)
    per_pair: dict[tuple[str, int], int] = {}
    for agent in plan.agents:
        for lane in agent.lanes:
            per_pair[(lane.src, lane.port)] = per_pair.get((lane.src, lane.port), 0) + lane.count
    assert sorted(per_pair.values()) == [1, 1, 1, 1, 1, 1, 2, 2]


def test_a_lane_can_be_split_between_two_agents() -> None:
    plan = make_plan(10, ONE, PORTS, 1000, processes=3)
    check_invariants(plan)
    assert [[lane.count for lane in agent.lanes] for agent in plan.agents] == [[4], [3], [3]]


def test_users_are_numbered_contiguously_across_agents() -> None:
    plan = make_plan(100_000, parse_target("127.0.0.1:7000-7001"), PORTS, 7000)
    check_invariants(plan)
    users = [agent.first_user + i for agent in plan.agents for i in range(agent.count)]
    assert users == list(range(100_000))


def test_many_targets_on_one_source_ip() -> None:
    targets = parse_target("127.0.0.1:7000-7039")
    plan = make_plan(1_000_000, targets, PORTS, 20_000, source_ips=("127.0.1.1",))
    check_invariants(plan)
    assert {lane.src for agent in plan.agents for lane in agent.lanes} == {"127.0.1.1"}


# --- make_plan: source IPs -------------------------------------------------------------


def test_too_few_source_ips_is_an_error_saying_how_many_are_needed() -> None:
    message = plan_error(100_000, ONE, PORTS, 20_000, source_ips=("127.0.1.1",))
    assert "Use at least 4 source IPs" in message
    assert "1 source IPs x 1 target ports x 25,408 ports per lane" in message
    assert "= 25,408" in message


def test_needed_source_ips_account_for_several_target_ports() -> None:
    targets = parse_target("127.0.0.1:7000-7001")
    message = plan_error(1_000_000, targets, PORTS, 20_000, source_ips=("127.0.1.1",))
    assert f"Use at least {math.ceil(1_000_000 / (2 * CAPACITY))} source IPs" in message


def test_exactly_enough_source_ips_is_fine() -> None:
    ips = parse_ip_range("127.0.1.1-127.0.1.4")
    plan = make_plan(4 * CAPACITY, ONE, PORTS, 200_000, source_ips=ips)
    check_invariants(plan)
    with pytest.raises(PlanError):
        make_plan(4 * CAPACITY + 1, ONE, PORTS, 200_000, source_ips=ips)


def test_an_empty_source_ip_list_is_an_error() -> None:
    assert "Use at least 1 source IPs" in plan_error(10, ONE, PORTS, 1000, source_ips=())


@pytest.mark.parametrize("target", ["10.0.0.1:7000", "192.168.1.2:7000-7001", "::2:7000"])
def test_a_non_loopback_target_without_source_ips_is_an_error(target: str) -> None:
    assert "--source-ips" in plan_error(10, parse_target(target), PORTS, 1000)


def test_a_non_loopback_target_with_source_ips_is_fine() -> None:
    plan = make_plan(10, parse_target("10.0.0.1:7000"), PORTS, 1000, source_ips=("10.0.0.9",))
    check_invariants(plan)


def test_default_source_ips_start_at_127_0_1_1() -> None:
    assert default_source_ips(3) == ("127.0.1.1", "127.0.1.2", "127.0.1.3")
    assert default_source_ips(256)[-1] == "127.0.2.0"
    assert default_source_ips(0) == ()


def test_default_source_ips_are_used_for_a_loopback_target() -> None:
    plan = make_plan(10_000, ONE, PORTS, 20_000)
    assert plan.source_ips == default_source_ips(len(plan.source_ips))
    assert plan.source_ips[0] == "127.0.1.1"
    assert all(ipaddress.ip_address(ip).is_loopback for ip in plan.source_ips)


def test_default_source_ips_keep_lanes_at_most_sparse_lane_deep() -> None:
    for connections in (1, SPARSE_LANE, SPARSE_LANE + 1, 123_457, 1_000_000):
        plan = make_plan(connections, ONE, PORTS, 20_000)
        check_invariants(plan)
        assert len(plan.source_ips) == math.ceil(connections / SPARSE_LANE)
        assert max(lane.count for a in plan.agents for lane in a.lanes) <= SPARSE_LANE


def test_default_source_ips_scale_with_target_ports() -> None:
    plan = make_plan(1_000_000, parse_target("127.0.0.1:7000-7003"), PORTS, 20_000)
    check_invariants(plan)
    assert len(plan.source_ips) == math.ceil(1_000_000 / (4 * SPARSE_LANE))


def test_a_narrow_port_range_makes_lanes_shallower_than_sparse_lane() -> None:
    plan = make_plan(10_000, ONE, (40000, 40999), 20_000)
    check_invariants(plan)
    assert plan.lane_capacity == 900
    assert len(plan.source_ips) == math.ceil(10_000 / 900)


# --- make_plan: other errors -----------------------------------------------------------


@pytest.mark.parametrize("connections", [0, -1])
def test_fewer_than_one_connection_is_an_error(connections: int) -> None:
    assert "at least 1" in plan_error(connections, ONE, PORTS, 1000)


@pytest.mark.parametrize("fd_limit", [64, 10])
def test_an_fd_limit_within_the_reserve_is_an_error(fd_limit: int) -> None:
    assert f"fd limit {fd_limit}" in plan_error(10, ONE, PORTS, fd_limit)


@pytest.mark.parametrize("port_range", [(40000, 40000), (60999, 32768)])
def test_a_port_range_without_room_for_a_lane_is_an_error(port_range: tuple[int, int]) -> None:
    assert "port range" in plan_error(10, ONE, port_range, 1000)


def test_no_targets_is_an_error() -> None:
    assert "target" in plan_error(10, (), PORTS, 1000)


# --- describe ----------------------------------------------------------------------------


def test_describe_states_the_arithmetic() -> None:
    text = make_plan(1_000_000, ONE, PORTS, 20_000).describe()
    assert text.startswith("1,000,000 connections = 500 source IPs x 1 target ports")
    assert "25,408" in text
    assert "32768-60999" in text
    assert "90%" in text
    assert text.endswith("over 51 load processes")

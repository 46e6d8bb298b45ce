"""Unit tests of `portside doctor`'s verdicts: version comparison, `docker info`'s cgroup fields,
the listening sockets of /proc/net/tcp, and the clock skew interval and its thresholds. The checks
against the real engine, real ports and a real HTTP server are in
tests/integration/test_doctor.py."""

from __future__ import annotations

import pytest

from nodeagent.doctor import (
    AgentPort,
    agent_ports,
    cgroup_check,
    engine_check,
    listening_inodes,
    parse_version,
    skew_bounds,
    skew_check,
)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("20.10.24+dfsg1", (20, 10, 24)),
        ("1.41", (1, 41)),
        ("27.3.1", (27, 3, 1)),
        ("19.03.15", (19, 3, 15)),
        ("v24.0.7", (24, 0, 7)),
        ("18.09.0-ce", (18, 9, 0)),
        ("1.13.1-rhel.2", (1, 13, 1)),
        ("dev", None),
        ("", None),
    ],
)
def test_parse_version(text: str, parsed: tuple[int, ...] | None) -> None:
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    ("engine", "api", "ok", "said"),
    [
        ("20.10.24+dfsg1", "1.41", True, ""),
        ("27.3.1", "1.47", True, ""),
        ("20.10.0", "1.41", True, ""),
        ("19.03.15", "1.40", False, "engine older than 20.10, API older than 1.41"),
        ("20.10.7", "1.40", False, "API older than 1.41"),
        ("1.13.1", "1.26", False, "engine older than 20.10, API older than 1.41"),
        ("", "", False, "engine older than 20.10, API older than 1.41"),
    ],
)
def test_engine_version_against_the_minimum(engine: str, api: str, ok: bool, said: str) -> None:
    check = engine_check({"Version": engine, "ApiVersion": api})
    assert check.ok is ok, check
    assert check.name == "docker engine" and f"(API {api or '?'})" in check.detail
    if not ok:
        assert check.detail.endswith(said) and "upgrade Docker to 20.10" in check.fix


# `docker info` of this project's machines (Debian 12, Docker 20.10, cgroup v1), trimmed.
INFO_V1 = {
    "CgroupVersion": "1",
    "CgroupDriver": "cgroupfs",
    "MemoryLimit": True,
    "SwapLimit": True,
    "CpuCfsQuota": True,
    "CpuCfsPeriod": True,
    "PidsLimit": True,
    "Warnings": None,
}


def test_cgroup_limits_enforceable() -> None:
    check = cgroup_check(INFO_V1)
    assert check.ok and not check.warning
    assert check.detail.startswith("cgroup v1, driver cgroupfs: memory, CPU quota and pids")
    v2 = cgroup_check({**INFO_V1, "CgroupVersion": "2", "CgroupDriver": "systemd"})
    assert v2.ok and "cgroup v2, driver systemd" in v2.detail


def test_no_memory_limit_fails_with_what_docker_said_and_how_to_enable_it() -> None:
    info = {
        **INFO_V1,
        "MemoryLimit": False,
        "SwapLimit": False,
        "Warnings": ["WARNING: No memory limit support", "WARNING: No swap limit support"],
    }
    check = cgroup_check(info)
    assert not check.ok
    assert "no memory limits" in check.detail
    assert "Docker says: No memory limit support; No swap limit support" in check.detail
    assert "cgroup_enable=memory" in check.fix
    v2 = cgroup_check({**info, "CgroupVersion": "2", "CpuCfsQuota": False})
    assert not v2.ok and "no memory limits" in v2.detail and "no CPU quotas" in v2.detail
    assert "cgroup.controllers" in v2.fix


def test_no_swap_limit_is_a_warning() -> None:
    info = {**INFO_V1, "SwapLimit": False, "Warnings": ["WARNING: No swap limit support"]}
    check = cgroup_check(info)
    assert check.ok and check.warning
    assert "No swap limit support" in check.detail and "swapaccount=1" in check.fix


def test_warnings_about_other_things_are_not_reported() -> None:
    info = {**INFO_V1, "Warnings": ["WARNING: bridge-nf-call-iptables is disabled"]}
    assert not cgroup_check(info).warning


def test_agent_ports_default_like_the_agent() -> None:
    assert agent_ports("127.0.0.2:7080") == [
        AgentPort("data", "127.0.0.2:7080"),
        AgentPort("API", "127.0.0.2:7081"),
        AgentPort("metrics", "127.0.0.2:7082"),
    ]
    assert agent_ports("0.0.0.0:7080", "127.0.0.1:9000", "127.0.0.1:9001")[1:] == [
        AgentPort("API", "127.0.0.1:9000"),
        AgentPort("metrics", "127.0.0.1:9001"),
    ]


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1BA8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1611 1
   1: 0100007F:1BA8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1612 1
   2: 0100007F:1BA9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1613 1
   3: 0100007F:1BA8 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1614 1
"""


def test_listening_inodes_of_a_port() -> None:
    assert listening_inodes(PROC_NET_TCP, 7080) == {1611, 1612}  # 0x1BA8; not the connection
    assert listening_inodes(PROC_NET_TCP, 7081) == {1613}
    assert listening_inodes(PROC_NET_TCP, 7082) == set()


def test_skew_bounds_from_a_date_header() -> None:
    # Sent at 100.2, answered at 100.4, Date says 100 (the server's second 100.0 to 100.999).
    assert skew_bounds(100.2, 100.4, 100.0) == pytest.approx((-0.4, 0.8))
    assert skew_bounds(100.2, 100.4, 107.0) == pytest.approx((6.6, 7.8))


@pytest.mark.parametrize(
    ("low", "high", "ok", "warning"),
    [
        (-0.4, 0.8, True, False),  # within the resolution: no skew to speak of
        (0.6, 1.8, True, False),  # could be 0.6 s: not above 1 s for sure
        (1.2, 2.4, True, True),  # at least 1.2 s ahead: warn
        (-2.9, -1.7, True, True),  # at least 1.7 s behind: warn
        (4.9, 6.1, True, True),  # at least 4.9 s: still a warning
        (5.2, 6.4, False, False),  # at least 5.2 s: fail
        (-40.5, -39.3, False, False),
    ],
)
def test_skew_verdict(low: float, high: float, ok: bool, warning: bool) -> None:
    check = skew_check("127.0.0.1:7071", low, high)
    assert (check.ok, check.warning) == (ok, warning), check
    assert check.name == "clock against 127.0.0.1:7071" and "resolution 1 s" in check.detail
    if not ok or warning:
        side = "ahead of" if low > 0 else "behind"
        assert f"s {side} this host's" in check.fix and "NTP" in check.fix
    if not ok:
        assert "< 5 s" in check.fix

"""Unit tests of the cgroup sampler's pure parts: /proc/<pid>/cgroup and mountinfo text from cgroup
v1, hybrid and v2 hosts, locating a container's counters, working set and CPU arithmetic."""

from __future__ import annotations

import pytest

from nodeagent.stats import (
    UNIFIED,
    CgroupDirs,
    CgroupMount,
    ContainerUsage,
    cores_between,
    cpu_percent,
    locate_cgroup_dirs,
    parse_flat_keyed,
    parse_mountinfo,
    parse_proc_cgroup,
    working_set_bytes,
)

CID = "fcbb60f60a183583c3a6b341da4da98648c37aeeeb8cd0c7ba88ececae37d305"

# A Docker container on a cgroup v1 host with systemd's hybrid layout (cpu and cpuacct mounted
# apart, as on Portside's Debian 12 hosts), read from the host.
PROC_CGROUP_V1 = f"""\
9:name=systemd:/docker/{CID}
8:pids:/docker/{CID}
4:memory:/docker/{CID}
3:cpuset:/docker/{CID}
2:cpuacct:/docker/{CID}
1:cpu:/docker/{CID}
0::/docker/{CID}
"""
MOUNTINFO_V1 = """\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
# Debian's classic v1 layout: cpu and cpuacct co-mounted (the ordering of the two varies).
PROC_CGROUP_COMOUNTED = f"""\
5:memory:/docker/{CID}
3:cpu,cpuacct:/docker/{CID}
1:name=systemd:/docker/{CID}
"""
MOUNTINFO_COMOUNTED = """\
28 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev shared:9 - cgroup cgroup rw,cpu,cpuacct
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev shared:11 - cgroup cgroup rw,memory
"""
# Pure cgroup v2 with Docker's systemd driver.
PROC_CGROUP_V2 = f"0::/system.slice/docker-{CID}.scope\n"
MOUNTINFO_V2 = """\
24 1 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
26 23 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
"""


def test_proc_cgroup_v1_maps_every_controller_and_the_unified_line() -> None:
    paths = parse_proc_cgroup(PROC_CGROUP_V1)
    assert paths["cpuacct"] == paths["memory"] == paths["name=systemd"] == f"/docker/{CID}"
    assert paths[UNIFIED] == f"/docker/{CID}"
    comounted = parse_proc_cgroup(PROC_CGROUP_COMOUNTED)
    assert comounted["cpu"] == comounted["cpuacct"] == f"/docker/{CID}"


def test_proc_cgroup_v2_has_only_the_unified_path() -> None:
    assert parse_proc_cgroup(PROC_CGROUP_V2) == {UNIFIED: f"/system.slice/docker-{CID}.scope"}


def test_proc_cgroup_ignores_malformed_lines() -> None:
    assert parse_proc_cgroup("garbage\n\n4:memory:/a:b\n") == {"memory": "/a:b"}


def test_mountinfo_finds_cgroup_mounts_with_their_controllers() -> None:
    mounts = parse_mountinfo(MOUNTINFO_V1)
    assert [m.mount_point for m in mounts] == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
    ]
    assert mounts[1] == CgroupMount(1, frozenset({"cpuacct"}), "/", "/sys/fs/cgroup/cpuacct")
    # Mount flags among the super options are not controllers; named hierarchies are kept.
    assert mounts[3].controllers == frozenset({"name=systemd"})
    assert mounts[4] == CgroupMount(2, frozenset(), "/", "/sys/fs/cgroup/unified")
    comounted = parse_mountinfo(MOUNTINFO_COMOUNTED)
    assert comounted[0].controllers == frozenset({"cpu", "cpuacct"})
    assert parse_mountinfo(MOUNTINFO_V2) == [CgroupMount(2, frozenset(), "/", "/sys/fs/cgroup")]


def test_mountinfo_unescapes_paths_and_skips_odd_lines() -> None:
    text = (
        "50 31 0:40 /a\\040b /mnt/cg\\040x rw - cgroup cgroup rw,memory\n"
        "no separator here\n"
        "51 31 0:41 / /short rw - cgroup\n"
    )
    assert parse_mountinfo(text) == [CgroupMount(1, frozenset({"memory"}), "/a b", "/mnt/cg x")]


def test_a_v1_host_uses_cpuacct_and_memory_not_the_empty_unified_tree() -> None:
    dirs = locate_cgroup_dirs(parse_proc_cgroup(PROC_CGROUP_V1), parse_mountinfo(MOUNTINFO_V1))
    assert dirs == CgroupDirs(
        cpu=f"/sys/fs/cgroup/cpuacct/docker/{CID}",
        cpu_v2=False,
        memory=f"/sys/fs/cgroup/memory/docker/{CID}",
        memory_v2=False,
    )
    comounted = locate_cgroup_dirs(
        parse_proc_cgroup(PROC_CGROUP_COMOUNTED), parse_mountinfo(MOUNTINFO_COMOUNTED)
    )
    assert comounted is not None
    assert comounted.cpu == f"/sys/fs/cgroup/cpu,cpuacct/docker/{CID}"


def test_a_v2_host_uses_the_unified_tree_for_both() -> None:
    dirs = locate_cgroup_dirs(parse_proc_cgroup(PROC_CGROUP_V2), parse_mountinfo(MOUNTINFO_V2))
    scope = f"/sys/fs/cgroup/system.slice/docker-{CID}.scope"
    assert dirs == CgroupDirs(cpu=scope, cpu_v2=True, memory=scope, memory_v2=True)


def test_a_mount_of_a_subtree_is_joined_below_its_root() -> None:
    # An agent in a container of its own sees the host's /docker/<agent> at /sys/fs/cgroup/...
    mounts = [
        CgroupMount(1, frozenset({"cpuacct"}), "/docker/agent", "/sys/fs/cgroup/cpuacct"),
        CgroupMount(1, frozenset({"memory"}), "/docker/other", "/elsewhere"),
        CgroupMount(1, frozenset({"memory"}), "/docker/agent", "/sys/fs/cgroup/memory/"),
    ]
    paths = {"cpuacct": "/docker/agent/docker/x", "memory": "/docker/agent/docker/x"}
    assert locate_cgroup_dirs(paths, mounts) == CgroupDirs(
        cpu="/sys/fs/cgroup/cpuacct/docker/x",
        cpu_v2=False,
        memory="/sys/fs/cgroup/memory/docker/x",
        memory_v2=False,
    )


def test_unmounted_controllers_are_not_located() -> None:
    v1_paths = parse_proc_cgroup(PROC_CGROUP_COMOUNTED)
    only_memory = [m for m in parse_mountinfo(MOUNTINFO_COMOUNTED) if "memory" in m.controllers]
    assert locate_cgroup_dirs(v1_paths, only_memory) is None
    assert locate_cgroup_dirs(v1_paths, []) is None
    assert locate_cgroup_dirs(parse_proc_cgroup(PROC_CGROUP_V2), []) is None


def test_working_set_leaves_out_inactive_page_cache() -> None:
    v1 = parse_flat_keyed("cache 61440\ninactive_file 4096\ntotal_inactive_file 8192\n")
    assert working_set_bytes(786432, v1, v2=False) == 786432 - 8192
    v2 = parse_flat_keyed("anon 100\ninactive_file 4096\nnoise\n")
    assert v2 == {"anon": 100, "inactive_file": 4096}
    assert working_set_bytes(10000, v2, v2=True) == 10000 - 4096
    assert working_set_bytes(100, v2, v2=True) == 0  # the two files are read moments apart


@pytest.mark.parametrize(
    ("previous", "current", "cores"),
    [
        (None, (5_000, 10), None),  # first sight
        ((1_000_000_000, 0), (1_500_000_000, 2_000_000_000), 0.25),
        ((0, 0), (3_000_000_000, 2_000_000_000), 1.5),  # several cores
        ((9_000, 0), (1_000, 1_000_000_000), None),  # the counter restarted: a new cgroup
        ((1_000, 5), (1_000, 5), None),  # no time passed
    ],
)
def test_cores_between(
    previous: tuple[int, int] | None, current: tuple[int, int], cores: float | None
) -> None:
    assert cores_between(previous, current) == cores


def test_cpu_percent_of_the_instance_types_vcpu() -> None:
    assert cpu_percent(ContainerUsage("c", 0.25, 1), vcpu=0.5) == 50.0
    assert cpu_percent(ContainerUsage("c", None, 1), vcpu=0.5) is None
    with pytest.raises(ValueError):
        cpu_percent(ContainerUsage("c", 0.25, 1), vcpu=0)

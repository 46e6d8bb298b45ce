"""Per-container CPU and memory use read straight from the kernel's cgroup counters, for the
autoscaler: a few tiny file reads per container, where Docker's stats API blocks a second each."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The key of a cgroup v2 (unified) line in /proc/<pid>/cgroup, "0::/path": it names no controller.
UNIFIED = ""

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# Kernel mount flags that appear among a cgroup v1 mount's super options next to its controllers.
_MOUNT_FLAGS = frozenset(
    {
        "rw",
        "ro",
        "noprefix",
        "clone_children",
        "xattr",
        "cpuset_v2_mode",
        "favordynmods",
        "nofavordynmods",
    }
)


@dataclass(frozen=True)
class ContainerUsage:
    """One container's use: `cpu_cores` is CPU time per wall-clock second since the previous
    sample (0.25 = a quarter of one core), None on the first sample of the container;
    `memory_bytes` is its working set, page cache that the kernel can drop not counted."""

    container_id: str
    cpu_cores: float | None
    memory_bytes: int


def cpu_percent(usage: ContainerUsage, vcpu: float) -> float | None:
    """The container's CPU use in % of its instance type's `vcpu` (100 = all of it)."""
    if vcpu <= 0:
        raise ValueError(f"vcpu must be positive, not {vcpu}")
    if usage.cpu_cores is None:
        return None
    return 100.0 * usage.cpu_cores / vcpu


@dataclass(frozen=True)
class CgroupMount:
    """A cgroup hierarchy as mounted in our mount namespace: `root` is the cgroup path that
    appears at `mount_point` (not "/" when we run in a container of our own)."""

    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: cpu, cpuacct, memory, name=systemd ...; v2: empty
    root: str
    mount_point: str


@dataclass(frozen=True)
class CgroupDirs:
    """Where one container's counters live; v1 and v2 can mix on a hybrid host."""

    cpu: str
    cpu_v2: bool
    memory: str
    memory_v2: bool


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup mounts in /proc/<pid>/mountinfo text, in the file's order."""
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        # "36 25 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu": the
        # optional fields before " - " vary in number, so split there first.
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        head, tail = before.split(), after.split()
        if len(head) < 6 or len(tail) < 3:
            continue
        fstype, super_options = tail[0], tail[2]
        root, mount_point = _unescape(head[3]), _unescape(head[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, frozenset(), root, mount_point))
        elif fstype == "cgroup":
            controllers = frozenset(o for o in super_options.split(",") if o not in _MOUNT_FLAGS)
            mounts.append(CgroupMount(1, controllers, root, mount_point))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup text as controller → cgroup path; the v2 line's key is `UNIFIED`."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hierarchy, controllers, path = parts
        if not controllers:
            paths[UNIFIED] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def _join(mount: CgroupMount, path: str) -> str | None:
    if mount.root == "/":
        relative = path
    elif path == mount.root or path.startswith(mount.root + "/"):
        relative = path[len(mount.root) :]
    else:
        return None  # this mount shows another part of the hierarchy
    return mount.mount_point.rstrip("/") + relative


def _v1_dir(controller: str, paths: Mapping[str, str], mounts: Iterable[CgroupMount]) -> str | None:
    path = paths.get(controller)
    if path is None:
        return None
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers:
            joined = _join(mount, path)
            if joined is not None:
                return joined
    return None


def _v2_dir(paths: Mapping[str, str], mounts: Iterable[CgroupMount]) -> str | None:
    path = paths.get(UNIFIED)
    if path is None:
        return None
    for mount in mounts:
        if mount.version == 2:
            joined = _join(mount, path)
            if joined is not None:
                return joined
    return None


def locate_cgroup_dirs(
    paths: Mapping[str, str], mounts: Sequence[CgroupMount]
) -> CgroupDirs | None:
    """The directories of a process's CPU and memory counters, or None if either is not mounted.

    A v1 controller wins over the unified hierarchy: on a hybrid host (systemd's default on cgroup
    v1) the v2 tree is mounted too, but holds no memory controller.
    """
    unified = _v2_dir(paths, mounts)
    cpu = _v1_dir("cpuacct", paths, mounts)
    memory = _v1_dir("memory", paths, mounts)
    if (cpu is None or memory is None) and unified is None:
        return None
    return CgroupDirs(
        cpu=cpu if cpu is not None else str(unified),
        cpu_v2=cpu is None,
        memory=memory if memory is not None else str(unified),
        memory_v2=memory is None,
    )


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A "key value" per line file such as memory.stat or cpu.stat."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def working_set_bytes(usage: int, memory_stat: Mapping[str, int], v2: bool) -> int:
    """Memory in use minus inactive page cache, as `docker stats` shows it: cache that the
    kernel reclaims before it would OOM-kill the container is not the app's to scale for."""
    inactive = memory_stat.get("inactive_file" if v2 else "total_inactive_file", 0)
    return max(0, usage - inactive)


def cores_between(previous: tuple[int, int] | None, current: tuple[int, int]) -> float | None:
    """CPU cores used between two (cpu time ns, monotonic ns) readings; None without a usable
    previous one (none yet, no time passed, or a counter that went back: a new cgroup)."""
    if previous is None:
        return None
    cpu_ns = current[0] - previous[0]
    wall_ns = current[1] - previous[1]
    if cpu_ns < 0 or wall_ns <= 0:
        return None
    return cpu_ns / wall_ns


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class CgroupSampler:
    """Samples the CPU and memory of containers given by id → main PID (docker inspect's
    `State.Pid`). Keeps each container's counter directories and its last reading between calls;
    not thread-safe: one caller (the agent's stats loop) owns it.

    Costs a few small reads of cgroupfs per container and call (measured ~40 µs each), so it can
    run on the event loop. A container's first sample has `cpu_cores` None.
    """

    def __init__(
        self,
        *,
        proc: str = "/proc",
        mounts: Sequence[CgroupMount] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._proc = proc
        self._mounts = (
            mounts if mounts is not None else parse_mountinfo(_read(f"{proc}/self/mountinfo"))
        )
        self._clock = clock
        self._dirs: dict[str, tuple[int, CgroupDirs]] = {}  # id -> (pid, dirs)
        self._last: dict[str, tuple[int, int]] = {}  # id -> (cpu ns, monotonic ns)
        self._warned = False  # a host whose cgroups are not mounted says so once, not per call

    def sample(self, containers: Mapping[str, int]) -> dict[str, ContainerUsage]:
        """Usage of each container that still runs; the others are left out and forgotten."""
        usage: dict[str, ContainerUsage] = {}
        for container_id, pid in containers.items():
            try:
                dirs = self._dirs_of(container_id, pid)
                if dirs is None:
                    continue
                now = self._clock()
                cpu_ns = self._cpu_ns(dirs)
                memory = self._memory_bytes(dirs)
            except (OSError, ValueError, KeyError) as exc:
                # The container stopped between the caller's listing and now: its process or
                # cgroup is gone. Not a fault; the next listing will not name it.
                log.debug("no cgroup counters for container %s: %s", container_id[:12], exc)
                self._forget(container_id)
                continue
            reading = (cpu_ns, now)
            cores = cores_between(self._last.get(container_id), reading)
            self._last[container_id] = reading
            usage[container_id] = ContainerUsage(container_id, cores, memory)
        for gone in (self._dirs.keys() | self._last.keys()) - usage.keys():
            self._forget(gone)
        return usage

    def cpu_ns(self, container_id: str) -> int | None:
        """The container's cumulative CPU time at its last sample (its cgroup's counter, which
        starts at zero when the container starts); None if it was not sampled."""
        last = self._last.get(container_id)
        return last[0] if last is not None else None

    def _forget(self, container_id: str) -> None:
        self._dirs.pop(container_id, None)
        self._last.pop(container_id, None)

    def _dirs_of(self, container_id: str, pid: int) -> CgroupDirs | None:
        cached = self._dirs.get(container_id)
        if cached is not None and cached[0] == pid:
            return cached[1]
        # A new PID means the container restarted into a new cgroup whose counter starts again
        # from zero: a delta against the old reading would be meaningless.
        self._forget(container_id)
        if pid <= 0:
            return None  # docker inspect says 0 for a container that is not running
        paths = parse_proc_cgroup(_read(f"{self._proc}/{pid}/cgroup"))
        dirs = locate_cgroup_dirs(paths, self._mounts)
        if dirs is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "container %s: its cgroups (%s) are not mounted here", container_id[:12], paths
                )
            return None
        # Docker names its cgroups after the container (/docker/<id>, docker-<id>.scope). A PID
        # that the container's exit freed and another process took would point elsewhere.
        if container_id not in dirs.cpu or container_id not in dirs.memory:
            return None
        self._dirs[container_id] = (pid, dirs)
        return dirs

    @staticmethod
    def _cpu_ns(dirs: CgroupDirs) -> int:
        if dirs.cpu_v2:
            return parse_flat_keyed(_read(f"{dirs.cpu}/cpu.stat"))["usage_usec"] * 1000
        return int(_read(f"{dirs.cpu}/cpuacct.usage"))

    @staticmethod
    def _memory_bytes(dirs: CgroupDirs) -> int:
        usage_file = "memory.current" if dirs.memory_v2 else "memory.usage_in_bytes"
        usage = int(_read(f"{dirs.memory}/{usage_file}"))
        stat = parse_flat_keyed(_read(f"{dirs.memory}/memory.stat"))
        return working_set_bytes(usage, stat, dirs.memory_v2)


__all__ = [
    "UNIFIED",
    "CgroupDirs",
    "CgroupMount",
    "CgroupSampler",
    "ContainerUsage",
    "cores_between",
    "cpu_percent",
    "locate_cgroup_dirs",
    "parse_flat_keyed",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "working_set_bytes",
]

"""The cgroup sampler against real containers: a CPU-limited busy loop measures its quota, an idle
container nothing, and stopped, removed or restarted containers are handled."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import docker
import pytest

from nodeagent.runtime.labels import LABEL_NODE
from nodeagent.stats import CgroupSampler, cpu_percent

pytestmark = pytest.mark.integration

BURN = ["/bin/sh", "-c", "while :; do :; done"]
IDLE = ["/bin/sleep", "3600"]
Start = Callable[..., tuple[str, int]]


@pytest.fixture
def start(docker_client: docker.DockerClient, node_id: str, echo_image: str) -> Start:
    """Run a container of the test image (labelled so node_id's fixture removes it); return its
    id and main PID."""

    def run(entrypoint: list[str], vcpu: float = 0.5) -> tuple[str, int]:
        container = docker_client.containers.run(
            echo_image,
            entrypoint=entrypoint,
            detach=True,
            labels={LABEL_NODE: node_id},
            nano_cpus=int(vcpu * 1e9),
            network_mode="none",
        )
        container.reload()
        return container.id, int(container.attrs["State"]["Pid"])

    return run


def test_a_busy_loop_uses_its_quota_and_an_idle_container_nothing(start: Start) -> None:
    burner, burner_pid = start(BURN, vcpu=0.5)
    idle, idle_pid = start(IDLE)
    sampler = CgroupSampler()
    containers = {burner: burner_pid, idle: idle_pid}

    first = sampler.sample(containers)
    assert set(first) == {burner, idle}
    assert all(u.cpu_cores is None and u.memory_bytes > 0 for u in first.values())

    time.sleep(1.5)
    second = sampler.sample(containers)
    busy = second[burner].cpu_cores
    assert busy is not None and 0.375 <= busy <= 0.625, busy
    quiet = second[idle].cpu_cores
    assert quiet is not None and quiet < 0.05, quiet
    assert second[idle].memory_bytes > 0
    percent = cpu_percent(second[burner], vcpu=0.5)
    assert percent is not None and 75 <= percent <= 125


def test_a_removed_container_disappears(start: Start, docker_client: docker.DockerClient) -> None:
    gone, gone_pid = start(IDLE)
    kept, kept_pid = start(IDLE)
    sampler = CgroupSampler()
    assert set(sampler.sample({gone: gone_pid, kept: kept_pid})) == {gone, kept}

    docker_client.containers.get(gone).remove(force=True)
    # The caller's listing may lag behind: a stale entry is left out, not an error.
    after = sampler.sample({gone: gone_pid, kept: kept_pid})
    assert set(after) == {kept}
    assert after[kept].cpu_cores is not None
    assert sampler.sample({}) == {}


def test_a_restarted_container_starts_over_without_cpu(
    start: Start, docker_client: docker.DockerClient
) -> None:
    container_id, pid = start(IDLE)
    sampler = CgroupSampler()
    sampler.sample({container_id: pid})
    assert sampler.sample({container_id: pid})[container_id].cpu_cores is not None

    container = docker_client.containers.get(container_id)
    container.restart(timeout=0)  # sleep ignores SIGTERM as PID 1: kill it at once
    container.reload()
    new_pid = int(container.attrs["State"]["Pid"])
    assert new_pid != pid
    restarted = sampler.sample({container_id: new_pid})
    assert restarted[container_id].cpu_cores is None
    assert restarted[container_id].memory_bytes > 0


def test_a_pid_outside_the_container_is_not_measured(start: Start) -> None:
    container_id, _pid = start(IDLE)
    # Our own process runs in no cgroup of that container, as a PID reused after the container's
    # exit would not; a stopped container's PID is 0.
    assert CgroupSampler().sample({container_id: os.getpid()}) == {}
    assert CgroupSampler().sample({container_id: 0}) == {}

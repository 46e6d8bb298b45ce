"""The per-instance CPU and memory gauges follow the sampler: set for every running instance,
removed when it stops. Stubs for the manager, the runtime and the cgroup reader (their real
versions are tested against Docker and cgroups in tests/integration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import REGISTRY

from nodeagent.instances import InstanceSnapshot, InstanceState
from nodeagent.pools import UsageSampler
from nodeagent.stats import ContainerUsage


def snap(name: str, state: InstanceState = InstanceState.RUNNING) -> InstanceSnapshot:
    return InstanceSnapshot(
        id="id-" + name,
        name=name,
        class_name="Gauged",
        state=state,
        container_id="c-" + name,
        upstream=None,
        in_flight=0,
        last_activity=0.0,
        exit_code=None,
        vcpu=0.5,
    )


@dataclass
class Info:
    pid: int


class Stubs:
    def __init__(self) -> None:
        self.snaps: list[InstanceSnapshot] = []
        self.cores: float | None = 0.25

    def snapshot(self) -> list[InstanceSnapshot]:
        return self.snaps

    async def inspect(self, container_id: str) -> Info:
        return Info(pid=100)

    def sample(self, containers: dict[str, int]) -> dict[str, ContainerUsage]:
        return {cid: ContainerUsage(cid, self.cores, 64 << 20) for cid in containers}


def value(metric: str, name: str) -> float | None:
    return REGISTRY.get_sample_value(metric, {"class": "Gauged", "instance_name": name})


async def test_gauges_follow_running_instances() -> None:
    stubs = Stubs()
    sampler = UsageSampler(cast(Any, stubs), cast(Any, stubs))
    sampler.sampler = cast(Any, stubs)
    stubs.snaps = [snap("a"), snap("b"), snap("z", InstanceState.STOPPED)]
    await sampler.sample()
    assert value("portside_agent_instance_cpu_ratio", "a") == 0.5  # 0.25 cores of 0.5 vCPU
    assert value("portside_agent_instance_memory_bytes", "b") == 64 << 20
    assert value("portside_agent_instance_memory_bytes", "z") is None

    stubs.snaps = [snap("a"), snap("b", InstanceState.STOPPED)]
    stubs.cores = None  # e.g. a restarted container's first sample: no CPU interval yet
    await sampler.sample()
    assert value("portside_agent_instance_cpu_ratio", "a") is None
    assert value("portside_agent_instance_memory_bytes", "a") == 64 << 20
    assert value("portside_agent_instance_cpu_ratio", "b") is None
    assert value("portside_agent_instance_memory_bytes", "b") is None

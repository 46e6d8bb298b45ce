"""Capacity: what a node offers and what its awake (and paused) instances take, and the one rule
for whether another instance fits. The scheduler, the autoscaler's room count and the agent's own
check on a wake all ask here, so they can never disagree about a full node."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from portside.states import InstanceState

if TYPE_CHECKING:
    from portside.spec import InstanceType

# Sums of fractional vCPUs (0.1 + 0.2) are inexact; without slack an exactly full node could be
# refused or, worse, an over-full one accepted.
VCPU_EPSILON = 1e-6


@dataclass(frozen=True)
class Resources:
    """An amount of vCPU and memory: a node's capacity, a use, or what is left."""

    vcpu: float = 0.0
    memory_mib: int = 0

    @classmethod
    def of(cls, itype: InstanceType) -> Resources:
        return cls(itype.vcpu, itype.memory_mib)

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.vcpu + other.vcpu, self.memory_mib + other.memory_mib)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.vcpu - other.vcpu, self.memory_mib - other.memory_mib)

    def fits(self, need: Resources) -> bool:
        """Whether `need` fits in this much (what is left of a node)."""
        return self.vcpu + VCPU_EPSILON >= need.vcpu and self.memory_mib >= need.memory_mib

    def how_many(self, need: Resources) -> int:
        """How many of `need` fit in this much, side by side."""
        if need.vcpu <= 0 or need.memory_mib <= 0:
            raise ValueError(f"an instance takes some vCPU and memory, not {need}")
        by_cpu = math.floor((self.vcpu + VCPU_EPSILON) / need.vcpu)
        by_memory = self.memory_mib // need.memory_mib
        return max(0, min(by_cpu, by_memory))


def held(state: InstanceState, size: Resources) -> Resources:
    """What an instance of `size` in `state` takes of its node: all of it while awake, only its
    memory while paused (frozen, it uses no CPU but keeps its memory), nothing while it rests."""
    if state.awake:
        return size
    if state is InstanceState.PAUSED:
        return Resources(0.0, size.memory_mib)
    return Resources()


__all__ = ["VCPU_EPSILON", "Resources", "held"]

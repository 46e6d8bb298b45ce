"""Metered use: what an instance (as its agent reports it) or a class (summed per UTC day by the
control plane, read with `portside usage`) used, and what that costs."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Cloudflare Containers' prices, the defaults of `Usage.cost` and `portside usage`.
PRICE_VCPU_SECOND = 0.000020
PRICE_GIB_SECOND = 0.0000025
PRICE_DISK_GB_SECOND = 0.00000007


@dataclass(frozen=True)
class Usage:
    """What `class_name` used on UTC day `day` (YYYY-MM-DD): provisioned vCPU-seconds, GiB-seconds
    of memory and GB-seconds of disk over its running time (metered in 10 ms steps), the CPU its
    containers actually used, and the bytes they sent out (enable_internet classes).
    `instance_id` is set in an agent's report of one instance and empty in a class's total."""

    class_name: str
    day: str
    instance_id: str = ""
    running_ms: int = 0
    vcpu_seconds: float = 0.0
    memory_gib_seconds: float = 0.0
    disk_gb_seconds: float = 0.0
    cpu_seconds_used: float = 0.0
    egress_bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        """These amounts plus `other`'s, under this one's class, day and instance."""
        return replace(
            self,
            running_ms=self.running_ms + other.running_ms,
            vcpu_seconds=self.vcpu_seconds + other.vcpu_seconds,
            memory_gib_seconds=self.memory_gib_seconds + other.memory_gib_seconds,
            disk_gb_seconds=self.disk_gb_seconds + other.disk_gb_seconds,
            cpu_seconds_used=self.cpu_seconds_used + other.cpu_seconds_used,
            egress_bytes=self.egress_bytes + other.egress_bytes,
        )

    def cost(
        self,
        per_vcpu_second: float = PRICE_VCPU_SECOND,
        per_gib_second: float = PRICE_GIB_SECOND,
        per_gb_second_disk: float = PRICE_DISK_GB_SECOND,
    ) -> float:
        """In dollars, at these prices (defaults: Cloudflare Containers')."""
        return (
            self.vcpu_seconds * per_vcpu_second
            + self.memory_gib_seconds * per_gib_second
            + self.disk_gb_seconds * per_gb_second_disk
        )


__all__ = ["PRICE_DISK_GB_SECOND", "PRICE_GIB_SECOND", "PRICE_VCPU_SECOND", "Usage"]

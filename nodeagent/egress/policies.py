"""Who is behind a container address, and what it may reach: the egress proxy's table of this
node's containers (IP -> instance) and each instance's outbound policy (its class's, or its own
from SetOutbound), compiled for `CompiledPolicy.decide`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from portside.outbound import CompiledPolicy
from portside.spec import ContainerClass, OutboundPolicy

if TYPE_CHECKING:  # the runtime imports this module, and the instance manager the runtime
    from nodeagent.instances import InstanceSnapshot

_NOTHING = CompiledPolicy.of(OutboundPolicy())


def lets_out(policy: OutboundPolicy) -> bool:
    """Whether an instance with `policy` may send anything out of its node: such classes run on
    the egress network, every other one on the internal network (no route out)."""
    return policy.enable_internet or bool(policy.allowed_hosts or policy.outbound_by_host)


def class_lets_out(cls: ContainerClass) -> bool:
    return lets_out(OutboundPolicy.of_class(cls))


@dataclass(frozen=True)
class Occupant:
    """The instance whose container holds an address on the egress network."""

    class_name: str
    name: str
    container_id: str


def egress_occupants(
    snapshots: Iterable[InstanceSnapshot], class_named: Callable[[str], ContainerClass | None]
) -> dict[str, Occupant]:
    """Container IP -> instance, for this node's containers that have an address (running or
    paused) and whose class runs on the egress network."""
    found = {}
    for snap in snapshots:
        cls = class_named(snap.class_name)
        if snap.upstream is None or snap.container_id is None or cls is None:
            continue
        if class_lets_out(cls):
            found[snap.upstream.host] = Occupant(snap.class_name, snap.name, snap.container_id)
    return found


class OutboundPolicies:
    """The table the proxy and the DNS responder consult on every connection and question.
    `replace` installs the current occupants (the agent calls it as containers start and stop);
    `set_policy` gives one instance a policy of its own (SetOutbound) or gives it back its
    class's (None). A class that is not deployed (any more) reaches nothing."""

    def __init__(self, class_named: Callable[[str], ContainerClass | None]) -> None:
        self._class_named = class_named
        self._occupants: dict[str, Occupant] = {}
        self._own: dict[tuple[str, str], CompiledPolicy] = {}
        # Class name -> the class it was compiled from, and the result (recompiled when the
        # catalog hands out another class object: a new deploy).
        self._of_class: dict[str, tuple[ContainerClass, CompiledPolicy]] = {}

    def replace(self, occupants: Mapping[str, Occupant]) -> bool:
        """Install `occupants` (IP -> instance); whether the set of addresses changed."""
        changed = occupants.keys() != self._occupants.keys()
        self._occupants = dict(occupants)
        return changed

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(self._occupants)

    def occupants(self) -> dict[str, Occupant]:
        return dict(self._occupants)

    def occupant(self, ip: str) -> Occupant | None:
        return self._occupants.get(ip)

    def set_policy(self, class_name: str, name: str, policy: OutboundPolicy | None) -> None:
        """Instance `name` of `class_name` follows `policy` from its next connection (or DNS
        question) on; None: its class's again. Raises ValueError for a bad host pattern."""
        if policy is None:
            self._own.pop((class_name, name), None)
        else:
            self._own[(class_name, name)] = CompiledPolicy.of(policy)

    def policy_of(self, occupant: Occupant) -> CompiledPolicy:
        own = self._own.get((occupant.class_name, occupant.name))
        if own is not None:
            return own
        cls = self._class_named(occupant.class_name)
        if cls is None:
            return _NOTHING
        cached = self._of_class.get(cls.name)
        if cached is None or cached[0] is not cls:
            cached = (cls, CompiledPolicy.of(OutboundPolicy.of_class(cls)))
            self._of_class[cls.name] = cached
        return cached[1]


__all__ = [
    "Occupant",
    "OutboundPolicies",
    "class_lets_out",
    "egress_occupants",
    "lets_out",
]

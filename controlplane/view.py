"""The control plane's in-memory view of the store: classes, routes, live nodes and placed
instances, loaded once and then kept current by one watch (like a Kubernetes informer)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from controlplane import records
from controlplane.records import InstanceRecord
from controlplane.store import KeyValue, Store, WatchEvent
from portside.spec import Config, ContainerClass, Node, Route

log = logging.getLogger(__name__)


@dataclass
class NodeUse:
    vcpu: float = 0.0
    memory_mib: int = 0
    instances: int = 0


@dataclass
class ClusterView:
    """Readers get consistent-enough snapshots; writers are the watch loop and `note_placed`,
    which applies the control plane's own placement at once so back-to-back placements see it."""

    store: Store
    classes: dict[str, ContainerClass] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)  # store key -> route
    nodes: dict[str, Node] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)  # store key -> record
    node_use: dict[str, NodeUse] = field(default_factory=dict)
    class_count: dict[str, int] = field(default_factory=dict)
    revision: int = 0
    config_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    config_version: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def load(self) -> None:
        kvs, self.revision = await self.store.range(records.ROOT)
        for kv in kvs:
            self._apply(WatchEvent("put", kv))
        self.ready.set()

    async def follow(self) -> None:
        """Apply every change after the loaded revision; runs until cancelled."""
        async for event in self.store.watch(records.ROOT, self.revision + 1):
            config_changed = self._apply(event)
            self.revision = max(self.revision, event.kv.mod_revision)
            if config_changed:
                async with self.config_changed:
                    self.config_version += 1
                    self.config_changed.notify_all()

    def _apply(self, event: WatchEvent) -> bool:
        """Apply one event; True if it changed classes or routes."""
        kv: KeyValue = event.kv
        key, deleted = kv.key, event.type == "delete"
        try:
            if key.startswith(records.CLASSES):
                name = key[len(records.CLASSES) :]
                if deleted:
                    self.classes.pop(name, None)
                else:
                    self.classes[name] = records.decode_class(kv.value)
                return True
            if key.startswith(records.ROUTES):
                if deleted:
                    self.routes.pop(key, None)
                else:
                    self.routes[key] = records.decode_route(kv.value)
                return True
            if key.startswith(records.NODES):
                node_id = key[len(records.NODES) :]
                if deleted:
                    self.nodes.pop(node_id, None)
                else:
                    self.nodes[node_id] = records.decode_node(kv.value)
            elif key.startswith(records.INSTANCES):
                self._set_instance(key, None if deleted else InstanceRecord.decode(kv.value))
        except (ValueError, TypeError, KeyError) as exc:
            # A record this version cannot read must not stop the view; it is skipped loudly.
            log.error("skipping unreadable store key %s: %s", key, exc)
        return False

    def note_placed(self, key: str, record: InstanceRecord) -> None:
        self._set_instance(key, record)

    def _set_instance(self, key: str, record: InstanceRecord | None) -> None:
        # Use per node and count per class are kept incrementally: placement reads them often.
        old = self.instances.pop(key, None)
        if old is not None:
            self._count(old, -1)
        if record is not None:
            self.instances[key] = record
            self._count(record, +1)

    def _count(self, rec: InstanceRecord, sign: int) -> None:
        use = self.node_use.setdefault(rec.node_id, NodeUse())
        use.vcpu += sign * rec.vcpu
        use.memory_mib += sign * rec.memory_mib
        use.instances += sign
        self.class_count[rec.class_name] = self.class_count.get(rec.class_name, 0) + sign

    def config(self) -> Config:
        return Config(
            classes=tuple(self.classes[k] for k in sorted(self.classes)),
            routes=tuple(self.routes[k] for k in sorted(self.routes)),
        )

    def use_of(self, node_id: str) -> NodeUse:
        return self.node_use.get(node_id) or NodeUse()

    def instances_of(self, class_name: str) -> int:
        return self.class_count.get(class_name, 0)

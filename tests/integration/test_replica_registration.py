"""A control-plane replica registers itself for Prometheus discovery under a lease it keeps,
and the view sees it come and go; on the embedded SQLite store (the etcd backend honours the
same contract, see test_store_contract.py)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from controlplane import records
from controlplane.discovery import ReplicaRegistration, targets
from controlplane.store import instrument, open_store
from controlplane.view import ClusterView
from tests.support import eventually

pytestmark = pytest.mark.integration


async def test_a_replica_is_a_target_while_it_runs(tmp_path: Path) -> None:
    store = instrument(await open_store(f"sqlite://{tmp_path / 'state.db'}"))
    view = ClusterView(store)
    await view.load()
    follow = asyncio.create_task(view.follow())
    registration = ReplicaRegistration(
        store, "cp-a", records.Replica("fra", "127.0.0.1:7071"), ttl_s=2
    )
    run = asyncio.create_task(registration.run())
    try:
        await eventually(lambda: "cp-a" in view.replicas, within=5, what="the replica registered")
        assert targets(view) == [
            {
                "targets": ["127.0.0.1:7071"],
                "labels": {
                    "portside_role": "controlplane",
                    "portside_region": "fra",
                    "portside_node": "cp-a",
                },
            }
        ]
        # Time must pass: past the 2 s TTL, the replica is still there only if it renews its lease.
        await asyncio.sleep(3)
        assert "cp-a" in view.replicas
        run.cancel()
        await registration.deregister()
        await eventually(lambda: not view.replicas, within=5, what="the replica deregistered")
    finally:
        for task in (run, follow):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await store.close()

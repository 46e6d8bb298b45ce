"""Class versions in a real store (etcd on loopback, SQLite in a file): replicas deploying the same
change at once make one version; different changes make one each, numbered without gaps."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from controlplane.store import Store, open_store
from controlplane.versions import history, version_class, versions_prefix
from portside.spec import ContainerClass

pytestmark = pytest.mark.integration


@pytest.fixture(params=["etcd", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "etcd":
        return cast(str, request.getfixturevalue("etcd_url"))
    return f"sqlite://{tmp_path / 'state.db'}"


@pytest.fixture
def cls() -> ContainerClass:
    # Its own keys under versions/ in a shared etcd.
    return ContainerClass(name="Versioned" + uuid.uuid4().hex[:8], image="web:1")


@pytest.fixture
async def store(store_url: str, cls: ContainerClass) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    yield opened
    kvs, _ = await opened.range(versions_prefix(cls.name))
    for kv in kvs:
        await opened.delete(kv.key)
    await opened.close()


@contextlib.asynccontextmanager
async def replicas(store_url: str, store: Store, n: int) -> AsyncIterator[list[Store]]:
    """`n` replicas' stores: with etcd, each its own client; the embedded SQLite store serves one
    control plane, so there the same store, called at once."""
    if store_url.startswith("sqlite://"):
        yield [store] * n
        return
    others = [await open_store(store_url) for _ in range(n - 1)]
    try:
        yield [store, *others]
    finally:
        for s in others:
            await s.close()


async def test_a_redeploy_without_changes_keeps_the_version(
    store: Store, cls: ContainerClass
) -> None:
    first, made = await version_class(store, cls)
    assert first.version == 1 and made is not None
    again, made = await version_class(store, dataclasses.replace(cls, sleep_after_s=5.0))
    assert again.version == 1 and made is None
    assert [v.number for v in await history(store, cls.name)] == [1]


async def test_replicas_deploying_the_same_change_at_once_make_one_version(
    store_url: str, store: Store, cls: ContainerClass
) -> None:
    await version_class(store, cls)
    changed = dataclasses.replace(cls, image="web:2")
    async with replicas(store_url, store, 4) as stores:
        results = await asyncio.gather(*(version_class(s, changed) for s in stores))
    assert {c.version for c, _ in results} == {2}
    assert sum(made is not None for _, made in results) == 1
    kept = await history(store, cls.name)
    assert [(v.number, v.spec.image, v.changes) for v in kept] == [
        (1, "web:1", ("new",)),
        (2, "web:2", ("image",)),
    ]


async def test_different_changes_at_once_are_numbered_without_gaps(
    store_url: str, store: Store, cls: ContainerClass
) -> None:
    await version_class(store, cls)
    async with replicas(store_url, store, 3) as stores:
        results = await asyncio.gather(
            *(
                version_class(s, dataclasses.replace(cls, env={"N": str(i)}))
                for i, s in enumerate(stores)
            )
        )
    assert sorted(c.version for c, _ in results) == [2, 3, 4]
    assert [v.number for v in await history(store, cls.name)] == [1, 2, 3, 4]

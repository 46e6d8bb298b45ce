"""EtcdStore refreshes leases over one long-lived LeaseKeepAlive stream (controlplane/store/etcd.py
_KeepAlive): concurrent refreshes of several leases share it and each gets its own answer; when
the stream breaks, every refresh waiting on it fails as a refresh failed before, and the next
refresh opens a new stream."""

from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator

import pytest

from controlplane.store import Store, open_store
from portside.errors import StoreError
from tests.support import eventually

pytestmark = pytest.mark.integration


def keepalive_streams_started(etcd_url: str) -> int:
    """LeaseKeepAlive streams etcd has accepted since it started (its /metrics)."""
    metrics_url = "http://" + etcd_url.removeprefix("etcd://") + "/metrics"
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r'grpc_server_started_total\{grpc_method="LeaseKeepAlive"[^}]*\} (\d+)', text)
    assert found, "etcd's metrics name no LeaseKeepAlive streams"
    return int(found.group(1))


async def test_concurrent_refreshes_of_several_leases_share_one_stream(etcd_url: str) -> None:
    store = await open_store(etcd_url)
    try:
        live = [await store.grant_lease(30) for _ in range(4)]
        revoked = await store.grant_lease(30)
        await store.revoke_lease(revoked)
        short = await store.grant_lease(1)
        key = f"/portside-test/{uuid.uuid4().hex}/short"
        await store.put(key, b"", short)
        before = await asyncio.to_thread(keepalive_streams_started, etcd_url)
        leases = [*live, revoked]
        answers = await asyncio.gather(
            *(store.refresh_lease(leases[i % len(leases)]) for i in range(500))
        )
        started = await asyncio.to_thread(keepalive_streams_started, etcd_url) - before
        assert answers == [leases[i % len(leases)] != revoked for i in range(500)]
        assert started == 1  # 500 refreshes, one stream (aetcd alone opened one each)
        # A lease that ran out (its key gone, unrefreshed) answers False, as one revoked does.
        await eventually(
            lambda: _gone(store, key), within=10, every=0.2, what="the 1 s lease expired"
        )
        assert await store.refresh_lease(short) is False
        assert await store.refresh_lease(live[0]) is True
        for lease in live:
            await store.revoke_lease(lease)
    finally:
        await store.close()


async def _gone(store: Store, key: str) -> bool:
    return await store.get(key) is None


class CuttableLink:
    """A TCP relay on loopback to etcd whose traffic the test can hold and whose connections it
    can cut: a member that stops answering and then goes away."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, held=True),
            self._pipe(up_reader, writer, held=False),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: bool
    ) -> None:
        while data := await reader.read(65536):
            if held:
                await self.flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.close()

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


@pytest.fixture
async def link(etcd_url: str) -> AsyncIterator[CuttableLink]:
    relay = CuttableLink(etcd_url.removeprefix("etcd://"))
    yield relay
    relay.cut()
    relay.server.close()
    await relay.server.wait_closed()


async def test_a_broken_stream_fails_every_waiting_refresh_and_the_next_opens_a_new_one(
    etcd_url: str, link: CuttableLink
) -> None:
    address = await link.start()
    store = await open_store(f"etcd://{address}", timeout_s=5)
    leases: list[int] = []
    try:
        leases = [await store.grant_lease(30) for _ in range(3)]
        assert await store.refresh_lease(leases[0]) is True  # the stream is open
        link.flowing.clear()
        waiting = [asyncio.create_task(store.refresh_lease(leases[i % 3])) for i in range(30)]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in waiting)
        link.cut()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        # What a refresh raised before when its member's connection broke: the member is
        # unreachable (one member: no other to fail over to).
        for lease, outcome in zip([leases[i % 3] for i in range(30)], outcomes, strict=True):
            assert isinstance(outcome, StoreError), outcome
            assert str(outcome).startswith(
                f"etcd at {address} is unreachable (refresh lease {lease:x})"
            ), outcome
        link.flowing.set()

        async def refreshed() -> bool:
            try:
                return await store.refresh_lease(leases[1])
            except StoreError:
                return False  # the channel reconnects within a second

        await eventually(refreshed, within=10, every=0.1, what="a refresh on a new stream")
    finally:
        await store.close()
        cleaner = await open_store(etcd_url)
        for lease in leases:
            await cleaner.revoke_lease(lease)
        await cleaner.close()

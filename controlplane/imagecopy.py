"""Every replica holds every image: one that sees (on the store watch) an image it lacks copies
it from a replica that holds it, in the background, one at a time, with backoff.

A pull of an image this replica lacks waits for the same copy (`ReplicaCopier.copy`), so an
agent never needs to know which replica holds what. The copy is PullImage on the holder, with
this replica's certificate (role controlplane) on its cluster port, or plaintext --insecure;
it is taken in as a push is (verified against its digest), the layers this replica has left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane.imagecatalog import ImageCatalog, region_code
from controlplane.images import ImageStore, StoredImage
from controlplane.metrics import (
    IMAGE_COPIED_BYTES,
    IMAGE_COPIES,
    IMAGE_COPY_SECONDS,
    IMAGES_HELD,
)
from controlplane.records import ImageRecord, Replica
from controlplane.view import ClusterView
from portside import net
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import InvalidArgument, NotFound, PortsideError, Unavailable
from portside.imagepull import pull_image

log = logging.getLogger(__name__)

# Copies that failed are tried again after 5 s, 10 s, 20 s … at most 5 minutes.
RETRY_FIRST_S = 5.0
RETRY_MOST_S = 300.0
# The holder reads a layer from its disk while it streams: a stream silent this long stalled.
COPY_STALL_S = 60.0


# -- pure parts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """The copies of one image that failed in a row, and when to try again."""

    count: int
    retry_at: float


def after_failure(previous: Failure | None, now: float) -> Failure:
    count = (previous.count if previous is not None else 0) + 1
    return Failure(count, now + min(RETRY_MOST_S, RETRY_FIRST_S * 2 ** (count - 1)))


def copies_wanted(images: Mapping[str, ImageRecord], replica_id: str) -> list[str]:
    """The images another replica holds and this one does not, the latest pushed first (the
    likeliest to be pulled soon)."""
    wanted = [r for r in images.values() if r.replicas and replica_id not in r.replicas]
    return [r.digest for r in sorted(wanted, key=lambda r: (-r.pushed_at, r.digest))]


def next_copy(
    wanted: Sequence[str], failures: Mapping[str, Failure], running: Collection[str], now: float
) -> str | None:
    """The first wanted image not being copied now whose backoff (if it failed) has passed."""
    for digest in wanted:
        failed = failures.get(digest)
        if digest not in running and (failed is None or failed.retry_at <= now):
            return digest
    return None


def next_retry(wanted: Sequence[str], failures: Mapping[str, Failure]) -> float | None:
    """When the earliest backoff of a wanted image ends (None: none is waiting)."""
    times = [failures[d].retry_at for d in wanted if d in failures]
    return min(times) if times else None


def copy_sources(
    record: ImageRecord, replicas: Mapping[str, Replica], replica_id: str, region: str
) -> list[tuple[str, str]]:
    """(replica id, gRPC address) of each registered holder of the image but this replica,
    those in `region` first, then by id. A holder not registered (stopped), or registered
    without an address (an older version), cannot be copied from."""
    out = []
    for holder in record.replicas:
        replica = replicas.get(holder)
        if holder != replica_id and replica is not None and replica.address:
            out.append((region_code(replica.region) != region, holder, replica.address))
    return [(holder, address) for _, holder, address in sorted(out)]


# -- the copier -------------------------------------------------------------------------------


class ReplicaCopier:
    """Copies images to this replica's store from the replicas that hold them. `tls`: this
    replica's client identity toward other replicas (None: --insecure, plaintext)."""

    def __init__(
        self,
        images: ImageStore,
        catalog: ImageCatalog,
        view: ClusterView,
        *,
        region: str,
        tls: net.ClientTls | None,
        stall_s: float = COPY_STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.images, self.catalog, self.view = images, catalog, view
        self.region = region_code(region)
        self.tls = tls
        self.stall_s = stall_s
        self.clock = clock
        self.failures: dict[str, Failure] = {}
        self._copies: dict[str, asyncio.Task[StoredImage]] = {}
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}

    @property
    def replica_id(self) -> str:
        return self.catalog.replica_id

    def copying(self) -> frozenset[str]:
        return frozenset(self._copies)

    def copy(self, digest: str) -> asyncio.Future[StoredImage]:
        """Wait for the copy of `digest`, starting it unless one runs. Shielded: a pull that
        gives up (its caller went away) leaves it running for the next."""
        task = self._copies.get(digest)
        if task is None:
            task = asyncio.create_task(self._copy(digest), name=f"copy image {digest}")
            self._copies[digest] = task
            task.add_done_callback(functools.partial(self._copied, digest))
        return asyncio.shield(task)

    def _copied(self, digest: str, task: asyncio.Task[StoredImage]) -> None:
        if self._copies.get(digest) is task:
            del self._copies[digest]
        if task.cancelled():
            return
        if task.exception() is None:
            self.failures.pop(digest, None)
        else:
            self.failures[digest] = after_failure(self.failures.get(digest), self.clock())
        self.catalog.changed.set()  # the loop looks again (the next copy, or a backoff)

    async def _copy(self, digest: str) -> StoredImage:
        started = self.clock()
        outcome = "failed"
        try:
            image, outcome = await self._copy_from_holders(digest)
            return image
        except InvalidArgument:
            outcome = "refused"
            raise
        finally:
            IMAGE_COPIES.labels(outcome).inc()
            if outcome == "copied":
                IMAGE_COPY_SECONDS.observe(self.clock() - started)

    async def _copy_from_holders(self, digest: str) -> tuple[StoredImage, str]:
        held = await self.images.stored(digest)
        if held is not None:  # taken in by a push meanwhile: only the record was behind
            await self.catalog.note_held(held, create=False)
            return held, "held"
        record = self.catalog.images.get(digest)
        if record is None:
            raise NotFound(f"image {digest} is in no replica's image store (no record of it)")
        sources = copy_sources(record, self.view.replicas, self.replica_id, self.region)
        if not sources:
            raise Unavailable(
                f"image {digest} is held by replica {', '.join(record.replicas) or 'none'}, "
                "none of them registered with an address to copy it from"
            )
        reasons = []
        for holder, address in sources:
            try:
                return await self._copy_from(digest, record, holder, address), "copied"
            except InvalidArgument:
                raise  # what the holder sent does not match the digest: said, not hidden
            except PortsideError as exc:
                log.warning("could not copy image %s from replica %s: %s", digest, holder, exc)
                reasons.append(f"replica {holder}: {exc}")
        raise Unavailable(f"could not copy image {digest}: {'; '.join(reasons)}")

    async def _copy_from(
        self, digest: str, record: ImageRecord, holder: str, address: str
    ) -> StoredImage:
        have = await self.images.chain_ids()
        log.info(
            "copying image %s from replica %s (%s), %d layer chains here",
            digest,
            holder,
            address,
            len(have),
        )
        # Closed however the ingest ends, so a refused copy does not leave the holder's stream open.
        async with contextlib.aclosing(self._pull(address, holder, digest, have)) as archive:
            ingested = await self.images.ingest(digest, record.reference, archive)
        IMAGE_COPIED_BYTES.inc(ingested.stored_bytes)
        if await self.catalog.note_held(ingested.image, create=False) is None:
            # Collected while it was copied: the record is gone, so the copy goes too.
            await self.images.remove([digest])
            raise NotFound(f"image {digest} was garbage-collected while it was copied")
        IMAGES_HELD.set(len(await self.images.held()))
        log.info(
            "copied image %s from replica %s: %d bytes, %d new",
            digest,
            holder,
            ingested.image.size_bytes,
            ingested.stored_bytes,
        )
        return ingested.image

    def _stub(self, address: str) -> Any:
        target = (
            address if self.tls is None else net.with_port_offset(address, net.CLUSTER_PORT_OFFSET)
        )
        cached = self._channels.get(target)
        if cached is None:
            channel = net.grpc_channel(target, tls=self.tls)
            cached = (channel, cp_grpc.ControlPlaneStub(channel))
            self._channels[target] = cached
        return cached[1]

    def _pull(
        self, address: str, holder: str, digest: str, have: Sequence[str]
    ) -> AsyncGenerator[bytes, None]:
        name = f"replica {holder} ({address})"
        return pull_image(self._stub(address), digest, have, name=name, stall_s=self.stall_s)

    async def run(self) -> None:
        """Until cancelled: copy the images other replicas hold and this one lacks, one at a
        time, the latest first, each failed one again after its backoff."""
        await self.catalog.loaded.wait()
        while True:
            self.catalog.changed.clear()
            wanted = copies_wanted(self.catalog.images, self.replica_id)
            for gone in set(self.failures) - set(wanted):
                del self.failures[gone]
            digest = next_copy(wanted, self.failures, (), self.clock())
            if digest is not None:
                try:
                    await self.copy(digest)
                except (PortsideError, OSError) as exc:  # a full disk too: tried again later
                    failure = self.failures.get(digest)
                    log.warning(
                        "copy of image %s failed (%d in a row; next try in %.0fs): %s",
                        digest,
                        failure.count if failure else 1,
                        (failure.retry_at - self.clock()) if failure else RETRY_FIRST_S,
                        exc,
                    )
                continue
            retry = next_retry(wanted, self.failures)
            timeout = None if retry is None else max(0.0, retry - self.clock())
            try:
                await asyncio.wait_for(self.catalog.changed.wait(), timeout)
            except TimeoutError:
                pass

    async def close(self) -> None:
        """Cancel the copies in progress and close the channels (a replica that stops)."""
        tasks = list(self._copies.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()

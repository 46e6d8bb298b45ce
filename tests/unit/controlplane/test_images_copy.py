"""The bookkeeping of copies between replicas: what to copy next and from whom (pure choices,
table-driven), backoff, and one shared copy per digest for the background and pulls alike.
No store and no network: the transfer itself is replaced."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from controlplane.imagecatalog import ImageCatalog
from controlplane.imagecopy import (
    RETRY_FIRST_S,
    RETRY_MOST_S,
    Failure,
    ReplicaCopier,
    after_failure,
    copies_wanted,
    copy_sources,
    next_copy,
    next_retry,
)
from controlplane.images import StoredImage
from controlplane.records import ImageRecord, Replica
from controlplane.view import ClusterView
from portside.errors import Unavailable


def d(n: int) -> str:
    return f"sha256:{n:064x}"


def rec(n: int, replicas: tuple[str, ...], pushed_at: float = 0.0) -> ImageRecord:
    return ImageRecord(d(n), "", 1, pushed_at, replicas)


def test_copies_wanted_are_images_held_elsewhere_only_latest_first() -> None:
    images = {
        d(1): rec(1, ("r2",), pushed_at=10),
        d(2): rec(2, ("r1", "r2"), pushed_at=30),  # held here already
        d(3): rec(3, (), pushed_at=40),  # held nowhere: nothing to copy from
        d(4): rec(4, ("r3",), pushed_at=20),
    }
    assert copies_wanted(images, "r1") == [d(4), d(1)]


@pytest.mark.parametrize(
    ("failures", "running", "now", "want"),
    [
        ({}, set(), 0.0, d(1)),
        ({d(1): Failure(1, 5.0)}, set(), 0.0, d(2)),  # d(1) backs off
        ({d(1): Failure(1, 5.0)}, set(), 5.0, d(1)),  # its backoff has passed
        ({}, {d(1)}, 0.0, d(2)),  # already being copied (for a pull)
        ({d(1): Failure(1, 5.0), d(2): Failure(2, 9.0)}, set(), 1.0, None),
    ],
)
def test_next_copy(
    failures: dict[str, Failure], running: set[str], now: float, want: str | None
) -> None:
    assert next_copy([d(1), d(2)], failures, running, now) == want


def test_next_retry_is_the_earliest_backoff_of_a_wanted_image() -> None:
    failures = {d(1): Failure(1, 9.0), d(2): Failure(1, 4.0), d(3): Failure(1, 1.0)}
    assert next_retry([d(1), d(2)], failures) == 4.0
    assert next_retry([d(4)], failures) is None


def test_backoff_doubles_up_to_five_minutes() -> None:
    f = None
    delays = []
    for _ in range(9):
        f = after_failure(f, 100.0)
        delays.append(f.retry_at - 100.0)
    assert delays[:3] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 4 * RETRY_FIRST_S]
    assert delays[-1] == RETRY_MOST_S and f is not None and f.count == 9


def test_sources_are_registered_holders_with_an_address_nearest_first() -> None:
    replicas = {
        "r1": Replica("fra", "m", "127.0.0.11:7070"),
        "r2": Replica("iad", "m", "127.0.0.12:7070"),
        "r3": Replica("FRA", "m", "127.0.0.13:7070"),
        "r4": Replica("fra", "m", ""),  # an older replica: no address to call
    }
    record = rec(1, ("r1", "r2", "r3", "r4", "r5"))  # r5 is not registered (stopped)
    assert copy_sources(record, replicas, "r1", "fra") == [
        ("r3", "127.0.0.13:7070"),
        ("r2", "127.0.0.12:7070"),
    ]


# --- one copy per digest, shared ---


class Copier(ReplicaCopier):
    """A copier whose transfer waits for the test to let it finish."""

    def __init__(self) -> None:
        view = ClusterView(store=cast(Any, None))
        catalog = ImageCatalog(store=cast(Any, None), view=view, replica_id="r1")
        self.now = 100.0
        super().__init__(
            cast(Any, None), catalog, view, region="fra", tls=None, clock=lambda: self.now
        )
        self.started = 0
        self.outcome: asyncio.Future[StoredImage] | None = None

    async def _copy_from_holders(self, digest: str) -> tuple[StoredImage, str]:
        self.started += 1
        self.outcome = asyncio.get_running_loop().create_future()
        return await self.outcome, "copied"


def stored(n: int) -> StoredImage:
    return StoredImage(d(n), "", (), (), 1, 0.0)


async def test_a_pull_and_the_background_share_one_copy_that_outlives_a_waiter() -> None:
    copier = Copier()
    first = copier.copy(d(1))
    second = copier.copy(d(1))
    await asyncio.sleep(0)
    assert copier.started == 1 and copier.copying() == {d(1)}
    first.cancel()  # a pull whose agent went away
    await asyncio.sleep(0)
    assert copier.copying() == {d(1)}
    assert copier.outcome is not None
    copier.outcome.set_result(stored(1))
    assert await second == stored(1)
    await asyncio.sleep(0)
    assert copier.copying() == frozenset() and copier.failures == {}
    assert copier.catalog.changed.is_set()  # the loop looks for the next


async def test_a_failed_copy_backs_off_and_a_later_success_clears_it() -> None:
    copier = Copier()
    waiting = copier.copy(d(1))
    await asyncio.sleep(0)
    assert copier.outcome is not None
    copier.outcome.set_exception(Unavailable("replica r2 is unreachable"))
    with pytest.raises(Unavailable):
        await waiting
    assert copier.failures == {d(1): Failure(1, 100.0 + RETRY_FIRST_S)}
    again = copier.copy(d(1))  # a pull does not wait for the backoff
    await asyncio.sleep(0)
    assert copier.started == 2 and copier.outcome is not None
    copier.outcome.set_exception(Unavailable("still"))
    with pytest.raises(Unavailable):
        await again
    assert copier.failures[d(1)].count == 2
    ok = copier.copy(d(1))
    await asyncio.sleep(0)
    copier.outcome.set_result(stored(1))
    await ok
    assert copier.failures == {}

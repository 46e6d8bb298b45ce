"""The control plane's state store: one contract, backends chosen by the URL's scheme.

`etcd://host:port[,host:port...]` for a cluster (`etcd+https://` over TLS, with the files of a
StoreTls), `sqlite:///absolute/path.db` for one machine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from portside.errors import ConfigError

from . import etcd, quorum, sqlite
from ._base import (
    MAX_SWAPS,
    Compacted,
    KeyValue,
    LeaseNotFound,
    Put,
    Store,
    Swap,
    Swapped,
    WatchEvent,
)
from ._tls import NO_TLS, StoreTls
from .instrumented import InstrumentedStore, instrument

__all__ = [
    "MAX_SWAPS",
    "Compacted",
    "LeaseNotFound",
    "InstrumentedStore",
    "KeyValue",
    "Put",
    "Store",
    "StoreTls",
    "Swap",
    "Swapped",
    "WatchEvent",
    "instrument",
    "open_store",
    "quorum_probe",
]


async def _open_sqlite(url: str, timeout_s: float, tls: StoreTls) -> Store:
    return await sqlite.open_url(url, timeout_s)  # no network, so no TLS: open_store checked


BACKENDS: dict[str, Callable[[str, float, StoreTls], Awaitable[Store]]] = {
    "etcd": etcd.open_url,
    "etcd+https": etcd.open_url,
    "sqlite": _open_sqlite,
}
"""URL scheme -> opener(url, timeout_s, tls); each opener validates its URL before any I/O."""


async def open_store(url: str, *, timeout_s: float = 5.0, tls: StoreTls = NO_TLS) -> Store:
    """A connected store for `url`; `timeout_s` is the deadline of each network call, `tls` the
    files of an `etcd+https://` store.

    Raises ConfigError, naming the flag, for an unknown scheme, a malformed URL or TLS files that
    do not fit it; StoreError if it cannot connect.
    """
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigError("--store", url, "expected a URL such as " + _examples())
    opener = BACKENDS.get(scheme)
    if opener is None:
        raise ConfigError(
            "--store", url, f"unknown scheme {scheme!r}: the known ones are " + _examples()
        )
    tls.check(url)
    return await opener(url, timeout_s, tls)


def _examples() -> str:
    return (
        "etcd://127.0.0.1:2379, etcd+https://10.0.0.5:2379 or sqlite:///var/lib/portside/state.db"
    )


def quorum_probe(url: str, tls: StoreTls = NO_TLS) -> Callable[[], Awaitable[bool]] | None:
    """For an etcd store: a check of whether its cluster provably has no quorum (see
    controlplane/store/quorum.py). None for a store without one (SQLite never loses it)."""
    scheme = url.partition("://")[0]
    if scheme not in ("etcd", "etcd+https"):
        return None
    credentials = tls.channel_credentials() if scheme == "etcd+https" else None
    return quorum.quorum_probe(etcd.parse_etcd_url(url), credentials)

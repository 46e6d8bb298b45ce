"""The control plane's state store: one contract, backends chosen by the URL's scheme.

`etcd://host:port[,host:port...]` for a cluster, `sqlite:///absolute/path.db` for one machine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from portside.errors import ConfigError

from . import etcd, sqlite
from ._base import Compacted, KeyValue, Store, WatchEvent
from .instrumented import InstrumentedStore, instrument

__all__ = [
    "Compacted",
    "InstrumentedStore",
    "KeyValue",
    "Store",
    "WatchEvent",
    "instrument",
    "open_store",
]

BACKENDS: dict[str, Callable[[str, float], Awaitable[Store]]] = {
    "etcd": etcd.open_url,
    "sqlite": sqlite.open_url,
}
"""URL scheme -> opener(url, timeout_s); each opener validates its URL before any I/O."""


async def open_store(url: str, *, timeout_s: float = 5.0) -> Store:
    """A connected store for `url`; `timeout_s` is the deadline of each network call.

    Raises ConfigError for an unknown scheme or a malformed URL, StoreError if it cannot connect.
    """
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigError("--store", url, "expected a URL such as " + _examples())
    opener = BACKENDS.get(scheme)
    if opener is None:
        raise ConfigError(
            "--store", url, f"unknown scheme {scheme!r}: the known ones are " + _examples()
        )
    return await opener(url, timeout_s)


def _examples() -> str:
    return "etcd://127.0.0.1:2379 or sqlite:///var/lib/portside/state.db"

"""The store embedded in one control-plane process, over SQLite: for a single machine.

As k3s's kine does: a table of keys, one revision counter, and an event log that watches replay.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from portside.errors import ConfigError, StoreError

from ._base import Compacted, KeyValue, LeaseNotFound, Put, Swap, Swapped, WatchEvent, check_swaps

log = logging.getLogger(__name__)

MEMORY = ":memory:"
DEFAULT_HISTORY = 10_000
"""Revisions of events kept for watches from the past; older ones are compacted away."""
EXPIRY_INTERVAL_S = 0.5
_WATCH_BATCH = 1000

# Every sqlite call runs directly on the event loop. They are local and short (WAL with
# synchronous=NORMAL fsyncs only at checkpoints), and with one thread every read-check-write
# below is atomic without a lock; a worker thread would buy little and cost that.
_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compact_revision', 0);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision INTEGER NOT NULL,
    type TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    lease INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_revision ON events (revision);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_s INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
COMMIT;
"""


def parse_sqlite_url(url: str) -> str:
    """`sqlite:///absolute/path.db` as the path; `sqlite://:memory:` as ":memory:"."""
    scheme, sep, rest = url.partition("://")
    if scheme != "sqlite" or not sep:
        raise ConfigError("--store", url, "a SQLite URL starts with sqlite://")
    if rest == MEMORY:
        return MEMORY
    if not rest.startswith("/"):
        raise ConfigError(
            "--store", url, "the path must be absolute: sqlite:///absolute/path.db (three slashes)"
        )
    if any(c in rest for c in "?#"):
        raise ConfigError("--store", url, "options are not supported in a SQLite URL")
    if rest.endswith("/"):
        raise ConfigError("--store", url, "the path names a directory, not a database file")
    return rest


async def open_url(url: str, timeout_s: float) -> SqliteStore:
    """Open the file of `url`; `timeout_s` is unused, as nothing here waits on a network."""
    return await SqliteStore.open(parse_sqlite_url(url))


def _prefix_bounds(prefix: str) -> tuple[bytes, bytes | None]:
    if not prefix:
        return b"", None
    key = prefix.encode()
    # UTF-8 never contains 0xff, so the last byte can always be bumped.
    return key, key[:-1] + bytes([key[-1] + 1])


def _key_value(row: Any) -> KeyValue:
    key, value, create_revision, mod_revision, lease = row
    return KeyValue(key.decode(), bytes(value), int(create_revision), int(mod_revision), int(lease))


class _Txn:
    """One write transaction; every change in it shares one new revision, as in etcd."""

    def __init__(self, db: sqlite3.Connection, current_revision: int) -> None:
        self.db = db
        self._current = current_revision
        self.revision: int | None = None

    def bump(self) -> int:
        if self.revision is None:
            self.revision = self._current + 1
            self.db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (self.revision,))
        return self.revision

    def log(self, kind: str, key: bytes, value: bytes, create_revision: int, lease: int) -> int:
        revision = self.bump()
        self.db.execute(
            "INSERT INTO events (revision, type, key, value, create_revision, lease)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (revision, kind, key, value, create_revision, lease),
        )
        return revision


class SqliteStore:
    """The Store contract over one SQLite file, owned by one process."""

    def __init__(self, db: sqlite3.Connection, path: str, history: int) -> None:
        self._db = db
        self.path = path
        self._history = history
        self._revision = 0
        self._compact_revision = 0
        # Replaced after every commit: watchers wait on the one they saw before reading.
        self._wakeup = asyncio.Event()
        self._closed = False
        self._open_watches = 0
        self._expirer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str, *, history: int = DEFAULT_HISTORY) -> SqliteStore:
        """Open (or create) the database and start expiring leases in the background."""
        if history < 1:
            raise ValueError(f"history must be at least 1 revision, not {history}")
        try:
            db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: open {path}: {exc}") from exc
        try:
            # One process owns the file: revisions and lease timers live in its memory, and
            # watchers elsewhere would never be woken. EXCLUSIVE locking makes a second opener
            # fail at once (busy_timeout 0) instead of quietly sharing the file.
            db.execute("PRAGMA busy_timeout = 0")
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
            store = cls(db, path, history)
            store._load()
        except sqlite3.Error as exc:
            db.close()
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_BUSY":
                raise StoreError(f"sqlite: {path} is in use by another process") from exc
            raise StoreError(f"sqlite: open {path}: {exc}") from exc
        store._expirer = asyncio.create_task(store._expire_forever(), name=f"lease expiry {path}")
        return store

    def _load(self) -> None:
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        self._revision = int(meta["revision"])
        self._compact_revision = int(meta["compact_revision"])
        # expires_at is on this process's monotonic clock, so a reopen starts every lease's
        # TTL afresh, as etcd does on a new leader: a restart must not expire every lease.
        self._db.execute("UPDATE leases SET expires_at = ? + ttl_s", (time.monotonic(),))

    @property
    def watch_count(self) -> int:
        """Watches open on this store, for metrics and tests."""
        return self._open_watches

    @contextmanager
    def _write(self, what: str) -> Iterator[_Txn]:
        """A write transaction; its revision is published, and watchers woken, on commit."""
        self._check_open(what)
        txn = _Txn(self._db, self._revision)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield txn
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {what}: {exc}") from exc
        if txn.revision is not None:
            self._revision = txn.revision
            self._wake_watchers()

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        self._check_open(what)
        try:
            yield self._db
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {what}: {exc}") from exc

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StoreError(f"sqlite: {what}: the store is closed")

    def _wake_watchers(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def get(self, key: str) -> KeyValue | None:
        with self._read(f"get {key!r}") as db:
            row = db.execute(
                "SELECT key, value, create_revision, mod_revision, lease FROM kv WHERE key = ?",
                (key.encode(),),
            ).fetchone()
        return None if row is None else _key_value(row)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        low, high = _prefix_bounds(prefix)
        with self._read(f"range {prefix!r}") as db:
            rows = db.execute(
                "SELECT key, value, create_revision, mod_revision, lease FROM kv"
                " WHERE key >= :low AND (:high IS NULL OR key < :high) ORDER BY key",
                {"low": low, "high": high},
            ).fetchall()
        return [_key_value(row) for row in rows], self._revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        with self._write(f"put {key!r}") as txn:
            revision = self._put(txn, key, value, lease)
        return revision

    async def delete(self, key: str) -> bool:
        with self._write(f"delete {key!r}") as txn:
            existed = self._delete(txn, key.encode())
        return existed

    async def compare_and_swap(
        self,
        key: str,
        mod_revision: int,
        value: bytes | None,
        lease: int = 0,
        *,
        absent: str = "",
        unchanged: tuple[str, int] | None = None,
    ) -> bool:
        with self._write(f"compare-and-swap {key!r}") as txn:
            if not self._holds(txn, key, mod_revision, absent):
                return False
            if unchanged is not None:
                other = txn.db.execute(
                    "SELECT mod_revision FROM kv WHERE key = ?", (unchanged[0].encode(),)
                ).fetchone()
                if (0 if other is None else int(other[0])) != unchanged[1]:
                    return False
            if value is None:
                self._delete(txn, key.encode())
            else:
                self._put(txn, key, value, lease)
        return True

    @staticmethod
    def _holds(txn: _Txn, key: str, mod_revision: int, absent: str) -> bool:
        """Whether `key` is at `mod_revision` (0: absent) and the key `absent` (if any) is not."""
        found = txn.db.execute("SELECT mod_revision FROM kv WHERE key = ?", (key.encode(),))
        row = found.fetchone()
        if (0 if row is None else int(row[0])) != mod_revision:
            return False
        return not (
            absent
            and txn.db.execute("SELECT 1 FROM kv WHERE key = ?", (absent.encode(),)).fetchone()
        )

    async def swap_all(self, swaps: Sequence[Swap]) -> list[Swapped]:
        check_swaps(swaps)
        out = []
        with self._write(f"swap {len(swaps)} keys") as txn:
            for swap in swaps:
                if not self._holds(txn, swap.key, swap.mod_revision, swap.absent):
                    out.append(Swapped(False))
                    continue
                for put in (Put(swap.key, swap.value, swap.lease), *swap.also):
                    self._put(txn, put.key, put.value, put.lease)
                read = None
                if swap.read:
                    row = txn.db.execute(
                        "SELECT key, value, create_revision, mod_revision, lease FROM kv"
                        " WHERE key = ?",
                        (swap.read.encode(),),
                    ).fetchone()
                    read = None if row is None else _key_value(row)
                out.append(Swapped(True, read))
        return out

    def _put(self, txn: _Txn, key: str, value: bytes, lease: int) -> int:
        raw = key.encode()
        known = txn.db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone()
        if lease and known is None:
            raise LeaseNotFound(f"sqlite: put {key!r}: lease {lease} not found")
        found = txn.db.execute("SELECT create_revision FROM kv WHERE key = ?", (raw,)).fetchone()
        revision = txn.bump()
        create_revision = revision if found is None else int(found[0])
        txn.db.execute(
            "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
            (raw, value, create_revision, revision, lease),
        )
        txn.log("put", raw, value, create_revision, lease)
        return revision

    def _delete(self, txn: _Txn, raw: bytes) -> bool:
        if txn.db.execute("DELETE FROM kv WHERE key = ?", (raw,)).rowcount == 0:
            return False
        txn.log("delete", raw, b"", 0, 0)
        return True

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        what = f"watch {prefix!r}"
        low, high = _prefix_bounds(prefix)
        start = start_revision or self._revision + 1
        with self._read(what) as db:
            # Event ids grow with revisions: resume after the last event before `start`.
            (after_id,) = db.execute(
                "SELECT COALESCE(MAX(id), 0) FROM events WHERE revision < ?", (start,)
            ).fetchone()
        # Every event up to this revision has been delivered or did not match the prefix.
        covered = start - 1
        self._open_watches += 1
        try:
            while True:
                if self._closed:
                    raise StoreError(f"sqlite: {what} ended: the store was closed")
                if covered + 1 < self._compact_revision:
                    raise Compacted(
                        f"sqlite: {what}: revision {covered + 1} has been compacted"
                        f" (history starts at {self._compact_revision})"
                    )
                wakeup = self._wakeup  # taken before reading, so no later write goes unnoticed
                with self._read(what) as db:
                    rows = db.execute(
                        "SELECT id, revision, type, key, value, create_revision, lease FROM events"
                        " WHERE id > :after AND key >= :low AND (:high IS NULL OR key < :high)"
                        " ORDER BY id LIMIT :batch",
                        {"after": after_id, "low": low, "high": high, "batch": _WATCH_BATCH},
                    ).fetchall()
                    last = db.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0
                if len(rows) == _WATCH_BATCH:
                    # The batch may end inside a revision: the rest of it is still owed.
                    after_id, covered = rows[-1][0], rows[-1][1] - 1
                else:
                    after_id, covered = max(after_id, last), max(covered, self._revision)
                for _, revision, kind, key, value, create_revision, lease in rows:
                    kv = KeyValue(key.decode(), bytes(value), create_revision, revision, lease)
                    yield WatchEvent("put" if kind == "put" else "delete", kv)
                if len(rows) < _WATCH_BATCH:
                    await wakeup.wait()
        finally:
            self._open_watches -= 1

    async def grant_lease(self, ttl_s: int) -> int:
        if ttl_s < 1:
            raise ValueError(f"lease TTL must be at least 1 s, not {ttl_s}")
        with self._write("grant lease") as txn:
            cursor = txn.db.execute(
                "INSERT INTO leases (ttl_s, expires_at) VALUES (?, ?)",
                (ttl_s, time.monotonic() + ttl_s),
            )
        return int(cursor.lastrowid or 0)

    async def refresh_lease(self, lease: int) -> bool:
        now = time.monotonic()
        with self._write(f"refresh lease {lease}") as txn:
            # A lease past its time but not yet collected is expired all the same, as in etcd.
            cursor = txn.db.execute(
                "UPDATE leases SET expires_at = ? + ttl_s WHERE id = ? AND expires_at > ?",
                (now, lease, now),
            )
        return cursor.rowcount == 1

    async def revoke_lease(self, lease: int) -> None:
        with self._write(f"revoke lease {lease}") as txn:
            self._revoke(txn, lease)

    def _revoke(self, txn: _Txn, lease: int) -> None:
        keys = txn.db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))
        for (raw,) in keys.fetchall():
            self._delete(txn, raw)
        txn.db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            try:
                self._expire_leases()
                if self._revision - self._history > self._compact_revision:
                    self._compact(self._revision - self._history)
            except Exception:
                # A full disk or a bug: keep trying, as leases must still expire afterwards.
                log.exception("sqlite store %s: lease expiry or compaction failed", self.path)

    def _expire_leases(self) -> None:
        with self._read("expire leases") as db:
            expired = db.execute(
                "SELECT id FROM leases WHERE expires_at <= ?", (time.monotonic(),)
            ).fetchall()
        for (lease,) in expired:
            # One revision per lease, as etcd revokes each expired lease on its own.
            with self._write(f"expire lease {lease}") as txn:
                self._revoke(txn, lease)

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; watches from earlier revisions then fail."""
        if revision > self._revision:
            raise StoreError(f"sqlite: compact to {revision}: beyond revision {self._revision}")
        self._compact(revision)

    def _compact(self, revision: int) -> None:
        if revision <= self._compact_revision:
            return
        with self._write(f"compact to {revision}") as txn:
            txn.db.execute("DELETE FROM events WHERE revision < ?", (revision,))
            txn.db.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (revision,))
        self._compact_revision = revision

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._expirer is not None:
            self._expirer.cancel()
            try:
                await self._expirer
            except asyncio.CancelledError:
                pass
        self._wake_watchers()  # they find the store closed and raise StoreError
        try:
            self._db.close()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: close {self.path}: {exc}") from exc

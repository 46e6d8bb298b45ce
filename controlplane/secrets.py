"""Gateway secrets (issue 14): values people set with `portside secret put`, kept in the store
encrypted with the cluster's secrets key and handed decrypted only to the parts that run gateway
code (WatchSecrets). A value never appears in a log line, an event or an error message.

Each value is sealed with AES-256-GCM under the key of `--secrets-key-file` (every replica is
started with the same file; `portside bootstrap` and `portside up` make it), a random 96-bit nonce
per value and the secret's name as associated data, so a ciphertext cannot be moved to another
name. The store alone (a backup, a copy of etcd's data) does not reveal them: docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controlplane import records
from controlplane.store import Compacted, KeyValue, Store
from portside.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

KEY_BYTES = 32  # AES-256
KEY_FILE = "secrets.key"  # what bootstrap and `portside up` name it, beside the tokens
NONCE_BYTES = 12
MAX_NAME_CHARS = 128
MAX_VALUE_BYTES = 16 * 1024
# WatchSecrets sends every value in one message: 128 x 16 KiB = 2 MiB, well inside gRPC's limit.
MAX_SECRETS = 128
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

NO_KEY = (
    "this control plane replica was started without --secrets-key-file, so it cannot encrypt or "
    "decrypt gateway secrets: start every replica with the cluster's secrets key (`portside "
    "bootstrap` wrote secrets.key beside the tokens)"
)


def validate_name(name: str) -> None:
    """A secret's name is an environment variable's: letters, digits and _, not first a digit."""
    if not name:
        raise InvalidArgument("name: required (letters, digits and _, like API_KEY)")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"name: {len(name)} characters is over the limit of {MAX_NAME_CHARS}")
    if not is_name(name):
        # Not echoed: what was given as a name may be a value pasted in the wrong place.
        raise InvalidArgument(
            "name: not a secret name: letters, digits and _, not starting with a digit (like "
            "an environment variable: API_KEY)"
        )


def is_name(text: str) -> bool:
    return len(text) <= MAX_NAME_CHARS and _NAME.fullmatch(text) is not None


def validate_value(value: str) -> None:
    """Only the value's size is ever named, never any of it."""
    size = len(value.encode())
    if size == 0:
        raise InvalidArgument("value: empty (give the secret's value on standard input)")
    if size > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"value: {size} bytes is over the limit of {MAX_VALUE_BYTES} (16 KiB)"
        )


def secret_key(name: str) -> str:
    return records.SECRETS + name


def new_key_text() -> str:
    """A new random secrets key as its file holds it: base64 of 32 bytes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def write_key_file(path: Path) -> None:
    """A new secrets key in a new file (mode 0600; its folder made 0700 if missing), one
    line. FileExistsError if the file is there: a key is never replaced."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_text() + "\n")


def load_key_file(path: str) -> SecretsKey:
    """The key in the file at `path`; ConfigError naming --secrets-key-file if it is unreadable
    or is not base64 of 32 bytes (its content is never shown)."""
    flag = "--secrets-key-file"
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(flag, path, f"cannot read it: {exc.strerror or exc}") from exc
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(flag, path, "is not a secrets key (base64 of 32 bytes)") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(
            flag, path, f"holds {len(key)} bytes; a secrets key is {KEY_BYTES} (base64, one line)"
        )
    return SecretsKey(key)


@dataclass(frozen=True)
class SealedSecret:
    """A secret as the store keeps it: the value sealed, and what a listing shows."""

    name: str
    key_id: str  # which key sealed it (SecretsKey.id)
    nonce: bytes
    ciphertext: bytes  # AES-GCM of the value, its tag included
    updated_at: float  # unix seconds
    digest: str  # keyed: tells versions apart without helping anyone guess the value

    def encode(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "key_id": self.key_id,
                "nonce": base64.b64encode(self.nonce).decode(),
                "ciphertext": base64.b64encode(self.ciphertext).decode(),
                "updated_at": self.updated_at,
                "digest": self.digest,
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def decode(data: bytes) -> SealedSecret:
        d = json.loads(data)
        return SealedSecret(
            name=d["name"],
            key_id=d["key_id"],
            nonce=base64.b64decode(d["nonce"]),
            ciphertext=base64.b64decode(d["ciphertext"]),
            updated_at=float(d["updated_at"]),
            digest=d["digest"],
        )


class SecretsKey:
    """The cluster's secrets key: seals and opens values, and names itself by `id`, a digest
    that says which key sealed a record without revealing it."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secrets key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self.id = "key:" + hashlib.sha256(b"portside secrets key id\0" + key).hexdigest()[:12]
        self._digest_key = hmac.digest(key, b"portside secret digest", "sha256")

    def digest(self, name: str, value: str) -> str:
        """HMAC-SHA256 under a key derived from this one: equal for equal values, and no help
        to someone who lists secrets (READ role) or reads the store and guesses a weak value."""
        mac = hmac.digest(self._digest_key, name.encode() + b"\0" + value.encode(), "sha256")
        return "hmac-sha256:" + mac.hex()[:12]

    def seal(self, name: str, value: str, now: float) -> SealedSecret:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, value.encode(), name.encode())
        return SealedSecret(name, self.id, nonce, sealed, now, self.digest(name, value))

    def open(self, sealed: SealedSecret) -> str:
        """The value; FailedPrecondition (naming the secret and the keys, never the value) if
        another key sealed it or the record was altered."""
        if sealed.key_id != self.id:
            raise FailedPrecondition(
                f"secret {sealed.name} was sealed with {sealed.key_id}, but this replica's "
                f"--secrets-key-file is {self.id}: start every replica with the same key file"
            )
        try:
            return self._aead.decrypt(
                sealed.nonce, sealed.ciphertext, sealed.name.encode()
            ).decode()
        except InvalidTag as exc:
            raise FailedPrecondition(
                f"secret {sealed.name} does not decrypt with {self.id}: its record was altered "
                "in the store; put it again"
            ) from exc


class Secrets:
    """The secrets of one store, sealed with `key` (None: a replica without a key file, which
    can list and delete them but neither put nor serve them)."""

    def __init__(
        self, store: Store, key: SecretsKey | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.key = key
        self.clock = clock

    def _key(self) -> SecretsKey:
        if self.key is None:
            raise FailedPrecondition(NO_KEY)
        return self.key

    async def listing(self) -> list[SealedSecret]:
        """Every secret, sorted by name (no value decrypted: no key needed)."""
        kvs, _ = await self.store.range(records.SECRETS)
        return [_sealed(kv) for kv in kvs]

    async def put(self, name: str, value: str) -> SealedSecret:
        """Set a secret (a new one, or a new value). Refused while any secret was sealed with
        another key: one cluster, one key."""
        validate_name(name)
        validate_value(value)
        key = self._key()
        existing = await self.listing()
        for other in existing:
            if other.key_id != key.id:
                raise FailedPrecondition(
                    f"secret {other.name} was sealed with {other.key_id}, this replica's "
                    f"--secrets-key-file is {key.id}: every replica needs the cluster's one key "
                    "(if that key is lost, delete the secrets it sealed and put them again)"
                )
        if name not in {s.name for s in existing} and len(existing) >= MAX_SECRETS:
            raise InvalidArgument(
                f"name: there are {len(existing)} secrets already, the limit is {MAX_SECRETS}; "
                "delete one first"
            )
        sealed = key.seal(name, value, self.clock())
        await self.store.put(secret_key(name), sealed.encode())
        log.info("secret %s set (%s)", name, sealed.digest)
        return sealed

    async def delete(self, name: str) -> SealedSecret:
        validate_name(name)
        kv = await self.store.get(secret_key(name))
        if kv is None or not await self.store.compare_and_swap(kv.key, kv.mod_revision, None):
            raise NotFound(f"no secret {name}")
        log.info("secret %s deleted", name)
        return _sealed(kv)

    async def key_problem(self) -> str | None:
        """Why this replica cannot serve the secrets in the store (None: it can), told once at
        start so that an operator sees it before an edge does."""
        existing = await self.listing()
        if not existing:
            return None
        if self.key is None:
            return f"the store holds {len(existing)} gateway secrets, but {NO_KEY}"
        others = sorted({s.key_id for s in existing} - {self.key.id})
        if others:
            return (
                f"gateway secrets in the store were sealed with {', '.join(others)}, but this "
                f"replica's --secrets-key-file is {self.key.id}: start every replica with the "
                "same key file"
            )
        return None

    async def watch(self) -> AsyncGenerator[dict[str, str], None]:
        """Every secret decrypted, now and after each change (a new dict each time), until
        closed. FailedPrecondition once a secret cannot be decrypted here."""
        while True:
            kvs, revision = await self.store.range(records.SECRETS)
            values = {s.name: self._key().open(s) for s in map(_sealed, kvs)}
            yield dict(values)
            try:
                async with aclosing(self.store.watch(records.SECRETS, revision + 1)) as changes:
                    async for change in changes:
                        name = change.kv.key[len(records.SECRETS) :]
                        if change.type == "delete":
                            values.pop(name, None)
                        else:
                            values[name] = self._key().open(_sealed(change.kv))
                        yield dict(values)
            except Compacted:
                continue  # the history is gone: read them all again
            return  # the store ended the watch: the stream's caller reconnects


def _sealed(kv: KeyValue) -> SealedSecret:
    return SealedSecret.decode(kv.value)

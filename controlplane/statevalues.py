"""Per-instance key/value state beside the instance in the store, for hooks that save state on
exit and load it on start; small values with limits checked here and named in every error."""

from __future__ import annotations

import re

from controlplane import records
from controlplane.store import Store
from portside.errors import InvalidArgument, NotFound

MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 128  # an instance's values are read whole on a move; this bounds that to 8 MiB
_KEY = re.compile(r"[A-Za-z0-9._/-]+")


def validate_key(key: str) -> None:
    """Keys are 1..256 bytes of [A-Za-z0-9._/-] (ASCII, so characters are bytes)."""
    if not key:
        raise InvalidArgument("key: must not be empty (1..256 bytes of [A-Za-z0-9._/-])")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"key: {len(key.encode())} bytes is over the limit of {MAX_KEY_BYTES}"
        )
    if not _KEY.fullmatch(key):
        bad = next(c for c in key if not _KEY.fullmatch(c))
        raise InvalidArgument(f"key: {key!r} has {bad!r}; keys are 1..256 bytes of [A-Za-z0-9._/-]")


def validate_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"value: {len(value)} bytes is over the limit of {MAX_VALUE_BYTES} (64 KiB)"
        )


class StateValues:
    """The values of one store; the caller checks the class exists (NOT_FOUND otherwise)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, class_name: str, instance_id: str, name: str, key: str) -> bytes:
        validate_key(key)
        kv = await self.store.get(records.state_key(class_name, instance_id, key))
        if kv is None:
            raise NotFound(f"instance {class_name}/{name} has no state value {key!r}")
        return kv.value

    async def put(
        self, class_name: str, instance_id: str, name: str, key: str, value: bytes
    ) -> None:
        validate_key(key)
        validate_value(value)
        full_key = records.state_key(class_name, instance_id, key)
        if await self.store.get(full_key) is None:
            existing, _ = await self.store.range(records.state_prefix(class_name, instance_id))
            # Two racing puts of new keys may both pass at 127: the limit bounds size, not
            # exactness, and a transaction per put would cost more than one key over.
            if len(existing) >= MAX_KEYS:
                raise InvalidArgument(
                    f"key: instance {class_name}/{name} already has {len(existing)} state "
                    f"values, the limit is {MAX_KEYS}; delete one first"
                )
        await self.store.put(full_key, value)

    async def delete(self, class_name: str, instance_id: str, key: str) -> bool:
        validate_key(key)
        return await self.store.delete(records.state_key(class_name, instance_id, key))

    async def delete_all(self, class_name: str, instance_id: str) -> int:
        """Forget every value of the instance (on destroy); returns how many there were."""
        existing, _ = await self.store.range(records.state_prefix(class_name, instance_id))
        for kv in existing:
            await self.store.delete(kv.key)
        return len(existing)

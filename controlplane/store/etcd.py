"""The store over an etcd 3.4+ cluster, through the asyncio client `aetcd`, in plaintext
(`etcd://`) or over TLS with an optional client certificate (`etcd+https://`).

aetcd and gRPC exceptions stop here: every operation raises StoreError instead.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from portside.errors import ConfigError, StoreError

from ._base import Compacted, KeyValue, WatchEvent
from ._tls import StoreTls

DEFAULT_PORT = 2379

# etcd reads an empty key with range_end "\0" as "every key": the way to watch or list it all.
_ALL_KEYS = b"\0"


def parse_etcd_url(url: str) -> list[tuple[str, int]]:
    """`etcd[+https]://host:port[,host:port...]` as (host, port) pairs, in the order to try them."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("etcd", "etcd+https") or not sep:
        raise ConfigError("--store", url, "an etcd URL starts with etcd:// or etcd+https://")
    rest = rest.removesuffix("/")
    if not rest:
        raise ConfigError(
            "--store", url, f"no endpoint: expected {scheme}://host:port[,host:port...]"
        )
    if any(c in rest for c in "/?#@"):
        raise ConfigError(
            "--store", url, "only host:port endpoints are allowed: no path, query or user"
        )
    return [_parse_endpoint(url, item) for item in rest.split(",")]


def _parse_endpoint(url: str, endpoint: str) -> tuple[str, int]:
    if endpoint.startswith("["):  # IPv6 literal, [::1]:2379
        host, closed, tail = endpoint[1:].partition("]")
        if not closed or (tail and not tail.startswith(":")):
            raise ConfigError("--store", url, f"bad endpoint {endpoint!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = endpoint.partition(":")
    if not host:
        raise ConfigError("--store", url, f"endpoint {endpoint!r} has no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError("--store", url, f"endpoint {endpoint!r}: port must be 1-65535")
    return host, int(port_text)


async def open_url(url: str, timeout_s: float, tls: StoreTls) -> EtcdStore:
    """Connect to the first endpoint of `url` that answers; over TLS for `etcd+https://`, with
    the files of `tls` (already checked against `url` by open_store)."""
    endpoints = parse_etcd_url(url)
    secure = tls if url.startswith("etcd+https://") else None
    return await EtcdStore.connect(endpoints, timeout_s=timeout_s, tls=secure)


class _TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd's client over a TLS channel: aetcd's own connect() opens only plaintext ones.

    This is aetcd 1.0's Client.connect with a secure channel and without its username/password
    login, which Portside does not use; every other method is aetcd's. The contract suite runs
    against it (tests/integration/test_store_tls.py), so an aetcd that changes shape fails there.
    """

    def __init__(self, host: str, port: int, timeout: float, credentials: Any) -> None:
        super().__init__(host=host, port=port, timeout=timeout)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        # Nothing is awaited from here to set(): no other task can see a half-built client.
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.channel = grpc.aio.secure_channel(
            f"{host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def _refusal_hint(detail: str, tls: StoreTls | None) -> str:
    """What a refused first call most likely means when the two ends disagree about TLS, which
    gRPC's own words ("Socket closed", "TSI_DATA_CORRUPTED") do not say; "" when unsure."""
    if tls is None:
        if "Socket closed" in detail:
            return (
                " (does this etcd serve TLS? then use --store etcd+https://... with --store-ca,"
                " --store-cert and --store-key)"
            )
        return ""
    if "Handshake read failed" in detail:
        return " (does this etcd serve plaintext? then use --store etcd://...)"
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        signer = f"--store-ca {tls.ca}" if tls.ca else "a CA gRPC trusts: give --store-ca"
        return f" (etcd's certificate is not signed by {signer})"
    if "Hostname Verification" in detail:
        return " (etcd's certificate does not name the host of --store in its subjectAltName)"
    if any(s in detail for s in ("TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")):
        if not tls.cert:
            return " (etcd wants a client certificate: give --store-cert and --store-key)"
        return (
            f" (etcd refused the client certificate --store-cert {tls.cert}:"
            " is it signed by etcd's --trusted-ca-file?)"
        )
    return ""


@contextmanager
def _translated(what: str, endpoint: str = "", timeout_s: float = 0.0) -> Iterator[None]:
    """The one place where etcd's exceptions become Portside's, each a one-line reason that says
    which etcd and what happened."""
    etcd = f"etcd at {endpoint}" if endpoint else "etcd"
    try:
        yield
    except aetcd.RevisionCompactedError as exc:
        raise Compacted(
            f"{etcd}: {what}: revision compacted (history starts at {exc.compacted_revision})"
        ) from exc
    except aetcd.ConnectionTimeoutError as exc:
        within = f" within {timeout_s:g}s" if timeout_s else ""
        raise StoreError(f"{etcd} did not answer{within} ({what})") from exc
    except aetcd.ConnectionFailedError as exc:
        raise StoreError(f"{etcd} is unreachable ({what}): {_first_line(exc)}") from exc
    except aetcd.ClientError as exc:
        raise StoreError(f"{etcd}: {what}: {_first_line(exc)}") from exc
    except grpc.RpcError as exc:  # aetcd wraps most, but not those of a broken watch stream
        raise StoreError(f"{etcd}: {what}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    if not prefix:
        return _ALL_KEYS, _ALL_KEYS
    key = prefix.encode()
    # UTF-8 never contains 0xff, so the last byte can always be bumped.
    return key, key[:-1] + bytes([key[-1] + 1])


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        lease=int(kv.lease),
    )


class EtcdStore:
    """The Store contract over etcd; one gRPC channel, one shared watch stream."""

    def __init__(self, client: aetcd.Client, endpoint: str, timeout_s: float = 0.0) -> None:
        self._client = client
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._closed = False
        self._open_watches = 0

    @classmethod
    async def connect(
        cls, endpoints: list[tuple[str, int]], *, timeout_s: float, tls: StoreTls | None = None
    ) -> EtcdStore:
        """Try the endpoints in order; the first that answers a read is kept. With `tls`, every
        connection is TLS, verified and authenticated with its files.

        `timeout_s` is the deadline of every call, including each connection attempt.
        """
        credentials = None if tls is None else tls.channel_credentials()
        failures: list[str] = []
        hints: dict[str, None] = {}  # each once, in order, however many endpoints it explains
        for host, port in endpoints:
            if credentials is None:
                client = aetcd.Client(host=host, port=port, timeout=timeout_s)
            else:
                client = _TlsClient(host, port, timeout_s, credentials)
            try:
                # aetcd's connect() only builds a channel; a read proves the member answers.
                await client.get(b"health")
            except (aetcd.ClientError, grpc.RpcError) as exc:
                detail = _first_line(exc)
                failures.append(f"{host}:{port}: {detail}")
                hints[_refusal_hint(detail, tls)] = None
                await client.close()
                continue
            return cls(client, f"{host}:{port}", timeout_s)
        raise StoreError("etcd: no endpoint answered: " + "; ".join(failures) + "".join(hints))

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        # aetcd would quietly reconnect a closed client; a closed store must refuse instead.
        if self._closed:
            raise StoreError(f"etcd at {self.endpoint}: {what}: the store is closed")
        with _translated(what, self.endpoint, self.timeout_s):
            yield

    @property
    def watch_count(self) -> int:
        """Watches open through this store, for metrics and tests."""
        return self._open_watches

    async def get(self, key: str) -> KeyValue | None:
        with self._call(f"get {key!r}"):
            kv = await self._client.get(key.encode())
        return None if kv is None else _key_value(kv)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        start, end = _prefix_range(prefix)
        with self._call(f"range {prefix!r}"):
            result = await self._client.get_range(start, end, sort_order="ascend")
        return [_key_value(kv) for kv in result.kvs], int(result.header.revision)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        with self._call(f"put {key!r}"):
            result = await self._client.put(key.encode(), value, lease=lease)
        return int(result.header.revision)

    async def delete(self, key: str) -> bool:
        with self._call(f"delete {key!r}"):
            result = await self._client.delete(key.encode())
        return result is not None

    async def compare_and_swap(
        self, key: str, mod_revision: int, value: bytes | None, lease: int = 0
    ) -> bool:
        raw = key.encode()
        txn = self._client.transactions
        # An absent key has mod revision 0 in etcd, so one comparison covers create-if-absent.
        write = txn.delete(raw) if value is None else txn.put(raw, value, lease=lease)
        with self._call(f"compare-and-swap {key!r}"):
            succeeded, _ = await self._client.transaction(
                compare=[txn.mod(raw) == mod_revision], success=[write], failure=[]
            )
        return bool(succeeded)

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        start, end = _prefix_range(prefix)
        with self._call(f"watch {prefix!r}"):
            handle = await self._client.watch(
                start, range_end=end, start_revision=start_revision or None
            )
        self._open_watches += 1
        events = aiter(handle)
        try:
            with self._call(f"watch {prefix!r}"):
                async for event in events:
                    kv = _key_value(event.kv)
                    yield WatchEvent("put", kv) if event.kind == "PUT" else WatchEvent("delete", kv)
            # aetcd ends its iterator quietly when the client closes; a watcher must hear of it.
            raise StoreError(f"etcd: watch {prefix!r} ended: the store was closed")
        finally:
            self._open_watches -= 1
            await events.aclose()
            if not self._closed:  # after close() aetcd has dropped its watcher: nothing to cancel
                with _translated(f"cancel watch {prefix!r}"):
                    await handle.cancel()

    async def grant_lease(self, ttl_s: int) -> int:
        if ttl_s < 1:
            raise ValueError(f"lease TTL must be at least 1 s, not {ttl_s}")
        with self._call("grant lease"):
            lease = await self._client.lease(ttl_s)
        return int(lease.id)

    async def refresh_lease(self, lease: int) -> bool:
        with self._call(f"refresh lease {lease:x}"):
            reply = await self._client.refresh_lease(lease)
        # etcd answers a keep-alive for an expired or unknown lease with TTL 0, not an error.
        return reply is not None and int(reply.TTL) > 0

    async def revoke_lease(self, lease: int) -> None:
        if self._closed:
            raise StoreError(f"etcd: revoke lease {lease:x}: the store is closed")
        try:
            await self._client.revoke_lease(lease)
        except aetcd.ClientError as exc:
            cause = exc.__cause__
            if isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.NOT_FOUND:
                return  # already expired or revoked: the outcome the caller asked for
            raise StoreError(f"etcd: revoke lease {lease:x}: {exc}") from exc

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; watches from earlier revisions then fail."""
        with self._call(f"compact to {revision}"):
            await self._client.compact(revision)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _translated("close"):
            await self._client.close()

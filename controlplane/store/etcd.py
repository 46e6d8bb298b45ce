"""The store over an etcd 3.4+ cluster, through the asyncio client `aetcd`, in plaintext
(`etcd://`) or over TLS with an optional client certificate (`etcd+https://`).

With several endpoints (`etcd://a:2379,b:2379,c:2379`) every call fails over between the
members: see EtcdStore. aetcd and gRPC exceptions stop here: every operation raises StoreError.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aetcd
import grpc
from aetcd import rpc, watcher

from portside.errors import ConfigError, StoreError

from ._base import (
    Compacted,
    KeyValue,
    LeaseNotFound,
    Put,
    Swap,
    Swapped,
    WatchEvent,
    check_swaps,
)
from ._tls import StoreTls

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379

#: How long one member may take over one request before the call moves on to the next member.
#: A member without a leader does not refuse: it holds reads, writes and lease refreshes until
#: their deadline. An election after a leader's death takes one to two seconds (etcd's default
#: election timeout, 1 s, randomised up to 2 s), so a call that waited this long on one member
#: finds a leader on the next.
MEMBER_TIMEOUT_S = 2.0

#: The pause after a round in which every member failed (an election is going on), before the
#: next round.
ROUND_PAUSE_S = 0.2

#: After an outage longer than a call's deadline, a watch tries again this often.
WATCH_RETRY_S = 1.0

_CHANNEL_OPTIONS = {
    # A member that comes back is reconnected within a second, not after gRPC's default backoff
    # (up to two minutes), during which every call to it would fail at once.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
    # A member that hangs (host frozen, network cut) under an open watch is noticed by ping
    # within 13 s. etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 3_000,
    # gRPC's default 4 MiB would refuse a watch response of a big transaction; etcd's own client
    # takes any size too. Ranges come in pages (RANGE_PAGE) all the same.
    "grpc.max_receive_message_length": -1,
}

#: Keys a range reads per request. Every placement in one reply passed gRPC's default 4 MiB at
#: about 11,000 of them, and a million are some 350 MiB, built by etcd in one piece. Not much
#: smaller either: etcd counts every key left in the range for each page (its reply's `count`),
#: so pages of 2,000 took 130 s to read a million placements (bench/scale.py). Some 7 MiB each.
RANGE_PAGE = 20_000

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
    """A store over every endpoint of `url`, using the first that answers; over TLS for
    `etcd+https://`, with the files of `tls` (already checked against `url` by open_store)."""
    endpoints = parse_etcd_url(url)
    secure = tls if url.startswith("etcd+https://") else None
    return await EtcdStore.connect(endpoints, timeout_s=timeout_s, tls=secure)


class _TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd's client over a TLS channel: aetcd's own connect() opens only plaintext ones.

    This is aetcd 1.0's Client.connect with a secure channel and without its username/password
    login, which Portside does not use; every other method is aetcd's. The contract suite runs
    against it (tests/integration/test_store_tls.py), so an aetcd that changes shape fails there.
    """

    def __init__(
        self, host: str, port: int, timeout: float, credentials: Any, options: dict[str, Any]
    ) -> None:
        super().__init__(host=host, port=port, timeout=timeout, options=options)
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


FailureKind = Literal["unreachable", "unavailable", "timeout"]


@dataclass(frozen=True)
class _Failure:
    """Why one member could not serve one request; the call then tries the next member.

    "unreachable": no connection (refused, reset: the member is down); "unavailable": the member
    answered that it cannot serve now (no leader, leader changed, request timed out inside etcd);
    "timeout": no answer within the member's time."""

    kind: FailureKind
    detail: str


def _member_failure(exc: BaseException) -> _Failure | None:
    """The failure of the member that `exc` shows, or None for an answer that another member
    would give as well (compacted, invalid argument, unknown lease...): that one is raised."""
    if isinstance(exc, (TimeoutError, aetcd.WatchTimeoutError)):
        return _Failure("timeout", "no answer")
    cause = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    if not isinstance(cause, grpc.RpcError):
        return None
    code = cause.code()
    details = (cause.details() or "").strip()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "context deadline exceeded" in details:
        return _Failure("timeout", "no answer")
    if code == grpc.StatusCode.UNAVAILABLE:
        # etcd's own refusals all say "etcdserver: ..."; gRPC's transport failures do not.
        if details.startswith("etcdserver:"):
            return _Failure("unavailable", details.removeprefix("etcdserver: "))
        return _Failure("unreachable", _transport_detail(details))
    return None


def _transport_detail(details: str) -> str:
    """gRPC's long words for a failed connection, short."""
    lowered = details.lower()
    for words in ("connection refused", "connection reset", "socket closed", "broken pipe"):
        if words in lowered:
            return words
    return _first_line(details)


def _store_error(exc: BaseException, what: str, endpoint: str = "") -> StoreError:
    """The one place where etcd's exceptions become Portside's, each a one-line reason that says
    which etcd and what happened."""
    etcd = f"etcd at {endpoint}" if endpoint else "etcd"
    if isinstance(exc, aetcd.RevisionCompactedError):
        return Compacted(
            f"{etcd}: {what}: revision compacted (history starts at {exc.compacted_revision})"
        )
    if isinstance(exc, (TimeoutError, aetcd.ConnectionTimeoutError, aetcd.WatchTimeoutError)):
        return StoreError(f"{etcd} did not answer ({what})")
    if isinstance(exc, aetcd.ConnectionFailedError):
        return StoreError(f"{etcd} is unreachable ({what}): {_first_line(exc)}")
    cause = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    if isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.NOT_FOUND:
        if "lease not found" in (cause.details() or ""):  # etcd's ErrLeaseNotFound
            return LeaseNotFound(f"{etcd}: {what}: {_first_line(cause.details() or '')}")
    # aetcd wraps most gRPC errors, but not those of a broken watch stream
    return StoreError(f"{etcd}: {what}: {_first_line(exc)}")


@contextmanager
def _translated(what: str, endpoint: str = "") -> Iterator[None]:
    try:
        yield
    except (aetcd.ClientError, grpc.RpcError) as exc:
        raise _store_error(exc, what, endpoint) from exc


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    if not prefix:
        return _ALL_KEYS, _ALL_KEYS
    key = prefix.encode()
    # UTF-8 never contains 0xff, so the last byte can always be bumped.
    return key, key[:-1] + bytes([key[-1] + 1])


async def _range_page(request: Any, client: aetcd.Client) -> Any:
    """One page of a range, straight on aetcd's stub: its get_range has no limit or revision.
    The caller's deadline (EtcdStore._call) bounds it."""
    await client.connect()
    return await client.kvstub.Range(request, metadata=client.metadata)


def _swap_txn(swap: Swap) -> Any:
    """The nested transaction of one Swap (see EtcdStore.swap_all)."""
    key = swap.key.encode()
    # An absent key has mod revision 0 in etcd, so one comparison covers create-if-absent.
    equal = rpc.Compare.EQUAL
    compare = [
        rpc.Compare(result=equal, target=rpc.Compare.MOD, key=key, mod_revision=swap.mod_revision)
    ]
    if swap.absent:  # version 0: no such key
        compare.append(
            rpc.Compare(
                result=equal, target=rpc.Compare.VERSION, key=swap.absent.encode(), version=0
            )
        )
    puts = [Put(swap.key, swap.value, swap.lease), *swap.also]
    success = [
        rpc.RequestOp(request_put=rpc.PutRequest(key=p.key.encode(), value=p.value, lease=p.lease))
        for p in puts
    ]
    if swap.read:
        success.append(rpc.RequestOp(request_range=rpc.RangeRequest(key=swap.read.encode())))
    return rpc.TxnRequest(compare=compare, success=success)


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        lease=int(kv.lease),
    )


class _KeepAlive:
    """One LeaseKeepAlive stream to one member, shared by every lease refresh sent through it.

    Why: aetcd's refresh_lease opens a new gRPC stream for each call, and setting one up and
    tearing it down was the largest part of a heartbeat's cost in the control plane
    (docs/benchmarks.md "Scale"). etcd reads a stream's requests one at a time and answers each
    before the next, its reply naming the lease, so a refresh writes its request and takes the
    next reply for its lease. The stream carries no deadline: each refresh keeps its own, the
    call's (EtcdStore._call).

    A stream that fails (the member went away, etcd gave up on a request) ends: every refresh
    waiting on it gets the same error, as aetcd would have raised it, and fails over as any call
    does; the next refresh opens a new stream. A refresh that stops waiting (its deadline, or its
    caller cancelled) retires the stream, so that no later refresh queues behind a request that
    etcd is still holding: the retired stream is half-closed, etcd answers what it was sent, and
    the next refresh opens a new one. A stream that ends without an error leaves its waiters
    None: no reply, as from aetcd.
    """

    def __init__(self, client: aetcd.Client) -> None:
        self._requests: asyncio.Queue[Any] = asyncio.Queue()  # None ends the stream
        self._waiting: dict[int, deque[asyncio.Future[Any]]] = {}  # by lease, in sent order
        self._call = client.leasestub.LeaseKeepAlive(self._sent(), metadata=client.metadata)
        self._reader = asyncio.create_task(self._read())
        self.usable = True

    async def _sent(self) -> AsyncGenerator[Any, None]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def refresh(self, lease: int) -> Any:
        """etcd's reply to a keep-alive of `lease` (TTL 0: expired or unknown), or None."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease, deque()).append(waiter)
        self._requests.put_nowait(rpc.LeaseKeepAliveRequest(ID=lease))
        try:
            return await waiter
        except asyncio.CancelledError:
            self.retire()
            raise

    def retire(self) -> None:
        """No new refreshes on this stream; those sent are still answered."""
        if self.usable:
            self.usable = False
            self._requests.put_nowait(None)

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            async for reply in self._call:
                lease = int(reply.ID)
                waiters = self._waiting.get(lease)
                if waiters:  # the reply of a refresh that stopped waiting, too
                    waiter = waiters.popleft()
                    if not waiters:
                        del self._waiting[lease]
                    if not waiter.done():
                        waiter.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = _client_error(exc)
        except (Exception, asyncio.CancelledError) as exc:  # CancelledError: the store closed
            error = exc
        self.usable = False
        for waiter in (w for waiters in self._waiting.values() for w in waiters):
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                waiter.cancel()
            else:
                waiter.set_exception(error)

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.wait({self._reader})


def _client_error(exc: grpc.aio.AioRpcError) -> aetcd.ClientError:
    """`exc` as aetcd's calls raise it, with the gRPC error as its cause: the one translation
    that EtcdStore._call and _store_error read."""
    try:
        aetcd.exceptions._handle_exception(exc)  # always raises
    except aetcd.ClientError as error:
        return error
    raise AssertionError("aetcd did not translate a gRPC error") from exc


@dataclass
class _Member:
    endpoint: str  # host:port
    client: aetcd.Client
    failing: bool = False  # its last request failed: logged once, until it answers again
    keepalive: _KeepAlive | None = None  # the lease refreshes' stream, opened on the first


class EtcdStore:
    """The Store contract over the members of one etcd cluster: one gRPC channel to each, one
    shared watch stream on the member in use.

    Failover. A call goes to the member in use. When that member cannot serve it (no
    connection, "etcdserver: no leader" and its kin, or no answer within MEMBER_TIMEOUT_S), the
    store moves to the next member and sends the call again there, round after round, until the
    call's deadline (`timeout_s`). The members are the endpoints of the URL; the cluster's own
    member list is not consulted. A call fails with StoreError when its deadline passes, and at
    once when a majority of the members cannot be reached at all: then there is no quorum to
    wait for.

    What a retry means. Reads and lease refreshes are safe to send again. A write whose member
    failed after it was sent (no answer, or the connection dropped) may have been applied: the
    retry then sees its effect. A plain put is idempotent. A compare-and-swap retried after it
    did succeed returns False (its own write changed the revision): callers treat False as "read
    the key again" and find their own record there (controlplane/placement.py resolve_named). A
    delete retried after it did succeed returns False ("did not exist"). A lease grant retried
    leaves the first lease unused, to expire after its TTL; a revoke retried finds the lease gone,
    which is not an error.

    Leases live in the cluster, not in a member: one granted through a member is refreshed
    through any other. A watch resumes on the next member from the revision after the last event
    it delivered, so its reader sees every event once (see `watch`).
    """

    def __init__(self, members: list[_Member], timeout_s: float = 5.0) -> None:
        if not members:
            raise ValueError("an EtcdStore needs at least one member")
        self._members = members
        self._current = 0  # the member in use
        self.timeout_s = timeout_s
        # One member: waiting for it is all there is to do, until the call's deadline.
        self.member_timeout_s = timeout_s if len(members) == 1 else min(MEMBER_TIMEOUT_S, timeout_s)
        self._closed = False
        self._open_watches = 0

    @classmethod
    async def connect(
        cls, endpoints: list[tuple[str, int]], *, timeout_s: float, tls: StoreTls | None = None
    ) -> EtcdStore:
        """A store over all `endpoints`, using the first that answers a read (tried in order).
        With `tls`, every connection is TLS, verified and authenticated with its files.

        `timeout_s` is the deadline of every call; one member may take MEMBER_TIMEOUT_S of it.
        """
        credentials = None if tls is None else tls.channel_credentials()
        members = []
        member_timeout = timeout_s if len(endpoints) == 1 else min(MEMBER_TIMEOUT_S, timeout_s)
        for host, port in endpoints:
            if credentials is None:
                client = aetcd.Client(
                    host=host, port=port, timeout=member_timeout, options=dict(_CHANNEL_OPTIONS)
                )
            else:
                client = _TlsClient(host, port, member_timeout, credentials, dict(_CHANNEL_OPTIONS))
            members.append(_Member(f"{host}:{port}", client))
        store = cls(members, timeout_s)
        failures: list[str] = []
        hints: dict[str, None] = {}  # each once, in order, however many endpoints it explains
        for index, member in enumerate(members):
            try:
                # aetcd's connect() only builds a channel; a read proves the member answers.
                async with asyncio.timeout(member_timeout):
                    await member.client.get(b"health")
            except (TimeoutError, aetcd.ClientError, grpc.RpcError) as exc:
                if isinstance(exc, TimeoutError):
                    detail = f"no answer within {member_timeout:g}s"
                else:
                    detail = _first_line(exc)
                failures.append(f"{member.endpoint}: {detail}")
                hints[_refusal_hint(detail, tls)] = None
                continue
            store._current = index
            if len(members) > 1:
                log.info("etcd: using member %s of %d", member.endpoint, len(members))
            return store
        await store.close()
        raise StoreError("etcd: no endpoint answered: " + "; ".join(failures) + "".join(hints))

    @property
    def endpoint(self) -> str:
        """The member in use (host:port)."""
        return self._members[self._current].endpoint

    @property
    def _client(self) -> aetcd.Client:
        return self._members[self._current].client

    @property
    def watch_count(self) -> int:
        """Watches open through this store, for metrics and tests."""
        return self._open_watches

    def _check_open(self, what: str) -> None:
        # aetcd would quietly reconnect a closed client; a closed store must refuse instead.
        if self._closed:
            raise StoreError(f"etcd at {self.endpoint}: {what}: the store is closed")

    async def _call(self, what: str, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """`op` on the member in use, failing over as the class says, within `timeout_s`."""
        self._check_open(what)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        failures: dict[int, _Failure] = {}
        attempts = 0
        while True:
            index = self._current
            member = self._members[index]
            budget = min(self.member_timeout_s, deadline - loop.time())
            try:
                async with asyncio.timeout(budget):
                    result = await op(member.client)
            except (TimeoutError, aetcd.ClientError, grpc.RpcError) as exc:
                failure = _member_failure(exc)
                if failure is None or self._closed:
                    raise _store_error(exc, what, member.endpoint) from exc
                if failure.kind == "timeout" and len(self._members) > 1:
                    failure = await self._why_silent(member, deadline)
                failures[index] = failure
                self._failed(index, failure)
                error = self._give_up(what, failures, deadline - loop.time())
                if error is not None:
                    raise error from exc
                attempts += 1
                if attempts % len(self._members) == 0:
                    await asyncio.sleep(min(ROUND_PAUSE_S, max(0.0, deadline - loop.time())))
                self._check_open(what)
                continue
            if member.failing:
                member.failing = False
                log.info("etcd member %s answers again", member.endpoint)
            return result

    async def _why_silent(self, member: _Member, deadline: float) -> _Failure:
        """For the reason of a member that did not answer: does it know of a leader? Its
        status is answered locally, leader or not."""
        budget = min(0.3, deadline - asyncio.get_running_loop().time())
        if budget > 0:
            try:
                async with asyncio.timeout(budget):
                    await member.client.connect()
                    status = await member.client.maintenancestub.Status(rpc.StatusRequest())
            except (TimeoutError, aetcd.ClientError, grpc.RpcError):
                pass
            else:
                if not status.leader:
                    return _Failure("unavailable", "no leader")
        return _Failure("timeout", f"no answer within {self.member_timeout_s:g}s")

    def _failed(self, index: int, failure: _Failure) -> None:
        """Move on from the member at `index`, unless another call already did."""
        member = self._members[index]
        if self._current == index:
            self._current = (index + 1) % len(self._members)
        if not member.failing and len(self._members) > 1:
            member.failing = True
            log.warning(
                "etcd member %s failed (%s): using %s",
                member.endpoint,
                failure.detail,
                self._members[self._current].endpoint,
            )

    def _give_up(
        self, what: str, failures: dict[int, _Failure], left_s: float
    ) -> StoreError | None:
        """The error to end a call with, after `failures`; None to try the next member."""
        n = len(self._members)
        if n == 1:
            failure = failures[0]
            endpoint = self._members[0].endpoint
            if failure.kind == "unreachable":
                return StoreError(f"etcd at {endpoint} is unreachable ({what}): {failure.detail}")
            if left_s > 0:
                return None
            if failure.kind == "timeout":
                return StoreError(
                    f"etcd at {endpoint} did not answer within {self.timeout_s:g}s ({what})"
                )
            return StoreError(f"etcd at {endpoint}: {what}: {failure.detail}")
        each = "; ".join(
            f"{self._members[i].endpoint}: {f.detail}" for i, f in sorted(failures.items())
        )
        unreachable = sum(f.kind == "unreachable" for f in failures.values())
        if len(failures) == n and unreachable > n // 2:
            return StoreError(
                f"etcd has no quorum: {unreachable} of {n} members unreachable ({what}; {each})"
            )
        if left_s > 0:
            return None
        if all(f.kind == "timeout" for f in failures.values()):
            return StoreError(
                f"no etcd member answered within {self.member_timeout_s:g}s ({what}; {each})"
            )
        if any(f.detail == "no leader" for f in failures.values()):
            return StoreError(f"etcd has no quorum: no member has a leader ({what}; {each})")
        return StoreError(f"etcd did not serve {what} within {self.timeout_s:g}s ({each})")

    async def get(self, key: str) -> KeyValue | None:
        kv = await self._call(f"get {key!r}", lambda c: c.get(key.encode()))
        return None if kv is None else _key_value(kv)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """In pages of RANGE_PAGE keys (etcd returns them in key order), every page read at the
        first one's revision: one consistent snapshot, however many requests it takes."""
        start, end = _prefix_range(prefix)
        out: list[KeyValue] = []
        revision = 0
        while True:
            request = rpc.RangeRequest(
                key=start, range_end=end, limit=RANGE_PAGE, revision=revision
            )
            reply = await self._call(f"range {prefix!r}", functools.partial(_range_page, request))
            out.extend(_key_value(kv) for kv in reply.kvs)
            revision = revision or int(reply.header.revision)
            if not reply.more:
                return out, revision
            start = reply.kvs[-1].key + b"\0"  # the next key after the page's last

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        result = await self._call(f"put {key!r}", lambda c: c.put(key.encode(), value, lease=lease))
        return int(result.header.revision)

    async def delete(self, key: str) -> bool:
        result = await self._call(f"delete {key!r}", lambda c: c.delete(key.encode()))
        return result is not None

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
        raw = key.encode()

        async def swap(client: aetcd.Client) -> bool:
            txn = client.transactions
            # An absent key has mod revision 0 in etcd, so one comparison covers create-if-absent.
            compare = [txn.mod(raw) == mod_revision]
            if absent:
                compare.append(txn.version(absent.encode()) == 0)  # version 0: no such key
            if unchanged is not None:
                compare.append(txn.mod(unchanged[0].encode()) == unchanged[1])
            write = txn.delete(raw) if value is None else txn.put(raw, value, lease=lease)
            succeeded, _ = await client.transaction(compare=compare, success=[write], failure=[])
            return bool(succeeded)

        return await self._call(f"compare-and-swap {key!r}", swap)

    async def swap_all(self, swaps: Sequence[Swap]) -> list[Swapped]:
        """One etcd transaction whose every operation is a nested transaction of one swap (etcd
        3.3+): each nested one checks its own key, so one failed check does not fail the rest."""
        check_swaps(swaps)
        if not swaps:
            return []
        request = rpc.TxnRequest(success=[rpc.RequestOp(request_txn=_swap_txn(s)) for s in swaps])

        async def commit(client: aetcd.Client) -> Any:
            await client.connect()
            return await client.kvstub.Txn(request, metadata=client.metadata)

        reply = await self._call(f"swap {len(swaps)} keys from {swaps[0].key!r}", commit)
        out = []
        for swap, op in zip(swaps, reply.responses, strict=True):
            nested = op.response_txn
            read = None
            if nested.succeeded and swap.read:
                kvs = nested.responses[-1].response_range.kvs
                read = _key_value(kvs[0]) if kvs else None
            out.append(Swapped(bool(nested.succeeded), read))
        return out

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Follows `prefix` across members. When the member's stream breaks, the watch opens
        again on the next member from the revision after the last event delivered: etcd sends
        the events of one revision in one response (a revision is never split unless the watch
        asks for fragments), and aetcd queues a response's events before a stream's error, so
        every revision up to the last delivered one was delivered whole. While no member serves
        (quorum lost and the member gone), it tries again every WATCH_RETRY_S; it raises only
        for a closed store, a compacted revision or a first open that fails."""
        start, end = _prefix_range(prefix)
        what = f"watch {prefix!r}"
        self._check_open(what)
        next_revision = start_revision
        if not next_revision:
            # "From now" pinned to a revision at once, so that a watch resumed on another member
            # neither misses nor repeats what was written in between.
            header = await self._call(what, lambda c: c.get_range(start, start + b"\0"))
            next_revision = int(header.header.revision) + 1
        self._open_watches += 1
        handle: Any = None
        events: Any = None
        outage = ""
        try:
            while True:
                try:
                    handle, index = await self._call(
                        what, functools.partial(self._open_watch, start, end, next_revision)
                    )
                except Compacted:
                    raise
                except StoreError as exc:
                    if events is None or self._closed:
                        raise  # a first open that fails tells its caller: nothing was promised
                    if not outage:
                        log.warning("etcd: %s: no member serves it, retrying: %s", what, exc)
                    outage = str(exc)
                    await asyncio.sleep(WATCH_RETRY_S)
                    continue
                if outage:
                    log.info("etcd: %s resumed at revision %d", what, next_revision)
                    outage = ""
                events = aiter(handle)
                try:
                    async for event in events:
                        kv = _key_value(event.kv)
                        next_revision = kv.mod_revision + 1
                        yield (
                            WatchEvent("put", kv)
                            if event.kind == "PUT"
                            else WatchEvent("delete", kv)
                        )
                except (aetcd.ClientError, grpc.RpcError) as exc:
                    failure = _member_failure(exc)
                    if failure is None or self._closed:
                        raise _store_error(exc, what, self._members[index].endpoint) from exc
                    self._failed(index, failure)
                    log.info(
                        "etcd: %s broke on %s (%s): resuming at revision %d on %s",
                        what,
                        self._members[index].endpoint,
                        failure.detail,
                        next_revision,
                        self.endpoint,
                    )
                    await events.aclose()
                    continue
                # aetcd ends its iterator quietly when the client closes; a watcher must hear of it.
                raise StoreError(f"etcd: watch {prefix!r} ended: the store was closed")
        finally:
            self._open_watches -= 1
            if events is not None:
                await events.aclose()
            if handle is not None and not self._closed:
                # After close() aetcd has dropped its watchers: nothing to cancel then.
                with _translated(f"cancel watch {prefix!r}"):
                    await handle.cancel()

    async def _open_watch(
        self, start: bytes, end: bytes, revision: int, client: aetcd.Client
    ) -> tuple[Any, int]:
        """A watch on `client`'s member, and that member's index: the one to fail over from."""
        handle = await client.watch(start, range_end=end, start_revision=revision)
        index = next(i for i, m in enumerate(self._members) if m.client is client)
        return handle, index

    async def grant_lease(self, ttl_s: int) -> int:
        if ttl_s < 1:
            raise ValueError(f"lease TTL must be at least 1 s, not {ttl_s}")
        lease = await self._call("grant lease", lambda c: c.lease(ttl_s))
        return int(lease.id)

    async def refresh_lease(self, lease: int) -> bool:
        """True while the lease lives; False once it has expired or was revoked. A store that
        cannot say (no member answers, no quorum) raises StoreError: that is not an expiry."""
        reply = await self._call(
            f"refresh lease {lease:x}", functools.partial(self._keep_alive, lease)
        )
        # etcd answers a keep-alive for an expired or unknown lease with TTL 0, not an error.
        return reply is not None and int(reply.TTL) > 0

    async def _keep_alive(self, lease: int, client: aetcd.Client) -> Any:
        """One keep-alive of `lease` on `client`'s member, over its one stream (_KeepAlive)."""
        await client.connect()  # first: from the check to a new stream, nothing may wait
        member = next(m for m in self._members if m.client is client)
        if member.keepalive is None or not member.keepalive.usable:
            member.keepalive = _KeepAlive(client)
        return await member.keepalive.refresh(lease)

    async def revoke_lease(self, lease: int) -> None:
        async def revoke(client: aetcd.Client) -> None:
            try:
                await client.revoke_lease(lease)
            except aetcd.ClientError as exc:
                cause = exc.__cause__
                if isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.NOT_FOUND:
                    return  # already expired or revoked: the outcome the caller asked for
                raise

        await self._call(f"revoke lease {lease:x}", revoke)

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; watches from earlier revisions then fail."""
        await self._call(f"compact to {revision}", lambda c: c.compact(revision))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for member in self._members:
            if member.keepalive is not None:
                await member.keepalive.close()
            with _translated("close", member.endpoint):
                await member.client.close()

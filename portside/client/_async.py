"""The asynchronous client: `connect()` gives a `Portside`, `Portside.container()` a `Container`.

Every call goes to the control plane over gRPC, except `Container.fetch`, which goes through an
edge over HTTP. gRPC failures are translated into `portside.errors` in `_grpc_errors` only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc

from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.client._models import (
    DEPLOY_ROLLOUTS,
    ROLLBACK_ROLLOUTS,
    ClassVersion,
    DeployResult,
    ExecChunk,
    ExecResult,
    ImageInfo,
    LogChunk,
    Outbound,
    Response,
    Rollout,
    Schedule,
    SecretInfo,
)
from portside.convert import (
    class_from_pb,
    event_from_pb,
    exec_chunk_from_pb,
    instance_info_from_pb,
    log_chunks_from_pb,
    node_info_from_pb,
    outbound_from_pb,
    outbound_to_pb,
    rollout_from_pb,
    schedule_from_pb,
    snapshot_from_pb,
    terminal_size_to_pb,
    token_info_from_pb,
    usage_from_pb,
)
from portside.errors import InvalidArgument, PortsideError, Unavailable, from_rpc
from portside.events import Event
from portside.headers import INSTANCE, LOCATION_HINT
from portside.instances import InstanceInfo
from portside.outbound import given_policy
from portside.rpc import Backoff, follow_stream
from portside.snapshots import SNAPSHOT_TIMEOUT_S, Snapshot
from portside.spec import ContainerClass, NodeInfo
from portside.states import InstanceState
from portside.terminal import TerminalSize
from portside.tokens import Token, TokenRecord, find_token
from portside.usage import Usage

if TYPE_CHECKING:
    from portside.build import PushResult

DEFAULT_CONTROLPLANE = "127.0.0.1:7070"
#: The environment variable that holds an API token's text.
TOKEN_VARIABLE = "PORTSIDE_TOKEN"
#: Where `portside up` leaves its admin token, relative to where it ran.
DEFAULT_TOKEN_FILE = ".portside/admin.token"
DEFAULT_EDGE = "http://127.0.0.1:8787"
DEFAULT_TIMEOUT = 10.0
#: Start waits for the port (the class's boot_timeout bounds that on the server side).
DEFAULT_START_TIMEOUT = 120.0
#: How long `events()` keeps trying to resume a broken watch before it gives up.
DEFAULT_RESUME_FOR = 60.0
#: The header `fetch` names the instance in, unless told another (see `Container.fetch`).
INSTANCE_HEADER = INSTANCE

_STDIN_CHUNK = 64 * 1024
# A watch broken by these (control plane restarting, a replica gone, the connection reset) is
# resumed from the last revision seen; any other status is a real error.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

#: An exec's stdin: bytes, or an async iterable of bytes (and, with a tty, of TerminalSize).
Stdin = bytes | AsyncIterable[bytes | TerminalSize] | None


def _check_word(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"{name} {value!r} is not one of {', '.join(allowed)}")


def controlplane_address(address: str | None = None) -> str:
    """`address`, else $PORTSIDE_CONTROLPLANE, else 127.0.0.1:7070."""
    return address or os.environ.get("PORTSIDE_CONTROLPLANE") or DEFAULT_CONTROLPLANE


def edge_url(edge: str | None = None) -> str:
    """`edge`, else $PORTSIDE_EDGE, else http://127.0.0.1:8787; "HOST:PORT" gets http://."""
    url = (edge or os.environ.get("PORTSIDE_EDGE") or DEFAULT_EDGE).rstrip("/")
    if "://" not in url:
        net.split_hostport(url, "edge address")
        url = "http://" + url
    return url


def api_token(token: str | None = None, *, path: str | None = None) -> Token | None:
    """The API token to call with: `token` (its text), else the file `path` (--token-file), else
    $PORTSIDE_TOKEN, else ./.portside/admin.token if there is one (`portside up` writes it),
    else None (a cluster run with --insecure: plaintext). InvalidArgument for a malformed token
    or a join token, never echoing it."""
    return find_token(
        "api",
        text=token,
        path=path,
        flag="--token-file",
        variable=TOKEN_VARIABLE,
        default_file=DEFAULT_TOKEN_FILE,
    )


def connect(
    address: str | None = None,
    *,
    edge: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> Portside:
    """A client of the control plane at `address` ("HOST:PORT", or "A:1,B:2" for replicas;
    default $PORTSIDE_CONTROLPLANE or 127.0.0.1:7070), with the API token `token` (its text;
    default $PORTSIDE_TOKEN, else ./.portside/admin.token if present): over TLS, verified with
    the cluster CA the token carries. With no token at all, plaintext (a cluster run with
    --insecure). Use it as an async context manager::

        async with portside.connect("127.0.0.1:7070") as ps:
            box = ps.container("CodeExecutor", name="session-42")
            await box.start(env={"MODE": "sandbox"})
            print((await box.exec(["echo", "hi"])).stdout)

    `edge` is the base URL `Container.fetch` sends requests to (default $PORTSIDE_EDGE or
    http://127.0.0.1:8787). `timeout` is the deadline of each short call, in seconds.
    """
    return Portside(address, edge=edge, timeout=timeout, token=token)


class Portside:
    """A connection to a Portside cluster. Create it with `portside.connect()`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        edge: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
    ) -> None:
        self.address = controlplane_address(address)
        for part in self.address.split(","):
            net.split_hostport(part.strip(), "control plane address")
        self._token = api_token(token)
        self.edge = edge_url(edge)
        self.timeout = timeout
        #: The deadline of `Container.start` and `Container.fetch`, which may boot a container.
        self.start_timeout = DEFAULT_START_TIMEOUT
        self._channel: grpc.aio.Channel | None = None
        self._stub_: Any = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Portside:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the gRPC channel and the HTTP session (also done by `async with`)."""
        channel, self._channel, self._stub_ = self._channel, None, None
        http, self._http = self._http, None
        if channel is not None:
            await channel.close()
        if http is not None:
            await http.close()

    def __repr__(self) -> str:
        return f"<Portside {self.address} edge={self.edge}>"

    # --- plumbing ---

    @property
    def _stub(self) -> Any:
        # Created on first use, inside the running event loop that will use it.
        if self._stub_ is None:
            token = self._token
            self._channel = net.grpc_channel(
                self.address,
                tls=net.ClientTls(token.ca_pem) if token is not None else None,
                bearer=token.bearer if token is not None else None,
            )
            self._stub_ = cp_grpc.ControlPlaneStub(self._channel)
        return self._stub_

    @contextlib.contextmanager
    def _grpc_errors(self) -> Iterator[None]:
        """The one boundary where gRPC errors become Portside's."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: grpc.aio.AioRpcError) -> PortsideError:
        # The control plane is named only when the call failed on the way: an error it answered
        # with (an agent is unreachable, say) comes back as its own class and reason.
        return from_rpc(exc, f"control plane {self.address}")

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = net.http_client_session(net.Deadlines(), limit=100)
        return self._http

    # --- the cluster ---

    def container(self, class_name: str, name: str) -> Container:
        """A handle on the named instance `name` of class `class_name`::

            box = ps.container("CodeExecutor", name="session-42")

        No call is made: the handle holds no state.
        """
        if not class_name:
            raise InvalidArgument("class_name is empty")
        if not name:
            raise InvalidArgument(f"instance name for class {class_name!r} is empty")
        return Container(self, class_name, name)

    async def classes(self) -> list[ContainerClass]:
        """The deployed classes."""
        with self._grpc_errors():
            reply = await self._stub.ListClasses(cp.ListClassesRequest(), timeout=self.timeout)
        return [class_from_pb(c) for c in reply.classes]

    async def instances(
        self,
        class_name: str | None = None,
        node: str | None = None,
        state: InstanceState | str | None = None,
    ) -> list[InstanceInfo]:
        """Placed instances as their nodes last reported them, optionally only of one class, on
        one node, or in one state (an `InstanceState` or its name)::

            for info in await ps.instances("CodeExecutor", state="healthy"):
                print(info.name, info.node_id)

        GetState (`Container.state()`) asks the instance's agent instead: fresher, one call each.
        """
        wanted = InstanceState.parse(state) if state else None
        request = cp.ListInstancesRequest(
            class_name=class_name or "", node_id=node or "", state=wanted or ""
        )
        with self._grpc_errors():
            reply = await self._stub.ListInstances(request, timeout=self.timeout)
        return [instance_info_from_pb(m) for m in reply.instances]

    async def nodes(self) -> list[NodeInfo]:
        """Nodes with their region, capacity, use and liveness."""
        with self._grpc_errors():
            reply = await self._stub.ListNodes(cp.ListNodesRequest(), timeout=self.timeout)
        return [node_info_from_pb(n) for n in reply.nodes]

    async def usage(self, class_name: str | None = None, since: str | None = None) -> list[Usage]:
        """Metered use per class and UTC day, optionally of one class and from `since`
        (YYYY-MM-DD, inclusive)::

            for u in await ps.usage(since="2026-11-01"):
                print(u.class_name, u.day, u.vcpu_seconds, f"${u.cost():.4f}")
        """
        request = cp.GetUsageRequest(class_name=class_name or "", since=since or "")
        with self._grpc_errors():
            reply = await self._stub.GetUsage(request, timeout=self.timeout)
        return [usage_from_pb(u) for u in reply.usage]

    def events(
        self,
        class_name: str | None = None,
        *,
        after_revision: int = 0,
        resume_for: float = DEFAULT_RESUME_FOR,
    ) -> AsyncIterator[Event]:
        """Lifecycle events of every instance (or of one class), until you stop iterating::

            async for event in ps.events("CodeExecutor"):
                print(event.kind, event.name, event.exit_code)

        From `after_revision` + 1 (0: from now). A broken watch is resumed from the last
        revision seen, for up to `resume_for` seconds, so no event still in the store's history
        is missed; after that `Unavailable` is raised.
        """
        return self._watch(class_name or "", "", after_revision, resume_for)

    async def deploy(
        self,
        path: str | os.PathLike[str],
        *,
        report: Callable[[str], None] | None = None,
        on_build_failure: Callable[[Sequence[str]], None] | None = None,
        rollout: str = "gradual",
    ) -> DeployResult:
        """Register the classes and routes of a portside.toml (or wrangler.jsonc), replacing
        the ones registered before. A class whose `image` is a Dockerfile or build directory is
        built first with the local Docker engine and its image pushed to the cluster unless the
        cluster has it (`portside.build.build_and_push`; progress lines go to `report`, a failed
        build's last output lines to `on_build_failure`).

        A class whose version changes rolls its running instances to the new version:
        `rollout` "gradual" (in the class's rollout steps), "immediate" (all at once) or "none"
        (existing containers stay on their version). The result lists the rollouts started."""
        from portside.build import build_and_push
        from portside.config import load_deployment
        from portside.convert import config_to_pb

        _check_word("rollout", rollout, DEPLOY_ROLLOUTS)
        loaded = load_deployment(path)
        config = await build_and_push(
            loaded, self, report=report, on_build_failure=on_build_failure
        )
        request = cp.DeployRequest(config=config_to_pb(config), rollout=rollout)
        with self._grpc_errors():
            # wait_for_ready: `portside up` deploys as soon as its control plane's port opens.
            reply = await self._stub.Deploy(request, timeout=self.timeout, wait_for_ready=True)
        return DeployResult(
            classes=reply.classes,
            routes=reply.routes,
            rollouts=tuple(rollout_from_pb(m) for m in reply.rollouts),
        )

    # --- rollouts (issue 12: versions and rollouts) ---

    async def rollout(self, class_name: str) -> Rollout:
        """The class's latest rollout, in progress or ended (NotFound: it never had one)."""
        request = cp.GetRolloutRequest(class_name=class_name)
        with self._grpc_errors():
            reply = await self._stub.GetRollout(request, timeout=self.timeout)
        return rollout_from_pb(reply.rollout)

    async def pause_rollout(self, class_name: str) -> Rollout:
        """Hold the class's rollout where it is (FailedPrecondition: none in progress)."""
        return await self._control_rollout(class_name, "pause")

    async def resume_rollout(self, class_name: str) -> Rollout:
        """Go on with the class's paused rollout (FailedPrecondition: none paused)."""
        return await self._control_rollout(class_name, "resume")

    async def abort_rollout(self, class_name: str) -> Rollout:
        """End the class's rollout; every instance stays on the version it runs now
        (FailedPrecondition: none in progress)."""
        return await self._control_rollout(class_name, "abort")

    async def rollback(
        self, class_name: str, version: int = 0, rollout: str = "immediate"
    ) -> Rollout:
        """Make `version` (0: the one before the current one) the class's current version again
        and roll its instances back to it, "immediate" or "gradual" (NotFound: no such class or
        version). Returns the rollback's rollout."""
        _check_word("rollout", rollout, ROLLBACK_ROLLOUTS)
        if version < 0:
            raise InvalidArgument(f"version must be a version number, or 0; not {version}")
        request = cp.RollbackRequest(class_name=class_name, version=version, rollout=rollout)
        with self._grpc_errors():
            reply = await self._stub.Rollback(request, timeout=self.timeout)
        return rollout_from_pb(reply.rollout)

    async def _control_rollout(self, class_name: str, action: str) -> Rollout:
        request = cp.ControlRolloutRequest(class_name=class_name, action=action)
        with self._grpc_errors():
            reply = await self._stub.ControlRollout(request, timeout=self.timeout)
        return rollout_from_pb(reply.rollout)

    # --- per-instance schedules (issue 13) ---

    async def schedules(
        self, class_name: str | None = None, name: str | None = None
    ) -> list[Schedule]:
        """Every schedule, one class's, or one instance's (`Container.schedules()`)."""
        request = cp.ListSchedulesRequest(class_name=class_name or "", name=name or "")
        with self._grpc_errors():
            reply = await self._stub.ListSchedules(request, timeout=self.timeout)
        return [schedule_from_pb(m) for m in reply.schedules]

    # --- images (issue 12: no registry needed) ---

    async def images(self) -> list[ImageInfo]:
        """Every image the cluster knows: size, the classes using it, which replicas' image
        stores and which nodes' engines have it."""
        with self._grpc_errors():
            reply = await self._stub.ListImages(cp.ListImagesRequest(), timeout=self.timeout)
        return [_image_info_from_pb(m) for m in reply.images]

    async def versions(self, class_name: str) -> list[ClassVersion]:
        """The class's versions, newest first (NotFound: no such class and none kept)."""
        request = cp.ListVersionsRequest(class_name=class_name)
        with self._grpc_errors():
            reply = await self._stub.ListVersions(request, timeout=self.timeout)
        return [
            ClassVersion(
                number=v.number,
                spec=class_from_pb(v.spec),
                created_at=v.created_at,
                changes=tuple(v.changes),
                instances=v.instances,
                current=v.number == reply.current,
            )
            for v in reply.versions
        ]

    async def stat_images(self, digests: Sequence[str]) -> set[str]:
        """Which of `digests` (sha256:<64 hex>) the cluster's image store holds whole."""
        if not digests:
            return set()
        with self._grpc_errors():
            reply = await self._stub.StatImages(
                cp.StatImagesRequest(digests=list(digests)),
                timeout=self.timeout,
                wait_for_ready=True,
            )
        return set(reply.held)

    async def push_image(
        self,
        digest: str,
        reference: str,
        data: AsyncIterable[bytes],
        *,
        deadline_s: float | None = None,
    ) -> PushResult:
        """Upload the image `digest` (its id, sha256:<64 hex>), tagged `reference`, from `data`,
        the bytes of its `docker save` archive; sent in messages of PUSH_CHUNK bytes. The store
        verifies the archive against `digest` (InvalidArgument if it does not match). `deadline_s`
        bounds the whole upload (default: none beyond the connection's)."""
        from portside.imagepush import push_image

        with self._grpc_errors():
            return await push_image(self._stub, digest, reference, data, deadline_s=deadline_s)

    # --- snapshots (issue 13): a named instance's filesystem, kept and restored ---

    async def snapshots(self, class_name: str = "", name: str = "") -> list[Snapshot]:
        """The class's snapshots (of instance `name` only, if given; of every class if no
        class), newest first."""
        request = cp.ListSnapshotsRequest(class_name=class_name, instance_name=name)
        with self._grpc_errors():
            reply = await self._stub.ListSnapshots(request, timeout=self.timeout)
        return [snapshot_from_pb(m) for m in reply.snapshots]

    async def delete_snapshot(self, class_name: str, snapshot: str) -> Snapshot:
        """Forget the class's snapshot `snapshot` (its id or name; NotFound if none); the image
        store frees its layer at its next garbage collection."""
        request = cp.DeleteSnapshotRequest(class_name=class_name, snapshot=snapshot)
        with self._grpc_errors():
            reply = await self._stub.DeleteSnapshot(request, timeout=self.timeout)
        return snapshot_from_pb(reply.snapshot)

    # --- tokens (an admin token's calls) ---

    async def create_token(
        self,
        role: str,
        *,
        classes: Sequence[str] = (),
        ttl: float = 0.0,
        name: str = "",
    ) -> tuple[str, TokenRecord]:
        """A new token and what it is: `role` "read", "deploy" or "admin" (an API token) or
        "join" (for nodes); only for `classes` (empty: every class); expiring after `ttl`
        seconds (0: never). The token's text is given this once::

            text, info = await ps.create_token("deploy", classes=["CodeExecutor"], ttl=86400)
        """
        request = cp.CreateTokenRequest(role=role, classes=classes, ttl_seconds=ttl, name=name)
        with self._grpc_errors():
            reply = await self._stub.CreateToken(request, timeout=self.timeout)
        return reply.token, token_info_from_pb(reply.info)

    async def tokens(self) -> list[TokenRecord]:
        """Every token, without its secret (`digest` is "")."""
        with self._grpc_errors():
            reply = await self._stub.ListTokens(cp.ListTokensRequest(), timeout=self.timeout)
        return [token_info_from_pb(t) for t in reply.tokens]

    async def revoke_token(self, token: str) -> TokenRecord:
        """Revoke a token by its name or id; every replica refuses it within seconds."""
        with self._grpc_errors():
            reply = await self._stub.RevokeToken(
                cp.RevokeTokenRequest(token=token), timeout=self.timeout
            )
        return token_info_from_pb(reply.info)

    # --- gateway secrets (issue 14): the gateway module reads them as env.secrets ---

    async def put_secret(self, name: str, value: str) -> SecretInfo:
        """Set the gateway secret `name` (letters, digits and _, like API_KEY) to `value`
        (at most 16 KiB), encrypted in the store; every edge and agent has it within moments.
        Needs an admin token. The value is never shown again, by any call."""
        with self._grpc_errors():
            reply = await self._stub.PutSecret(
                cp.PutSecretRequest(name=name, value=value), timeout=self.timeout
            )
        return _secret_info_from_pb(reply.secret)

    async def secrets(self) -> list[SecretInfo]:
        """Every gateway secret, by name: when it was set and its digest, never its value."""
        with self._grpc_errors():
            reply = await self._stub.ListSecrets(cp.ListSecretsRequest(), timeout=self.timeout)
        return [_secret_info_from_pb(m) for m in reply.secrets]

    async def delete_secret(self, name: str) -> SecretInfo:
        """Delete a gateway secret (NotFound if there is none). Needs an admin token."""
        with self._grpc_errors():
            reply = await self._stub.DeleteSecret(
                cp.DeleteSecretRequest(name=name), timeout=self.timeout
            )
        return _secret_info_from_pb(reply.secret)

    async def _watch(
        self, class_name: str, name: str, after_revision: int, resume_for: float
    ) -> AsyncIterator[Event]:
        last = after_revision

        def open_watch() -> AsyncIterator[pb.Event]:
            request = cp.WatchEventsRequest(class_name=class_name, name=name, after_revision=last)
            return self._stub.WatchEvents(request)  # type: ignore[no-any-return]

        messages = follow_stream(
            open_watch,
            what=f"event watch on control plane {self.address}",
            backoff=Backoff(most=2.0),
            fatal=lambda exc: exc.code() not in _RESUMABLE,
            unreachable=f"control plane {self.address}",
            give_up_after=resume_for,
        )
        async with contextlib.aclosing(messages):
            async for message in messages:
                event = event_from_pb(message)
                if last and 0 < event.revision <= last:
                    continue  # already seen before the watch was resumed
                last = max(last, event.revision)
                yield event


class Container:
    """A named instance of a class: `ps.container("CodeExecutor", name="s-1")`.

    Every method is one call to the control plane (or, for `fetch`, to an edge); the handle
    itself holds no state and can be made as often as needed.
    """

    def __init__(self, portside: Portside, class_name: str, name: str) -> None:
        self.portside = portside
        self.class_name = class_name
        self.name = name

    def __repr__(self) -> str:
        return f"<Container {self.class_name}/{self.name}>"

    @property
    def _ref(self) -> pb.InstanceRef:
        return pb.InstanceRef(class_name=self.class_name, name=self.name)

    async def start(
        self,
        entrypoint: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        hint: str | None = None,
        wait: bool = True,
        snapshot: str | Snapshot | None = None,
    ) -> InstanceInfo:
        """Place the instance if needed (near `hint`, a region code or area), boot its
        container and, unless `wait` is false, wait until its port answers::

            info = await box.start(env={"MODE": "sandbox"}, hint="fra")
            print(info.state, info.node_id)

        `entrypoint` replaces the class's command; `env` is added to the class's env.
        `snapshot` (a snapshot of the class, or its id or name; another instance's too) makes
        its container again from that snapshot's filesystem: FailedPrecondition if it runs
        (stop it first) or if the snapshot was taken on another image than the class's now.
        Raises NotFound (unknown class or snapshot), NoCapacity, ContainerExited (it exited
        while starting; `.exit_code`) or BootTimeout.
        """
        if isinstance(entrypoint, str):
            raise InvalidArgument("entrypoint is a list of arguments, e.g. ['/bin/app', '-v']")
        request = cp.StartRequest(
            instance=self._ref,
            entrypoint=list(entrypoint or ()),
            env=dict(env or {}),
            location_hint=hint or "",
            no_wait=not wait,
            snapshot=snapshot.id if isinstance(snapshot, Snapshot) else snapshot or "",
        )
        with self.portside._grpc_errors():
            reply = await self.portside._stub.Start(request, timeout=self.portside.start_timeout)
        return instance_info_from_pb(reply.info)

    async def snapshot(self, name: str | None = None) -> Snapshot:
        """Snapshot the instance's filesystem now (its container's writable layer, running or
        asleep; not its memory), named `name` (default: its id; AlreadyExists if the class has
        one of that name). FailedPrecondition if it has no container yet::

            snap = await box.snapshot("before-upgrade")
            await ps.container(box.class_name, "copy").start(snapshot=snap)
        """
        request = cp.CreateSnapshotRequest(instance=self._ref, name=name or "")
        with self.portside._grpc_errors():
            # As long as the control plane waits for the agent, plus its own calls.
            reply = await self.portside._stub.CreateSnapshot(
                request, timeout=SNAPSHOT_TIMEOUT_S + self.portside.timeout
            )
        return snapshot_from_pb(reply.snapshot)

    async def stop(self, signal: int = 15, grace: float = 10.0) -> InstanceInfo:
        """Send `signal` (default SIGTERM), then SIGKILL after `grace` seconds. The instance
        keeps its node and writable layer; the next start or request wakes it."""
        request = cp.StopRequest(instance=self._ref, signal=signal, grace_seconds=grace)
        with self.portside._grpc_errors():
            reply = await self.portside._stub.Stop(request, timeout=self.portside.timeout + grace)
        return instance_info_from_pb(reply.info)

    async def signal(self, signal: int) -> None:
        """Send `signal` (a number: 15, or `signal.SIGHUP`) to the container's main process.
        Raises FailedPrecondition when it is not running."""
        request = cp.SignalRequest(instance=self._ref, signal=int(signal))
        with self.portside._grpc_errors():
            await self.portside._stub.Signal(request, timeout=self.portside.timeout)

    async def destroy(self) -> None:
        """Remove the container and its writable layer, and forget where it was placed."""
        request = cp.DestroyRequest(instance=self._ref)
        with self.portside._grpc_errors():
            await self.portside._stub.Destroy(request, timeout=self.portside.timeout + 10)

    async def state(self) -> InstanceInfo:
        """Where the instance is and what it is doing (`info.state`, `info.exit_code`)."""
        request = cp.GetStateRequest(instance=self._ref)
        with self.portside._grpc_errors():
            reply = await self.portside._stub.GetState(request, timeout=self.portside.timeout)
        return instance_info_from_pb(reply.info)

    async def renew_activity(self) -> None:
        """Push the sleep timer, as if a request had just ended."""
        request = cp.RenewActivityRequest(instance=self._ref)
        with self.portside._grpc_errors():
            await self.portside._stub.RenewActivity(request, timeout=self.portside.timeout)

    async def exec(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        stdin: Stdin = None,
        *,
        user: str | None = None,
        tty: bool = False,
        size: TerminalSize | None = None,
        wake: bool = False,
        activity: bool = False,
    ) -> ExecResult:
        """Run `command` in the running container and wait for it::

            result = await box.exec(["sh", "-c", "echo $MODE"])
            assert result.exit_code == 0, result.stderr
            zipped = await box.exec(["gzip", "-c"], stdin=b"some text")
            uid = await box.exec(["id", "-u"], user="1000", wake=True)

        `stdin` is bytes or an async iterable of bytes (streamed as it comes). `user` is
        user[:group] or uid[:gid] (default: the image's). `tty`: a pseudo-terminal of `size`
        (default 80x24), as `docker exec -t`; see `exec_stream`. A command that fails is a
        result with its exit code, not an exception.

        Exec neither wakes the instance nor keeps it awake unless `wake`: a sleeping instance
        raises FailedPrecondition, and one that goes to sleep during the command ends it with
        FailedPrecondition. `wake` boots it first if needed and holds it awake until the command
        ends. Exec does not count as activity for sleep_after unless `activity` (the sleep
        timer then restarts when the command ends).
        """
        stdout, stderr = bytearray(), bytearray()
        exit_code = -1
        async for chunk in self.exec_stream(
            command,
            env=env,
            workdir=workdir,
            stdin=stdin,
            user=user,
            tty=tty,
            size=size,
            wake=wake,
            activity=activity,
        ):
            if chunk.stream == "stdout":
                stdout += chunk.data
            elif chunk.stream == "stderr":
                stderr += chunk.data
            elif chunk.exit_code is not None:
                exit_code = chunk.exit_code
        return ExecResult(exit_code=exit_code, stdout=bytes(stdout), stderr=bytes(stderr))

    async def exec_stream(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        stdin: Stdin = None,
        *,
        user: str | None = None,
        tty: bool = False,
        size: TerminalSize | None = None,
        wake: bool = False,
        activity: bool = False,
    ) -> AsyncIterator[ExecChunk]:
        """Like `exec`, but yields the output as it comes, then one chunk with the exit code::

            async for chunk in box.exec_stream(["sh", "-c", "make test"]):
                if chunk.stream == "exit":
                    print("exit code", chunk.exit_code)
                else:
                    sys.stdout.buffer.write(chunk.data)

        A command that fails ends with its exit code, not an exception.

        With `tty` the command gets a pseudo-terminal: its output is all stdout, and what
        `stdin` yields goes to the terminal unchanged (byte 0x03 is Ctrl-C, which the terminal
        makes SIGINT; byte 0x04, Ctrl-D, is its end of input). The end of `stdin` is typed as
        the terminal's end of input (^D, twice after a partial line): a command that reads to
        its end ends, an interactive shell exits; one that ignores it (a full-screen program, or
        a shell running a long command) runs on until it ends, or until you stop iterating,
        which hangs it up (SIGHUP, then SIGKILL). `stdin` may also yield a `TerminalSize` to
        resize the terminal::

            async def keys():
                yield TerminalSize(rows=50, cols=132)
                yield b"stty size; exit 3\\r"  # prints "50 132"; the exit code is 3

            async for chunk in box.exec_stream(["sh"], stdin=keys(), tty=True): ...
        """
        if isinstance(command, str | bytes):
            raise InvalidArgument("command is a list of arguments, e.g. ['sh', '-c', 'ls']")
        if not command:
            raise InvalidArgument("command is empty")
        if size is not None and not tty:
            raise InvalidArgument("size is the size of a terminal: pass tty=True too")
        start = pb.ExecStart(
            instance=self._ref,
            command=list(command),
            env=dict(env or {}),
            working_dir=workdir or "",
            stdin=stdin is not None,
            tty=tty,
            user=user or "",
            wake=wake,
            activity=activity,
        )
        if size is not None:
            start.size.CopyFrom(terminal_size_to_pb(size))
        call = self.portside._stub.Exec(_exec_requests(start, stdin))
        exited = False
        try:
            with self.portside._grpc_errors():
                async for message in call:
                    chunk = exec_chunk_from_pb(message)
                    if chunk is None:
                        continue
                    exited = chunk.stream == "exit"
                    yield chunk
                    if exited:
                        break
        finally:
            call.cancel()
        if not exited:
            raise PortsideError(f"exec in {self.class_name}/{self.name} ended without exit code")

    async def logs(self, follow: bool = False, tail: int = 0) -> AsyncIterator[LogChunk]:
        """The container's output (the last `tail` lines, 0: all), then, with `follow`, what
        it writes next until you stop iterating::

            async for chunk in box.logs(follow=True):
                print(chunk.stream, chunk.data.decode())
        """
        request = pb.LogsRequest(instance=self._ref, follow=follow, tail=tail)
        call = self.portside._stub.Logs(request)
        try:
            with self.portside._grpc_errors():
                async for message in call:
                    for chunk in log_chunks_from_pb(message):
                        yield chunk
        finally:
            call.cancel()

    def events(
        self, after_revision: int = 0, resume_for: float = DEFAULT_RESUME_FOR
    ) -> AsyncIterator[Event]:
        """This instance's lifecycle events, until you stop iterating::

            async for event in box.events():
                if event.kind == "exited":
                    print("exit code", event.exit_code)
                    break

        From `after_revision` + 1 (0: from now); a broken watch resumes by itself from the last
        revision seen (see `Portside.events`).
        """
        return self.portside._watch(self.class_name, self.name, after_revision, resume_for)

    async def get_state_value(self, key: str) -> bytes:
        """The value saved under `key`. Raises NotFound when there is none."""
        request = cp.GetStateValueRequest(instance=self._ref, key=key)
        with self.portside._grpc_errors():
            reply = await self.portside._stub.GetStateValue(request, timeout=self.portside.timeout)
        value: bytes = reply.value
        return value

    async def put_state_value(self, key: str, value: bytes | str) -> None:
        """Save `value` (at most 64 KiB; str is stored as UTF-8) under `key` beside the
        instance in the store: it survives sleeps and moves to another node::

            await box.put_state_value("progress", b"42")
        """
        data = value.encode() if isinstance(value, str) else bytes(value)
        request = cp.PutStateValueRequest(instance=self._ref, key=key, value=data)
        with self.portside._grpc_errors():
            await self.portside._stub.PutStateValue(request, timeout=self.portside.timeout)

    async def delete_state_value(self, key: str) -> bool:
        """Delete `key`; returns whether it existed."""
        request = cp.DeleteStateValueRequest(instance=self._ref, key=key)
        with self.portside._grpc_errors():
            reply = await self.portside._stub.DeleteStateValue(
                request, timeout=self.portside.timeout
            )
        return bool(reply.existed)

    async def schedule(
        self,
        when: float | datetime,
        path: str | None = None,
        *,
        command: Sequence[str] | None = None,
        method: str = "GET",
        no_wake: bool = False,
        no_activity: bool = False,
        id: str | None = None,
    ) -> Schedule:
        """Run once at `when` (a datetime, or seconds from now) an HTTP request to `path` on
        the class's default_port, or `command` in the container::

            await box.schedule(30, "/report", method="POST")
            await box.schedule(datetime(2026, 12, 24, 18, tzinfo=UTC), command=["sh", "/cleanup"])

        The control plane's leader runs it at most once (a run whose replica died before its
        result is reported lost, not run again), waking the instance if it sleeps (with
        `no_wake` a sleeping instance is skipped instead); it counts as activity for
        sleep_after unless `no_activity`. Its result is a schedule-ran event (see `events()`)
        and the schedule's `last_result`; it stays listed until deleted. `id` names it in its
        instance (default: generated; AlreadyExists if taken). InvalidArgument names the field
        at fault.
        """
        at = when.timestamp() if isinstance(when, datetime) else time.time() + float(when)
        return await self._schedule(at, 0.0, path, command, method, no_wake, no_activity, id)

    async def schedule_every(
        self,
        seconds: float,
        path: str | None = None,
        *,
        command: Sequence[str] | None = None,
        method: str = "GET",
        no_wake: bool = False,
        no_activity: bool = False,
        id: str | None = None,
    ) -> Schedule:
        """Run every `seconds` (at least 0.1) an HTTP request to `path` or `command`, first
        `seconds` from now, until deleted (or the instance is destroyed)::

            health = await box.schedule_every(0.5, "/_health")
            ...
            await box.delete_schedule(health.id)

        At most one run is in flight: a run longer than the interval skips the ticks it
        overlapped, and ticks missed while no control plane ran are not made up. The rest is
        as `schedule`.
        """
        return await self._schedule(
            0.0, float(seconds), path, command, method, no_wake, no_activity, id
        )

    async def _schedule(
        self,
        at: float,
        every_s: float,
        path: str | None,
        command: Sequence[str] | None,
        method: str,
        no_wake: bool,
        no_activity: bool,
        schedule_id: str | None,
    ) -> Schedule:
        if isinstance(command, str | bytes):
            raise InvalidArgument("command is a list of arguments, e.g. ['touch', '/tmp/x']")
        request = cp.ScheduleRequest(
            instance=self._ref,
            at=at,
            every_seconds=every_s,
            path=path or "",
            method=method.upper() if path else "",
            command=list(command or ()),
            no_wake=no_wake,
            no_activity=no_activity,
            id=schedule_id or "",
        )
        with self.portside._grpc_errors():
            reply = await self.portside._stub.Schedule(request, timeout=self.portside.timeout)
        return schedule_from_pb(reply.schedule)

    async def schedules(self) -> list[Schedule]:
        """This instance's schedules, with how their runs went."""
        return await self.portside.schedules(self.class_name, self.name)

    async def delete_schedule(self, schedule_id: str) -> Schedule:
        """Delete one of this instance's schedules (NotFound: no such schedule)."""
        request = cp.DeleteScheduleRequest(instance=self._ref, id=schedule_id)
        with self.portside._grpc_errors():
            reply = await self.portside._stub.DeleteSchedule(request, timeout=self.portside.timeout)
        return schedule_from_pb(reply.schedule)

    async def set_outbound(
        self,
        *,
        allowed_hosts: Sequence[str] = (),
        denied_hosts: Sequence[str] = (),
        outbound_by_host: Mapping[str, str] | None = None,
        enable_internet: bool = False,
        intercept_https: bool = False,
    ) -> Outbound:
        """Give this instance its own outbound policy in place of its class's, whole (what is
        not given is the default: no internet, nothing allowed, no handlers). Its node applies
        it to the next connection, without a restart; it is kept while the instance moves and
        sleeps, until `clear_outbound` or `destroy`::

            await box.set_outbound(allowed_hosts=["api.example.com"], denied_hosts=["10.0.0.0/8"])
            await box.set_outbound(outbound_by_host={"billing.internal": "billing"})

        Hosts are name globs (`*.example.com`), IP addresses or CIDRs; `outbound_by_host` maps
        hosts to handler functions of the gateway module (docs/security.md has the order in
        which they apply). InvalidArgument names a bad pattern; NotFound: unknown class.
        """
        policy = given_policy(
            allowed_hosts=allowed_hosts,
            denied_hosts=denied_hosts,
            outbound_by_host=outbound_by_host,
            enable_internet=enable_internet,
            intercept_https=intercept_https,
        )
        request = cp.SetOutboundRequest(instance=self._ref, policy=outbound_to_pb(policy))
        return await self._set_outbound(request)

    async def clear_outbound(self) -> Outbound:
        """Drop this instance's own outbound policy: its class's applies again."""
        return await self._set_outbound(cp.SetOutboundRequest(instance=self._ref, clear=True))

    async def _set_outbound(self, request: cp.SetOutboundRequest) -> Outbound:
        with self.portside._grpc_errors():
            reply = await self.portside._stub.SetOutbound(request, timeout=self.portside.timeout)
        return Outbound(outbound_from_pb(reply.policy), reply.own)

    async def outbound(self) -> Outbound:
        """The outbound policy that applies to this instance: its own, or its class's."""
        request = cp.GetOutboundRequest(instance=self._ref)
        with self.portside._grpc_errors():
            reply = await self.portside._stub.GetOutbound(request, timeout=self.portside.timeout)
        return Outbound(outbound_from_pb(reply.policy), reply.own)

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        hint: str | None = None,
        name_header: str = INSTANCE_HEADER,
    ) -> Response:
        """An HTTP request to this instance through the edge given to `connect` (which boots it
        if it sleeps), read in full::

            resp = await box.fetch("/execute-code", method="POST", data=code,
                                   name_header="X-Session-Id")
            print(resp.status, resp.text)

        The edge finds the instance from the request, as the route for `path` says. `fetch`
        puts the instance name in the `name_header` header (default `Portside-Instance`), so
        it reaches this instance when the route reads that header, e.g.
        `instance = "header:Portside-Instance"`, or `"header:X-Session-Id"` with
        `name_header="X-Session-Id"`. Other routes (query, cookie, path) need the name in
        `params`, `headers` or `path` yourself. `hint` becomes Portside-Location-Hint.
        Raises Unavailable when the edge cannot be reached; an answer from Portside itself
        (no route, no capacity...) is a Response whose `.error` says which.
        """
        if not path.startswith("/"):
            raise InvalidArgument(f"fetch path {path!r} must start with '/'")
        sent = {name_header: self.name}
        if hint:
            sent[LOCATION_HINT] = hint
        sent.update(headers or {})
        url = self.portside.edge + path
        try:
            async with self.portside._session().request(
                method,
                url,
                data=data,
                headers=sent,
                params=params,
                timeout=aiohttp.ClientTimeout(total=self.portside.start_timeout),
            ) as resp:
                body = await resp.read()
                return Response(status=resp.status, headers=dict(resp.headers), body=body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"edge {self.portside.edge}: {type(exc).__name__}: {exc}") from exc


async def _exec_requests(start: pb.ExecStart, stdin: Stdin) -> AsyncIterator[pb.ExecRequest]:
    yield pb.ExecRequest(start=start)
    if stdin is None:
        return
    if isinstance(stdin, bytes | bytearray | memoryview):
        data = bytes(stdin)
        for i in range(0, len(data), _STDIN_CHUNK):
            yield pb.ExecRequest(stdin=data[i : i + _STDIN_CHUNK])
    else:
        async for piece in stdin:
            if isinstance(piece, TerminalSize):
                yield pb.ExecRequest(resize=terminal_size_to_pb(piece))
                continue
            for i in range(0, len(piece), _STDIN_CHUNK):
                yield pb.ExecRequest(stdin=bytes(piece[i : i + _STDIN_CHUNK]))
    yield pb.ExecRequest(stdin_close=True)


def _secret_info_from_pb(m: cp.SecretInfo) -> SecretInfo:
    return SecretInfo(name=m.name, updated_at=m.updated_at, digest=m.digest)


def _image_info_from_pb(m: cp.ImageInfo) -> ImageInfo:
    return ImageInfo(
        digest=m.digest,
        reference=m.reference,
        size_bytes=m.size_bytes,
        classes=tuple(m.classes),
        replicas=tuple(m.replicas),
        nodes=tuple(m.nodes),
        pushed_at=m.pushed_at,
    )

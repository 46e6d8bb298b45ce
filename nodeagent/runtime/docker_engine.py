"""`ContainerRuntime`, `ImageEngine` and `SnapshotEngine` on a local Docker engine: labelled
containers with resource limits on Portside's private networks, images loaded as they stream,
commits read back layer by layer, Docker's blocking SDK run off the loop, and Docker's errors
translated into Portside's at this one boundary."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import fcntl
import functools
import hashlib
import io
import logging
import math
import os
import re
import signal as signals
import tarfile
import tempfile
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, urlencode

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig

from nodeagent.egress.policies import class_lets_out
from nodeagent.egress_tls import ContainerFiles
from nodeagent.runtime.docker_streams import (
    ChunkedBody,
    DockerExec,
    EngineCalls,
    engine_error,
    frames,
    open_stream,
)
from nodeagent.runtime.engine_events import EventFeed
from nodeagent.runtime.labels import (
    LABEL_CLASS,
    LABEL_CLASS_IMAGE,
    LABEL_INSTANCE,
    LABEL_INSTANCE_ID,
    LABEL_MANAGED,
    LABEL_MEMORY_MIB,
    LABEL_NODE,
    LABEL_OVERRIDES,
    LABEL_PORT,
    LABEL_SNAPSHOT,
    LABEL_VCPU,
    LABEL_VERSION,
)
from nodeagent.runtime.protocol import (
    NO_OVERRIDES,
    ContainerEvent,
    ContainerInfo,
    EngineImage,
    ExecProcess,
    FromSnapshot,
    ImageParts,
    Overrides,
    RegistryCredential,
    Stream,
)
from portside.errors import (
    EngineError,
    EngineUnavailable,
    FailedPrecondition,
    ImageUnavailable,
    InvalidArgument,
    NotFound,
    PortsideError,
)
from portside.spec import ContainerClass, instance_id
from portside.terminal import TerminalSize

log = logging.getLogger(__name__)

NETWORK_INTERNAL = "portside-internal"  # internal=True: no route out, for enable_internet=false
NETWORK_EGRESS = "portside-egress"  # a plain bridge, for enable_internet=true

PIDS_LIMIT = 1024
# NET_RAW would let a container forge ARP/IP packets on the shared bridge; MKNOD has no use in an
# app container. Everything else stays at Docker's default set so ordinary images keep working.
CAP_DROP = ("NET_RAW", "MKNOD")
_LOG_CONFIG = LogConfig(type="json-file", config={"max-size": "10m", "max-file": "2"})

# Agents on one host serialise network creation with this file (see _ensure_network).
_NETWORK_LOCK = os.path.join(tempfile.gettempdir(), "portside-docker-networks.lock")

_T = TypeVar("_T")
_EXITED_STATUS = re.compile(r"Exited \((-?\d+)\)")
_LOADED = re.compile(r"Loaded image(?: ID)?: (\S+)")
# Chunks of an archive being loaded that may wait between its source and the engine: enough to
# keep both busy, few enough that a large image is never held in memory.
_LOAD_QUEUE = 4
# The pieces a `docker save` is read in (snapshots).
_SAVE_CHUNK = 1024 * 1024
_DOCKER_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


@dataclasses.dataclass(frozen=True)
class NetworkBridge:
    """One of Portside's Docker networks as the host's packet filter sees it."""

    network: str
    interface: str  # the host's bridge interface, e.g. br-06ba06e1b493
    ipv6: bool
    gateways: tuple[str, ...]  # the host's addresses on the bridge
    subnets: tuple[str, ...] = ()  # its containers' addresses (CIDRs)


def network_bridge(network: Mapping[str, Any]) -> NetworkBridge:
    """The bridge of a network as the engine lists it (Docker names it br-<12 hex of the id>
    unless the network was created with its own name)."""
    options = network.get("Options") or {}
    ipam = (network.get("IPAM") or {}).get("Config") or []
    return NetworkBridge(
        network=str(network.get("Name", "")),
        interface=options.get("com.docker.network.bridge.name") or f"br-{network['Id'][:12]}",
        ipv6=bool(network.get("EnableIPv6")),
        gateways=tuple(str(c["Gateway"]) for c in ipam if c.get("Gateway")),
        subnets=tuple(str(c["Subnet"]) for c in ipam if c.get("Subnet")),
    )


def container_name(node_id: str, instance: str) -> str:
    """`portside-<node id>-<first 16 hex of the instance id>`: stable, so a lost create is found."""
    return f"portside-{node_id}-{instance[:16]}"


class DockerRuntime:
    """`ContainerRuntime` on a local Docker engine (API 1.41+). The network names can be changed
    so that separate Portside clusters (or tests) on one engine stay apart.

    Blocking SDK calls run in a dedicated pool: asyncio's default executor has only a handful of
    threads on a 2-core host, and a burst of boots must not queue behind each other. Docker's
    exceptions are translated here: a missing container is `NotFound`, a container in the wrong
    state `FailedPrecondition`, an image the node cannot run `ImageUnavailable`, an engine that
    does not answer `EngineUnavailable`, and any other failure `EngineError` with Docker's own
    explanation. None of them reads as "the agent is unreachable".
    """

    def __init__(
        self,
        node_id: str,
        client: docker.DockerClient | None = None,
        *,
        workers: int = 16,
        internal_network: str = NETWORK_INTERNAL,
        egress_network: str = NETWORK_EGRESS,
    ) -> None:
        if not node_id or not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", node_id):
            raise ValueError(f"node id {node_id!r} cannot be part of a container name")
        self.node_id = node_id
        self._owns_client = client is None
        self._client = client if client is not None else docker.from_env(max_pool_size=workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._internal_network, self._egress_network = internal_network, egress_network
        self._networks: dict[str, str] = {}  # name -> id
        self._bridges: dict[str, NetworkBridge] = {}  # name -> its bridge
        self._guard: Callable[[list[NetworkBridge]], Awaitable[None]] | None = None
        self._networks_lock = asyncio.Lock()
        self._feeds: set[EventFeed] = set()
        self._calls = EngineCalls(self._client.api)
        # Files and env each new container gets beyond its class's (intercept_https's CA,
        # nodeagent/egress_tls.py); called in a worker thread with the class and instance name.
        self.container_files: Callable[[ContainerClass, str], ContainerFiles | None] | None = None

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except docker.errors.APIError as exc:
            raise engine_error(exc.status_code, _explain(exc)) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineUnavailable(
                f"the Docker engine of node {self.node_id} is unreachable: {exc}"
            ) from exc

    # -- networks ---------------------------------------------------------------------------

    async def ensure_networks(self) -> None:
        async with self._networks_lock:
            for name, internal in ((self._internal_network, True), (self._egress_network, False)):
                network = await self._call(self._ensure_network, name, internal)
                self._networks[name], self._bridges[name] = network["Id"], network_bridge(network)
            if self._guard is not None:
                await self._guard(list(self._bridges.values()))

    async def guard_networks(self, guard: Callable[[list[NetworkBridge]], Awaitable[None]]) -> None:
        """Run `guard` on Portside's networks now and every time they are made again (someone
        removed them), before any container joins them; what it raises fails that create."""
        self._guard = guard
        await self.ensure_networks()

    def _ensure_network(self, name: str, internal: bool) -> dict[str, Any]:
        # The engine's duplicate check is not atomic (three racing creates made three networks
        # of one name in our tests), so agents sharing this host's engine take turns under a
        # host-wide lock.
        with open(_NETWORK_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._ensure_network_locked(name, internal)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _ensure_network_locked(self, name: str, internal: bool) -> dict[str, Any]:
        api = self._client.api
        existing = _exact(api.networks(names=[name]), name)
        if not existing:
            try:
                api.create_network(
                    name,
                    driver="bridge",
                    internal=internal,
                    check_duplicate=True,
                    labels={LABEL_MANAGED: "true"},
                    # Instances of different users share the bridge: no container-to-container
                    # traffic, only the agent on the host reaches them.
                    options={"com.docker.network.bridge.enable_icc": "false"},
                )
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
            existing = _exact(api.networks(names=[name]), name)
        if not existing:
            raise EngineError(f"docker: network {name} vanished while it was being created")
        # Should duplicates exist anyway (agents on another host sharing a remote engine), all
        # pick the same one, the oldest, and address it by id so the name's ambiguity never
        # matters. None is removed: a stopped container may still need it.
        chosen = min(existing, key=lambda n: (n.get("Created", ""), n["Id"]))
        if len(existing) > 1:
            log.warning(
                "%d docker networks are named %s; using the oldest, %s",
                len(existing),
                name,
                chosen["Id"][:12],
            )
        if chosen.get("Internal", False) != internal:
            raise EngineError(
                f"docker: network {name} exists with internal="
                f"{chosen.get('Internal')}; remove it so Portside can recreate it"
            )
        return chosen

    @property
    def egress_network(self) -> str:
        """The network of classes that may reach anything outside the node (its agent's egress
        proxy controls what they reach: nodeagent/egress)."""
        return self._egress_network

    async def _network_for(self, cls: ContainerClass) -> str:
        name = self._egress_network if class_lets_out(cls) else self._internal_network
        if name not in self._networks:
            await self.ensure_networks()
        return self._networks[name]

    # -- containers -------------------------------------------------------------------------

    async def list(self) -> list[ContainerInfo]:
        summaries = await self._call(
            self._client.api.containers,
            all=True,
            filters={"label": [f"{LABEL_NODE}={self.node_id}"]},
        )
        return [_from_summary(s) for s in summaries]

    async def create(
        self,
        cls: ContainerClass,
        name: str,
        overrides: Overrides = NO_OVERRIDES,
        from_snapshot: FromSnapshot | None = None,
    ) -> str:
        network = await self._network_for(cls)
        try:
            return await self._call(self._create, cls, name, network, overrides, from_snapshot)
        except NotFound as exc:
            if "network" not in str(exc):
                raise
            # Someone removed our network since it was ensured: make it again, once.
            self._networks.clear()
            return await self._call(
                self._create, cls, name, await self._network_for(cls), overrides, from_snapshot
            )

    def _create(
        self,
        cls: ContainerClass,
        name: str,
        network: str,
        overrides: Overrides = NO_OVERRIDES,
        from_snapshot: FromSnapshot | None = None,
    ) -> str:
        api = self._client.api
        iid = instance_id(cls.name, name)
        cname = container_name(self.node_id, iid)
        labels = {
            LABEL_CLASS: cls.name,
            LABEL_INSTANCE: name,
            LABEL_INSTANCE_ID: iid,
            LABEL_NODE: self.node_id,
            LABEL_PORT: str(cls.default_port),
            LABEL_VCPU: repr(cls.instance_type.vcpu),
            LABEL_MEMORY_MIB: str(cls.instance_type.memory_mib),
            LABEL_OVERRIDES: overrides.digest,
            LABEL_VERSION: str(cls.version),
            LABEL_CLASS_IMAGE: cls.run_image,
        }
        image = cls.image
        if from_snapshot is not None:
            image = from_snapshot.reference
            labels[LABEL_CLASS_IMAGE] = from_snapshot.class_image
            labels[LABEL_SNAPSHOT] = from_snapshot.snapshot_id
        # Portside's variables win over the class's and a Start's: the agent connects to PORT.
        files = self.container_files(cls, name) if self.container_files is not None else None
        env = {
            **cls.env,
            **overrides.env,
            **(files.env if files is not None else {}),
            "PORTSIDE_CLASS": cls.name,
            "PORTSIDE_INSTANCE": name,
            "PORTSIDE_INSTANCE_ID": iid,
            "PORT": str(cls.default_port),
        }
        entrypoint = list(overrides.entrypoint or cls.entrypoint) or None
        memory = cls.instance_type.memory_mib * 1024 * 1024
        egress = self._bridges.get(self._egress_network)
        host_config = api.create_host_config(
            network_mode=network,
            # Docker's embedded DNS asks the agent's DNS responder (nodeagent/egress/dns.py).
            dns=list(egress.gateways[:1])
            if egress is not None and network == self._networks.get(self._egress_network)
            else None,
            nano_cpus=int(cls.instance_type.vcpu * 1e9),
            mem_limit=memory,
            memswap_limit=memory,  # equal to the memory limit: no swap
            pids_limit=PIDS_LIMIT,
            init=True,  # docker-init forwards SIGTERM, so a sleep (docker stop) is quick
            privileged=False,
            cap_drop=list(CAP_DROP),
            security_opt=["no-new-privileges"],
            log_config=_LOG_CONFIG,
            # The instance type's disk_mb is NOT enforced: overlay2 honours storage_opt size only
            # on xfs with project quotas, which these hosts do not have.
        )
        try:
            created = api.create_container(
                image=image,
                name=cname,
                labels=labels,
                environment=env,
                entrypoint=entrypoint,
                host_config=host_config,
                networking_config=api.create_networking_config(
                    {network: api.create_endpoint_config()}
                ),
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageUnavailable(
                f"class {cls.name}: image {image!r} is not on node {self.node_id} "
                f"(docker: {_explain(exc)})"
            ) from exc
        except docker.errors.APIError as exc:
            if exc.status_code == 400 and "invalid reference format" in _explain(exc):
                raise ImageUnavailable(
                    f"class {cls.name}: image {cls.image!r} is not an image reference "
                    f"(docker on node {self.node_id}: {_explain(exc)}); set `image` to an "
                    "image name such as registry.example.com/app:1.0 (a Dockerfile path is "
                    "built by `portside deploy`, not by the agent)"
                ) from exc
            if exc.status_code != 409:
                raise
            # The name is taken: a create whose answer we lost (a cancelled boot, an agent crash
            # before it recorded the id). Reuse it if it is this instance's on this node.
            existing = api.inspect_container(cname)
            found = existing.get("Config", {}).get("Labels") or {}
            if (
                found.get(LABEL_NODE) != self.node_id
                or found.get(LABEL_INSTANCE_ID) != iid
                or found.get(LABEL_OVERRIDES, "") != overrides.digest
                or found.get(LABEL_SNAPSHOT, "") != labels.get(LABEL_SNAPSHOT, "")
            ):
                raise
            log.info("reusing existing container %s for %s/%s", cname, cls.name, name)
            reused: str = existing["Id"]
            return reused
        container_id: str = created["Id"]
        if files is not None:
            api.put_archive(container_id, "/", files.archive)
        return container_id

    async def read_file(self, container_id: str, path: str) -> bytes:
        """One regular file of a container, running or not; FileNotFoundError without it."""
        return await self._call(self._read_file, container_id, path)

    def _read_file(self, container_id: str, path: str) -> bytes:
        try:
            chunks, _ = self._client.api.get_archive(container_id, path)
        except docker.errors.NotFound as exc:
            raise FileNotFoundError(path) from exc
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            member = tar.next()
            extracted = tar.extractfile(member) if member is not None else None
            if extracted is None:
                raise FileNotFoundError(path)
            return extracted.read()

    async def start(self, container_id: str) -> ContainerInfo:
        await self._call(self._client.api.start, container_id)
        return await self.inspect(container_id)

    async def stop(
        self, container_id: str, grace_s: float, signum: int | None = None
    ) -> ContainerInfo | None:
        if signum is None:
            # Docker's stop honours the image's STOPSIGNAL; it takes whole seconds, and 0 would
            # mean an immediate SIGKILL.
            await self._call(
                self._client.api.stop, container_id, timeout=max(1, math.ceil(grace_s))
            )
        else:
            await self._call(self._stop_with, container_id, grace_s, signum)
        try:
            return await self.inspect(container_id)
        except NotFound:
            return None

    def _stop_with(self, container_id: str, grace_s: float, signum: int) -> None:
        api = self._client.api
        for sig, wait_s in ((signum, grace_s), (int(signals.SIGKILL), 10.0)):
            try:
                api.kill(container_id, signal=sig)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # not running (any more): nothing to stop
                    return
                raise
            try:
                api.wait(container_id, timeout=max(0.05, wait_s))
                return
            except requests.exceptions.RequestException:
                continue  # still running after the grace period: SIGKILL

    async def signal(self, container_id: str, signum: int) -> None:
        if not 0 < signum < 65:
            raise InvalidArgument(f"signal: {signum} is not a signal number (1-64)")
        try:
            await self._call(self._client.api.kill, container_id, signal=signum)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"container {container_id[:12]} is not running") from exc

    async def pause(self, container_id: str) -> None:
        await self._call(self._client.api.pause, container_id)

    async def unpause(self, container_id: str) -> None:
        # On a request's path (its thaw): a kept-alive connection, not a thread and the SDK.
        try:
            await self._calls.post(f"/containers/{quote(container_id)}/unpause")
        except EngineError as exc:
            # Docker answers 500, not 409, for a container that is not paused.
            if "is not paused" not in str(exc):
                raise
            raise FailedPrecondition(f"container {container_id[:12]} is not paused") from exc

    async def exec(
        self,
        container_id: str,
        command: Sequence[str],
        env: Mapping[str, str],
        working_dir: str,
        stdin: bool,
        *,
        tty: TerminalSize | None = None,
        user: str = "",
    ) -> ExecProcess:
        if not command:
            raise InvalidArgument("command: must not be empty")
        try:
            created = await self._call(
                self._client.api.exec_create,
                container_id,
                list(command),
                stdout=True,
                stderr=True,
                stdin=stdin,
                tty=tty is not None,
                user=user,
                environment=dict(env) or None,
                workdir=working_dir or None,
            )
        except FailedPrecondition as exc:  # not running, or paused
            raise FailedPrecondition(f"container {container_id[:12]} is not running") from exc
        exec_id: str = created["Id"]
        reader, writer = await open_stream(
            self._client.api,
            "POST",
            f"/exec/{exec_id}/start",
            body={"Detach": False, "Tty": tty is not None},
            upgrade=True,
        )
        if tty is None:
            return DockerExec(exec_id, reader, writer, self._exec_inspect)
        process = DockerExec(exec_id, reader, writer, self._exec_inspect, self._exec_resize)
        # A terminal the engine made has no size (0x0) until it is given one.
        await process.resize(tty)
        return process

    async def _exec_resize(self, exec_id: str, size: TerminalSize) -> None:
        """Best effort: a resize that races the command's end fails, and changes nothing."""
        try:
            await self._call(
                self._client.api.exec_resize, exec_id, height=size.rows, width=size.cols
            )
        except PortsideError as exc:
            log.debug("exec %s: resize to %s failed: %s", exec_id[:12], size, exc)

    async def _exec_inspect(self, exec_id: str) -> Mapping[str, Any]:
        info: Mapping[str, Any] = await self._call(self._client.api.exec_inspect, exec_id)
        return info

    async def logs(
        self, container_id: str, follow: bool, tail: int
    ) -> AsyncIterator[tuple[Stream, bytes]]:
        query = urlencode(
            {
                "stdout": 1,
                "stderr": 1,
                "follow": int(follow),
                "tail": str(tail) if tail > 0 else "all",
            }
        )
        reader, writer = await open_stream(
            self._client.api, "GET", f"/containers/{quote(container_id)}/logs?{query}"
        )
        try:
            async for item in frames(ChunkedBody(reader)):
                yield item
        finally:
            writer.close()

    async def events(self, since: float | None = None) -> AsyncIterator[ContainerEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ContainerEvent | str] = asyncio.Queue()
        feed = EventFeed(self._client.api, self.node_id, loop, queue, since)
        self._feeds.add(feed)
        feed.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    raise EngineUnavailable(f"the Docker engine of node {self.node_id}: {item}")
                yield item
        finally:
            self._feeds.discard(feed)
            await loop.run_in_executor(None, feed.close)

    async def ping(self) -> None:
        await self._call(self._client.api.ping)

    async def inspect(self, container_id: str) -> ContainerInfo:
        return _from_inspect(await self._call(self._client.api.inspect_container, container_id))

    async def remove(self, container_id: str, force: bool = False) -> None:
        try:
            await self._call(self._client.api.remove_container, container_id, force=force)
        except NotFound:
            pass

    # -- images -----------------------------------------------------------------------------

    async def images(self) -> builtins.list[EngineImage]:
        summaries = await self._call(self._client.api.images, all=True)
        return [
            EngineImage(
                str(s["Id"]), tuple(t for t in s.get("RepoTags") or () if t != "<none>:<none>")
            )
            for s in summaries
        ]

    async def image_id(self, reference: str) -> str | None:
        try:
            found = await self._call(self._client.api.inspect_image, reference)
        except NotFound:
            return None
        except EngineError as exc:
            if "invalid reference format" not in str(exc):
                raise
            reason = str(exc).removeprefix("docker: ")
            raise ImageUnavailable(
                f"image {reference!r} is not an image reference (docker on node {self.node_id}: "
                f"{reason}); set `image` to an image name such as registry.example.com/app:1.0 "
                "(a Dockerfile path is built by `portside deploy`, not by the agent)"
            ) from exc
        return str(found["Id"])

    async def image_layers(self, image_id: str) -> tuple[str, ...]:
        found = await self._call(self._client.api.inspect_image, image_id)
        return tuple(str(d) for d in (found.get("RootFS") or {}).get("Layers") or ())

    async def load_image(self, archive: AsyncIterator[bytes]) -> builtins.list[str]:
        # Docker's SDK sends a request body from a blocking iterator on one of our threads: it
        # takes chunks one by one from a small queue the loop fills from `archive`. None in the
        # queue is the end; `ended` says whether the archive ended whole.
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_LOAD_QUEUE)
        ended: builtins.list[bool] = []
        failure: builtins.list[Exception] = []

        async def feed() -> None:
            try:
                async for chunk in archive:
                    if chunk:
                        await chunks.put(chunk)
                ended.append(True)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the upload is cut
                failure.append(exc)
            finally:
                aclose = getattr(archive, "aclose", None)
                if aclose is not None:  # ends the source's call now, even when cancelled
                    await aclose()
            await chunks.put(None)

        def body() -> Iterator[bytes]:
            while True:
                chunk = asyncio.run_coroutine_threadsafe(chunks.get(), loop).result()
                if chunk is None:
                    if not ended:  # cut the upload: the engine must not load part of it
                        raise _ArchiveBroken()
                    return
                yield chunk

        feeder = asyncio.create_task(feed(), name="image archive")
        try:
            return await self._call(self._load, body())
        except (_ArchiveBroken, EngineUnavailable, EngineError) as exc:
            if failure:
                raise failure[0] from None
            if isinstance(exc, _ArchiveBroken):
                raise EngineError("docker load: the archive was cut short") from None
            raise
        finally:
            feeder.cancel()
            # The loading thread may wait for a chunk that will not come (we were cancelled, or
            # the engine answered before the end): hand it the end. Drained first, so the put
            # cannot fail.
            while not chunks.empty():
                chunks.get_nowait()
            chunks.put_nowait(None)

    def _load(self, body: Iterator[bytes]) -> builtins.list[str]:
        api = self._client.api
        # The SDK's load_image has no timeout of its own: the client's 60 s would cut the wait
        # while the engine unpacks a large image after the upload, so the call takes none.
        response = api._post(
            api._url("/images/load"), data=body, params={"quiet": True}, stream=True, timeout=None
        )
        api._raise_for_status(response)
        loaded: builtins.list[str] = []
        for entry in api._stream_helper(response, decode=True):
            error = entry.get("error") or (entry.get("errorDetail") or {}).get("message")
            if error:
                raise EngineError(f"docker load: {error}")
            for line in str(entry.get("stream", "")).splitlines():
                match = _LOADED.match(line.strip())
                if match:
                    loaded.append(match.group(1))
        return loaded

    async def tag_image(self, image_id: str, reference: str) -> None:
        repository, tag = _split_reference(reference)
        await self._call(self._client.api.tag, image_id, repository, tag or None, force=True)

    async def pull_image(self, reference: str, credential: RegistryCredential | None) -> str:
        repository, tag = _split_reference(reference)
        try:
            await self._call(self._pull, repository, tag or "latest", _auth_config(credential))
        except (EngineError, NotFound, InvalidArgument, FailedPrecondition) as exc:
            # Docker's reason names the registry and what it said; never the credential.
            reason = str(exc).removeprefix("docker: ")
            raise ImageUnavailable(f"docker pull {reference}: {reason}") from exc
        found = await self.image_id(reference)
        if found is None:
            raise ImageUnavailable(f"docker pull {reference}: done, yet the engine lacks it")
        return found

    def _pull(self, repository: str, tag: str, auth: dict[str, str] | None) -> None:
        progress = self._client.api.pull(
            repository, tag=tag, stream=True, decode=True, auth_config=auth
        )
        for entry in progress:
            error = entry.get("error") or (entry.get("errorDetail") or {}).get("message")
            if error:
                raise EngineError(str(error))

    async def remove_image(self, reference: str) -> None:
        try:
            await self._call(self._client.api.remove_image, reference, noprune=False)
        except (NotFound, FailedPrecondition):
            pass  # gone already, or a container uses it: kept

    # -- snapshots ----------------------------------------------------------------------------

    async def commit(self, container_id: str, reference: str) -> str:
        repository, _, tag = reference.rpartition(":")
        # pause: a running container is frozen while its layer is read: one moment's files.
        committed = await self._call(
            self._client.api.commit, container_id, repository=repository, tag=tag, pause=True
        )
        return str(committed["Id"])

    async def read_image(self, image_id: str, layers: Collection[str], into: Path) -> ImageParts:
        return await self._call(self._read_image, image_id, frozenset(layers), into)

    def _read_image(self, image_id: str, wanted: frozenset[str], into: Path) -> ImageParts:
        """`docker save` read as it streams: a layer's diff id is the sha256 of its layer.tar,
        known once it was read, so each one is written to a file while it is hashed and kept
        only if it is wanted."""
        config_name = image_id.removeprefix("sha256:") + ".json"
        config: bytes | None = None
        found: dict[str, Path] = {}
        chunks = self._client.api.get_image(image_id, chunk_size=_SAVE_CHUNK)
        try:
            reader = _ChunkReader(chunks)
            with tarfile.open(fileobj=reader, mode="r|", bufsize=_SAVE_CHUNK) as archive:
                for member in archive:
                    source = archive.extractfile(member) if member.isfile() else None
                    if source is None:
                        continue
                    if member.name == config_name:
                        config = source.read()
                    elif member.name.endswith("/layer.tar"):
                        diff_id, path = _spool(source, into)
                        if diff_id in wanted:
                            found[diff_id] = path
                        else:
                            path.unlink()
        except tarfile.TarError as exc:
            raise EngineError(f"docker save {image_id}: not an image archive: {exc}") from exc
        missing = sorted(wanted - found.keys())
        if config is None or missing:
            lacks = f"layers {', '.join(missing)}" if missing else f"its config {config_name}"
            raise EngineError(f"docker save {image_id}: the archive lacks {lacks}")
        return ImageParts(config, found)

    async def image_settings(self, image_id: str) -> Mapping[str, Any]:
        found = await self._call(self._client.api.inspect_image, image_id)
        settings: Mapping[str, Any] = found.get("Config") or {}
        return settings

    async def close(self) -> None:
        for feed in list(self._feeds):  # normally closed by their consumer already
            await asyncio.get_running_loop().run_in_executor(None, feed.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._calls.close()
        if self._owns_client:
            self._client.close()


class _ArchiveBroken(Exception):
    """Raised into Docker's SDK to abort an upload whose archive did not end cleanly."""


class _ChunkReader(io.RawIOBase):
    """A blocking stream of byte chunks (Docker's SDK's download) read as a file."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = memoryview(b"")
        self._at = 0  # what of the current chunk was read (no copy of the rest per read)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._chunk):
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk, self._at = memoryview(chunk), 0
        n = min(len(buffer), len(self._chunk) - self._at)
        buffer[:n] = self._chunk[self._at : self._at + n]
        self._at += n
        return n


def _spool(source: IO[bytes], into: Path) -> tuple[str, Path]:
    """Copy `source` to a new file in `into`; its sha256 ("sha256:<hex>") and the file."""
    hasher = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=into, suffix=".tar", delete=False) as out:
        while piece := source.read(_SAVE_CHUNK):
            hasher.update(piece)
            out.write(piece)
    return "sha256:" + hasher.hexdigest(), Path(out.name)


def _split_reference(reference: str) -> tuple[str, str]:
    """("registry:5000/app", "1.0") from "registry:5000/app:1.0"; a digest stays in the name
    ("app@sha256:…", ""); no tag: ""."""
    if "@" in reference:
        return reference, ""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:  # no tag, or the colon was a registry's port
        return reference, ""
    return name, tag


def _auth_config(credential: RegistryCredential | None) -> dict[str, str] | None:
    if credential is None:
        return None
    if credential.identitytoken:
        return {"identitytoken": credential.identitytoken}
    return {"username": credential.username, "password": credential.password}


def _explain(exc: docker.errors.APIError) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def _exact(networks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    # The engine's name filter matches substrings: portside-internal-old would match too.
    return [n for n in networks if n.get("Name") == name]


def _ip(networks: Mapping[str, Any] | None) -> str | None:
    for settings in (networks or {}).values():
        address = (settings or {}).get("IPAddress")
        if address:
            return str(address)
    return None


def _time(text: str | None) -> datetime | None:
    """Docker's times are UTC with nanoseconds; "0001-01-01T00:00:00Z" means never."""
    if not text or text.startswith("0001-"):
        return None
    match = _DOCKER_TIME.match(text)
    if match is None:
        return datetime.fromisoformat(text)
    whole, fraction = match.groups()
    return datetime.fromisoformat(whole).replace(
        microsecond=int((fraction or "0")[:6].ljust(6, "0")), tzinfo=UTC
    )


def _labelled(
    data: Mapping[str, Any],
    labels: Mapping[str, str],
    name: str,
    status: str,
    exit_code: int | None,
    networks: Mapping[str, Any] | None,
) -> ContainerInfo:
    """A ContainerInfo with what Portside's labels say of the container."""
    port = labels.get(LABEL_PORT, "")
    try:
        vcpu, memory_mib = (
            float(labels.get(LABEL_VCPU, "0")),
            int(labels.get(LABEL_MEMORY_MIB, "0")),
        )
    except ValueError:
        vcpu, memory_mib = 0.0, 0
    return ContainerInfo(
        id=data["Id"],
        name=name,
        status=status,
        exit_code=exit_code,
        ip=_ip(networks),
        port=int(port) if port.isdigit() else None,
        class_name=labels.get(LABEL_CLASS, ""),
        instance_name=labels.get(LABEL_INSTANCE, ""),
        instance_id=labels.get(LABEL_INSTANCE_ID, ""),
        vcpu=vcpu,
        memory_mib=memory_mib,
        overrides_digest=labels.get(LABEL_OVERRIDES, ""),
        version=int(version) if (version := labels.get(LABEL_VERSION, "")).isdigit() else 0,
        # A listing's "Image" is the name it was made from, "ImageID" the id; inspect's "Image"
        # is the id.
        image_id=str(data.get("ImageID") or data.get("Image") or ""),
        class_image=labels.get(LABEL_CLASS_IMAGE, ""),
        snapshot_id=labels.get(LABEL_SNAPSHOT, ""),
    )


def _from_inspect(data: Mapping[str, Any]) -> ContainerInfo:
    state: Mapping[str, Any] = data.get("State") or {}
    status = str(state.get("Status", "unknown"))
    info = _labelled(
        data,
        (data.get("Config") or {}).get("Labels") or {},
        str(data.get("Name", "")).lstrip("/"),
        status,
        None if status in ("running", "created") else int(state.get("ExitCode", 0)),
        (data.get("NetworkSettings") or {}).get("Networks"),
    )
    return dataclasses.replace(
        info,
        started_at=_time(state.get("StartedAt")),
        finished_at=_time(state.get("FinishedAt")),
        pid=int(state.get("Pid") or 0) or None,
    )


def _from_summary(data: Mapping[str, Any]) -> ContainerInfo:
    exited = _EXITED_STATUS.match(str(data.get("Status", "")))
    names = data.get("Names") or [""]
    return _labelled(
        data,
        data.get("Labels") or {},
        str(names[0]).lstrip("/"),
        str(data.get("State", "unknown")),
        int(exited.group(1)) if exited else None,
        (data.get("NetworkSettings") or {}).get("Networks"),
    )


__all__ = [
    "CAP_DROP",
    "NETWORK_EGRESS",
    "NETWORK_INTERNAL",
    "PIDS_LIMIT",
    "DockerRuntime",
    "NetworkBridge",
    "container_name",
    "network_bridge",
]

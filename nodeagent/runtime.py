"""The container runtime the node agent drives: a small `ContainerRuntime` protocol and its Docker
implementation (labels, private networks, resource limits), with Docker's blocking SDK off-loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal as signals
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote, urlencode

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig

from portside.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from portside.spec import ContainerClass, instance_id

log = logging.getLogger(__name__)

LABEL_CLASS = "portside.class"
LABEL_INSTANCE = "portside.instance"  # the instance's name
LABEL_INSTANCE_ID = "portside.instance_id"
LABEL_NODE = "portside.node"
# The port is baked into the container (its PORT env) when it is created, so a redeployed class
# with another default_port must not change where an existing container is reached.
LABEL_PORT = "portside.port"
# The instance type's size, so that an agent that adopts the container can account for it.
LABEL_VCPU = "portside.vcpu"
LABEL_MEMORY_MIB = "portside.memory_mib"
LABEL_MANAGED = "portside.managed"  # on the networks Portside creates
# A hash of the entrypoint and env a Start asked for ("" for none): a Start with other overrides
# must make the container again, since Docker cannot change them on an existing container.
LABEL_OVERRIDES = "portside.overrides"

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
_DOCKER_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


def container_name(node_id: str, instance: str) -> str:
    """`portside-<node id>-<first 16 hex of the instance id>`: stable, so a lost create is found."""
    return f"portside-{node_id}-{instance[:16]}"


@dataclass(frozen=True)
class Overrides:
    """What a Start may change for one container: its entrypoint (empty: the class's) and env
    (added over the class's). Fixed when the container is created."""

    entrypoint: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """ "" for no overrides, else a short stable hash (the container's label)."""
        if not self.entrypoint and not self.env:
            return ""
        canonical = json.dumps([list(self.entrypoint), sorted(self.env.items())])
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


NO_OVERRIDES = Overrides()

Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class ContainerEvent:
    """One of the engine's container events for this node: die (with exit_code), oom, start,
    destroy. `time` is unix seconds."""

    kind: str
    container_id: str
    instance_id: str
    time: float
    exit_code: int | None = None


class ExecProcess(Protocol):
    """A command running inside a container: read its output, feed its stdin, get its code."""

    def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """stdout and stderr chunks as they come, until the command closes both."""

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def exit_code(self) -> int:
        """After output() ended: the command's exit code."""

    async def close(self) -> None:
        """Drop the connection (the command may go on running in the container)."""


@dataclass(frozen=True)
class ContainerInfo:
    """What the agent needs to know about one of its containers.

    `status` is Docker's: created, running, paused, restarting, removing, exited or dead.
    `started_at`/`finished_at` are None when never, and always None from `list()`.
    """

    id: str
    name: str
    status: str
    exit_code: int | None
    ip: str | None
    port: int | None
    class_name: str
    instance_name: str
    instance_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None  # the main process, while running (from inspect only)

    @property
    def running(self) -> bool:
        return self.status == "running"


class ContainerRuntime(Protocol):
    """Containers of ONE node. Every method may raise NotFound (no such container) or Unavailable
    (the engine failed); create may also raise Unavailable for a missing image."""

    async def ensure_networks(self) -> None:
        """Create Portside's networks if they are absent (idempotent, safe to race)."""

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        """This node's containers, any status, optionally narrowed by more labels."""

    async def create(
        self, cls: ContainerClass, name: str, overrides: Overrides = NO_OVERRIDES
    ) -> str:
        """Create (not start) the container of instance `name`; return its id. If it already
        exists (a create whose answer was lost), return the existing one's id."""

    async def start(self, container_id: str) -> ContainerInfo:
        """Start the container (no-op when running) and inspect it: its IP may change on
        every start. The returned status shows whether it already exited."""

    async def stop(
        self, container_id: str, grace_s: float, signum: int | None = None
    ) -> int | None:
        """`signum` (None: the image's stop signal, SIGTERM by default), then SIGKILL after
        `grace_s` seconds; no-op when not running. Returns the exit code it stopped with (None
        if unknown)."""

    async def signal(self, container_id: str, signum: int) -> None:
        """Send `signum` to the container's main process. FailedPrecondition: not running."""

    async def exec(
        self,
        container_id: str,
        command: Sequence[str],
        env: Mapping[str, str],
        working_dir: str,
        stdin: bool,
    ) -> ExecProcess:
        """Run `command` in the running container. FailedPrecondition: not running."""

    def logs(
        self, container_id: str, follow: bool, tail: int
    ) -> AsyncIterator[tuple[Stream, bytes]]:
        """The container's output (the last `tail` lines first; 0: all), and with `follow` what
        it writes next, until it stops."""

    def events(self) -> AsyncIterator[ContainerEvent]:
        """This node's container events as the engine reports them, until cancelled."""

    async def inspect(self, container_id: str) -> ContainerInfo: ...

    async def remove(self, container_id: str, force: bool = False) -> None:
        """Delete the container and its writable layer; no-op when it does not exist."""

    async def close(self) -> None: ...


class DockerRuntime:
    """`ContainerRuntime` on a local Docker engine (API 1.41+). The network names can be changed
    so that separate Portside clusters (or tests) on one engine stay apart.

    Blocking SDK calls run in a dedicated pool: asyncio's default executor has only a handful of
    threads on a 2-core host, and a burst of boots must not queue behind each other. Docker's
    exceptions are translated here, at the boundary: a missing container is `NotFound`, any other
    engine failure `Unavailable` with Docker's own explanation.
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
        self._networks_lock = asyncio.Lock()
        self._feeds: set[_EventFeed] = set()

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except docker.errors.ImageNotFound as exc:
            raise Unavailable(f"docker: image not on this node: {_explain(exc)}") from exc
        except docker.errors.NotFound as exc:
            raise NotFound(f"docker: {_explain(exc)}") from exc
        except docker.errors.APIError as exc:
            raise Unavailable(f"docker: {_explain(exc)}") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise Unavailable(f"docker engine unreachable: {exc}") from exc

    # -- networks ---------------------------------------------------------------------------

    async def ensure_networks(self) -> None:
        async with self._networks_lock:
            for name, internal in ((self._internal_network, True), (self._egress_network, False)):
                self._networks[name] = await self._call(self._ensure_network, name, internal)

    def _ensure_network(self, name: str, internal: bool) -> str:
        # The engine's duplicate check is not atomic (three racing creates made three networks
        # of one name in our tests), so agents sharing this host's engine take turns under a
        # host-wide lock.
        with open(_NETWORK_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._ensure_network_locked(name, internal)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _ensure_network_locked(self, name: str, internal: bool) -> str:
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
            raise Unavailable(f"docker: network {name} vanished while it was being created")
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
            raise Unavailable(
                f"docker: network {name} exists with internal="
                f"{chosen.get('Internal')}; remove it so Portside can recreate it"
            )
        net_id: str = chosen["Id"]
        return net_id

    async def _network_for(self, cls: ContainerClass) -> str:
        name = self._egress_network if cls.enable_internet else self._internal_network
        if name not in self._networks:
            await self.ensure_networks()
        return self._networks[name]

    # -- containers -------------------------------------------------------------------------

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        wanted = {LABEL_NODE: self.node_id, **(labels or {})}
        summaries = await self._call(
            self._client.api.containers,
            all=True,
            filters={"label": [f"{k}={v}" for k, v in wanted.items()]},
        )
        return [_from_summary(s) for s in summaries]

    async def create(
        self, cls: ContainerClass, name: str, overrides: Overrides = NO_OVERRIDES
    ) -> str:
        network = await self._network_for(cls)
        try:
            return await self._call(self._create, cls, name, network, overrides)
        except NotFound as exc:
            if "network" not in str(exc):
                raise
            # Someone removed our network since it was ensured: make it again, once.
            self._networks.clear()
            return await self._call(
                self._create, cls, name, await self._network_for(cls), overrides
            )

    def _create(
        self, cls: ContainerClass, name: str, network: str, overrides: Overrides = NO_OVERRIDES
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
        }
        # Portside's variables win over the class's and a Start's: the agent connects to PORT.
        env = {
            **cls.env,
            **overrides.env,
            "PORTSIDE_CLASS": cls.name,
            "PORTSIDE_INSTANCE": name,
            "PORTSIDE_INSTANCE_ID": iid,
            "PORT": str(cls.default_port),
        }
        entrypoint = list(overrides.entrypoint or cls.entrypoint) or None
        memory = cls.instance_type.memory_mib * 1024 * 1024
        host_config = api.create_host_config(
            network_mode=network,
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
                image=cls.image,
                name=cname,
                labels=labels,
                environment=env,
                entrypoint=entrypoint,
                host_config=host_config,
                networking_config=api.create_networking_config(
                    {network: api.create_endpoint_config()}
                ),
            )
        except docker.errors.APIError as exc:
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
            ):
                raise
            log.info("reusing existing container %s for %s/%s", cname, cls.name, name)
            reused: str = existing["Id"]
            return reused
        container_id: str = created["Id"]
        return container_id

    async def start(self, container_id: str) -> ContainerInfo:
        await self._call(self._client.api.start, container_id)
        return await self.inspect(container_id)

    async def stop(
        self, container_id: str, grace_s: float, signum: int | None = None
    ) -> int | None:
        if signum is None:
            # Docker's stop honours the image's STOPSIGNAL; it takes whole seconds, and 0 would
            # mean an immediate SIGKILL.
            await self._call(
                self._client.api.stop, container_id, timeout=max(1, math.ceil(grace_s))
            )
        else:
            await self._call(self._stop_with, container_id, grace_s, signum)
        try:
            info = await self.inspect(container_id)
        except NotFound:
            return None
        return info.exit_code

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
            await self._call(self._kill, container_id, signum)
        except _NotRunning as exc:
            raise FailedPrecondition(f"container {container_id[:12]} is not running") from exc

    def _kill(self, container_id: str, signum: int) -> None:
        try:
            self._client.api.kill(container_id, signal=signum)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise _NotRunning(str(exc)) from exc
            raise

    async def exec(
        self,
        container_id: str,
        command: Sequence[str],
        env: Mapping[str, str],
        working_dir: str,
        stdin: bool,
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
                tty=False,
                environment=dict(env) or None,
                workdir=working_dir or None,
            )
        except Unavailable as exc:
            if "is not running" in str(exc) or "is paused" in str(exc):
                raise FailedPrecondition(f"container {container_id[:12]} is not running") from exc
            raise
        exec_id: str = created["Id"]
        reader, writer = await self._open_stream(
            "POST", f"/exec/{exec_id}/start", body={"Detach": False, "Tty": False}, upgrade=True
        )
        return _DockerExec(self, exec_id, reader, writer)

    async def _exec_exit_code(self, exec_id: str) -> int:
        # The stream ends a moment before the engine records the code.
        for _ in range(100):
            info = await self._call(self._client.api.exec_inspect, exec_id)
            if not info.get("Running"):
                code = info.get("ExitCode")
                return int(code) if code is not None else -1  # -1: the engine does not know
            await asyncio.sleep(0.02)
        raise Unavailable(f"docker: exec {exec_id[:12]} still running after its output ended")

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
        reader, writer = await self._open_stream(
            "GET", f"/containers/{quote(container_id)}/logs?{query}"
        )
        try:
            async for item in _frames(_ChunkedBody(reader)):
                yield item
        finally:
            writer.close()

    async def _open_stream(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, upgrade: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw HTTP/1.1 exchange with the engine, for the streams the SDK cannot give
        asynchronously (exec with stdin, logs by stream): returns the connection after the
        response head, the body unread. Errors become NotFound / Unavailable."""
        try:
            reader, writer = await _connect(self._client.api)
        except OSError as exc:
            raise Unavailable(f"docker engine unreachable: {exc}") from exc
        payload = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} /v{self._client.api.api_version}{path} HTTP/1.1", "Host: docker"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        if upgrade:
            head += ["Connection: Upgrade", "Upgrade: tcp"]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            await writer.drain()
            status_line, headers = await _read_head(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise Unavailable(f"docker: {method} {path.split('?')[0]} failed: {exc}") from exc
        status = int(status_line.split()[1])
        if status >= 300:
            try:
                text = (await _read_body(reader, headers)).decode(errors="replace")
            finally:
                writer.close()
            try:
                message = str(json.loads(text).get("message", text))
            except ValueError:
                message = text.strip()
            if status == 404:
                raise NotFound(f"docker: {message}")
            if status == 409:
                raise FailedPrecondition(f"docker: {message}")
            raise Unavailable(f"docker: {message}")
        return reader, writer

    async def events(self) -> AsyncIterator[ContainerEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ContainerEvent] = asyncio.Queue()
        feed = _EventFeed(self._client.api, self.node_id, loop, queue)
        self._feeds.add(feed)
        feed.start()
        try:
            while True:
                yield await queue.get()
        finally:
            self._feeds.discard(feed)
            await loop.run_in_executor(None, feed.close)

    async def inspect(self, container_id: str) -> ContainerInfo:
        return _from_inspect(await self._call(self._client.api.inspect_container, container_id))

    async def remove(self, container_id: str, force: bool = False) -> None:
        try:
            await self._call(self._client.api.remove_container, container_id, force=force)
        except NotFound:
            pass

    async def close(self) -> None:
        for feed in list(self._feeds):  # normally closed by their consumer already
            await asyncio.get_running_loop().run_in_executor(None, feed.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_client:
            self._client.close()


class _NotRunning(Exception):
    pass


class _DockerExec:
    """An exec's hijacked connection: Docker multiplexes stdout and stderr on it in frames of
    an 8-byte header (stream, 0, 0, 0, big-endian length) and the payload; we write stdin."""

    def __init__(
        self,
        runtime: DockerRuntime,
        exec_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._runtime = runtime
        self.exec_id = exec_id
        self._reader, self._writer = reader, writer

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        async for item in _frames(self._reader):
            yield item

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close_stdin(self) -> None:
        # A half-close: the engine closes the command's stdin and keeps sending its output.
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    async def exit_code(self) -> int:
        return await self._runtime._exec_exit_code(self.exec_id)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}


async def _frames(body: asyncio.StreamReader | _ChunkedBody) -> AsyncIterator[tuple[Stream, bytes]]:
    while True:
        try:
            header = await body.readexactly(8)
        except asyncio.IncompleteReadError:
            return
        stream, size = header[0], struct.unpack(">I", header[4:])[0]
        payload = await body.readexactly(size)
        if stream in _STREAMS and payload:
            yield _STREAMS[stream], payload


class _ChunkedBody:
    """`readexactly` over an HTTP/1.1 chunked body (how the engine streams logs)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()
        self._done = False

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n and not self._done:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self._done = True
                break
            self._buffer += await self._reader.readexactly(size)
            await self._reader.readexactly(2)
        if len(self._buffer) < n:
            raise asyncio.IncompleteReadError(bytes(self._buffer), n)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


async def _connect(api: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    base = str(api.base_url)
    adapter = getattr(api, "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    if base.startswith("http+docker://localhost") and socket_path:
        return await asyncio.open_unix_connection(socket_path, limit=1 << 20)
    if base.startswith("http://"):
        host, _, port = base.removeprefix("http://").partition(":")
        return await asyncio.open_connection(host, int(port or 2375), limit=1 << 20)
    raise Unavailable(
        f"docker: exec and logs need the engine on a unix socket or plain TCP, not {base}"
    )


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return head[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _ChunkedBody(reader)
        out = bytearray()
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                out += await body.readexactly(1)
        return bytes(out)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


class _EventFeed:
    """A thread that follows the engine's event stream for this node's containers and hands
    each event to the loop. The SDK's stream blocks, so it cannot live on the loop; it ends when
    the engine goes away, and the thread reconnects from the last event's time. `close()`
    cancels the stream (closing its socket unblocks the read) and joins the thread."""

    KINDS = frozenset({"die", "oom", "start", "destroy"})

    def __init__(
        self,
        api: Any,
        node_id: str,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[ContainerEvent],
    ) -> None:
        self._api, self._node_id, self._loop, self._queue = api, node_id, loop, queue
        self._closing = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"docker-events-{node_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        since: float | None = None
        last_nano = 0
        delay = 0.1
        while not self._closing.is_set():
            try:
                stream = self._api.events(
                    decode=True,
                    since=since,
                    filters={"label": f"{LABEL_NODE}={self._node_id}", "type": "container"},
                )
                with self._lock:
                    self._stream = stream
                if self._closing.is_set():
                    stream.close()
                    return
                delay = 0.1
                for raw in stream:
                    nano = int(raw.get("timeNano") or 0)
                    if nano and nano <= last_nano:
                        continue  # seen before the reconnect
                    last_nano = max(last_nano, nano)
                    since = nano / 1e9 if nano else since
                    event = _container_event(raw)
                    if event is not None and event.kind in self.KINDS:
                        self._hand_over(event)
            except Exception as exc:  # noqa: BLE001 - the engine went away: retry below
                if not self._closing.is_set():
                    log.warning("docker event stream failed (%s); reconnecting", exc)
            if not self._closing.wait(delay):
                delay = min(delay * 2, 5.0)

    def _hand_over(self, event: ContainerEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self._closing.set()


def _container_event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    actor = raw.get("Actor") or {}
    attributes: Mapping[str, str] = actor.get("Attributes") or {}
    kind = str(raw.get("Action") or raw.get("status") or "")
    container_id = str(actor.get("ID") or raw.get("id") or "")
    if not kind or not container_id:
        return None
    code = attributes.get("exitCode")
    nano = int(raw.get("timeNano") or 0)
    return ContainerEvent(
        kind=kind,
        container_id=container_id,
        instance_id=attributes.get(LABEL_INSTANCE_ID, ""),
        time=nano / 1e9 if nano else float(raw.get("time") or 0),
        exit_code=int(code) if code is not None and code.lstrip("-").isdigit() else None,
    )


def _explain(exc: docker.errors.APIError | docker.errors.NotFound) -> str:
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


def _port(labels: Mapping[str, str]) -> int | None:
    text = labels.get(LABEL_PORT, "")
    return int(text) if text.isdigit() else None


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


def _from_inspect(data: Mapping[str, Any]) -> ContainerInfo:
    labels: Mapping[str, str] = (data.get("Config") or {}).get("Labels") or {}
    state: Mapping[str, Any] = data.get("State") or {}
    status = str(state.get("Status", "unknown"))
    return ContainerInfo(
        id=data["Id"],
        name=str(data.get("Name", "")).lstrip("/"),
        status=status,
        exit_code=None if status in ("running", "created") else int(state.get("ExitCode", 0)),
        ip=_ip((data.get("NetworkSettings") or {}).get("Networks")),
        port=_port(labels),
        class_name=labels.get(LABEL_CLASS, ""),
        instance_name=labels.get(LABEL_INSTANCE, ""),
        instance_id=labels.get(LABEL_INSTANCE_ID, ""),
        labels=dict(labels),
        started_at=_time(state.get("StartedAt")),
        finished_at=_time(state.get("FinishedAt")),
        pid=int(state.get("Pid") or 0) or None,
    )


def _from_summary(data: Mapping[str, Any]) -> ContainerInfo:
    labels: Mapping[str, str] = data.get("Labels") or {}
    exited = _EXITED_STATUS.match(str(data.get("Status", "")))
    names = data.get("Names") or [""]
    return ContainerInfo(
        id=data["Id"],
        name=str(names[0]).lstrip("/"),
        status=str(data.get("State", "unknown")),
        exit_code=int(exited.group(1)) if exited else None,
        ip=_ip((data.get("NetworkSettings") or {}).get("Networks")),
        port=_port(labels),
        class_name=labels.get(LABEL_CLASS, ""),
        instance_name=labels.get(LABEL_INSTANCE, ""),
        instance_id=labels.get(LABEL_INSTANCE_ID, ""),
        labels=dict(labels),
    )


__all__ = [
    "CAP_DROP",
    "LABEL_CLASS",
    "LABEL_INSTANCE",
    "LABEL_INSTANCE_ID",
    "LABEL_NODE",
    "LABEL_OVERRIDES",
    "LABEL_PORT",
    "NETWORK_EGRESS",
    "NETWORK_INTERNAL",
    "NO_OVERRIDES",
    "PIDS_LIMIT",
    "ContainerEvent",
    "ContainerInfo",
    "ContainerRuntime",
    "DockerRuntime",
    "ExecProcess",
    "Overrides",
    "Stream",
    "container_name",
]

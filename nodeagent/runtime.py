"""The container runtime the node agent drives: a small `ContainerRuntime` protocol and its Docker
implementation (labels, private networks, resource limits), with Docker's blocking SDK off-loop."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig

from portside.errors import NotFound, Unavailable
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

    async def create(self, cls: ContainerClass, name: str) -> str:
        """Create (not start) the container of instance `name`; return its id. If it already
        exists (a create whose answer was lost), return the existing one's id."""

    async def start(self, container_id: str) -> ContainerInfo:
        """Start the container (no-op when running) and inspect it: its IP may change on
        every start. The returned status shows whether it already exited."""

    async def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s` seconds; no-op when not running."""

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

    def __init__(self, node_id: str, client: docker.DockerClient | None = None, *,
                 workers: int = 16, internal_network: str = NETWORK_INTERNAL,
                 egress_network: str = NETWORK_EGRESS) -> None:
        if not node_id or not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", node_id):
            raise ValueError(f"node id {node_id!r} cannot be part of a container name")
        self.node_id = node_id
        self._owns_client = client is None
        self._client = client if client is not None else docker.from_env(max_pool_size=workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._internal_network, self._egress_network = internal_network, egress_network
        self._networks: dict[str, str] = {}  # name -> id
        self._networks_lock = asyncio.Lock()

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
                    name, driver="bridge", internal=internal, check_duplicate=True,
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
            log.warning("%d docker networks are named %s; using the oldest, %s", len(existing),
                        name, chosen["Id"][:12])
        if chosen.get("Internal", False) != internal:
            raise Unavailable(f"docker: network {name} exists with internal="
                              f"{chosen.get('Internal')}; remove it so Portside can recreate it")
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
            self._client.api.containers, all=True,
            filters={"label": [f"{k}={v}" for k, v in wanted.items()]},
        )
        return [_from_summary(s) for s in summaries]

    async def create(self, cls: ContainerClass, name: str) -> str:
        network = await self._network_for(cls)
        try:
            return await self._call(self._create, cls, name, network)
        except NotFound as exc:
            if "network" not in str(exc):
                raise
            # Someone removed our network since it was ensured: make it again, once.
            self._networks.clear()
            return await self._call(self._create, cls, name, await self._network_for(cls))

    def _create(self, cls: ContainerClass, name: str, network: str) -> str:
        api = self._client.api
        iid = instance_id(cls.name, name)
        cname = container_name(self.node_id, iid)
        labels = {
            LABEL_CLASS: cls.name, LABEL_INSTANCE: name, LABEL_INSTANCE_ID: iid,
            LABEL_NODE: self.node_id, LABEL_PORT: str(cls.default_port),
            LABEL_VCPU: repr(cls.instance_type.vcpu),
            LABEL_MEMORY_MIB: str(cls.instance_type.memory_mib),
        }
        # Portside's variables win over the class's: the agent connects to PORT.
        env = {**cls.env, "PORTSIDE_CLASS": cls.name, "PORTSIDE_INSTANCE": name,
               "PORTSIDE_INSTANCE_ID": iid, "PORT": str(cls.default_port)}
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
                image=cls.image, name=cname, labels=labels, environment=env,
                entrypoint=list(cls.entrypoint) or None, host_config=host_config,
                networking_config=api.create_networking_config(
                    {network: api.create_endpoint_config()}),
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            # The name is taken: a create whose answer we lost (a cancelled boot, an agent crash
            # before it recorded the id). Reuse it if it is this instance's on this node.
            existing = api.inspect_container(cname)
            found = existing.get("Config", {}).get("Labels") or {}
            if found.get(LABEL_NODE) != self.node_id or found.get(LABEL_INSTANCE_ID) != iid:
                raise
            log.info("reusing existing container %s for %s/%s", cname, cls.name, name)
            reused: str = existing["Id"]
            return reused
        container_id: str = created["Id"]
        return container_id

    async def start(self, container_id: str) -> ContainerInfo:
        await self._call(self._client.api.start, container_id)
        return await self.inspect(container_id)

    async def stop(self, container_id: str, grace_s: float) -> None:
        # Docker takes whole seconds; 0 would mean an immediate SIGKILL.
        await self._call(self._client.api.stop, container_id, timeout=max(1, math.ceil(grace_s)))

    async def inspect(self, container_id: str) -> ContainerInfo:
        return _from_inspect(await self._call(self._client.api.inspect_container, container_id))

    async def remove(self, container_id: str, force: bool = False) -> None:
        try:
            await self._call(self._client.api.remove_container, container_id, force=force)
        except NotFound:
            pass

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_client:
            self._client.close()


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
        microsecond=int((fraction or "0")[:6].ljust(6, "0")), tzinfo=UTC)


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
    "CAP_DROP", "LABEL_CLASS", "LABEL_INSTANCE", "LABEL_INSTANCE_ID", "LABEL_NODE", "LABEL_PORT",
    "NETWORK_EGRESS", "NETWORK_INTERNAL", "PIDS_LIMIT", "ContainerInfo", "ContainerRuntime",
    "DockerRuntime", "container_name",
]

"""What the instance manager needs of a container engine: the `ContainerRuntime`,
`ImageEngine` and `SnapshotEngine` protocols and the values they speak, free of any engine's
terms.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from portside.spec import ContainerClass
from portside.terminal import TerminalSize


@dataclass(frozen=True)
class Overrides:
    """What a Start may change for one container: its entrypoint (empty: the class's) and env
    (added over the class's). Fixed when the container is created."""

    entrypoint: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """ "" for no overrides, else a short stable hash (kept with the container)."""
        if not self.entrypoint and not self.env:
            return ""
        canonical = json.dumps([list(self.entrypoint), sorted(self.env.items())])
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


NO_OVERRIDES = Overrides()


@dataclass(frozen=True)
class FromSnapshot:
    """A snapshot a container is made from instead of its class's image: the snapshot's id, its
    image's name in the engine, and the class image it was taken on. The container's labels keep
    the id and the class image, so a later snapshot of it records the class image it stands on."""

    snapshot_id: str
    reference: str
    class_image: str


Stream = Literal["stdout", "stderr"]


class ContainerEventKind(enum.StrEnum):
    """The engine's container events the agent follows."""

    DIE = "die"  # the main process exited (exit_code)
    OOM = "oom"  # the kernel's OOM killer hit it
    START = "start"
    DESTROY = "destroy"  # removed
    PAUSE = "pause"  # frozen (the agent's own freeze, or a docker pause behind its back)
    UNPAUSE = "unpause"  # thawed


@dataclass(frozen=True)
class ContainerEvent:
    """One of the engine's container events for this node; `time` is unix seconds (0: unknown)."""

    kind: ContainerEventKind
    container_id: str
    instance_id: str
    time: float
    exit_code: int | None = None


@dataclass(frozen=True)
class ContainerInfo:
    """What the agent needs to know about one of its containers.

    `status` is the engine's: created, running, paused, restarting, removing, exited or dead.
    `started_at`/`finished_at` are None when never, and always None from `list()`. `vcpu`,
    `memory_mib` and `overrides_digest` are what the container was made with, so that an agent
    that adopts it can account for it and tell whether a Start must make it again.
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
    vcpu: float = 0.0
    memory_mib: int = 0
    overrides_digest: str = ""
    version: int = 0  # the class version it was made from (0: unknown)
    image_id: str = ""  # the engine's id of the image it was made from
    # The class image its filesystem stands on (a digest, or a registry reference), and the
    # snapshot it was made from ("": its class's image); from its labels (see FromSnapshot).
    class_image: str = ""
    snapshot_id: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None  # the main process, while running (from inspect only)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def paused(self) -> bool:
        """Frozen by the cgroup freezer: its processes and memory are kept, it uses no CPU."""
        return self.status == "paused"


class ExecProcess(Protocol):
    """A command running inside a container: read its output, feed its stdin, get its code."""

    def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """stdout and stderr chunks as they come, until the command closes both."""

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None:
        """End its stdin (with a pseudo-terminal: type its end of input, ^D)."""

    async def resize(self, size: TerminalSize) -> None:
        """Give its pseudo-terminal a new size (no-op without one, or once it ended)."""

    async def exit_code(self) -> int:
        """After output() ended: the command's exit code."""

    async def close(self) -> None:
        """End the session: a command that still runs is hung up (SIGHUP, later SIGKILL)."""


class ContainerRuntime(Protocol):
    """Containers of ONE node. Every method may raise NotFound (no such container),
    EngineUnavailable (the engine cannot be reached) or EngineError (it failed the call);
    create raises ImageUnavailable for an image the node cannot run."""

    async def ensure_networks(self) -> None:
        """Create Portside's networks if they are absent (idempotent, safe to race)."""

    async def list(self) -> list[ContainerInfo]:
        """This node's containers, any status."""

    async def create(
        self,
        cls: ContainerClass,
        name: str,
        overrides: Overrides = NO_OVERRIDES,
        from_snapshot: FromSnapshot | None = None,
    ) -> str:
        """Create (not start) the container of instance `name`, from its class's image or
        `from_snapshot`'s; return its id. If it already exists (a create whose answer was lost),
        return the existing one's id."""

    async def start(self, container_id: str) -> ContainerInfo:
        """Start the container (no-op when running) and inspect it: its IP may change on
        every start. The returned status shows whether it already exited."""

    async def stop(
        self, container_id: str, grace_s: float, signum: int | None = None
    ) -> ContainerInfo | None:
        """`signum` (None: the image's stop signal, SIGTERM by default), then SIGKILL after
        `grace_s` seconds; no-op when not running. Returns the container as it stopped (its
        exit code, and when: `finished_at`), or None if it no longer exists."""

    async def signal(self, container_id: str, signum: int) -> None:
        """Send `signum` to the container's main process. FailedPrecondition: not running."""

    async def pause(self, container_id: str) -> None:
        """Freeze every process of the running container (the cgroup freezer): its memory and
        processes are kept, it uses no CPU. FailedPrecondition: not running, or paused already.
        A paused container can be stopped and removed as a running one."""

    async def unpause(self, container_id: str) -> None:
        """Thaw a paused container: its processes go on where they were. FailedPrecondition:
        it is not paused."""

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
        """Run `command` in the running container, as `user` (user[:group] or uid[:gid]; "": the
        image's), with a pseudo-terminal of size `tty` if given (its output all stdout).
        FailedPrecondition: not running."""

    def logs(
        self, container_id: str, follow: bool, tail: int
    ) -> AsyncIterator[tuple[Stream, bytes]]:
        """The container's output (the last `tail` lines first; 0: all), and with `follow` what
        it writes next, until it stops."""

    def events(self, since: float | None = None) -> AsyncIterator[ContainerEvent]:
        """This node's container events as the engine reports them, from unix time `since`
        (None: from now), until cancelled. Raises EngineUnavailable when the stream breaks (the
        engine restarted or went away): events from then on are lost, so the caller lists the
        containers again once the engine answers, and follows anew."""

    async def ping(self) -> None:
        """Return if the engine answers now; EngineUnavailable if not."""

    async def inspect(self, container_id: str) -> ContainerInfo: ...

    async def remove(self, container_id: str, force: bool = False) -> None:
        """Delete the container and its writable layer; no-op when it does not exist."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EngineImage:
    """An image the engine has: its id (sha256:<hex> of its config) and the names it goes by."""

    id: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistryCredential:
    """How to log in to one registry: a username and password, or an identity token. The
    secrets stay out of repr() so that no log line or traceback shows them."""

    username: str = ""
    password: str = field(default="", repr=False)
    identitytoken: str = field(default="", repr=False)


class ImageEngine(Protocol):
    """The images of ONE node's engine. Every method may raise EngineUnavailable or
    EngineError like ContainerRuntime's."""

    async def images(self) -> list[EngineImage]:
        """Every image the engine has (dangling ones too)."""

    async def image_id(self, reference: str) -> str | None:
        """The id of the image `reference` (a name, or an id) names now; None if none."""

    async def image_layers(self, image_id: str) -> tuple[str, ...]:
        """The diff ids of the image's layers, bottom first. NotFound: no such image."""

    async def load_image(self, archive: AsyncIterator[bytes]) -> list[str]:
        """Load an archive as `docker save` writes it, read as it streams (never held whole);
        return what the engine says it loaded (names, or ids of unnamed images). What the
        archive's iterator raises is raised."""

    async def tag_image(self, image_id: str, reference: str) -> None:
        """Name the image `reference` (moving the name if another image had it)."""

    async def pull_image(self, reference: str, credential: RegistryCredential | None) -> str:
        """Pull `reference` from its registry; return the image id. ImageUnavailable when the
        registry refuses or cannot be reached, with the registry's reason."""

    async def remove_image(self, reference: str) -> None:
        """Drop the name (or the image, for an id) unless a container uses it; no-op if gone."""


@dataclass(frozen=True)
class ImageParts:
    """What `SnapshotEngine.read_image` took out of an image: its config as the engine keeps it
    (the bytes its id is the sha256 of) and the layers asked for, each in a file (by diff id)."""

    config: bytes
    layers: Mapping[str, Path]


class SnapshotEngine(ImageEngine, Protocol):
    """What snapshots need of ONE node's engine beyond its images (nodeagent.snapshots)."""

    async def inspect(self, container_id: str) -> ContainerInfo: ...

    async def commit(self, container_id: str, reference: str) -> str:
        """Make an image of the container's filesystem (its image's layers, and its writable
        layer on top; a running container is frozen meanwhile), named `reference`, and return
        its id. Its config is the container's, env included: read what is needed out of it and
        remove it."""

    async def read_image(self, image_id: str, layers: Collection[str], into: Path) -> ImageParts:
        """The image's config, and those of its layers whose diff id is in `layers`, each
        written to a file in the folder `into` (read as the engine's export streams)."""

    async def image_settings(self, image_id: str) -> Mapping[str, Any]:
        """The image's run settings as the OCI image config's `config` holds them (Env, Cmd,
        Entrypoint, WorkingDir, User, ExposedPorts, Labels, ...)."""


__all__ = [
    "NO_OVERRIDES",
    "ContainerEvent",
    "ContainerEventKind",
    "ContainerInfo",
    "ContainerRuntime",
    "EngineImage",
    "ExecProcess",
    "FromSnapshot",
    "ImageEngine",
    "ImageParts",
    "Overrides",
    "RegistryCredential",
    "SnapshotEngine",
    "Stream",
]

"""Builds the images of a config's Dockerfile classes with the local Docker engine, names them by
digest, and pushes the ones the cluster's image store lacks: what `portside deploy` does first.

The control plane only ever sees a built reference and its digest (spec.ContainerClass).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from portside.config import BuildSpec, LoadedConfig
from portside.errors import ConfigError, EngineError, EngineUnavailable
from portside.spec import Config

if TYPE_CHECKING:
    import docker

__all__ = [
    "PUSH_CHUNK_BYTES",
    "BuiltImage",
    "ImageStore",
    "PushResult",
    "archive_chunks",
    "build_and_push",
    "build_image",
    "human_size",
    "image_reference",
    "open_engine",
    "snapshot_reference",
    "with_built_images",
]

log = logging.getLogger(__name__)

#: The bytes of `docker save` one PushImageRequest carries (the last may carry fewer).
PUSH_CHUNK_BYTES = 256 * 1024
#: How many of a failed build's last output lines are shown.
LOG_TAIL_LINES = 20
#: A push may take this long, plus a second per MB of its image (an upload of at least 1 MB/s).
PUSH_BASE_TIMEOUT_S = 60.0

REFERENCE_REPOSITORY = "portside"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
# Docker's grammar for a path component of a repository name (distribution/reference).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_SUCCESS = re.compile(r"Successfully built ([0-9a-f]{12,64})")

Report = Callable[[str], None]


@dataclass(frozen=True)
class BuiltImage:
    """An image built for a class: its id (`digest`, sha256:<64 hex>) and the tag it got."""

    class_name: str
    digest: str
    reference: str  # portside/<class>:<first 12 hex of digest>
    size_bytes: int  # uncompressed, as `docker images` shows it


@dataclass(frozen=True)
class PushResult:
    """What a PushImage stored: the image's size and what this push added to the store."""

    digest: str
    size_bytes: int
    stored_bytes: int  # 0: the store had every layer already


class ImageStore(Protocol):
    """The cluster's image store as a client reaches it (the SDK's `Portside` is one)."""

    async def stat_images(self, digests: Sequence[str]) -> set[str]: ...

    async def push_image(
        self, digest: str, reference: str, data: AsyncIterable[bytes], *, deadline_s: float
    ) -> PushResult: ...


def image_reference(class_name: str, digest: str) -> str:
    """`portside/<class name lowercased>:<first 12 hex of digest>`; a class name Docker would
    not take as a repository component (`web_`, `a___b`) has its runs of `_`/`-` made one `-`."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError(f"{digest!r} is not an image id (sha256:<64 hex>)")
    name = class_name.lower()
    if not _COMPONENT.fullmatch(name):
        name = re.sub(r"[-_]+", "-", name).strip("-")
    return f"{REFERENCE_REPOSITORY}/{name}:{match.group(1)[:12]}"


def snapshot_reference(class_name: str, digest: str) -> str:
    """What a snapshot of an instance of `class_name` is named in the cluster's image store and
    in engines: `portside/<class name lowercased>.snapshot:<first 12 hex of digest>` (its id)."""
    repository, tag = image_reference(class_name, digest).rsplit(":", 1)
    return f"{repository}.snapshot:{tag}"


def with_built_images(config: Config, built: Mapping[str, BuiltImage]) -> Config:
    """`config` with each built class's image set to its reference and digest."""
    classes = tuple(
        dataclasses.replace(
            cls, image=built[cls.name].reference, image_digest=built[cls.name].digest
        )
        if cls.name in built
        else cls
        for cls in config.classes
    )
    return dataclasses.replace(config, classes=classes)


def human_size(size: int) -> str:
    """1536 -> "1.5 KiB"; binary units, as instance types' MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def open_engine() -> docker.DockerClient:
    """The local Docker engine (DOCKER_HOST, else the default socket); EngineUnavailable if it
    does not answer."""
    import docker
    import requests

    try:
        engine = docker.from_env()
        engine.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        raise EngineUnavailable(
            f"cannot reach the Docker engine at {where} (DOCKER_HOST) to build images: {exc}"
        ) from exc
    return engine


def build_image(
    engine: docker.DockerClient,
    class_name: str,
    spec: BuildSpec,
    on_log: Callable[[str], None] | None = None,
) -> BuiltImage:
    """Build `spec` (blocking), tag it `image_reference(class_name, id)` and return it. Each line
    of the build's output goes to `on_log`. A failed build is a ConfigError naming the config
    file and the class's image, with the build's own reason; an engine that cannot be reached
    is EngineUnavailable."""
    import docker
    import requests

    dockerfile = _dockerfile_argument(spec)
    image_id = ""
    try:
        stream = engine.api.build(
            path=str(spec.context),
            dockerfile=dockerfile,
            buildargs=dict(spec.vars),
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in stream:
            image_id = _read_build_chunk(chunk, spec, class_name, on_log) or image_id
        if not image_id:
            raise _build_failed(spec, class_name, "the engine reported no image id")
        if not image_id.startswith("sha256:") or len(image_id) != 71:
            image_id = str(engine.api.inspect_image(image_id)["Id"])
        reference = image_reference(class_name, image_id)
        repository, _, tag = reference.rpartition(":")
        engine.api.tag(image_id, repository, tag)
        size = int(engine.api.inspect_image(image_id).get("Size") or 0)
    except docker.errors.APIError as exc:
        if exc.is_client_error():  # a bad Dockerfile or build arg: the user's to fix
            raise _build_failed(spec, class_name, str(exc.explanation or exc)) from exc
        raise EngineError(f"building {spec.source}: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineUnavailable(f"building {spec.source}: the Docker engine failed: {exc}") from exc
    except OSError as exc:  # the context could not be read (or packed)
        raise _build_failed(spec, class_name, f"cannot read the build context: {exc}") from exc
    return BuiltImage(class_name=class_name, digest=image_id, reference=reference, size_bytes=size)


def _dockerfile_argument(spec: BuildSpec) -> str:
    """The Dockerfile relative to the context; absolute when it lies outside (docker-py then
    sends it along with the context, as `docker build -f` does)."""
    try:
        return str(spec.dockerfile.relative_to(spec.context))
    except ValueError:
        return str(spec.dockerfile)


def _read_build_chunk(
    chunk: Mapping[str, Any],
    spec: BuildSpec,
    class_name: str,
    on_log: Callable[[str], None] | None,
) -> str:
    """One decoded message of a build's progress: its log lines to `on_log`, the image id if it
    carries one, a ConfigError if it says the build failed."""
    text = chunk.get("stream")
    found = ""
    if isinstance(text, str):
        for line in text.splitlines():
            if on_log is not None and line.strip():
                on_log(line.rstrip())
            success = _SUCCESS.search(line)
            if success:
                found = success.group(1)
    if "error" in chunk or "errorDetail" in chunk:
        detail = chunk.get("errorDetail") or {}
        reason = chunk.get("error") or (detail.get("message") if isinstance(detail, dict) else "")
        raise _build_failed(spec, class_name, str(reason or "failed").strip())
    aux = chunk.get("aux")
    if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
        found = aux["ID"]
    return found


def _build_failed(spec: BuildSpec, class_name: str, reason: str) -> ConfigError:
    return ConfigError(
        spec.file,
        f"{spec.at}.image" if spec.at else "image",
        f"building class {class_name} from {spec.source} failed: {reason}",
    )


async def archive_chunks(
    engine: docker.DockerClient, image: str, chunk_bytes: int = PUSH_CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """`docker save` of `image` (an id or a reference), streamed from the engine in pieces of
    about `chunk_bytes` (read in a thread: docker-py blocks). Saved by its reference, the
    archive's manifest names that tag, so `docker load` of it tags the image again."""
    import docker
    import requests

    pieces: Iterator[bytes] | None = None

    def read(source: Iterator[bytes]) -> bytes:
        return next(source, b"")

    try:
        pieces = stream = await asyncio.to_thread(engine.api.get_image, image, chunk_bytes)
        while piece := await asyncio.to_thread(read, stream):
            yield piece
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineUnavailable(f"reading image {image} from the Docker engine: {exc}") from exc
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


async def build_and_push(
    loaded: LoadedConfig,
    store: ImageStore,
    *,
    report: Report | None = None,
    on_build_failure: Callable[[Sequence[str]], None] | None = None,
) -> Config:
    """Build every class of `loaded` whose image is a build path, push the images `store`
    lacks, and return the config to deploy: each built class with its reference and digest.

    Progress goes to `report`, one line at a time; a failed build's last output lines go to
    `on_build_failure` (default: `report`) before its ConfigError is raised, and nothing is
    pushed then. A config without builds returns as it is, without touching Docker.
    """
    say = report or (lambda line: log.info("%s", line))
    if not loaded.builds:
        return loaded.config
    engine = await asyncio.to_thread(open_engine)
    try:
        built: dict[str, BuiltImage] = {}
        for name, spec in loaded.builds.items():
            built[name] = await _build_one(engine, name, spec, say, on_build_failure)
        await _push_missing(engine, store, list(built.values()), say)
    finally:
        engine.close()
    return with_built_images(loaded.config, built)


async def _build_one(
    engine: docker.DockerClient,
    name: str,
    spec: BuildSpec,
    say: Report,
    on_build_failure: Callable[[Sequence[str]], None] | None,
) -> BuiltImage:
    context = f" (context {spec.context})" if spec.context != spec.dockerfile.parent else ""
    say(f"building {name} from {spec.source}{context} ...")
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    try:
        image = await asyncio.to_thread(build_image, engine, name, spec, tail.append)
    except ConfigError:
        lines = [f"  | {line}" for line in tail]
        if on_build_failure is not None:
            on_build_failure(lines)
        else:
            for line in lines:
                say(line)
        raise
    say(f"built {name}: {image.reference} ({image.digest[:19]}), {human_size(image.size_bytes)}")
    return image


async def _push_missing(
    engine: docker.DockerClient, store: ImageStore, images: Sequence[BuiltImage], say: Report
) -> None:
    """Push each distinct image the store does not hold whole (by its first class's tag)."""
    first: dict[str, BuiltImage] = {}
    for image in images:
        first.setdefault(image.digest, image)
    unique = list(first.values())
    held = await store.stat_images([image.digest for image in unique])
    for image in unique:
        if image.digest in held:
            say(f"the cluster has {image.reference} already")
            continue
        say(f"pushing {image.reference} ({human_size(image.size_bytes)}) ...")
        sent = 0

        async def counted(image: BuiltImage = image) -> AsyncIterator[bytes]:
            nonlocal sent
            async for piece in archive_chunks(engine, image.reference):
                sent += len(piece)
                yield piece

        timeout = PUSH_BASE_TIMEOUT_S + image.size_bytes / 1_000_000
        result = await store.push_image(
            image.digest, image.reference, counted(), deadline_s=timeout
        )
        added = (
            f"the store added {human_size(result.stored_bytes)}"
            if result.stored_bytes
            else "the store had every layer"
        )
        say(f"pushed {image.reference}: sent {human_size(sent)}, {added}")

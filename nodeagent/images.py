"""How a node's engine gets the images its classes need: a built image from the control plane by
digest (no registry; verified, layers the engine has left out), a reference from its registry.

    ImageKeeper.ensure(cls)    before a container is created: the image is there, named cls.image
    ImageKeeper.want(digests)  a heartbeat reply's prefetch list; run() pulls the missing ones
    ImageKeeper.reported()     the Portside images the engine has, for the heartbeat
    ImageKeeper.keep(digests)  a heartbeat reply's keep list; run() removes the Portside images
                               outside it that no container uses, at most once a minute

One pull per image at a time: boots and the prefetcher that need the same image wait for the
same pull, which goes on in the background when a boot gives up on it (the next boot finds it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
import re
import time
import tomllib
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from nodeagent import metrics
from nodeagent.runtime.protocol import EngineImage, ImageEngine, RegistryCredential
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import (
    ConfigError,
    ImageUnavailable,
    PortsideError,
)
from portside.imagepull import PULL_STALL_S, pull_image
from portside.spec import ContainerClass

log = logging.getLogger(__name__)

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Images `portside deploy` built are named portside/<class>:<12 hex of the digest>.
PORTSIDE_REPOSITORY = "portside/"
DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# Prefetches that failed are tried again after 5 s, 10 s, 20 s … at most 5 minutes.
PREFETCH_RETRY_FIRST_S = 5.0
PREFETCH_RETRY_MOST_S = 300.0
# The control plane reads a layer from its store while it streams: a stream silent this long
# has stalled (a whole pull may take much longer).
# Images outside the cluster's keep list are removed at most this often; one this node pulled
# or booted from this recently stays (its keep list may be older than the pull).
REMOVE_EVERY_S = 60.0
RECENTLY_USED_S = 600.0


# -- pure parts -------------------------------------------------------------------------------


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain id of every layer of an image (OCI image spec): the first layer's is its diff
    id, each next one's sha256 of "<parent's chain id> <diff id>"."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            pair = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(pair).hexdigest())
    return chains


def engine_chain_ids(layers: Iterable[Sequence[str]]) -> list[str]:
    """Every layer chain of these images (each given by its diff ids), once, sorted."""
    return sorted({chain for diff_ids in layers for chain in chain_ids(diff_ids)})


def portside_images(
    images: Iterable[EngineImage], class_digests: Collection[str]
) -> frozenset[str]:
    """The digests of the Portside images among `images`: those a class names by digest, and
    those named portside/… (built by portside deploy, of a class since changed)."""
    return frozenset(
        i.id
        for i in images
        if i.id in class_digests or any(t.startswith(PORTSIDE_REPOSITORY) for t in i.tags)
    )


def images_to_remove(
    reported: Collection[str], keep: Collection[str], protected: Collection[str]
) -> list[str]:
    """The Portside images the engine has that the cluster no longer keeps and nothing here
    protects (a class's current image, a wanted or recently used one); sorted."""
    return sorted(d for d in reported if d not in keep and d not in protected)


def repository(reference: str) -> str:
    """ "portside/web" of "portside/web:0123abcd"; a registry's port is not a tag."""
    name, sep, tag = reference.rpartition(":")
    return name if sep and "/" not in tag else reference


def registry_host(reference: str) -> str:
    """The registry a reference names ("ghcr.io/a/b:1" → "ghcr.io"; "nginx" → "docker.io"),
    as Docker reads it: a first part with a dot or a port, or localhost, is a host."""
    first, sep, _rest = reference.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return _canonical_host(first)
    return DOCKER_HUB


def _canonical_host(text: str) -> str:
    host = text.strip().lower()
    host = host.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return DOCKER_HUB if host in _HUB_ALIASES else host


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials per registry host (repr shows the hosts only)."""

    credentials: Mapping[str, RegistryCredential] = field(default_factory=dict)

    def for_reference(self, reference: str) -> RegistryCredential | None:
        return self.credentials.get(registry_host(reference))


def parse_registry_auth(text: str, file: str) -> RegistryAuth:
    """Read --registry-auth FILE's text: JSON or TOML, a table of registry host → {username,
    password} or {identitytoken} (Docker's config.json, {"auths": {host: {"auth": …}}}, reads
    too). Errors name the file and the host, never a secret."""
    data: Any
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(file, problem=f"neither JSON nor TOML ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("auths"), dict):
        data = data["auths"]
    if not isinstance(data, dict):
        raise ConfigError(file, problem="must map registry hosts to credentials")
    credentials: dict[str, RegistryCredential] = {}
    for host, entry in data.items():
        if not isinstance(entry, dict):
            raise ConfigError(file, str(host), "must be a table of username and password")
        credentials[_canonical_host(str(host))] = _credential(entry, file, str(host))
    return RegistryAuth(credentials)


def _credential(entry: Mapping[str, Any], file: str, host: str) -> RegistryCredential:
    fields = {k: v for k, v in entry.items() if k in ("username", "password", "identitytoken")}
    if any(not isinstance(v, str) for v in fields.values()):
        raise ConfigError(file, host, "username, password and identitytoken must be strings")
    if "auth" in entry:  # Docker's config.json: base64 of "username:password"
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(file, host, "auth must be base64 of username:password") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ConfigError(file, host, "auth must be base64 of username:password")
        fields.setdefault("username", user)
        fields.setdefault("password", password)
    if fields.get("identitytoken"):
        return RegistryCredential(
            username=fields.get("username", ""), identitytoken=fields["identitytoken"]
        )
    if fields.get("username") and fields.get("password"):
        return RegistryCredential(username=fields["username"], password=fields["password"])
    raise ConfigError(file, host, "needs username and password, or identitytoken")


def load_registry_auth(path: str) -> RegistryAuth:
    """Read --registry-auth FILE; ConfigError if it cannot be read or is not valid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, problem=f"cannot be read: {exc.strerror or exc}") from None
    return parse_registry_auth(text, path)


@dataclass(frozen=True)
class Failure:
    """The prefetches of one image that failed in a row, and when to try again."""

    count: int
    retry_at: float


def after_failure(previous: Failure | None, now: float) -> Failure:
    count = (previous.count if previous is not None else 0) + 1
    delay = min(PREFETCH_RETRY_MOST_S, PREFETCH_RETRY_FIRST_S * 2 ** (count - 1))
    return Failure(count, now + delay)


def next_prefetch(
    wanted: Sequence[str],
    present: Collection[str],
    failures: Mapping[str, Failure],
    now: float,
) -> str | None:
    """The first wanted image the engine lacks whose backoff (if it failed) has passed."""
    for digest in wanted:
        failed = failures.get(digest)
        if digest not in present and (failed is None or failed.retry_at <= now):
            return digest
    return None


def next_retry(
    wanted: Sequence[str], present: Collection[str], failures: Mapping[str, Failure]
) -> float | None:
    """When the earliest backoff of a wanted, missing image ends (None: none is waiting)."""
    times = [failures[d].retry_at for d in wanted if d not in present and d in failures]
    return min(times) if times else None


# -- the control plane as a source ------------------------------------------------------------


class ImageSource(Protocol):
    """Where images by digest come from."""

    def pull(self, digest: str, have_chain_ids: Sequence[str]) -> AsyncIterator[bytes]:
        """The bytes of an archive `docker load` reads, leaving out the layers whose chain is
        in `have_chain_ids`. Raises a PortsideError (NotFound: nobody holds it)."""


class ControlPlaneImages:
    """`ImageSource` over the agent's channel to the control plane (PullImage)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        stall_s: float = PULL_STALL_S,
        name: str = "the control plane",
    ) -> None:
        self._stub = cp_grpc.ControlPlaneStub(channel)
        self._stall_s, self._name = stall_s, name

    def pull(self, digest: str, have_chain_ids: Sequence[str]) -> AsyncIterator[bytes]:
        return pull_image(
            self._stub, digest, have_chain_ids, name=self._name, stall_s=self._stall_s
        )


# -- the keeper -------------------------------------------------------------------------------


class ImageSupply(Protocol):
    """What the instance manager needs before it creates a container."""

    async def ensure(self, cls: ContainerClass) -> None:
        """Return once the engine has `cls`'s image under `cls.image`; ImageUnavailable (with
        the reason) if it cannot get it."""

    def pulling(self, cls: ContainerClass) -> bool:
        """Whether `cls`'s image is being pulled now."""


class ImageKeeper:
    """The images of this node's engine: gets what boots need (`ensure`), prefetches what the
    control plane asks for (`want`, `run`), and knows which Portside images it has (`reported`).

    `classes` answers the deployed classes: which digests are Portside images, and the name to
    give a prefetched one."""

    def __init__(
        self,
        engine: ImageEngine,
        source: ImageSource,
        classes: Callable[[], Iterable[ContainerClass]],
        *,
        node_id: str = "",
        registry_auth: RegistryAuth | None = None,
        on_change: Callable[[], None] | None = None,
        refresh_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine, self._source, self._classes = engine, source, classes
        self._node = f"node {node_id}" if node_id else "this node"
        self._auth = registry_auth or RegistryAuth()
        self._on_change = on_change
        self._refresh_s = refresh_s
        self._clock = clock
        self._pulls: dict[str, asyncio.Task[None]] = {}  # by digest, or by reference
        self._layers: dict[str, tuple[str, ...]] = {}  # diff ids by image id (ids never change)
        self._engine_ids: frozenset[str] = frozenset()
        self._reported: frozenset[str] = frozenset()
        self._version = 0
        self._wanted: tuple[str, ...] = ()
        self._failures: dict[str, Failure] = {}
        self._wake = asyncio.Event()
        self._keep: frozenset[str] | None = None  # None: the control plane has not said
        self._next_removal = clock()
        self._used: dict[str, float] = {}  # digest -> when a boot or a pull last needed it

    # -- boots --------------------------------------------------------------------------------

    async def ensure(self, cls: ContainerClass) -> None:
        try:
            outcome = await self._ensure(cls)
        except PortsideError as exc:
            metrics.IMAGE_CHECKS.labels("failed").inc()
            if isinstance(exc, ImageUnavailable):  # the boot's error names the class
                raise ImageUnavailable(f"class {cls.name}: {exc}") from exc
            raise
        metrics.IMAGE_CHECKS.labels(outcome).inc()

    async def _ensure(self, cls: ContainerClass) -> str:
        if not cls.image_digest:
            if await self._engine.image_id(cls.image) is not None:
                return "present"
            await self._shared(cls.image, functools.partial(self._pull_registry, cls.image))
            return "pulled"
        digest = cls.image_digest
        if not DIGEST.fullmatch(digest):
            raise ImageUnavailable(f"image_digest {digest!r} is not sha256:<64 hex digits>")
        self._used[digest] = self._clock()
        if await self._engine.image_id(cls.image) == digest:
            return "present"
        outcome = "tagged"
        if await self._engine.image_id(digest) is None:
            await self._shared(digest, functools.partial(self._pull_controlplane, digest))
            outcome = "pulled"
        await self._engine.tag_image(digest, cls.image)
        return outcome

    def pulling(self, cls: ContainerClass) -> bool:
        return cls.run_image in self._pulls

    def _shared(
        self, key: str, pull: Callable[[], Coroutine[Any, Any, None]]
    ) -> asyncio.Future[None]:
        """Wait for the pull of `key`, starting it unless one runs. Shielded: a waiter that gives
        up (its boot timed out) leaves it running for the next."""
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(pull(), name=f"pull {key}")
            self._pulls[key] = task
            task.add_done_callback(functools.partial(self._pulled, key))
        return asyncio.shield(task)

    def _pulled(self, key: str, task: asyncio.Task[None]) -> None:
        if self._pulls.get(key) is task:
            del self._pulls[key]
        if not task.cancelled():
            task.exception()  # its waiters heard it; nobody else need

    async def _pull_controlplane(self, digest: str) -> None:
        started = self._clock()
        self._used[digest] = started
        outcome = "error"
        try:
            before = await self._engine.images()
            have = await self._chain_ids(before)
            log.info(
                "pulling image %s from the control plane (%d layer chains here)", digest, len(have)
            )
            loaded = await self._engine.load_image(_counted(self._source.pull(digest, have)))
            if await self._engine.image_id(digest) != digest:
                outcome = "mismatch"
                await self._discard(loaded, before, digest)
                raise ImageUnavailable(
                    f"image {digest} from the control plane did not load as its digest: the "
                    f"engine loaded {', '.join(loaded) or 'nothing'} instead"
                )
            outcome = "ok"
        except PortsideError as exc:
            log.warning("could not get image %s from the control plane: %s", digest, exc)
            if outcome == "mismatch":
                raise
            raise ImageUnavailable(
                f"image {digest} is not on {self._node} and could not be got from the control "
                f"plane: {exc}"
            ) from exc
        finally:
            metrics.IMAGE_PULLS.labels("controlplane", outcome).inc()
            metrics.IMAGE_PULL_SECONDS.labels("controlplane").observe(self._clock() - started)
        log.info("got image %s from the control plane in %.1fs", digest, self._clock() - started)
        await self.refresh_quietly()

    async def _discard(
        self, loaded: Sequence[str], before: Sequence[EngineImage], digest: str
    ) -> None:
        """Remove what a wrong archive added (names and images the engine did not have before):
        nothing may run it by mistake."""
        known = {i.id for i in before} | {t for i in before for t in i.tags} | {digest}
        for name in loaded:
            if name not in known:
                try:
                    await self._engine.remove_image(name)
                except PortsideError as exc:
                    log.warning("could not remove %s, loaded in place of an image: %s", name, exc)

    async def _chain_ids(self, images: Sequence[EngineImage]) -> list[str]:
        ids = {i.id for i in images}
        for gone in set(self._layers) - ids:
            del self._layers[gone]
        for image_id in ids - set(self._layers):
            try:
                self._layers[image_id] = await self._engine.image_layers(image_id)
            except PortsideError:
                continue  # removed meanwhile, or unreadable: its layers are sent
        return engine_chain_ids(self._layers.values())

    async def _pull_registry(self, reference: str) -> None:
        credential = self._auth.for_reference(reference)
        started = self._clock()
        outcome = "error"
        try:
            log.info(
                "pulling %s from its registry%s",
                reference,
                " with the credentials configured for it" if credential is not None else "",
            )
            await self._engine.pull_image(reference, credential)
            outcome = "ok"
        except PortsideError as exc:
            log.warning("could not pull %s: %s", reference, exc)
            raise ImageUnavailable(
                f"image {reference!r} is not on {self._node} and could not be pulled: {exc}"
            ) from exc
        finally:
            metrics.IMAGE_PULLS.labels("registry", outcome).inc()
            metrics.IMAGE_PULL_SECONDS.labels("registry").observe(self._clock() - started)
        await self.refresh_quietly()

    # -- the heartbeat ------------------------------------------------------------------------

    def reported(self) -> tuple[frozenset[str], int]:
        """The Portside images the engine has, and a number that grows when they change."""
        return self._reported, self._version

    def keep(self, digests: Iterable[str]) -> None:
        """The control plane's latest list of the images the cluster keeps: run() removes the
        Portside images outside it that no container uses."""
        keep = frozenset(d for d in digests if DIGEST.fullmatch(d))
        if keep != self._keep:
            self._keep = keep
            self._wake.set()

    def removable(self) -> list[str]:
        """The Portside images run() would remove now (none before a keep list came)."""
        if self._keep is None:
            return []
        now = self._clock()
        protected = {c.image_digest for c in self._classes() if c.image_digest}
        protected |= set(self._wanted) | set(self._pulls)
        protected |= {d for d, at in self._used.items() if now - at < RECENTLY_USED_S}
        return images_to_remove(self._reported, self._keep, protected)

    async def remove_unkept(self) -> None:
        """Remove the images `removable()` names, each unless a container uses it (the engine
        refuses; never forced), logging and counting each; then report the images again."""
        candidates = self.removable()
        for digest in candidates:
            outcome = "error"
            try:
                outcome = await self._remove(digest)
            except PortsideError as exc:
                log.warning(
                    "could not remove image %s, which the cluster no longer keeps: %s", digest, exc
                )
            metrics.IMAGE_REMOVALS.labels(outcome).inc()
            if outcome == "removed":
                self._used.pop(digest, None)
                log.info("removed image %s: the cluster no longer keeps it", digest)
            elif outcome == "in_use":
                log.info(
                    "kept image %s, which the cluster no longer keeps: a container uses it", digest
                )
        if candidates:
            await self.refresh_quietly()

    async def _remove(self, digest: str) -> str:
        """Remove the image by its id, which the engine refuses while a container (running or
        not) uses it. One named in several repositories (two classes built the same image)
        the engine removes only name by name: the last name is refused while it is in use."""
        names = next((i.tags for i in await self._engine.images() if i.id == digest), ())
        await self._engine.remove_image(digest)
        if await self._engine.image_id(digest) is not None and len(set(map(repository, names))) > 1:
            for name in names:
                await self._engine.remove_image(name)
                if await self._engine.image_id(digest) is None:
                    break
        return "removed" if await self._engine.image_id(digest) is None else "in_use"

    def want(self, digests: Iterable[str]) -> None:
        """The control plane's latest list of images this node should have."""
        wanted = tuple(dict.fromkeys(d for d in digests if DIGEST.fullmatch(d)))
        if wanted != self._wanted:
            self._wanted = wanted
            self._wake.set()

    async def refresh(self) -> None:
        """Look at the engine's images again; tell `on_change` if the Portside ones changed."""
        images = await self._engine.images()
        self._engine_ids = frozenset(i.id for i in images)
        digests = {c.image_digest for c in self._classes() if c.image_digest}
        found = portside_images(images, digests)
        metrics.IMAGES.set(len(found))
        if found != self._reported:
            self._reported, self._version = found, self._version + 1
            if self._on_change is not None:
                self._on_change()

    async def refresh_quietly(self) -> None:
        """refresh(), logging instead of raising when the engine does not answer."""
        try:
            await self.refresh()
        except PortsideError as exc:
            log.warning("could not list the engine's images: %s", exc)

    async def run(self) -> None:
        """Until cancelled: look at the engine's images every refresh_s (an image removed, a
        deploy naming one), pull the wanted images it lacks, one at a time, with backoff, and
        remove those the cluster no longer keeps, at most once every REMOVE_EVERY_S."""
        next_refresh = self._clock()
        while True:
            if self._clock() >= next_refresh:
                await self.refresh_quietly()
                next_refresh = self._clock() + self._refresh_s
            if self._clock() >= self._next_removal and self.removable():
                self._next_removal = self._clock() + REMOVE_EVERY_S
                await self.remove_unkept()
            digest = next_prefetch(self._wanted, self._engine_ids, self._failures, self._clock())
            if digest is not None:
                await self._prefetch(digest)
                continue
            wake_at = next_refresh
            if self.removable():
                wake_at = min(wake_at, self._next_removal)
            retry = next_retry(self._wanted, self._engine_ids, self._failures)
            if retry is not None:
                wake_at = min(wake_at, retry)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - self._clock()))
            except TimeoutError:
                pass

    async def _prefetch(self, digest: str) -> None:
        reference = next((c.image for c in self._classes() if c.image_digest == digest), "")
        try:
            await self._shared(digest, functools.partial(self._pull_controlplane, digest))
            if reference:
                await self._engine.tag_image(digest, reference)
        except PortsideError as exc:
            failure = after_failure(self._failures.get(digest), self._clock())
            self._failures[digest] = failure
            metrics.IMAGE_PREFETCHES.labels("error").inc()
            log.warning(
                "prefetch of image %s failed (%d in a row; next try in %.0fs): %s",
                digest,
                failure.count,
                failure.retry_at - self._clock(),
                exc,
            )
            return
        self._failures.pop(digest, None)
        self._engine_ids |= {digest}
        metrics.IMAGE_PREFETCHES.labels("ok").inc()

    async def close(self) -> None:
        """Cancel the pulls in progress (an agent that stops)."""
        tasks = list(self._pulls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _counted(archive: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in archive:
            metrics.IMAGE_PULL_BYTES.inc(len(chunk))
            yield chunk
    finally:
        aclose = getattr(archive, "aclose", None)
        if aclose is not None:
            await aclose()


__all__ = [
    "DIGEST",
    "PORTSIDE_REPOSITORY",
    "ControlPlaneImages",
    "Failure",
    "ImageKeeper",
    "ImageSource",
    "ImageSupply",
    "RegistryAuth",
    "after_failure",
    "chain_ids",
    "engine_chain_ids",
    "images_to_remove",
    "load_registry_auth",
    "next_prefetch",
    "next_retry",
    "parse_registry_auth",
    "portside_images",
    "registry_host",
]

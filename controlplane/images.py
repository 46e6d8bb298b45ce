"""A control plane replica's content-addressed image store on disk: `docker save` archives
taken in verified, layer by layer, and given out again as archives that `docker load` reads.

Layout under the image directory (docs/architecture.md, "Images"):
    blobs/sha256/<hex>   image configs and uncompressed layer tars, by their sha256 (a layer
                         shared by two images is kept once)
    images/<hex>.json    one record per image (its config's hex): reference, diff ids, sizes;
                         written last, so an image with a record is held whole
    tmp/<upload>/        what a push spills to disk before it is verified (removed after)
Every file is written under another name and renamed into place, so a reader never sees half.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from controlplane.imagetar import (
    END_OF_ARCHIVE,
    ChunkReader,
    Member,
    file_header,
    next_member,
    padding,
)
from portside.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # an export's message size, and a push's disk write
# An archive's JSON members (manifest, config, per-layer json) are kept in memory, up to this
# much in all; every other member is hashed into a temporary file as it arrives.
IN_MEMORY_MAX = 4 * 1024 * 1024
MEMBERS_MAX = 100_000  # an image has at most a few hundred layers; more members is an attack
STALE_UPLOAD_S = 6 * 3600.0  # an upload folder untouched this long was left by a dead push
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# What `portside deploy` names a built image: portside/<component>:<first 12 hex of its digest>.
# Nothing else: the name goes into every engine that loads the image, and a pushed image named
# like a registry image (postgres:16) would stand in for it there.
_REFERENCE = re.compile(r"portside/[a-z0-9]+(?:[._-][a-z0-9]+)*:([0-9a-f]{12})")


def check_digest(digest: str, field: str = "digest") -> str:
    """`digest` if it is `sha256:<64 lowercase hex>`, else InvalidArgument naming `field`."""
    if not _DIGEST.fullmatch(digest):
        raise InvalidArgument(
            f"{field}: {digest!r} is not an image digest: expected sha256:<64 lowercase hex>, "
            "the image id `docker inspect --format {{.Id}}` prints"
        )
    return digest


def check_reference(reference: str, digest: str) -> str:
    """`reference` if it is the name `portside deploy` gives the image `digest` (or empty)."""
    found = _REFERENCE.fullmatch(reference)
    if reference and (found is None or not digest.startswith("sha256:" + found.group(1))):
        short = digest.removeprefix("sha256:")[:12]
        raise InvalidArgument(
            f"reference: {reference!r} is not this image's name: expected "
            f"portside/<name>:{short}, as `portside deploy` names it"
        )
    return reference


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Each layer's chain id (OCI image spec): the first layer's is its diff id, each next one
    sha256 of "<parent's chain id> <diff id>". An engine holds a layer by its chain."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append("sha256:" + hashlib.sha256(text).hexdigest())
    return out


@dataclass(frozen=True)
class StoredImage:
    """An image the store holds whole: its config's digest is its id."""

    digest: str
    reference: str
    diff_ids: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    config_size: int
    stored_at: float

    @property
    def size_bytes(self) -> int:
        return self.config_size + sum(self.layer_sizes)

    def encode(self) -> bytes:
        body = {
            "digest": self.digest,
            "reference": self.reference,
            "diff_ids": list(self.diff_ids),
            "layer_sizes": list(self.layer_sizes),
            "config_size": self.config_size,
            "stored_at": self.stored_at,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> StoredImage:
        body = json.loads(data)
        return cls(
            digest=body["digest"],
            reference=body["reference"],
            diff_ids=tuple(body["diff_ids"]),
            layer_sizes=tuple(body["layer_sizes"]),
            config_size=body["config_size"],
            stored_at=body["stored_at"],
        )


@dataclass(frozen=True)
class Ingested:
    """What a push gave the store: the image, and the bytes it added (0: every blob was there)."""

    image: StoredImage
    stored_bytes: int


@dataclass(frozen=True)
class Removed:
    """What removing images freed: their records, and the blobs no other image uses."""

    images: int
    blobs: int
    bytes: int


@dataclass(frozen=True)
class Received:
    """One file of a pushed archive, hashed as it arrived: small ones kept in `data`, large
    ones spilled to `path`; neither when the store held its blob already (`held`)."""

    sha256: str  # "sha256:<hex>"
    size: int
    data: bytes | None = None
    path: Path | None = None
    held: bool = False


@dataclass(frozen=True)
class Verified:
    """A pushed archive that matches its digest: the config and the layers, in order."""

    config: Received
    layers: tuple[Received, ...]
    diff_ids: tuple[str, ...]


def _no_blobs(digest: str) -> int | None:
    return None


def verify_archive(
    digest: str,
    files: Mapping[str, Received],
    links: Mapping[str, str],
    held_blob: Callable[[str], int | None] = _no_blobs,
) -> Verified:
    """Check a received `docker save` archive against `digest`: manifest.json names a config
    whose sha256 is `digest`, and layers whose sha256s are the config's rootfs.diff_ids, in
    order. InvalidArgument names what did not match.

    A layer the archive leaves out is taken from the store if `held_blob(diff id)` gives its
    size: a blob's name is its verified sha256, so it is that layer (an export to a replica
    leaves out the layers whose chains the replica sent, as one to an engine does)."""

    def resolve(name: str) -> str:
        seen: set[str] = set()
        while name in links and name not in seen:  # docker save links a repeated layer
            seen.add(name)
            name = links[name]
        return name

    def member(name: str, what: str) -> Received:
        name = resolve(name)
        found = files.get(name)
        if found is None:
            raise InvalidArgument(f"the archive's manifest.json names {what} {name!r}, absent")
        return found

    manifest_file = files.get("manifest.json")
    if manifest_file is None or manifest_file.data is None:
        raise InvalidArgument(
            "the archive has no manifest.json: push what `docker save IMAGE` writes"
        )
    try:
        manifest = json.loads(manifest_file.data)
        entries = [(str(e["Config"]), [str(x) for x in e["Layers"]]) for e in manifest]
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(
            f"the archive's manifest.json is not a docker manifest: {exc}"
        ) from exc
    found_configs = []
    for config_name, layer_names in entries:  # noqa: B007 - the matching entry's are used
        config = member(config_name, "config")
        found_configs.append(f"{config_name} ({config.sha256})")
        if config.sha256 == digest:
            break
    else:
        raise InvalidArgument(
            f"the archive holds no config whose sha256 is the pushed digest {digest}: its "
            f"manifest.json names {', '.join(found_configs) or 'no image'}"
        )
    if config.data is None:
        raise InvalidArgument(f"the archive's config {config_name} is too large for a config")
    try:
        body: Any = json.loads(config.data)
        diff_ids = tuple(str(d) for d in body["rootfs"]["diff_ids"])
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(
            f"the archive's config {config_name} has no rootfs.diff_ids: {exc}"
        ) from exc
    for i, diff_id in enumerate(diff_ids):
        check_digest(diff_id, f"config rootfs.diff_ids[{i}]")
    if len(diff_ids) != len(layer_names):
        raise InvalidArgument(
            f"the archive's manifest.json lists {len(layer_names)} layers, its config "
            f"{len(diff_ids)} diff ids"
        )
    layers = []
    for i, (name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True)):
        size = held_blob(diff_id) if resolve(name) not in files else None
        if size is not None:
            layers.append(Received(diff_id, size, held=True))
            continue
        layer = member(name, f"layer {i + 1}")
        if layer.sha256 != diff_id:
            raise InvalidArgument(
                f"layer {i + 1} of {len(diff_ids)} ({name}) has sha256 {layer.sha256}, but the "
                f"config's rootfs.diff_ids[{i}] is {diff_id}: the archive was altered or damaged"
            )
        layers.append(layer)
    return Verified(config, tuple(layers), diff_ids)


class ImageStore:
    """The image store under `root`. Safe to share between replicas on one machine: every
    write is a rename of a complete file, and equal names mean equal content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.records = root / "images"
        self.tmp = root / "tmp"
        # Taking a verified image in and removing images are exclusive: a removal must not
        # take a blob an image being taken in found already there (within this process).
        self._writing = asyncio.Lock()

    def prepare(self) -> None:
        """Create the folders and remove what pushes cut short left in tmp/ (blocking: call it
        as the process starts, before it serves)."""
        for folder in (self.blobs, self.records, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        # Only old ones: another replica on this machine may share the folder and push now.
        for leftover in self.tmp.iterdir():
            if time.time() - leftover.stat().st_mtime > STALE_UPLOAD_S:
                shutil.rmtree(leftover, ignore_errors=True)

    def _blob(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def _record(self, digest: str) -> Path:
        return self.records / (digest.removeprefix("sha256:") + ".json")

    def _blob_size(self, digest: str) -> int | None:
        try:
            return self._blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def stored(self, digest: str) -> StoredImage | None:
        """The image's record if the store holds it whole (its record and every blob)."""
        check_digest(digest)

        def read() -> StoredImage | None:
            try:
                image = StoredImage.decode(self._record(digest).read_bytes())
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError) as exc:
                # A damaged record (a crash mid-write): not held; a push or copy writes it anew.
                log.warning("image record %s is damaged (%s): taken as not held", digest, exc)
                return None
            if all(self._blob(d).exists() for d in (digest, *image.diff_ids)):
                return image
            return None

        return await asyncio.to_thread(read)

    async def held(self) -> list[StoredImage]:
        """Every image the store holds whole."""

        def names() -> list[str]:
            return sorted(p.stem for p in self.records.glob("*.json"))

        out = []
        for hex_digest in await asyncio.to_thread(names):
            if _DIGEST.fullmatch("sha256:" + hex_digest):
                image = await self.stored("sha256:" + hex_digest)
                if image is not None:
                    out.append(image)
        return out

    async def chain_ids(self) -> list[str]:
        """The layer chain of every layer of every image held whole, once, sorted: sent on a
        copy from another replica, which then leaves those layers out (ingest takes them from
        here)."""
        return sorted({c for image in await self.held() for c in chain_ids(image.diff_ids)})

    async def remove(self, digests: Iterable[str]) -> Removed:
        """Remove these images: their records, and each of their blobs that no other image this
        store has a record of uses (one another replica on this machine takes in meanwhile
        included: it writes its record last, so its blobs may go; its next start notices)."""
        gone = {check_digest(d) for d in digests}
        async with self._writing:
            return await asyncio.to_thread(self._remove, gone)

    def _remove(self, gone: set[str]) -> Removed:
        candidates: set[str] = set()
        images = 0
        for digest in gone:
            try:
                image = StoredImage.decode(self._record(digest).read_bytes())
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError):
                image = None  # unreadable: only its config blob is known to be its own
            candidates.add(digest)
            if image is not None:
                candidates.update(image.diff_ids)
            self._record(digest).unlink(missing_ok=True)
            images += 1
        used: set[str] = set()
        for path in self.records.glob("*.json"):
            try:
                other = StoredImage.decode(path.read_bytes())
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError):
                # Its blobs cannot be told apart: keep every candidate rather than break it.
                return Removed(images, 0, 0)
            used.add(other.digest)
            used.update(other.diff_ids)
        blobs = freed = 0
        for digest in sorted(candidates - used):
            size = self._blob_size(digest)
            if size is None:
                continue
            self._blob(digest).unlink(missing_ok=True)
            blobs += 1
            freed += size
        return Removed(images, blobs, freed)

    async def ingest(self, digest: str, reference: str, chunks: AsyncIterator[bytes]) -> Ingested:
        """Take in the `docker save` archive streamed as `chunks` (read to its end), verify it
        against `digest` (verify_archive) and keep its config and layers. Members are hashed as
        they arrive; large ones go to a temporary file, never the whole archive to memory.
        Layers the archive leaves out are taken from the blobs the store has, if it has them."""
        check_digest(digest)
        check_reference(reference, digest)
        upload = self.tmp / uuid.uuid4().hex
        await asyncio.to_thread(upload.mkdir, parents=True)
        try:
            reader = ChunkReader(chunks)
            files: dict[str, Received] = {}
            links: dict[str, str] = {}
            members = in_memory = 0
            while (member := await next_member(reader)) is not None:
                members += 1
                if members > MEMBERS_MAX:
                    raise InvalidArgument(f"not an image archive: over {MEMBERS_MAX} members")
                # One name, one content: a second member of a name could make what is kept
                # differ from what was verified.
                if member.name in files or member.name in links:
                    raise InvalidArgument(f"not an image archive: {member.name} twice")
                if member.kind == "link":
                    links[member.name] = member.target
                elif member.kind == "file":
                    keep = member.name.endswith(".json") or member.name == "repositories"
                    keep = keep and in_memory + member.size <= IN_MEMORY_MAX
                    in_memory += member.size if keep else 0
                    files[member.name] = await self._receive(
                        reader, member, upload, members, in_memory=keep
                    )
            await reader.drain()
            verified = await asyncio.to_thread(
                verify_archive, digest, files, links, self._blob_size
            )
            image = StoredImage(
                digest=digest,
                reference=reference,
                diff_ids=verified.diff_ids,
                layer_sizes=tuple(layer.size for layer in verified.layers),
                config_size=verified.config.size,
                stored_at=time.time(),
            )
            async with self._writing:
                stored = await asyncio.to_thread(self._keep, verified, upload)
                await asyncio.to_thread(_write_atomically, self._record(digest), image.encode())
            return Ingested(image, stored)
        finally:
            await asyncio.to_thread(shutil.rmtree, upload, True)

    async def _receive(
        self, reader: ChunkReader, member: Member, upload: Path, index: int, *, in_memory: bool
    ) -> Received:
        """`index`: the member's own number in the archive, which names its temporary file."""
        what = f"tar member {member.name}"
        hasher = hashlib.sha256()
        if in_memory:
            data = bytearray()
            async for piece in reader.pieces(member.size, what):
                hasher.update(piece)
                data += piece
            await reader.skip(padding(member.size), what)
            return Received("sha256:" + hasher.hexdigest(), member.size, data=bytes(data))
        # An OCI layout names a blob by its digest: one the store has is hashed, not written.
        named = "sha256:" + member.name.rpartition("/")[2]
        held = member.name.startswith("blobs/sha256/") and bool(_DIGEST.fullmatch(named))
        held = held and await asyncio.to_thread(self._blob(named).exists)
        path = None if held else upload / f"{index:06d}"
        out: IO[bytes] | None = None
        if path is not None:
            out = await asyncio.to_thread(path.open, "xb")
        try:
            batch = bytearray()
            async for piece in reader.pieces(member.size, what):
                batch += piece
                if len(batch) >= CHUNK:
                    await asyncio.to_thread(_hash_and_write, hasher, out, bytes(batch))
                    batch.clear()
            await asyncio.to_thread(_hash_and_write, hasher, out, bytes(batch))
        finally:
            if out is not None:
                await asyncio.to_thread(out.close)
        await reader.skip(padding(member.size), what)
        sha256 = "sha256:" + hasher.hexdigest()
        if held and sha256 != named:
            raise InvalidArgument(
                f"the archive's {member.name} has sha256 {sha256}, not the one its name says"
            )
        return Received(sha256, member.size, path=path, held=held)

    def _keep(self, verified: Verified, upload: Path) -> int:
        """Move the verified blobs into place (blocking: run in a thread); the bytes added."""
        stored = 0
        kept: set[str] = set()
        for item in (*verified.layers, verified.config):
            target = self._blob(item.sha256)
            if item.sha256 in kept or target.exists():
                continue
            if item.path is not None:
                os.replace(item.path, target)
            elif item.data is not None:
                _write_atomically(target, item.data, upload)
            else:
                raise FailedPrecondition(
                    f"blob {item.sha256} vanished from the image store at {self.blobs} "
                    "during the push; push again"
                )
            kept.add(item.sha256)
            stored += item.size
        return stored

    async def export(
        self, image: StoredImage, have_chain_ids: Collection[str] = ()
    ) -> AsyncIterator[bytes]:
        """The image as an archive `docker load` reads, in CHUNK-sized pieces: manifest.json,
        the config, and each layer whose chain id is not in `have_chain_ids` (the engine
        takes those from the layers it has)."""
        config_name = image.digest.removeprefix("sha256:") + ".json"
        layer_names = [d.removeprefix("sha256:") + "/layer.tar" for d in image.diff_ids]
        manifest = [
            {
                "Config": config_name,
                "RepoTags": [image.reference] if image.reference else [],
                "Layers": layer_names,
            }
        ]
        entries: list[tuple[str, bytes | Path, int]] = [
            ("manifest.json", json.dumps(manifest).encode(), 0),
            (config_name, self._blob(image.digest), image.config_size),
        ]
        have = set(have_chain_ids)
        for name, diff_id, chain_id, size in zip(
            layer_names, image.diff_ids, chain_ids(image.diff_ids), image.layer_sizes, strict=True
        ):
            if chain_id not in have and name not in {e[0] for e in entries}:
                entries.append((name, self._blob(diff_id), size))
        missing = [str(e[1]) for e in entries if isinstance(e[1], Path) and not e[1].exists()]
        if missing:
            raise FailedPrecondition(
                f"the image store lost {', '.join(missing)} of image {image.digest}; push it again"
            )
        out = bytearray()
        for name, source, size in entries:
            if isinstance(source, bytes):
                size = len(source)
            out += file_header(name, size, image.stored_at)
            if isinstance(source, bytes):
                out += source
            else:
                f = await asyncio.to_thread(source.open, "rb")
                try:
                    left = size
                    while left:
                        piece = await asyncio.to_thread(f.read, min(left, CHUNK))
                        if not piece:
                            raise FailedPrecondition(
                                f"{source} of image {image.digest} is shorter than recorded"
                            )
                        left -= len(piece)
                        out += piece
                        if len(out) >= CHUNK:
                            yield bytes(out)
                            out.clear()
                finally:
                    await asyncio.to_thread(f.close)
            out += bytes(padding(size))
            if len(out) >= CHUNK:
                yield bytes(out)
                out.clear()
        out += END_OF_ARCHIVE
        yield bytes(out)


def _hash_and_write(hasher: Any, out: IO[bytes] | None, data: bytes) -> None:
    hasher.update(data)
    if out is not None:
        out.write(data)


def _write_atomically(path: Path, data: bytes, scratch: Path | None = None) -> None:
    temp = (scratch or path.parent) / f".{path.name}.{uuid.uuid4().hex}"
    temp.write_bytes(data)
    os.replace(temp, path)

"""The image store's pure parts: chain ids, reading tar streams in pieces, and checking a
`docker save` archive against its digest. Archives are made by hand in memory."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator, Sequence

import pytest

from controlplane.access import RULES
from controlplane.images import (
    Received,
    StoredImage,
    chain_ids,
    check_digest,
    check_reference,
    verify_archive,
)
from controlplane.imagetar import ChunkReader, Member, next_member, padding
from portside.errors import InvalidArgument
from portside.pki import PeerRole
from portside.tokens import Role


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = sha(b"a"), sha(b"b"), sha(b"c")
    ab = sha(f"{a} {b}".encode())
    assert chain_ids([]) == []
    assert chain_ids([a]) == [a]
    assert chain_ids([a, b, c]) == [a, ab, sha(f"{ab} {c}".encode())]
    # A layer's chain depends on what is under it: b over nothing is not b over a.
    assert chain_ids([b])[0] != chain_ids([a, b])[1]


@pytest.mark.parametrize(
    "digest", ["", "sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 64, "a" * 64]
)
def test_a_malformed_digest_is_refused_naming_the_field(digest: str) -> None:
    with pytest.raises(InvalidArgument, match=r"layers\[0\].*sha256:<64 lowercase hex>"):
        check_digest(digest, "layers[0]")


def test_a_reference_is_the_name_portside_deploy_gives_that_image() -> None:
    digest = "sha256:0123456789ab" + "c" * 52
    assert check_reference("portside/web:0123456789ab", digest) == "portside/web:0123456789ab"
    assert check_reference("portside/a.b-c:0123456789ab", digest) == "portside/a.b-c:0123456789ab"
    assert check_reference("", digest) == ""
    # A name that would stand in for a registry image in every engine that loads it, another
    # image's tag, or no name at all.
    for wrong in ("postgres:16", "portside/web:latest", "portside/web:ffffffffffff", "has space:1"):
        with pytest.raises(InvalidArgument, match="portside/<name>:0123456789ab"):
            check_reference(wrong, digest)


def make_tar(files: Sequence[tuple[str, bytes]], links: Sequence[tuple[str, str]] = ()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return out.getvalue()


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def read_all(
    data: bytes, chunk: int
) -> tuple[dict[str, Received], dict[str, str], list[Member]]:
    """What ImageStore.ingest gathers, all in memory."""
    reader = ChunkReader(chunks_of(data, chunk))
    files: dict[str, Received] = {}
    links: dict[str, str] = {}
    members = []
    while (member := await next_member(reader)) is not None:
        members.append(member)
        if member.kind == "link":
            links[member.name] = member.target
        elif member.kind == "file":
            body = b"".join([p async for p in reader.pieces(member.size, member.name)])
            await reader.skip(padding(member.size), member.name)
            files[member.name] = Received(sha(body), len(body), data=body)
    await reader.drain()
    return files, links, members


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
async def test_members_are_read_whatever_the_chunking(chunk: int) -> None:
    long_name = "d" * 120 + "/layer.tar"  # past ustar's 100 characters: a PAX header
    archive = make_tar(
        [("manifest.json", b"[]"), (long_name, b"x" * 1500), ("empty", b"")],
        links=[("other/layer.tar", "../" + long_name)],
    )
    files, links, members = await read_all(archive, chunk)
    assert [m.name for m in members] == ["manifest.json", long_name, "empty", "other/layer.tar"]
    assert files[long_name].data == b"x" * 1500 and files["empty"].size == 0
    assert links == {"other/layer.tar": long_name}


async def test_a_cut_archive_is_refused_saying_so() -> None:
    archive = make_tar([("big", b"y" * 5000)])
    with pytest.raises(InvalidArgument, match="ended after .* not a whole `docker save`"):
        await read_all(archive[:3000], 1000)


async def test_garbage_is_not_a_tar_archive() -> None:
    with pytest.raises(InvalidArgument, match="not a tar archive"):
        await read_all(b"\x01" * 2048, 512)


def image_archive(
    layers: Sequence[bytes], *, tamper: int | None = None, duplicate_link: bool = False
) -> tuple[str, bytes]:
    """A `docker save`-style archive of an image with `layers` and its digest; with `tamper`,
    that layer's first byte is changed after the config was written."""
    diff_ids = [sha(layer) for layer in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    digest = sha(config)
    names = [f"{i:02d}/layer.tar" for i in range(len(layers))]
    files = []
    links = []
    for i, (name, layer) in enumerate(zip(names, layers, strict=True)):
        if duplicate_link and i > 0 and layer == layers[0]:
            links.append((name, f"../{names[0]}"))
            continue
        if i == tamper:
            layer = bytes([layer[0] ^ 1]) + layer[1:]
        files.append((name, layer))
    config_name = digest.removeprefix("sha256:") + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["t:1"], "Layers": names}]
    files += [(config_name, config), ("manifest.json", json.dumps(manifest).encode())]
    return digest, make_tar(files, links)


async def verified(digest: str, archive: bytes) -> tuple[str, ...]:
    files, links, _ = await read_all(archive, 777)
    return verify_archive(digest, files, links).diff_ids


async def test_a_whole_archive_verifies_with_its_layers_in_order() -> None:
    layers = [b"base" * 300, b"top" * 10]
    digest, archive = image_archive(layers)
    assert await verified(digest, archive) == (sha(layers[0]), sha(layers[1]))


async def test_a_repeated_layer_saved_as_a_link_verifies() -> None:
    layers = [b"same", b"other", b"same"]
    digest, archive = image_archive(layers, duplicate_link=True)
    assert len(await verified(digest, archive)) == 3


async def test_a_changed_layer_is_refused_naming_it() -> None:
    layers = [b"base" * 300, b"top" * 10]
    digest, archive = image_archive(layers, tamper=1)
    with pytest.raises(InvalidArgument) as caught:
        await verified(digest, archive)
    message = str(caught.value)
    assert "layer 2 of 2 (01/layer.tar)" in message
    assert f"rootfs.diff_ids[1] is {sha(layers[1])}" in message and "altered" in message


async def test_an_archive_of_another_image_is_refused_naming_both_digests() -> None:
    _, archive = image_archive([b"one"])
    other = sha(b"something else")
    with pytest.raises(
        InvalidArgument, match=f"no config whose sha256 is the pushed digest {other}"
    ):
        await verified(other, archive)


async def test_an_archive_without_a_manifest_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no manifest.json.*docker save"):
        await verified(sha(b"x"), make_tar([("a", b"b")]))


async def test_a_manifest_naming_a_missing_layer_is_refused() -> None:
    config = json.dumps({"rootfs": {"diff_ids": [sha(b"l")]}}).encode()
    manifest = [{"Config": "c.json", "Layers": ["gone/layer.tar"]}]
    archive = make_tar([("c.json", config), ("manifest.json", json.dumps(manifest).encode())])
    with pytest.raises(InvalidArgument, match="names layer 1 'gone/layer.tar', absent"):
        await verified(sha(config), archive)


async def test_layer_count_must_match_the_configs_diff_ids() -> None:
    config = json.dumps({"rootfs": {"diff_ids": [sha(b"l")]}}).encode()
    manifest = [{"Config": "c.json", "Layers": []}]
    archive = make_tar([("c.json", config), ("manifest.json", json.dumps(manifest).encode())])
    with pytest.raises(InvalidArgument, match="lists 0 layers, its config 1 diff ids"):
        await verified(sha(config), archive)


def test_stored_image_records_round_trip() -> None:
    image = StoredImage(sha(b"c"), "portside/a:1", (sha(b"l"),), (10,), 5, 1.5)
    assert StoredImage.decode(image.encode()) == image
    assert image.size_bytes == 15


def test_who_may_call_the_image_methods() -> None:
    assert RULES["PushImage"].role is Role.DEPLOY and RULES["PushImage"].audited
    assert RULES["StatImages"].role is Role.DEPLOY and not RULES["StatImages"].audited
    assert RULES["ListImages"].role is Role.READ and not RULES["ListImages"].audited
    # Agents pull for their engines; replicas copy from each other (controlplane.imagecopy).
    assert RULES["PullImage"].peers == {PeerRole.AGENT, PeerRole.CONTROLPLANE}
    assert RULES["PullImage"].role is None


def pax_member(name: str, data: bytes, pax: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def test_an_extended_header_past_its_bound_is_refused_before_it_is_read() -> None:
    archive = pax_member("layer.tar", b"x", {"comment": "y" * 100_000})
    with pytest.raises(InvalidArgument, match="extended tar header of .* bytes"):
        await read_all(archive, 4096)


@pytest.mark.parametrize("size", ["abc", "-5", "1e3", ""])
async def test_a_pax_size_that_is_not_a_count_of_bytes_is_refused(size: str) -> None:
    archive = pax_member("layer.tar", b"x", {"size": size})
    with pytest.raises(InvalidArgument, match="not a tar archive"):
        await read_all(archive, 4096)

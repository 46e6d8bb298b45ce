"""`portside deploy`'s image steps without I/O: reference naming, the config sent after a build,
sizes, how a push is cut into messages, and which images are pushed (fake store and engine)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from portside import build
from portside.api.v1 import controlplane_pb2 as cp
from portside.build import BuiltImage, PushResult, human_size, image_reference, with_built_images
from portside.client import ImageInfo, _async
from portside.config import BuildSpec, LoadedConfig
from portside.errors import ConfigError
from portside.imagepush import PUSH_CHUNK
from portside.spec import Config, ContainerClass

HEX = "0123456789abcdef" * 4
DIGEST = "sha256:" + HEX


@pytest.mark.parametrize(
    ("class_name", "reference"),
    [
        ("Web", "portside/web:0123456789ab"),
        ("CodeExecutor", "portside/codeexecutor:0123456789ab"),
        ("gif_maker", "portside/gif_maker:0123456789ab"),
        ("a--b", "portside/a--b:0123456789ab"),
        ("a__b", "portside/a__b:0123456789ab"),
        # Names Docker would refuse as they are: runs of _ and - become one -, none at the end.
        ("a___b", "portside/a-b:0123456789ab"),
        ("web_", "portside/web:0123456789ab"),
        ("Web-_x-", "portside/web-x:0123456789ab"),
    ],
)
def test_image_reference(class_name: str, reference: str) -> None:
    assert image_reference(class_name, DIGEST) == reference


@pytest.mark.parametrize("digest", ["", HEX, "sha256:" + HEX[:-1], "sha256:" + HEX.upper()])
def test_image_reference_needs_an_image_id(digest: str) -> None:
    with pytest.raises(ValueError, match="not an image id"):
        image_reference("Web", digest)


def test_with_built_images_sets_reference_and_digest_of_built_classes_only() -> None:
    config = Config(classes=(ContainerClass("Web", "./web"), ContainerClass("Db", "postgres:16")))
    built = {"Web": BuiltImage("Web", DIGEST, "portside/web:0123456789ab", 10)}
    out = with_built_images(config, built)
    assert out.classes == (
        ContainerClass("Web", "portside/web:0123456789ab", image_digest=DIGEST),
        ContainerClass("Db", "postgres:16"),
    )


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (3 * 2**40, "3072.0 GiB"),
    ],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


class FakePushStub:
    """Stands in for the control plane's stub: takes in a push's messages as gRPC would."""

    def __init__(self) -> None:
        self.messages: list[cp.PushImageRequest] = []
        self.timeout: float | None = -1.0

    async def PushImage(  # noqa: N802 - the RPC's name
        self,
        requests: AsyncIterable[cp.PushImageRequest],
        timeout: float | None = None,  # noqa: ASYNC109 - the stub's keyword
    ) -> cp.PushImageResponse:
        self.timeout = timeout
        async for message in requests:
            self.messages.append(message)
        size = sum(len(m.data) for m in self.messages)
        return cp.PushImageResponse(digest=self.messages[0].digest, size_bytes=size, stored_bytes=7)


async def pieces(sizes: Sequence[int]) -> AsyncIterator[bytes]:
    counter = itertools.count()
    for size in sizes:
        yield bytes(next(counter) % 251 for _ in range(size))


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # an empty stream is still one message, naming the image
        [10],
        [PUSH_CHUNK],
        [PUSH_CHUNK + 1],
        [1000] * 700,  # many small reads joined into full messages
        [3 * PUSH_CHUNK + 5, 17, PUSH_CHUNK - 17],  # big reads cut
    ],
)
async def test_push_is_cut_into_messages_of_the_chunk_size(sizes: list[int]) -> None:
    ps = _async.Portside("127.0.0.1:1", token=None)
    stub = FakePushStub()
    ps._stub_ = stub
    sent = b"".join([piece async for piece in pieces(sizes)])
    result = await ps.push_image(DIGEST, "portside/web:0123456789ab", pieces(sizes), deadline_s=9)
    assert result == PushResult(DIGEST, len(sent), 7)
    assert stub.timeout == 9
    first, *rest = stub.messages
    assert (first.digest, first.reference) == (DIGEST, "portside/web:0123456789ab")
    assert all(m.digest == "" and m.reference == "" for m in rest)
    assert b"".join(m.data for m in stub.messages) == sent
    # Every message but the last is full; the last is not empty unless it is the only one.
    assert all(len(m.data) == PUSH_CHUNK for m in stub.messages[:-1])
    assert 0 < len(stub.messages[-1].data) <= PUSH_CHUNK or len(stub.messages) == 1
    assert len(stub.messages) == max(1, -(-len(sent) // PUSH_CHUNK))


class FakeStore:
    """An image store that holds `held` and records what is pushed to it."""

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.asked: list[list[str]] = []
        self.pushed: list[tuple[str, str, bytes, float]] = []

    async def stat_images(self, digests: Sequence[str]) -> set[str]:
        self.asked.append(list(digests))
        return self.held & set(digests)

    async def push_image(
        self, digest: str, reference: str, data: AsyncIterable[bytes], *, deadline_s: float
    ) -> PushResult:
        body = b"".join([piece async for piece in data])
        self.pushed.append((digest, reference, body, deadline_s))
        return PushResult(digest, len(body), 0)


class FakeApi:
    """docker-py's low-level API, as far as `docker save` goes."""

    def __init__(self, archives: dict[str, bytes]) -> None:
        self.archives = archives

    def get_image(self, image: str, chunk_size: int) -> Iterator[bytes]:
        data = self.archives[image]
        return iter([data[i : i + chunk_size] for i in range(0, len(data), chunk_size)])


class FakeEngine:
    def __init__(self, archives: dict[str, bytes]) -> None:
        self.api = FakeApi(archives)


async def test_only_the_images_the_store_lacks_are_pushed_once_each() -> None:
    other = "sha256:" + "f" * 64
    engine: Any = FakeEngine(
        {"portside/web:0123456789ab": b"a" * 300_000, "portside/db:ffffffffffff": b"b" * 10}
    )
    images = [
        BuiltImage("Web", DIGEST, "portside/web:0123456789ab", 2_000_000),
        BuiltImage("Api", DIGEST, "portside/api:0123456789ab", 2_000_000),  # same Dockerfile
        BuiltImage("Db", other, "portside/db:ffffffffffff", 10),
    ]
    store = FakeStore(held={other})
    lines: list[str] = []
    await build._push_missing(engine, store, images, lines.append)
    assert store.asked == [[DIGEST, other]]
    assert [(d, r, len(b)) for d, r, b, _ in store.pushed] == [
        (DIGEST, "portside/web:0123456789ab", 300_000)
    ]
    assert store.pushed[0][3] == build.PUSH_BASE_TIMEOUT_S + 2.0
    assert lines == [
        "pushing portside/web:0123456789ab (1.9 MiB) ...",
        "pushed portside/web:0123456789ab: sent 293.0 KiB, the store had every layer",
        "the cluster has portside/db:ffffffffffff already",
    ]


async def test_a_config_without_builds_needs_no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_engine() -> None:
        raise AssertionError("Docker was opened")

    monkeypatch.setattr(build, "open_engine", no_engine)
    config = Config(classes=(ContainerClass("Db", "postgres:16"),))
    store = FakeStore(held=set())
    assert await build.build_and_push(LoadedConfig(config), store) is config
    assert store.asked == []


def test_dockerfile_argument_is_relative_inside_the_context_and_absolute_outside() -> None:
    inside = BuildSpec(dockerfile=Path("/p/app/Dockerfile"), context=Path("/p"))
    outside = BuildSpec(dockerfile=Path("/p/app/Dockerfile"), context=Path("/p/shared"))
    assert build._dockerfile_argument(inside) == "app/Dockerfile"
    assert build._dockerfile_argument(outside) == "/p/app/Dockerfile"


def test_build_progress_messages() -> None:
    spec = BuildSpec(
        Path("/p/Dockerfile"), Path("/p"), source="./Dockerfile", file="f.toml", at="containers[1]"
    )
    log: list[str] = []
    assert (
        build._read_build_chunk({"stream": "Step 1/2 : FROM scratch\n\n"}, spec, "Web", log.append)
        == ""
    )
    assert build._read_build_chunk({"aux": {"ID": DIGEST}}, spec, "Web", log.append) == DIGEST
    assert (
        build._read_build_chunk(
            {"stream": "Successfully built 0123456789ab\n"}, spec, "Web", log.append
        )
        == "0123456789ab"
    )
    assert log == ["Step 1/2 : FROM scratch", "Successfully built 0123456789ab"]
    with pytest.raises(ConfigError) as caught:
        build._read_build_chunk(
            {"error": "The command '/busybox false' returned a non-zero code: 1"}, spec, "Web", None
        )
    assert (caught.value.file, caught.value.field) == ("f.toml", "containers[1].image")
    assert caught.value.problem == (
        "building class Web from ./Dockerfile failed: The command '/busybox false' returned a "
        "non-zero code: 1"
    )


def test_the_flags_parse() -> None:
    from portside import cli

    args = cli.parse_args(["controlplane", "--store", "sqlite:///x.db", "--image-dir", "/srv/i"])
    assert args.image_dir == "/srv/i"
    assert cli.parse_args(["controlplane", "--store", "sqlite:///x.db"]).image_dir == ""
    args = cli.parse_args(
        ["agent", "--listen", "127.0.0.1:7080", "--region", "fra", "--registry-auth", "/a.toml"]
    )
    assert args.registry_auth == "/a.toml"
    assert cli.parse_args(["images", "--json"]).json


class FakeImages:
    """The SDK as `portside images` uses it."""

    def __init__(self, images: list[ImageInfo]) -> None:
        self.listed = images

    async def __aenter__(self) -> FakeImages:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def images(self) -> list[ImageInfo]:
        return self.listed


async def test_images_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from portside import cli

    listed = [
        ImageInfo(DIGEST, "portside/web:0123456789ab", 5 * 2**20, ("Api", "Web"), ("cp-1",),
                  ("node-a", "node-b"), time.time() - 125),
        ImageInfo("sha256:" + "f" * 64, "portside/db:ffffffffffff", 10),
    ]  # fmt: skip
    monkeypatch.setattr(cli, "_connect", lambda args: FakeImages(listed))
    assert await cli._images(cli.parse_args(["images"])) == 0
    assert capsys.readouterr().out.splitlines() == [
        "REFERENCE                  DIGEST        SIZE     CLASSES  NODES              "
        "REPLICAS  PUSHED",
        "portside/web:0123456789ab  0123456789ab  5.0 MiB  Api,Web  2 (node-a,node-b)  "
        "cp-1      2m",
        "portside/db:ffffffffffff   ffffffffffff  10 B     -        -                  -         -",
    ]
    assert await cli._images(cli.parse_args(["images", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["nodes"] == ["node-a", "node-b"] and rows[1]["size_bytes"] == 10

"""Unit tests of how the agent gets images: chain ids, which images it reports, registry
credentials, the prefetch schedule, and the keeper's shared pulls over a fake engine and source.
tests/integration/test_agent_images.py loads real archives into the real engine."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Sequence

import pytest

from nodeagent.images import (
    Failure,
    ImageKeeper,
    RegistryAuth,
    after_failure,
    chain_ids,
    engine_chain_ids,
    images_to_remove,
    next_prefetch,
    next_retry,
    parse_registry_auth,
    portside_images,
    registry_host,
)
from nodeagent.runtime.protocol import EngineImage, RegistryCredential
from portside.errors import ConfigError, ImageUnavailable, NotFound, PortsideError, Unavailable
from portside.spec import ContainerClass
from tests.support import eventually

# -- chain ids ------------------------------------------------------------------------------------

# A three-layer image as Docker 20.10 recorded it here: RootFS.Layers of `docker image inspect`,
# and the chain ids its layer store (/var/lib/docker/image/overlay2/layerdb/sha256) keys them by.
DOCKER_DIFF_IDS = [
    "sha256:8b54906b3d96b278aa7095d04eeece4ab4b2308d47032b1f6a1d31a023cdaaaf",
    "sha256:8be917d63e94bf1b72b0656973c2eb0917708539ea49bb85be01dc2e45780d68",
    "sha256:b0657440c9ef776346d9a242938227ea80bc65b1d0ef1816ed0c794ad3620c49",
]
DOCKER_CHAIN_IDS = [
    "sha256:8b54906b3d96b278aa7095d04eeece4ab4b2308d47032b1f6a1d31a023cdaaaf",
    "sha256:d7e408572ffa7e85219369390d378ec21cabc8224a39ff9e39c20de8a9145855",
    "sha256:526adf8dd4164909e87764834e5e2b6701f2f37c18cdbb4c9c9c958d05711708",
]


def test_chain_ids_are_the_ones_dockers_layer_store_uses() -> None:
    assert chain_ids(DOCKER_DIFF_IDS) == DOCKER_CHAIN_IDS
    assert chain_ids(DOCKER_DIFF_IDS[:1]) == DOCKER_CHAIN_IDS[:1]
    assert chain_ids([]) == []


def test_a_layer_has_another_chain_on_another_parent() -> None:
    # The same top layer over a different base is a different chain: it cannot be left out.
    other_base = [DOCKER_DIFF_IDS[1], DOCKER_DIFF_IDS[2]]
    assert chain_ids(other_base)[1] != DOCKER_CHAIN_IDS[2]


def test_engine_chain_ids_are_every_images_chains_once() -> None:
    shared_base = [DOCKER_DIFF_IDS[0], DOCKER_DIFF_IDS[1]]
    assert engine_chain_ids([DOCKER_DIFF_IDS, shared_base, []]) == sorted(DOCKER_CHAIN_IDS)


# -- what the heartbeat reports -------------------------------------------------------------------


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def test_portside_images_are_class_digests_and_portside_names() -> None:
    images = [
        EngineImage(digest(1), ("portside/web:0123456789ab",)),
        EngineImage(digest(2), ()),  # a class names it by digest, untagged
        EngineImage(digest(3), ("nginx:1.27", "portside-test/echo:latest")),
        EngineImage(digest(4), ("registry.example.com/portside/web:1",)),
    ]
    assert portside_images(images, {digest(2), digest(9)}) == {digest(1), digest(2)}
    assert portside_images([], {digest(1)}) == frozenset()


@pytest.mark.parametrize(
    ("reference", "host"),
    [
        ("nginx", "docker.io"),
        ("library/nginx:1.27", "docker.io"),
        ("ghcr.io/acme/app:1", "ghcr.io"),
        ("127.0.0.1:5000/app@sha256:" + "a" * 64, "127.0.0.1:5000"),
        ("localhost/app", "localhost"),
        ("Registry.Example.com/app", "registry.example.com"),
        ("index.docker.io/library/nginx", "docker.io"),
    ],
)
def test_registry_host(reference: str, host: str) -> None:
    assert registry_host(reference) == host


# -- registry credentials -------------------------------------------------------------------------


def test_registry_auth_reads_json_toml_and_dockers_config() -> None:
    from_json = parse_registry_auth(
        json.dumps(
            {
                "registry.example.com": {"username": "ci", "password": "pw-json"},
                "https://index.docker.io/v1/": {"identitytoken": "tok"},
            }
        ),
        "auth.json",
    )
    assert from_json.for_reference("registry.example.com/app:1") == RegistryCredential(
        "ci", "pw-json"
    )
    assert from_json.for_reference("nginx") == RegistryCredential(identitytoken="tok")
    assert from_json.for_reference("ghcr.io/a/b") is None

    from_toml = parse_registry_auth(
        '["127.0.0.1:5000"]\nusername = "u"\npassword = "pw-toml"\n', "auth.toml"
    )
    assert from_toml.for_reference("127.0.0.1:5000/x") == RegistryCredential("u", "pw-toml")

    docker_config = {"auths": {"ghcr.io": {"auth": base64.b64encode(b"me:pw:colon").decode()}}}
    from_docker = parse_registry_auth(json.dumps(docker_config), "config.json")
    assert from_docker.for_reference("ghcr.io/a/b") == RegistryCredential("me", "pw:colon")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not = [valid", "neither JSON nor TOML"),
        ("[1, 2]", "must map registry hosts"),
        ('{"ghcr.io": "secret-value"}', "ghcr.io: must be a table"),
        ('{"ghcr.io": {"username": "u"}}', "ghcr.io: needs username and password"),
        ('{"ghcr.io": {"username": "u", "password": 7}}', "ghcr.io: username, password"),
        ('{"ghcr.io": {"auth": "secret-value"}}', "ghcr.io: auth must be base64"),
    ],
)
def test_a_bad_registry_auth_file_is_named_without_its_secrets(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_registry_auth(text, "/etc/portside/auth.json")
    message = str(caught.value)
    assert message.startswith("/etc/portside/auth.json: ") and says in message
    assert "secret-value" not in message


def test_credentials_never_show_in_repr() -> None:
    auth = parse_registry_auth(
        '{"r.example": {"username": "u", "password": "hunter2", "identitytoken": "tok-42"}}', "f"
    )
    assert "hunter2" not in repr(auth) and "tok-42" not in repr(auth) and "r.example" in repr(auth)


# -- the prefetch schedule ------------------------------------------------------------------------


def test_backoff_doubles_up_to_five_minutes() -> None:
    failure: Failure | None = None
    delays = []
    for _ in range(10):
        failure = after_failure(failure, 100.0)
        delays.append(failure.retry_at - 100.0)
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0] and delays[-1] == 300.0
    assert failure is not None and failure.count == 10


def test_next_prefetch_takes_the_first_missing_image_not_backing_off() -> None:
    wanted = [digest(1), digest(2), digest(3)]
    failures = {digest(2): Failure(1, retry_at=50.0)}
    assert next_prefetch(wanted, {digest(1)}, failures, now=10.0) == digest(3)
    assert next_prefetch(wanted, {digest(1)}, failures, now=50.0) == digest(2)
    assert next_prefetch(wanted, {digest(1), digest(3)}, failures, now=10.0) is None
    assert next_retry(wanted, {digest(1), digest(3)}, failures) == 50.0
    assert next_retry(wanted, set(wanted), failures) is None


# -- the keeper over a fake engine and source ----------------------------------------------------


@dataclasses.dataclass
class FakeImage:
    id: str
    tags: set[str]
    layers: tuple[str, ...]


def archive_of(image_id: str, layers: Sequence[str], tags: Sequence[str] = ()) -> bytes:
    """What the fake engine loads: the image it describes."""
    return json.dumps({"id": image_id, "layers": list(layers), "tags": list(tags)}).encode()


class FakeEngine:
    """Images in a dict; load_image reads a JSON "archive" (see archive_of) chunk by chunk."""

    def __init__(self) -> None:
        self.store: dict[str, FakeImage] = {}
        self.pulls: list[tuple[str, RegistryCredential | None]] = []
        self.registry: dict[str, str] = {}  # reference -> id a pull gets
        self.removed: list[str] = []
        self.loaded_bytes = 0
        self.in_use: set[str] = set()  # image ids a container uses: the engine keeps them

    def add(self, image_id: str, *tags: str, layers: tuple[str, ...] = ()) -> None:
        self.store[image_id] = FakeImage(image_id, set(tags), layers)

    async def images(self) -> list[EngineImage]:
        return [EngineImage(i.id, tuple(sorted(i.tags))) for i in self.store.values()]

    async def image_id(self, reference: str) -> str | None:
        if reference in self.store:
            return reference
        return next((i.id for i in self.store.values() if reference in i.tags), None)

    async def image_layers(self, image_id: str) -> tuple[str, ...]:
        if image_id not in self.store:
            raise NotFound(f"no image {image_id}")
        return self.store[image_id].layers

    async def load_image(self, archive: AsyncIterator[bytes]) -> list[str]:
        data = b""
        async for chunk in archive:
            data += chunk
            self.loaded_bytes += len(chunk)
        described = json.loads(data)
        for tag in described["tags"]:
            for image in self.store.values():
                image.tags.discard(tag)
        self.add(described["id"], *described["tags"], layers=tuple(described["layers"]))
        return list(described["tags"]) or [described["id"]]

    async def tag_image(self, image_id: str, reference: str) -> None:
        for image in self.store.values():
            image.tags.discard(reference)
        self.store[image_id].tags.add(reference)

    async def pull_image(self, reference: str, credential: RegistryCredential | None) -> str:
        self.pulls.append((reference, credential))
        if reference not in self.registry:
            raise ImageUnavailable(f"docker pull {reference}: connection refused")
        self.add(self.registry[reference], reference)
        return self.registry[reference]

    async def remove_image(self, reference: str) -> None:
        self.removed.append(reference)
        found = await self.image_id(reference)
        if found is None:
            return
        image = self.store[found]
        # As Docker: an image in use is kept (its last name too); by id, refused if it is named
        # in several repositories.
        last_name = reference != found and image.tags == {reference}
        if found in self.in_use and (reference == found or last_name):
            return
        if reference == found:
            if len({t.rpartition(":")[0] for t in image.tags}) <= 1:
                del self.store[found]
        elif last_name:
            del self.store[found]
        else:
            image.tags.discard(reference)


class FakeSource:
    """Serves archives by digest in 3-byte chunks; `gate` holds every stream before its end;
    `error` fails the next pull."""

    def __init__(self) -> None:
        self.archives: dict[str, bytes] = {}
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: PortsideError | None = None

    async def pull(self, digest: str, have_chain_ids: Sequence[str]) -> AsyncIterator[bytes]:
        self.calls.append((digest, tuple(have_chain_ids)))
        if self.error is not None:
            raise self.error
        if digest not in self.archives:
            raise NotFound(f"no control plane replica holds image {digest}")
        data = self.archives[digest]
        for i in range(0, len(data), 3):
            yield data[i : i + 3]
            if i == 0:
                await self.gate.wait()


WEB_DIGEST = digest(100)
WEB = ContainerClass(
    "web", f"portside/web:{WEB_DIGEST[7:19]}", image_digest=WEB_DIGEST, boot_timeout_s=1.0
)
NGINX = ContainerClass("nginx", "registry.example.com/nginx:1.27")


@dataclasses.dataclass
class Setup:
    engine: FakeEngine
    source: FakeSource
    keeper: ImageKeeper
    changes: list[int]


@pytest.fixture
def setup() -> Setup:
    engine, source, changes = FakeEngine(), FakeSource(), []
    source.archives[WEB_DIGEST] = archive_of(WEB_DIGEST, ["sha256:base", "sha256:app"])
    keeper = ImageKeeper(
        engine,
        source,
        lambda: [WEB, NGINX],
        node_id="n1",
        registry_auth=RegistryAuth({"registry.example.com": RegistryCredential("ci", "hunter2")}),
        on_change=lambda: changes.append(1),
        refresh_s=0.05,
    )
    return Setup(engine, source, keeper, changes)


async def test_an_image_there_under_its_name_is_not_pulled(setup: Setup) -> None:
    setup.engine.add(WEB_DIGEST, WEB.image)
    await setup.keeper.ensure(WEB)
    assert setup.source.calls == []


async def test_an_image_there_under_its_digest_only_is_named(setup: Setup) -> None:
    setup.engine.add(WEB_DIGEST)
    setup.engine.add(digest(5), WEB.image)  # an older image that had the name
    await setup.keeper.ensure(WEB)
    assert setup.source.calls == [] and await setup.engine.image_id(WEB.image) == WEB_DIGEST


async def test_concurrent_boots_share_one_pull_that_sends_the_engines_chains(
    setup: Setup,
) -> None:
    setup.engine.add(digest(7), layers=("sha256:base",))
    setup.source.gate.clear()
    boots = [asyncio.create_task(setup.keeper.ensure(WEB)) for _ in range(5)]
    await eventually(lambda: setup.source.calls)
    assert setup.keeper.pulling(WEB) and not any(b.done() for b in boots)
    setup.source.gate.set()
    await asyncio.gather(*boots)
    assert setup.source.calls == [(WEB_DIGEST, ("sha256:base",))]
    assert await setup.engine.image_id(WEB.image) == WEB_DIGEST
    assert not setup.keeper.pulling(WEB)
    assert setup.engine.loaded_bytes == len(setup.source.archives[WEB_DIGEST])


async def test_a_boot_that_gives_up_leaves_the_pull_for_the_next(setup: Setup) -> None:
    setup.source.gate.clear()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(setup.keeper.ensure(WEB), 0.05)
    assert setup.keeper.pulling(WEB)
    setup.source.gate.set()
    await eventually(lambda: not setup.keeper.pulling(WEB))
    assert await setup.engine.image_id(WEB_DIGEST) == WEB_DIGEST
    await setup.keeper.ensure(WEB)  # named now, without a second pull
    assert len(setup.source.calls) == 1 and await setup.engine.image_id(WEB.image) == WEB_DIGEST


async def test_an_archive_of_another_image_is_refused_and_removed(setup: Setup) -> None:
    setup.source.archives[WEB_DIGEST] = archive_of(digest(66), [], ["evil/app:1"])
    with pytest.raises(ImageUnavailable) as caught:
        await setup.keeper.ensure(WEB)
    assert str(caught.value) == (
        f"class web: image {WEB_DIGEST} from the control plane did not load as its digest: "
        "the engine loaded evil/app:1 instead"
    )
    assert setup.engine.removed == ["evil/app:1"]
    assert await setup.engine.image_id(WEB.image) is None


async def test_a_failed_pull_says_it_could_not_get_it_from_the_control_plane(
    setup: Setup,
) -> None:
    setup.source.error = Unavailable("control plane 127.0.0.1:7070 is unreachable: refused")
    with pytest.raises(ImageUnavailable) as caught:
        await setup.keeper.ensure(WEB)
    assert str(caught.value) == (
        f"class web: image {WEB_DIGEST} is not on node n1 and could not be got from the control "
        "plane: control plane 127.0.0.1:7070 is unreachable: refused"
    )
    setup.source.error = None  # the next boot tries again
    await setup.keeper.ensure(WEB)
    assert len(setup.source.calls) == 2


async def test_a_malformed_digest_is_refused_before_any_pull(setup: Setup) -> None:
    with pytest.raises(ImageUnavailable, match="is not sha256:<64 hex digits>"):
        await setup.keeper.ensure(dataclasses.replace(WEB, image_digest="sha256:nope"))
    assert setup.source.calls == []


async def test_a_registry_reference_is_pulled_with_its_hosts_credentials(setup: Setup) -> None:
    setup.engine.registry[NGINX.image] = digest(8)
    await asyncio.gather(setup.keeper.ensure(NGINX), setup.keeper.ensure(NGINX))
    assert setup.engine.pulls == [(NGINX.image, RegistryCredential("ci", "hunter2"))]
    other = dataclasses.replace(NGINX, image="ghcr.io/a/b:1")
    with pytest.raises(ImageUnavailable) as caught:
        await setup.keeper.ensure(other)
    assert str(caught.value) == (
        "class nginx: image 'ghcr.io/a/b:1' is not on node n1 and could not be pulled: "
        "docker pull ghcr.io/a/b:1: connection refused"
    )
    assert setup.engine.pulls[-1] == ("ghcr.io/a/b:1", None)
    assert setup.source.calls == []


async def test_reported_images_change_with_the_engine(setup: Setup) -> None:
    assert setup.keeper.reported() == (frozenset(), 0)
    setup.engine.add(digest(1), "portside/old:0123456789ab")
    setup.engine.add(digest(2), "nginx:1")
    await setup.keeper.refresh()
    assert setup.keeper.reported() == (frozenset({digest(1)}), 1) and setup.changes == [1]
    await setup.keeper.refresh()  # unchanged: no news
    assert setup.keeper.reported()[1] == 1 and setup.changes == [1]
    await setup.keeper.ensure(WEB)  # a pull refreshes at once
    assert setup.keeper.reported() == (frozenset({digest(1), WEB_DIGEST}), 2)
    await setup.engine.remove_image(digest(1))
    await setup.keeper.refresh()
    assert setup.keeper.reported() == (frozenset({WEB_DIGEST}), 3) and len(setup.changes) == 3


async def test_prefetch_pulls_wanted_images_and_backs_off_on_failure(setup: Setup) -> None:
    missing = digest(200)
    runner = asyncio.create_task(setup.keeper.run())
    try:
        setup.keeper.want([WEB_DIGEST, "not-a-digest", missing])
        await eventually(lambda: setup.keeper.reported()[0] == {WEB_DIGEST})
        assert await setup.engine.image_id(WEB.image) == WEB_DIGEST  # named after its class
        await eventually(lambda: len(setup.source.calls) == 2)
        assert [c[0] for c in setup.source.calls] == [WEB_DIGEST, missing]
        await asyncio.sleep(0.3)  # several refreshes, but the failed one waits its 5 s
        assert len(setup.source.calls) == 2
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await setup.keeper.close()


# -- the instance manager makes sure of the image before it creates ----------------------------


async def test_the_manager_gets_the_image_before_it_creates_the_container(
    setup: Setup,
) -> None:
    from nodeagent.instances import InstanceManager, Timing
    from tests.unit.nodeagent.test_instances import FakeRuntime, Probe

    runtime = FakeRuntime()
    manager = InstanceManager(
        runtime,
        {WEB.name: WEB}.get,
        timing=Timing(port_poll=0.001, exit_poll=0.005),
        port_probe=Probe(),
        images=setup.keeper,
    )
    setup.source.error = NotFound(f"no control plane replica holds image {WEB_DIGEST}")
    with pytest.raises(ImageUnavailable, match="no control plane replica holds image"):
        await manager.acquire(WEB, "a")
    assert runtime.count("create") == 0

    setup.source.error = None
    setup.source.gate.clear()  # slower than the boot's deadline
    with pytest.raises(PortsideError) as caught:
        await manager.acquire(WEB, "b")
    assert f"its image {WEB_DIGEST} was not pulled (the pull goes on" in str(caught.value)
    setup.source.gate.set()
    hold = await manager.acquire(WEB, "b")  # the same pull, finished meanwhile
    hold.release()
    assert runtime.count("create") == 1 and len(setup.source.calls) == 2
    await manager.close()


# -- removal of images the cluster no longer keeps ------------------------------------------------


def test_images_to_remove_are_reported_ones_neither_kept_nor_protected() -> None:
    reported = {digest(1), digest(2), digest(3), digest(4)}
    assert images_to_remove(reported, {digest(1)}, {digest(2)}) == sorted([digest(3), digest(4)])
    assert images_to_remove(reported, reported, ()) == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_unkept_images_are_removed_unless_in_use_at_most_once_a_minute() -> None:
    engine, source, clock = FakeEngine(), FakeSource(), Clock()
    keeper = ImageKeeper(engine, source, lambda: [WEB], refresh_s=0.02, clock=clock)
    kept, unused, used, shared = digest(1), digest(2), digest(3), digest(4)
    engine.add(WEB_DIGEST, WEB.image)  # the class's current image: never removed
    engine.add(kept, "portside/web:kept")
    engine.add(unused, "portside/web:unused")
    engine.add(used, "portside/web:used")
    engine.in_use.add(used)
    engine.add(shared, "portside/a:1", "portside/b:1")  # two classes built the same image
    engine.add(digest(5), "nginx:1")  # not Portside's: not ours to remove
    runner = asyncio.create_task(keeper.run())
    try:
        await eventually(lambda: len(keeper.reported()[0]) == 5)
        await asyncio.sleep(0.1)
        assert engine.removed == []  # no keep list yet: nothing is removed
        keeper.keep([kept])
        await eventually(lambda: keeper.reported()[0] == {WEB_DIGEST, kept, used})
        assert set(engine.store) == {WEB_DIGEST, kept, used, digest(5)}
        assert engine.store[used].tags == {"portside/web:used"}  # in use: kept whole
        removed_so_far = len(engine.removed)
        engine.in_use.clear()
        await asyncio.sleep(0.2)  # refreshes go on, but a minute has not passed
        assert len(engine.removed) == removed_so_far
        clock.now += 61
        await eventually(lambda: used not in engine.store)
        assert keeper.reported()[0] == {WEB_DIGEST, kept}
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_an_image_booted_or_pulled_lately_is_not_removed(setup: Setup) -> None:
    await setup.keeper.ensure(WEB)  # pulled for a boot just now
    other = digest(7)
    setup.engine.add(other, "portside/old:1")
    await setup.keeper.refresh()
    setup.keeper.keep([])
    assert setup.keeper.removable() == [other]  # WEB is its class's image, and just used
    await setup.keeper.remove_unkept()
    assert other not in setup.engine.store and WEB_DIGEST in setup.engine.store

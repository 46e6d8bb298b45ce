"""Outbound control per instance (issue 14) through real edges, agents and containers: the
service-mesh example as a user deploys it, an instance's own policy set at run time taking
effect on the next connection without a restart, and intercept_https answering a container that
trusts the CA put into it. The "outside" is a server this test starts on a Docker network of its
own: nothing leaves the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import docker
import docker.errors
import pytest

from portside import Container, ExecResult, FailedPrecondition, OutboundPolicy, connect
from tests.e2e.harness import PORTSIDE, Cluster
from tests.images.build import _busybox
from tests.support import eventually

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OPENSSL_IMAGE = "portside-test/openssl:latest"


def cli(cluster: Cluster, *args: str) -> str:
    out = subprocess.run(
        [*PORTSIDE, *args, "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


@pytest.fixture
def outside(docker_client: docker.DockerClient) -> Iterator[str]:
    """A server on a network of the test's own (not Portside's): its address. A container can
    reach it only through its node's egress proxy, as it would a host on the internet."""
    name = "portside-test-outside-" + os.urandom(3).hex()
    network = docker_client.networks.create(name, driver="bridge")
    server = docker_client.containers.run(
        "portside-test/echo:latest", detach=True, name=name, hostname="outside", network=name
    )
    try:
        server.reload()
        yield server.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
    finally:
        server.remove(force=True)
        network.remove()


async def http_get(box: Container, url: str) -> tuple[int, str]:
    """The container's own HTTP request (busybox wget): its exit code and all it printed."""
    result = await box.exec(["wget", "-O", "-", url])
    return result.exit_code, (result.stdout + result.stderr).decode()


def refused(got: tuple[int, str]) -> bool:
    return got[0] != 0 and "403 Forbidden" in got[1]


def reached(got: tuple[int, str]) -> bool:
    """The outside server answered (its /whoami: its host name)."""
    return got[0] == 0 and got[1].startswith("outside \n")


async def test_service_mesh_and_an_instances_own_policy_at_run_time(
    cluster: Cluster, outside: str
) -> None:
    cluster.start_controlplane()
    agent = cluster.start_agent("fra")
    edge = f"http://{cluster.start_edge('fra').address}"
    cluster.wait_for_nodes(1)
    here = cluster.tmp / "service-mesh"
    shutil.copytree(EXAMPLES / "service-mesh", here)
    shutil.copy2(_busybox(), here / "app" / "busybox")
    cli(cluster, "deploy", str(here / "portside.toml"))

    async with aiohttp.ClientSession() as session:

        async def through_the_mesh(account: str) -> str:
            url = f"{edge}/cgi-bin/call?account={account}"
            async with session.get(url) as resp:
                body = await resp.text()
                assert resp.status == 200, body
                assert body.startswith("sub-service"), body
                return body

        acme = await eventually(
            lambda: through_the_mesh("acme"), within=60, every=0.5, what="the mesh"
        )
        assert acme == "sub-service acme: account acme, called by Frontend/main\n"
        globex = await through_the_mesh("globex")
        assert globex == "sub-service globex: account globex, called by Frontend/main\n"

    out = cli(cluster, "ps", "--json")
    for name in ("main", "acme", "globex"):
        assert f'"{name}"' in out

    async with connect(cluster.controlplane_address) as ps:
        box = ps.container("Frontend", "main")
        whoami = f"http://{outside}:8080/whoami"
        before = await box.state()
        # The class's policy: only sub.service, by its handler; the outside is refused.
        assert refused(said := await http_get(box, whoami)), said
        applied = await box.outbound()
        assert not applied.own and dict(applied.policy.outbound_by_host) == {
            "sub.service": "route_sub"
        }

        # Its own policy: the outside allowed, the mesh kept. The next connection follows it.
        applied = await box.set_outbound(
            allowed_hosts=[outside], outbound_by_host={"sub.service": "route_sub"}
        )
        assert applied.own and applied.policy.allowed_hosts == (outside,)
        assert reached(await http_get(box, whoami))
        mesh = await box.exec(
            ["wget", "-q", "-O", "-", "--header", "X-Account-Id: t1", "http://sub.service/cgi-bin/hello"]
        )  # fmt: skip
        assert mesh.text == "sub-service t1: account t1, called by Frontend/main\n", mesh
        assert "HTTP/1.1 200" in await raw_tcp(box, outside)

        # Denied wins over allowed; by IP, and for non-HTTP too (a raw TCP connection).
        await box.set_outbound(allowed_hosts=[outside], denied_hosts=[f"{outside}/32"])
        assert refused(said := await http_get(box, whoami)), said
        assert "HTTP/1.1" not in await raw_tcp(box, outside)

        # Back to its class's: the CLI shows it.
        assert "follows its class's" in cli(cluster, "outbound", "clear", "Frontend", "main")
        assert refused(said := await http_get(box, whoami)), said

        # All of it without a restart: the same container, awake since before.
        after = await box.state()
        assert after.since == before.since and after.state == before.state

        async def reaches_outside() -> bool:
            try:
                got = await http_get(box, whoami)
            except FailedPrecondition as exc:  # its node re-registering: no exec for a moment
                raise AssertionError(exc) from exc
            assert reached(got), got
            return True

        # Kept across a sleep and a wake: the agent gets it back with the Start. (A container
        # that just started may send before its node's rules are in place: tried again.)
        await box.set_outbound(allowed_hosts=[outside])
        await box.stop()
        await box.start()
        await eventually(reaches_outside, within=20, every=0.5, what="the outside after a wake")
        assert (await box.outbound()).own

        # And across an agent restart (its containers run on): the new agent is told before
        # it serves them.
        cluster.stop(agent)
        cluster.restart(agent)
        await eventually(reaches_outside, within=20, every=0.5, what="the outside, again")

        # Destroy forgets it.
        await box.destroy()
        assert not (await box.outbound()).own


async def raw_tcp(box: Container, ip: str) -> str:
    """What a plain TCP connection (busybox nc, not an HTTP client) gets back from ip:8080."""
    # nc ends its connection at its input's end: the sleep holds it open for the answer.
    sent = "(printf 'hi\\r\\n\\r\\n'; sleep 2) | nc -w 3 " + ip + " 8080"
    result = await box.exec(["sh", "-c", sent])
    return result.stdout.decode()


def build_openssl_image(client: docker.DockerClient) -> str:
    """busybox and the host's openssl with the libraries it links, FROM scratch: a client that
    verifies certificates against the CA bundle SSL_CERT_FILE names."""
    openssl = Path(shutil.which("openssl") or "/usr/bin/openssl").resolve()
    libs = subprocess.run(["ldd", str(openssl)], capture_output=True, text=True, check=True)
    paths = [openssl] + [
        Path(word).resolve()
        for line in libs.stdout.splitlines()
        for word in line.split()
        if word.startswith("/")
    ]
    with tempfile.TemporaryDirectory(prefix="portside-openssl-") as context:
        lines = ["FROM scratch", "COPY busybox /bin/busybox"]
        shutil.copy2(_busybox(), Path(context) / "busybox")
        for i, path in enumerate(paths):
            shutil.copy2(path, Path(context) / f"f{i}")
            # Where the binary looks: the path ldd names (a symlink's name too).
            lines.append(f"COPY f{i} {path}")
        for line in libs.stdout.splitlines():
            words = line.split()
            if "=>" in words and words[words.index("=>") + 1].startswith("/"):
                linked = words[words.index("=>") + 1]
                if Path(linked).resolve() != Path(linked):
                    lines.append(f"COPY f{paths.index(Path(linked).resolve())} {linked}")
            elif words and words[0].startswith("/") and Path(words[0]).resolve() != Path(words[0]):
                lines.append(f"COPY f{paths.index(Path(words[0]).resolve())} {words[0]}")
        lines += [
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
            f'RUN ["/bin/ln", "-s", "{openssl}", "/bin/openssl"]',
            'RUN ["/bin/mkdir", "/www"]',
            'CMD ["/bin/sh", "-c", "exec httpd -f -p \\"${PORT:-8080}\\" -h /www"]',
        ]
        (Path(context) / "Dockerfile").write_text("\n".join(lines) + "\n")
        client.images.build(path=context, tag=OPENSSL_IMAGE, rm=True, forcerm=True)
    return OPENSSL_IMAGE


HTTPS_CONFIG = """
[gateway]
module = "gateway.py"

[[containers]]
class_name = "Client"
image = "{image}"
default_port = 8080
instance_type = "lite"
outbound_by_host = {{ "secure.service" = "secure" }}
intercept_https = true
"""

HTTPS_GATEWAY = """
from portside.gateway import Response


async def fetch(request, env):
    return Response("this cluster serves no one from outside\\n", status=404)


async def secure(request, env, ctx):
    return Response(f"{request.method} {request.url} for {ctx.class_name}/{ctx.instance}\\n")
"""


async def test_intercept_https_answers_a_container_that_trusts_its_ca(
    cluster: Cluster, docker_client: docker.DockerClient
) -> None:
    image = build_openssl_image(docker_client)
    cluster.start_controlplane()
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    (cluster.tmp / "gateway.py").write_text(HTTPS_GATEWAY)
    cluster.deploy(HTTPS_CONFIG.format(image=image))
    request = b"GET /account?x=1 HTTP/1.1\r\nHost: secure.service\r\nConnection: close\r\n\r\n"
    async with connect(cluster.controlplane_address) as ps:
        box = ps.container("Client", "c1")
        await box.start()
        env = (await box.exec(["sh", "-c", "echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE"])).text
        assert env == "/etc/portside/ca.crt /etc/portside/ca.crt\n"

        async def call_secure() -> ExecResult:
            # No -CAfile: openssl verifies with what SSL_CERT_FILE names, failing on any doubt.
            result = await box.exec(
                ["openssl", "s_client", "-quiet", "-verify_return_error", "-connect",
                 "secure.service:443", "-servername", "secure.service"],
                stdin=request,
            )  # fmt: skip
            # Only this is tried again: the node's rules may follow a new container's first
            # DNS question by a moment (nodeagent/egress).
            assert b"name resolution" not in result.stderr, result
            return result

        verified = await eventually(call_secure, within=40, every=0.5, what="secure.service")
        out = verified.stdout.decode()
        assert verified.exit_code == 0, (out, verified.stderr.decode())
        assert "HTTP/1.1 200" in out
        assert "GET https://secure.service/account?x=1 for Client/c1" in out
        # Another name is not intercepted (nor allowed): that connection is reset.
        other = await box.exec(
            ["openssl", "s_client", "-quiet", "-connect", "secure.service:443",
             "-servername", "other.service"],
            stdin=request,
        )  # fmt: skip
        assert other.exit_code != 0 and b"HTTP/1.1" not in other.stdout
        # The policy as the SDK reads it says so.
        assert (await box.outbound()).policy == OutboundPolicy(
            outbound_by_host={"secure.service": "secure"}, intercept_https=True
        )

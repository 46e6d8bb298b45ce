"""intercept_https's certificates: an instance's CA as its container gets it, and the leaves
the egress proxy serves, checked by a real TLS handshake in memory."""

from __future__ import annotations

import io
import ssl
import tarfile
import time

import pytest

from nodeagent.egress.policies import Occupant, OutboundPolicies
from nodeagent.egress_tls import (
    CA_ENV,
    CA_PATH,
    KEY_PATH,
    TlsInterception,
    ca_files,
    files_for,
    instance_ca,
    leaf_certificate,
    server_context,
)
from portside.pki import CertificateAuthority
from portside.spec import ContainerClass, OutboundPolicy

NOW = 1_800_000_000.0
ROOTS = CertificateAuthority.create("some public root", NOW).cert_pem


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake over memory buffers; raises ssl.SSLError if the client refuses."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = [
        client.wrap_bio(to_client, client_out, server_hostname=name),
        server.wrap_bio(to_server, server_out, server_side=True),
    ]
    done = [False, False]
    for _ in range(10):
        for i, side in enumerate(sides):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if all(done):
            return
    raise AssertionError("the handshake did not finish")


def trusting(pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pem.decode())


def test_the_container_gets_the_ca_then_the_node_roots_and_the_key_beside_it() -> None:
    ca = instance_ca("Frontend", "main", NOW)
    files = ca_files(ca, ROOTS)
    assert files.env == CA_ENV == {"SSL_CERT_FILE": CA_PATH, "REQUESTS_CA_BUNDLE": CA_PATH}
    with tarfile.open(fileobj=io.BytesIO(files.archive)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"etc/portside", CA_PATH[1:], KEY_PATH[1:]}
        assert members["etc/portside"].isdir()
        bundle = tar.extractfile(CA_PATH[1:]).read()  # type: ignore[union-attr]
        assert bundle == ca.cert_pem + b"\n" + ROOTS
        assert tar.extractfile(KEY_PATH[1:]).read() == ca.key_pem  # type: ignore[union-attr]
        assert members[KEY_PATH[1:]].mode == 0o600


def test_a_leaf_verifies_for_its_name_with_the_instances_ca_only() -> None:
    now = time.time()
    ca = instance_ca("Frontend", "main", now)
    leaf = server_context(*leaf_certificate(ca, "sub.service", now))
    handshake(leaf, trusting(ca.cert_pem), "sub.service")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        handshake(leaf, trusting(ca.cert_pem), "other.service")
    another = instance_ca("Frontend", "other", now)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(leaf, trusting(another.cert_pem), "sub.service")


async def test_interception_reads_the_ca_back_once_and_reuses_its_leaves() -> None:
    ca = instance_ca("Frontend", "main", NOW)
    bundle = ca.cert_pem + b"\n" + ROOTS
    reads: list[tuple[str, str]] = []

    async def read_file(container: str, path: str) -> bytes:
        reads.append((container, path))
        if container == "old":
            raise FileNotFoundError(path)
        return {CA_PATH: bundle, KEY_PATH: ca.key_pem}[path]

    interception = TlsInterception(read_file)
    me = Occupant("Frontend", "main", "c1")
    first = await interception.context(me, "sub.service")
    assert first is not None
    assert await interception.context(me, "sub.service") is first
    assert await interception.context(me, "other.service") is not first
    assert reads == [("c1", CA_PATH), ("c1", KEY_PATH)]
    # A container made before intercept_https was on has no CA: not intercepted.
    assert await interception.context(Occupant("Frontend", "x", "old"), "sub.service") is None
    interception.forget({"c1"})
    assert await interception.context(me, "sub.service") is not first
    assert len(reads) == 5


def test_a_ca_is_made_for_instances_that_intercept_https_now() -> None:
    plain = ContainerClass(name="Plain", image="x", outbound_by_host={"a.service": "a"})
    secure = ContainerClass(
        name="Secure", image="x", outbound_by_host={"a.service": "a"}, intercept_https=True
    )
    policies = OutboundPolicies({c.name: c for c in (plain, secure)}.get)
    assert files_for(policies, plain, "p1", ROOTS) is None
    made = files_for(policies, secure, "s1", ROOTS)
    assert made is not None and made.env == CA_ENV
    # An instance's own policy decides over its class's, either way.
    policies.set_policy("Plain", "p2", OutboundPolicy(intercept_https=True))
    policies.set_policy("Secure", "s2", OutboundPolicy())
    assert files_for(policies, plain, "p2", ROOTS) is not None
    assert files_for(policies, secure, "s2", ROOTS) is None

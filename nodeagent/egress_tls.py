"""intercept_https (issue 14): HTTPS from a container to a name its outbound policy sends to a
gateway handler is terminated by the node, with a certificate for that name signed by a CA of
the instance's own, which only that instance trusts.

The CA is made when the instance's container is made (its class's or its own policy says
intercept_https then) and put into the container: CA_PATH holds its certificate followed by the
node's trusted roots, so that HTTPS to names that are not intercepted verifies as before, and
SSL_CERT_FILE and REQUESTS_CA_BUNDLE name it (OpenSSL, Python, curl and requests read them).
Its key is beside it at KEY_PATH, where the egress proxy reads it back when it first needs it
(after an agent restart too): a CA that only this instance trusts lets it deceive nobody but
itself, so the container may read it.
"""

from __future__ import annotations

import datetime
import io
import logging
import ssl
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.egress.policies import Occupant, OutboundPolicies
from portside.pki import CLOCK_SKEW_S, CertificateAuthority
from portside.spec import ContainerClass

log = logging.getLogger(__name__)

CA_PATH = "/etc/portside/ca.crt"
KEY_PATH = "/etc/portside/ca.key"
CA_ENV = {"SSL_CERT_FILE": CA_PATH, "REQUESTS_CA_BUNDLE": CA_PATH}
# The node's own roots, appended to the instance's CA in CA_PATH (Debian's, Red Hat's).
NODE_ROOTS = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
LEAF_LIFETIME_S = 7 * 24 * 3600.0
MOST_LEAVES = 1024  # leaf contexts kept per node (each names one host of one instance)


@dataclass(frozen=True)
class ContainerFiles:
    """What a container gets at its making: files (a tar archive extracted at /) and env."""

    archive: bytes
    env: dict[str, str] = field(default_factory=dict)


def instance_ca(class_name: str, name: str, now: float) -> CertificateAuthority:
    """A new CA for one instance (EC P-256, ten years, the cluster CA's shape)."""
    return CertificateAuthority.create(f"instance {class_name}/{name}", now)


def node_roots(paths: tuple[str, ...] = NODE_ROOTS) -> bytes:
    for path in paths:
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    return b""


def ca_files(ca: CertificateAuthority, roots: bytes) -> ContainerFiles:
    """The CA's certificate (then `roots`) at CA_PATH, its key at KEY_PATH, and the env."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        directory = tarfile.TarInfo(str(Path(CA_PATH).parent).lstrip("/"))
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for path, data, mode in (
            (CA_PATH, ca.cert_pem + b"\n" + roots, 0o644),
            (KEY_PATH, ca.key_pem, 0o600),
        ):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return ContainerFiles(buffer.getvalue(), dict(CA_ENV))


def files_for(
    policies: OutboundPolicies, cls: ContainerClass, name: str, roots: bytes
) -> ContainerFiles | None:
    """The runtime's `container_files`: a new CA for an instance whose policy intercepts HTTPS
    now (its own, else its class's), None for any other."""
    policy = policies.policy_of(Occupant(cls.name, name, "")).policy
    if not policy.intercept_https:
        return None
    return ca_files(instance_ca(cls.name, name, time.time()), roots)


def leaf_certificate(ca: CertificateAuthority, host: str, now: float) -> tuple[bytes, bytes]:
    """A server certificate for `host` signed by `ca`, and its new key (PEM both)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.fromtimestamp(now - CLOCK_SKEW_S, datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(seconds=LEAF_LIFETIME_S + CLOCK_SKEW_S))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context for one certificate (ssl loads keys from files only: a private
    temporary file, gone before this returns)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
        pem.write(key_pem + cert_pem)
        pem.flush()
        context.load_cert_chain(pem.name)
    return context


#: Reads one file of a container (the runtime's `read_file`).
ReadFile = Callable[[str, str], Awaitable[bytes]]


class TlsInterception:
    """The egress proxy's hook: a server context for `host` for the container of `occupant`,
    from the CA in it (read once per container, then kept), or None when it has none (its
    container was made before intercept_https was on: it is then not intercepted)."""

    def __init__(self, read_file: ReadFile, clock: Callable[[], float] = time.time) -> None:
        self._read_file = read_file
        self._clock = clock
        self._cas: dict[str, CertificateAuthority | None] = {}  # container id -> its CA
        self._leaves: dict[tuple[str, str], tuple[float, ssl.SSLContext]] = {}

    async def context(self, occupant: Occupant, host: str) -> ssl.SSLContext | None:
        key = (occupant.container_id, host)
        now = self._clock()
        leaf = self._leaves.get(key)
        if leaf is not None and leaf[0] > now:
            return leaf[1]
        ca = await self._ca(occupant)
        if ca is None:
            return None
        context = server_context(*leaf_certificate(ca, host, now))
        if len(self._leaves) >= MOST_LEAVES:
            self._leaves.pop(next(iter(self._leaves)))
        # Renewed well before it expires: a connection made now may live on for a while.
        self._leaves[key] = (now + LEAF_LIFETIME_S / 2, context)
        return context

    async def _ca(self, occupant: Occupant) -> CertificateAuthority | None:
        container = occupant.container_id
        if container not in self._cas:
            try:
                cert_pem = await self._read_file(container, CA_PATH)
                key_pem = await self._read_file(container, KEY_PATH)
            except FileNotFoundError:
                log.warning(
                    "%s/%s has no CA of its own (its container was made before intercept_https "
                    "was on): its HTTPS is not intercepted until its container is made again",
                    occupant.class_name,
                    occupant.name,
                )
                self._cas[container] = None
                return None
            # CA_PATH holds the instance's CA first, then the node's roots.
            first = x509.load_pem_x509_certificate(cert_pem)
            self._cas[container] = CertificateAuthority(
                first.public_bytes(serialization.Encoding.PEM), key_pem
            )
        return self._cas[container]

    def forget(self, container_ids: set[str]) -> None:
        """Containers that left: their CAs and leaves go."""
        for container in container_ids:
            self._cas.pop(container, None)
        for key in [k for k in self._leaves if k[0] in container_ids]:
            del self._leaves[key]

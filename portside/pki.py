"""The cluster's certificates: one CA, kept in the store, and short-lived certificates it signs for
each part by its role (control plane, agent, edge). Pure: keys and certificates in, PEM out.

A part's certificate names its role and its id in the subject's common name, "agent/fra-1", and
the DNS name its clients verify: every control plane's certificate carries `portside-controlplane`
and every agent's `portside-agent`, whatever addresses they listen on, so that a client needs only
the CA and the role it expects (as Kubernetes' API server is always `kubernetes.default`). A
private key is made where it is used and never sent: the CA signs a certificate signing request,
taking only its public key; the role and id come from who asked, never from the request.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portside.errors import InvalidArgument

DEFAULT_LIFETIME_S = 24 * 3600.0
CA_LIFETIME_S = 10 * 365 * 24 * 3600.0
# Certificates start a little in the past: a host whose clock runs behind still accepts them.
CLOCK_SKEW_S = 300.0


class PeerRole(enum.StrEnum):
    CONTROLPLANE = "controlplane"
    AGENT = "agent"
    EDGE = "edge"


#: The DNS name a part's clients verify, by role (edges serve no gRPC to the cluster).
SERVER_NAMES = {
    PeerRole.CONTROLPLANE: "portside-controlplane",
    PeerRole.AGENT: "portside-agent",
}

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


@dataclass(frozen=True)
class Peer:
    """Who a certificate belongs to."""

    role: PeerRole
    id: str
    not_after: float = 0.0  # unix seconds

    @property
    def common_name(self) -> str:
        return f"{self.role}/{self.id}"


def parse_common_name(common_name: str) -> Peer | None:
    """The peer a certificate's common name names ("agent/fra-1"), or None if it names none."""
    role, sep, ident = common_name.partition("/")
    if not sep or role not in PeerRole.__members__.values() or not _ID.fullmatch(ident):
        return None
    return Peer(PeerRole(role), ident)


@dataclass(frozen=True)
class Identity:
    """What a part holds to prove who it is: its private key, its certificate, and the CA that
    signed it (which is also what it trusts)."""

    key_pem: bytes = field(repr=False)  # never in a log line or a traceback
    cert_pem: bytes
    ca_pem: bytes

    @property
    def peer(self) -> Peer:
        return peer_of(self.cert_pem)


def new_key() -> bytes:
    """A new private key (EC P-256), PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def signing_request(key_pem: bytes) -> bytes:
    """A certificate signing request for `key_pem` (PEM). It names nobody: the CA decides."""
    key = _private_key(key_pem)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertificateAuthority:
    """The cluster CA: its certificate and private key, PEM."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def create(cls, cluster_id: str, now: float) -> CertificateAuthority:
        key_pem = new_key()
        key = _private_key(key_pem)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Portside CA {cluster_id}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_time(now - CLOCK_SKEW_S))
            .not_valid_after(_time(now + CA_LIFETIME_S))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER
        )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate, hex: what `portside bootstrap` prints to compare."""
        return hashlib.sha256(self.der).hexdigest()

    def issue(
        self,
        csr_pem: bytes,
        peer: Peer,
        now: float,
        lifetime_s: float = DEFAULT_LIFETIME_S,
        extra_names: tuple[str, ...] = (),
    ) -> bytes:
        """A certificate (PEM) for the key of `csr_pem`, naming `peer`, valid `lifetime_s` from
        `now`; for serving and calling alike. InvalidArgument for a request whose signature
        does not check out (it does not hold the key it names)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InvalidArgument(f"certificate request: not a PEM CSR ({exc})") from None
        if not csr.is_signature_valid:
            raise InvalidArgument("certificate request: its signature does not match its key")
        if not _ID.fullmatch(peer.id):
            raise InvalidArgument(f"{peer.id!r} cannot name a {peer.role} in a certificate")
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        ca_key = _private_key(self.key_pem)
        names: list[x509.GeneralName] = []
        server_name = SERVER_NAMES.get(peer.role)
        if server_name:
            names.append(x509.DNSName(server_name))
        names.extend(x509.DNSName(n) for n in extra_names if n)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer.common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_time(now - CLOCK_SKEW_S))
            .not_valid_after(_time(now + lifetime_s))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM)


def peer_of(cert_pem: bytes) -> Peer:
    """Who a certificate this CA signed belongs to, and until when it is valid."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    peer = parse_common_name(str(names[0].value)) if names else None
    if peer is None:
        raise InvalidArgument("the certificate names no Portside role")
    return Peer(peer.role, peer.id, cert.not_valid_after_utc.timestamp())


def ca_from_der(der: bytes) -> bytes:
    """A CA certificate (DER, as a token carries it) as PEM; InvalidArgument if it is none."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise InvalidArgument("the token's CA certificate is damaged") from None
    return cert.public_bytes(serialization.Encoding.PEM)


def ca_der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def _private_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument("expected an EC private key")
    return key


def _time(unix_s: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC)


__all__ = [
    "CA_LIFETIME_S",
    "DEFAULT_LIFETIME_S",
    "SERVER_NAMES",
    "CertificateAuthority",
    "Identity",
    "Peer",
    "PeerRole",
    "ca_der",
    "ca_from_der",
    "new_key",
    "parse_common_name",
    "peer_of",
    "signing_request",
]

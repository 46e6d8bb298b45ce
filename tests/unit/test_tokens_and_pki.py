"""Tokens (format, parsing, digests, roles and their scope) and the cluster CA's certificates.
No I/O: keys and certificates are made in memory."""

from __future__ import annotations

import time

import pytest
from cryptography import x509

from portside import pki, tokens
from portside.errors import InvalidArgument
from portside.tokens import Role, TokenRecord

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create("c1", NOW)


def test_a_token_carries_its_kind_id_secret_and_the_ca(ca: pki.CertificateAuthority) -> None:
    token = tokens.new_token("join", ca.cert_pem)
    text = token.text()
    assert text.startswith("pst1.join.") and "\n" not in text
    back = tokens.parse_token("  " + text + "\n")
    assert back == token and back.ca_pem == ca.cert_pem
    assert token.bearer == f"{token.id}.{token.secret}"
    assert token.secret not in repr(token)


def test_two_tokens_never_share_an_id_or_a_secret(ca: pki.CertificateAuthority) -> None:
    made = [tokens.new_token("api", ca.cert_pem) for _ in range(50)]
    assert len({t.id for t in made}) == len({t.secret for t in made}) == 50


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not a Portside token"),
        ("K10abc::server:secret", "not a Portside token"),
        ("pst1.root.0123456789abcdef.c2VjcmV0.Q0E", "not join or api"),
        ("pst1.api.XYZ.c2VjcmV0.Q0E", "damaged"),
        ("pst1.api.0123456789abcdef.c2VjcmV0.Q0E", "CA certificate is damaged"),
    ],
)
def test_a_bad_token_is_refused_without_echoing_it(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words) as caught:
        tokens.parse_token(text, "--token-file t")
    assert str(caught.value).startswith("--token-file t: ")
    if len(text) > 10:
        assert text not in str(caught.value)


def test_bearer_values() -> None:
    assert tokens.parse_bearer("Bearer 0123456789abcdef.c2VjcmV0") == (
        "0123456789abcdef",
        "c2VjcmV0",
    )
    for bad in ("", "Basic abc", "Bearer nodot", "Bearer 0123.x", "Bearer 0123456789abcdef."):
        assert tokens.parse_bearer(bad) is None


def test_the_store_keeps_a_digest_that_matches_only_its_secret() -> None:
    stored = tokens.digest("s3cret")
    assert "s3cret" not in stored and tokens.matches("s3cret", stored)
    assert not tokens.matches("s3cre", stored)


def record(role: Role | None, classes: tuple[str, ...] = (), kind: str = "api") -> TokenRecord:
    return TokenRecord(
        id="0123456789abcdef",
        kind=kind,  # type: ignore[arg-type]
        name="ci",
        digest="",
        created=NOW,
        role=role,
        classes=classes,
    )


@pytest.mark.parametrize(
    ("have", "need", "allowed"),
    [
        (Role.ADMIN, Role.ADMIN, True),
        (Role.ADMIN, Role.DEPLOY, True),
        (Role.ADMIN, Role.READ, True),
        (Role.DEPLOY, Role.ADMIN, False),
        (Role.DEPLOY, Role.DEPLOY, True),
        (Role.DEPLOY, Role.READ, True),
        (Role.READ, Role.ADMIN, False),
        (Role.READ, Role.DEPLOY, False),
        (Role.READ, Role.READ, True),
    ],
)
def test_roles_nest(have: Role, need: Role, allowed: bool) -> None:
    why = record(have).may(need)
    assert (why == "") is allowed
    if not allowed:
        assert f"role {have}" in why and f"needs {need}" in why


def test_a_scoped_token_reaches_only_its_classes() -> None:
    scoped = record(Role.DEPLOY, ("Echo", "Job"))
    assert scoped.may(Role.DEPLOY, ["Echo"]) == ""
    assert "not Other" in scoped.may(Role.DEPLOY, ["Echo", "Other"])
    assert "every class" in scoped.may(Role.READ)  # a cluster-wide call
    assert record(Role.READ).may(Role.READ) == ""  # an unscoped token reaches all


def test_a_join_token_calls_nothing() -> None:
    assert "join token" in record(None, kind="join").may(Role.READ)


def test_expiry() -> None:
    r = TokenRecord("0123456789abcdef", "api", "t", "", NOW, Role.READ, expires=NOW + 60)
    assert not r.expired(NOW + 59) and r.expired(NOW + 60)
    assert not record(Role.READ).expired(NOW + 10**9)  # 0: never


def test_roles_parse_with_the_choices() -> None:
    assert Role.parse("deploy") is Role.DEPLOY
    with pytest.raises(InvalidArgument, match="admin, deploy, read|read, deploy, admin"):
        Role.parse("root")


# --- the CA ---------------------------------------------------------------------------------


def test_a_certificate_names_the_peer_and_the_role_name_clients_check(
    ca: pki.CertificateAuthority,
) -> None:
    key = pki.new_key()
    pem = ca.issue(pki.signing_request(key), pki.Peer(pki.PeerRole.AGENT, "fra-1"), NOW, 3600)
    peer = pki.peer_of(pem)
    assert (peer.role, peer.id, peer.not_after) == (pki.PeerRole.AGENT, "fra-1", NOW + 3600)
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["portside-agent"]
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))


def test_an_edge_certificate_names_no_server(ca: pki.CertificateAuthority) -> None:
    pem = ca.issue(pki.signing_request(pki.new_key()), pki.Peer(pki.PeerRole.EDGE, "e1"), NOW)
    cert = x509.load_pem_x509_certificate(pem)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_the_ca_signs_only_a_request_made_with_its_key(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(InvalidArgument, match="not a PEM CSR"):
        ca.issue(b"nonsense", pki.Peer(pki.PeerRole.AGENT, "a"), NOW)
    with pytest.raises(InvalidArgument, match="cannot name"):
        ca.issue(pki.signing_request(pki.new_key()), pki.Peer(pki.PeerRole.AGENT, "a b"), NOW)


def test_common_names() -> None:
    assert pki.parse_common_name("controlplane/cp-1") == pki.Peer(pki.PeerRole.CONTROLPLANE, "cp-1")
    for bad in ("agent", "root/x", "agent/", "agent/a b", "Portside CA c1"):
        assert pki.parse_common_name(bad) is None


def test_the_ca_is_a_ca_for_ten_years(ca: pki.CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc.timestamp() - NOW > 9 * 365 * 86400
    assert len(ca.fingerprint) == 64 and pki.ca_from_der(ca.der) == ca.cert_pem
    assert time.time() < cert.not_valid_after_utc.timestamp()

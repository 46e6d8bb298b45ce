"""etcd over TLS with client certificates: a real etcd of this module's own, on free loopback
ports, that serves TLS only and admits only clients whose certificate its CA signed.

The whole store contract runs against it through `etcd+https://`; then the clients it must refuse
(no client certificate, a certificate from another CA, plaintext, a CA that did not sign etcd's
certificate) are refused with an error that says which and what to give instead; and the CLI's
flags reach the store, through real `portside bootstrap` and `portside controlplane` processes.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ipaddress
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane import records
from controlplane.store import StoreTls, open_store
from controlplane.store.etcd import EtcdStore
from portside.errors import ConfigError, StoreError
from portside.net import free_port
from tests.integration import test_store_contract as contract
from tests.support import eventually_sync

pytestmark = pytest.mark.integration

# Every contract test that takes a `store` runs here too, with the `store` fixture below.
globals().update(
    (name, test)
    for name, test in vars(contract).items()
    if name.startswith("test_") and "store" in inspect.signature(test).parameters
)
prefix = contract.prefix


# Certificates, as an operator makes them for etcd (docs/security-etcd.md does it with openssl).


@dataclass(frozen=True)
class Signer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    signer: Signer | None,
    *,
    usage: list[x509.ObjectIdentifier] | None = None,
    ips: list[str] | None = None,
) -> tuple[Signer, bytes, bytes]:
    """A new key and its certificate, signed by `signer` (self-signed CA without one): the
    subject as a signer, certificate PEM, key PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    me = Signer(_name(subject), key)
    issuer = signer or me
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(me.name)
        .issuer_name(issuer.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=signer is None, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if ips:
        sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return me, cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return str(cert), str(key)


@dataclass(frozen=True)
class TlsEtcd:
    url: str  # etcd+https://127.0.0.1:PORT
    client: StoreTls  # the control plane's files: the CA, and a certificate etcd admits
    other_ca: str  # a CA that signed neither etcd's certificate nor the client's
    other_client: StoreTls  # a client certificate from that other CA


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    """etcd serving TLS only, with --client-cert-auth; killed at the end, even on failure."""
    tmp = tmp_path_factory.mktemp("tls-etcd")
    ca, ca_pem, ca_key = _issue("etcd test CA", None)
    ca_file, _ = _write(tmp, "ca", ca_pem, ca_key)
    server = _issue(
        "etcd-0",
        ca,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        ips=["127.0.0.1"],
    )
    server_cert, server_key = _write(tmp, "etcd-0", *server[1:])
    client = _issue("portside-controlplane", ca, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    client_cert, client_key = _write(tmp, "controlplane", *client[1:])
    other, other_pem, other_key = _issue("another CA", None)
    other_ca, _ = _write(tmp, "other-ca", other_pem, other_key)
    stranger = _issue("stranger", other, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    stranger_cert, stranger_key = _write(tmp, "stranger", *stranger[1:])

    port, peer = free_port(), free_port()
    log = tmp / "etcd.log"
    proc = subprocess.Popen(
        [
            "etcd",
            "--name=etcd-0",
            f"--data-dir={tmp / 'data'}",
            f"--listen-client-urls=https://127.0.0.1:{port}",
            f"--advertise-client-urls=https://127.0.0.1:{port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=etcd-0=http://127.0.0.1:{peer}",
            f"--cert-file={server_cert}",
            f"--key-file={server_key}",
            f"--trusted-ca-file={ca_file}",
            "--client-cert-auth",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # Printed once the member has a leader and serves: the first read then succeeds.
        eventually_sync(
            lambda: b"ready to serve client requests" in log.read_bytes() or proc.poll(),
            within=30,
            what="etcd over TLS started",
        )
        assert proc.poll() is None, log.read_text()
        yield TlsEtcd(
            url=f"etcd+https://127.0.0.1:{port}",
            client=StoreTls(ca=ca_file, cert=client_cert, key=client_key),
            other_ca=other_ca,
            other_client=StoreTls(ca=ca_file, cert=stranger_cert, key=stranger_key),
        )
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
async def store(tls_etcd: TlsEtcd) -> AsyncIterator[EtcdStore]:
    """The contract's store, over TLS with the control plane's client certificate. The etcd is
    this module's own, so what the tests leave behind dies with it."""
    opened = await open_store(tls_etcd.url, tls=tls_etcd.client)
    assert isinstance(opened, EtcdStore)
    yield opened
    await opened.close()


async def test_tls_connects_to_the_first_endpoint_that_answers(tls_etcd: TlsEtcd) -> None:
    live = tls_etcd.url.removeprefix("etcd+https://")
    store = await open_store(f"etcd+https://127.0.0.1:1,{live}", tls=tls_etcd.client)
    try:
        assert isinstance(store, EtcdStore) and store.endpoint == live
        assert await store.get("/portside-test/none") is None
    finally:
        await store.close()


async def test_a_client_without_a_certificate_is_refused(tls_etcd: TlsEtcd) -> None:
    no_cert = StoreTls(ca=tls_etcd.client.ca)
    with pytest.raises(StoreError) as caught:
        await open_store(tls_etcd.url, tls=no_cert)
    assert "etcd wants a client certificate: give --store-cert and --store-key" in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_certificate_from_another_ca_is_refused(tls_etcd: TlsEtcd) -> None:
    with pytest.raises(StoreError) as caught:
        await open_store(tls_etcd.url, tls=tls_etcd.other_client)
    assert f"etcd refused the client certificate --store-cert {tls_etcd.other_client.cert}" in str(
        caught.value
    )


async def test_a_plaintext_client_is_refused(tls_etcd: TlsEtcd) -> None:
    plain = tls_etcd.url.replace("etcd+https://", "etcd://")
    with pytest.raises(StoreError) as caught:
        await open_store(plain)
    assert "does this etcd serve TLS? then use --store etcd+https://" in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_etcd_is_verified_against_store_ca(tls_etcd: TlsEtcd) -> None:
    wrong_ca = StoreTls(ca=tls_etcd.other_ca, cert=tls_etcd.client.cert, key=tls_etcd.client.key)
    with pytest.raises(StoreError) as caught:
        await open_store(tls_etcd.url, tls=wrong_ca)
    assert f"etcd's certificate is not signed by --store-ca {tls_etcd.other_ca}" in str(
        caught.value
    )


async def test_a_file_that_is_not_pem_names_its_flag(tls_etcd: TlsEtcd, tmp_path: Path) -> None:
    garbage = tmp_path / "key.der"
    garbage.write_bytes(b"\x30\x82 not a PEM file")
    bad_key = StoreTls(ca=tls_etcd.client.ca, cert=tls_etcd.client.cert, key=str(garbage))
    with pytest.raises(ConfigError, match=r"^--store-key: .*key\.der: not a PEM file"):
        await open_store(tls_etcd.url, tls=bad_key)


async def portside(*args: str) -> tuple[int, str]:
    """Exit status and stderr of a `portside` process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "portside", *args, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    return await proc.wait(), stderr.decode()


async def test_portside_bootstrap_writes_the_cluster_ca_over_tls(
    tls_etcd: TlsEtcd, tmp_path: Path
) -> None:
    tls = tls_etcd.client
    flags = ["--store-ca", tls.ca, "--store-cert", tls.cert, "--store-key", tls.key]
    status, stderr = await portside(
        "bootstrap", "--store", tls_etcd.url, *flags, "--out", str(tmp_path / "out")
    )
    assert status == 0, stderr
    assert (tmp_path / "out" / "admin.token").stat().st_mode & 0o777 == 0o600
    store = await open_store(tls_etcd.url, tls=tls)
    try:
        assert await store.get(records.CA) is not None
    finally:
        await store.close()


async def test_portside_controlplane_without_a_client_certificate_says_what_to_give(
    tls_etcd: TlsEtcd,
) -> None:
    status, stderr = await portside(
        "controlplane",
        f"--listen=127.0.0.1:{free_port()}",
        f"--store={tls_etcd.url}",
        f"--store-ca={tls_etcd.client.ca}",
    )
    last = stderr.strip().splitlines()[-1]  # gRPC's own C-core may log lines before it
    assert status == 1
    assert last.startswith("portside controlplane: etcd: no endpoint answered: "), stderr
    assert last.endswith("(etcd wants a client certificate: give --store-cert and --store-key)")

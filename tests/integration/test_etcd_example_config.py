"""deploy/etcd/ as etcd reads it: the three example member configs, with their addresses moved to
loopback (127.0.0.5 to 127.0.0.7 and free ports, never the shared 2379) and their files to the
test's own, start a real 3-member cluster over TLS; a client with the control planes'
certificate reads and writes, one without a certificate is refused, and a member's plain-HTTP
metrics port answers /health."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.x509.oid import ExtendedKeyUsageOID

from portside.net import free_port
from tests.integration.test_store_tls import _issue, _write
from tests.support import eventually_sync
from tests.unit.test_dashboards import ROOT

pytestmark = pytest.mark.integration

# The members' host addresses as the example names them (never contacted: each is rewritten to a
# loopback address of the test's own before anything starts).
EXAMPLE_IPS = tuple(
    m["host"]
    for m in (
        re.search(r"https://(?P<host>[^:]+):2380", url)
        for url in yaml.safe_load((ROOT / "deploy/etcd/etcd-0.yml").read_text())[
            "initial-cluster"
        ].split(",")
    )
    if m is not None
)
LOOPBACK_IPS = ("127.0.0.5", "127.0.0.6", "127.0.0.7")


def rendered(tmp: Path) -> list[str]:
    """Each member's example config with loopback addresses, free ports and the test's files."""
    ports = {(ip, port): free_port(lo) for ip, lo in zip(EXAMPLE_IPS, LOOPBACK_IPS, strict=True)
             for port in (2379, 2380, 2381)}  # fmt: skip
    texts = []
    for i in range(3):
        text = (ROOT / f"deploy/etcd/etcd-{i}.yml").read_text()
        for (ip, port), free in ports.items():
            text = text.replace(f"{ip}:{port}", f"{LOOPBACK_IPS[EXAMPLE_IPS.index(ip)]}:{free}")
        text = text.replace("/etc/etcd/pki", str(tmp / "pki"))
        text = text.replace("/var/lib/etcd", str(tmp / f"data-{i}"))
        kept = yaml.safe_dump(yaml.safe_load(text))  # comments aside
        assert not any(ip in kept for ip in EXAMPLE_IPS)
        texts.append(text)
    return texts


def make_pki(pki: Path) -> None:
    """What docs/security.md makes with openssl: the etcd CA, a certificate per member naming
    its address, and the control planes' client certificate."""
    pki.mkdir()
    ca, ca_pem, ca_key = _issue("Portside etcd CA", None)
    _write(pki, "etcd-ca", ca_pem, ca_key)
    for i, ip in enumerate(LOOPBACK_IPS):
        # 127.0.0.1 too: a member dials its peers from it (the loopback route's source address).
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        _write(pki, f"etcd-{i}", *_issue(f"etcd-{i}", ca, usage=usage, ips=[ip, "127.0.0.1"])[1:])
    client = _issue("portside-controlplane", ca, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    _write(pki, "controlplane", *client[1:])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[dict[str, object]]]:
    make_pki(tmp_path / "pki")
    procs, configs = [], []
    try:
        for i, text in enumerate(rendered(tmp_path)):
            path = tmp_path / f"etcd-{i}.yml"
            path.write_text(text)
            configs.append(yaml.safe_load(text))
            log = (tmp_path / f"etcd-{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    ["etcd", "--config-file", str(path)], stdout=log, stderr=subprocess.STDOUT
                )
            )
        yield configs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def etcdctl(endpoints: str, *args: str, pki: Path | None) -> subprocess.CompletedProcess[str]:
    tls = []
    if pki is not None:
        tls = [f"--cacert={pki / 'etcd-ca.crt'}", f"--cert={pki / 'controlplane.crt'}"]
        tls.append(f"--key={pki / 'controlplane.key'}")
    return subprocess.run(
        ["etcdctl", f"--endpoints={endpoints}", "--command-timeout=3s", *tls, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_example_configs_make_a_three_member_tls_cluster(
    cluster: list[dict[str, object]], tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    endpoints = ",".join(str(c["advertise-client-urls"]) for c in cluster)
    eventually_sync(
        lambda: etcdctl(endpoints, "endpoint", "health", pki=pki).returncode == 0,
        within=30,
        what="the three members healthy",
    )
    members = etcdctl(endpoints, "member", "list", pki=pki)
    assert members.returncode == 0 and members.stdout.count("started") == 3, members.stdout
    assert etcdctl(endpoints, "put", "/portside/test", "x", pki=pki).returncode == 0
    assert etcdctl(endpoints, "get", "/portside/test", pki=pki).stdout.split() == [
        "/portside/test",
        "x",
    ]
    without = etcdctl(
        endpoints, f"--cacert={pki / 'etcd-ca.crt'}", "get", "/portside/test", pki=None
    )
    assert without.returncode != 0  # no client certificate: refused
    metrics = str(cluster[0]["listen-metrics-urls"])
    with urllib.request.urlopen(f"{metrics}/health", timeout=5) as resp:  # plain HTTP
        assert b'"health":"true"' in resp.read()

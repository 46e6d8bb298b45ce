"""How a --store URL picks and configures a backend; every case here fails before any I/O.

The backends themselves are exercised in tests/integration/test_store_contract.py.
"""

from __future__ import annotations

import pytest

from controlplane.store import BACKENDS, StoreTls, open_store
from controlplane.store.etcd import parse_etcd_url
from controlplane.store.sqlite import parse_sqlite_url
from portside.errors import ConfigError


def test_registry_knows_etcd_and_sqlite_only() -> None:
    assert sorted(BACKENDS) == ["etcd", "etcd+https", "sqlite"]


@pytest.mark.parametrize(
    ("url", "endpoints"),
    [
        ("etcd://127.0.0.1:2379", [("127.0.0.1", 2379)]),
        ("etcd://127.0.0.2:2379,127.0.0.3:22379/", [("127.0.0.2", 2379), ("127.0.0.3", 22379)]),
        ("etcd://etcd-0", [("etcd-0", 2379)]),
        ("etcd://[::1]:2379", [("::1", 2379)]),
        ("etcd+https://127.0.1.5:2379,etcd-1", [("127.0.1.5", 2379), ("etcd-1", 2379)]),
    ],
)
def test_etcd_url_lists_endpoints_in_order(url: str, endpoints: list[tuple[str, int]]) -> None:
    assert parse_etcd_url(url) == endpoints


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/portside/state.db", "/var/lib/portside/state.db"),
        ("sqlite://:memory:", ":memory:"),
    ],
)
def test_sqlite_url_names_a_file(url: str, path: str) -> None:
    assert parse_sqlite_url(url) == path


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "expected a URL"),
        ("127.0.0.1:2379", "expected a URL"),
        ("redis://127.0.0.1:6379", "unknown scheme 'redis'"),
        ("ETCD://127.0.0.1:2379", "unknown scheme"),
        ("etcd://", "no endpoint"),
        ("etcd://127.0.0.1:port", "port must be 1-65535"),
        ("etcd://127.0.0.1:0", "port must be 1-65535"),
        ("etcd://127.0.0.1:65536", "port must be 1-65535"),
        ("etcd://127.0.0.1:2379,,127.0.0.2:2379", "has no host"),
        ("etcd://:2379", "has no host"),
        ("etcd://127.0.0.1:2379/portside", "no path"),
        ("etcd://user:pw@127.0.0.1:2379", "no path, query or user"),
        ("etcd://[::1", "bad endpoint"),
        ("sqlite://state.db", "must be absolute"),
        ("sqlite://", "must be absolute"),
        ("sqlite:///var/lib/portside/", "directory"),
        ("sqlite:///state.db?mode=ro", "options are not supported"),
    ],
)
async def test_bad_url_is_a_config_error_naming_the_flag(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        await open_store(url)
    assert caught.value.file == "--store"
    assert str(caught.value).startswith("--store: ")


@pytest.mark.parametrize(
    ("url", "tls", "flag", "problem"),
    [
        (
            "etcd://127.0.0.1:2379",
            StoreTls(ca="/ca.pem"),
            "--store-ca",
            "TLS files are for an etcd\\+https:// store, not etcd://; use etcd\\+https://",
        ),
        (
            "sqlite:///var/lib/portside/state.db",
            StoreTls(cert="/c.pem", key="/k.pem"),
            "--store-cert",
            "not sqlite://",
        ),
        (
            "etcd+https://127.0.0.1:2379",
            StoreTls(cert="/c.pem"),
            "--store-cert",
            "needs --store-key",
        ),
        (
            "etcd+https://127.0.0.1:2379",
            StoreTls(key="/k.pem"),
            "--store-key",
            "needs --store-cert",
        ),
        (
            "etcd+https://127.0.0.1:2379",
            StoreTls(ca="/nonexistent/ca.pem"),
            "--store-ca",
            "/nonexistent/ca.pem: cannot read it: No such file or directory",
        ),
    ],
)
async def test_tls_files_that_do_not_fit_name_their_flag(
    url: str, tls: StoreTls, flag: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        await open_store(url, tls=tls)
    assert caught.value.file == flag
    assert str(caught.value).startswith(f"{flag}: ")

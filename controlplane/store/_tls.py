"""The TLS files of a networked store (--store-ca, --store-cert, --store-key), checked against the
--store URL before any I/O; read once, at connect, into gRPC channel credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from portside.errors import ConfigError

#: The URL schemes whose stores speak TLS, and so may be given these files.
TLS_SCHEMES = ("etcd+https",)


@dataclass(frozen=True)
class StoreTls:
    """PEM paths; "" means not given. Without `ca`, gRPC's bundled public roots verify the store;
    `cert` and `key` are the client certificate and its private key, given together or not at all.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""

    def flags(self) -> list[tuple[str, str]]:
        """(flag, path) of each of the three, given or not."""
        return [("--store-ca", self.ca), ("--store-cert", self.cert), ("--store-key", self.key)]

    def check(self, url: str) -> None:
        """Raise ConfigError, naming the flag, for files that `url` cannot use or that lack
        their other half."""
        scheme = url.partition("://")[0]
        files = [(flag, path) for flag, path in self.flags() if path]
        if files and scheme not in TLS_SCHEMES:
            flag, path = files[0]
            hint = "; use etcd+https:// for etcd over TLS" if scheme == "etcd" else ""
            raise ConfigError(
                flag, path, f"TLS files are for an etcd+https:// store, not {scheme}://{hint}"
            )
        if self.cert and not self.key:
            raise ConfigError("--store-cert", self.cert, "needs --store-key, its private key")
        if self.key and not self.cert:
            raise ConfigError("--store-key", self.key, "needs --store-cert, its certificate")

    def channel_credentials(self) -> Any:
        """grpc.ChannelCredentials from the files; ConfigError naming the flag of one that cannot
        be read or holds no PEM block."""
        ca, cert, key = (_read_pem(flag, path) for flag, path in self.flags())
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def _read_pem(flag: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise ConfigError(flag, path, f"cannot read it: {exc.strerror or exc}") from exc
    # gRPC only says "handshake failed" later, without naming the file: check the obvious here.
    if b"-----BEGIN " not in pem:
        raise ConfigError(flag, path, "not a PEM file (no -----BEGIN line)")
    return pem


NO_TLS = StoreTls()

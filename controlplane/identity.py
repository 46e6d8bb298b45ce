"""The cluster's identity on the control plane: `bootstrap` (the CA and the first two tokens, once
per cluster), this replica's own certificate (re-issued at half its lifetime, handed to new TLS
handshakes without dropping a call), and the certificates it signs for nodes that join or renew.

The CA's private key lives in the store and in the memory of control-plane replicas only.

gRPC's Python server can either require a client certificate or not ask for one; it cannot ask
without requiring. So a replica serves two ports: `--listen` (TLS; API tokens, and Join, which a
node calls before it has a certificate) and the cluster port, `--listen` port + 2
(`net.CLUSTER_PORT_OFFSET`), where a client certificate of the cluster is required: agents and
edges make every other call there (`net.cluster_target`). The access table
(controlplane.access) reads the peer's certificate wherever it comes from, so it holds the same on
either port.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controlplane import records
from controlplane.secrets import KEY_FILE, new_key_text
from controlplane.store import Store, StoreTls, open_store
from controlplane.tokens import utc_text, write_token
from portside import net, pki, tokens
from portside.errors import FailedPrecondition, InvalidArgument
from portside.pki import CertificateAuthority, Peer, PeerRole
from portside.tokens import Role, TokenRecord

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
JOIN_TOKEN_FILE = "join.token"
#: Roles a join token admits: a control plane's certificate is never given to a node.
JOINING_ROLES = (PeerRole.AGENT, PeerRole.EDGE)


@dataclass(frozen=True)
class Bootstrapped:
    """What `bootstrap` did. `created` False: the store was bootstrapped already and nothing was
    written (its tokens' secrets are not kept anywhere, so they cannot be shown again)."""

    created: bool
    store_url: str
    admin_token: Path
    join_token: Path
    ca_fingerprint: str
    secrets_key: Path  # the key of gateway secrets: every control plane's --secrets-key-file

    def report(self) -> str:
        """What `portside bootstrap` prints."""
        fingerprint = f"CA fingerprint (SHA-256) {self.ca_fingerprint}"
        if self.created:
            return (
                f"bootstrapped the cluster in {self.store_url}; {fingerprint}\n"
                f"  {self.admin_token}  admin API token: $PORTSIDE_TOKEN or --token-file\n"
                f"  {self.join_token}  join token: agents and edges --join-token-file\n"
                f"  {self.secrets_key}  gateway secrets key: control planes --secrets-key-file\n"
                "Keep all three secret; `portside token create` makes more tokens."
            )
        here = all(_pins(path, self.ca_fingerprint) for path in (self.admin_token, self.join_token))
        where = (
            f"its tokens are in {self.admin_token} and {self.join_token}"
            if here
            else f"its tokens are where its first bootstrap wrote them (not in {self.out_dir})"
        )
        return (
            f"{self.store_url} was bootstrapped already ({fingerprint}): nothing was written; "
            f"{where}. Secrets are not kept, so they cannot be shown again: with an admin token, "
            "`portside token create --role admin` (or --role join) makes new ones."
        )

    @property
    def out_dir(self) -> Path:
        return self.admin_token.parent


async def bootstrap(
    store: Store,
    out_dir: str | os.PathLike[str],
    *,
    store_url: str = "the store",
    clock: Callable[[], float] = time.time,
) -> Bootstrapped:
    """Create the cluster CA in `store` (only if it has none), one admin API token and one join
    token, and write the tokens to `out_dir`/admin.token and join.token and a new gateway
    secrets key to secrets.key (mode 0600; the directory is made 0700 if missing). On a store
    bootstrapped already: writes nothing, `created` False. FailedPrecondition if one of those
    files is in the way (it would be overwritten)."""
    out = Path(out_dir)
    admin_path, join_path = out / ADMIN_TOKEN_FILE, out / JOIN_TOKEN_FILE
    key_path = out / KEY_FILE
    existing = await store.get(records.CA)
    if existing is not None:
        fingerprint = records.decode_ca(existing.value).fingerprint
        return Bootstrapped(False, store_url, admin_path, join_path, fingerprint, key_path)
    for path in (admin_path, join_path, key_path):
        if await asyncio.to_thread(os.path.lexists, path):
            raise FailedPrecondition(
                f"{path} exists, but {store_url} was never bootstrapped: that file is another "
                "cluster's; move it away or choose another --out"
            )
    now = clock()
    ca = CertificateAuthority.create(secrets.token_hex(4), now)
    admin = tokens.new_token("api", ca.cert_pem)
    join = tokens.new_token("join", ca.cert_pem)
    made = [
        TokenRecord(admin.id, "api", "admin", tokens.digest(admin.secret), now, Role.ADMIN),
        TokenRecord(join.id, "join", "join", tokens.digest(join.secret), now),
    ]
    # Tokens first, then the CA: the CA's create-if-absent decides who bootstrapped, and the
    # loser of a race takes its tokens back. A store with a CA always has its admin token.
    for record in made:
        await write_token(store, record)
    if not await store.compare_and_swap(records.CA, 0, records.encode_ca(ca)):
        for record in made:
            await store.delete(records.token_key(record.id))
        return await bootstrap(store, out, store_url=store_url, clock=clock)
    await asyncio.to_thread(
        _write_secrets,
        {admin_path: admin.text(), join_path: join.text(), key_path: new_key_text()},
    )
    log.info("bootstrapped %s: CA %s", store_url, ca.fingerprint)
    return Bootstrapped(True, store_url, admin_path, join_path, ca.fingerprint, key_path)


def bootstrap_url(
    store_url: str, out_dir: str | os.PathLike[str], store_tls: StoreTls | None = None
) -> Bootstrapped:
    """`bootstrap` on the store at `store_url` (with the files of an etcd+https:// store), from
    synchronous code (`portside bootstrap`, `portside up`)."""

    async def run() -> Bootstrapped:
        store = await open_store(store_url, tls=store_tls or StoreTls())
        try:
            return await bootstrap(store, out_dir, store_url=store_url)
        finally:
            await store.close()

    return asyncio.run(run())


def _pins(path: Path, fingerprint: str) -> bool:
    """Whether the token in the file at `path` is of the cluster whose CA has `fingerprint`."""
    try:
        token = tokens.parse_token(path.read_text(), str(path))
    except (OSError, InvalidArgument):
        return False
    return hashlib.sha256(pki.ca_der(token.ca_pem)).hexdigest() == fingerprint


def _write_secrets(lines: dict[Path, str]) -> None:
    """Each line to its own new file, mode 0600 (its directory made 0700 if missing)."""
    for path, line in lines.items():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(line + "\n")


async def load_ca(store: Store, store_url: str) -> CertificateAuthority:
    """The cluster CA; FailedPrecondition saying what to run if the store has none."""
    kv = await store.get(records.CA)
    if kv is None:
        raise FailedPrecondition(
            f"{store_url} was never bootstrapped: run `portside bootstrap --store {store_url} "
            "--out DIR` first (or start with --insecure, for development only)"
        )
    return records.decode_ca(kv.value)


@dataclass(frozen=True)
class Issued:
    certificate: bytes
    ca_certificate: bytes
    not_after: float


class ControlPlaneIdentity:
    """This replica's certificate (role controlplane, its replica id), renewed by `keep_renewed`
    at half its lifetime, and what it signs for others."""

    def __init__(
        self,
        ca: CertificateAuthority,
        replica_id: str,
        lifetime_s: float = pki.DEFAULT_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lifetime_s <= 0:
            raise InvalidArgument(f"certificate lifetime {lifetime_s:g}s: must be positive")
        self.ca = ca
        self.replica_id = replica_id
        self.lifetime_s = lifetime_s
        self.clock = clock
        #: The current key and certificate: servers and channels made from it follow renewals.
        self.live = net.LiveIdentity(self._issue_own())

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    @property
    def identity(self) -> pki.Identity:
        """The current key and certificate."""
        return self.live.current

    def client_tls(self, server: PeerRole) -> net.ClientTls:
        """Mutual TLS to a server of role `server` (an agent), following renewals."""
        return net.ClientTls(self.ca_pem, server=server, identity=self.live)

    def api_tls(self) -> net.ServerTls:
        """--listen: TLS, no client certificate asked (callers bring a token)."""
        return net.ServerTls(self.live)

    def cluster_tls(self) -> net.ServerTls:
        """The cluster port: a client certificate of this CA required, any role (the access
        table says which role may call what)."""
        return net.ServerTls(self.live, peers=frozenset(PeerRole))

    def _issue_own(self) -> pki.Identity:
        key = pki.new_key()
        peer = Peer(PeerRole.CONTROLPLANE, self.replica_id)
        cert = self.ca.issue(pki.signing_request(key), peer, self.clock(), self.lifetime_s)
        return pki.Identity(key, cert, self.ca_pem)

    async def keep_renewed(self) -> None:
        """Re-issue this replica's certificate at half its lifetime; runs until cancelled.
        Handshakes after that present the new one; connections made before keep theirs."""
        while True:
            renew_at = self.live.peer.not_after - self.lifetime_s / 2
            await asyncio.sleep(max(0.0, renew_at - self.clock()))
            self.live.replace(self._issue_own())
            log.info(
                "renewed this replica's certificate, valid until %s",
                utc_text(self.live.peer.not_after),
            )

    def join(self, role: str, node_id: str, csr_pem: bytes) -> Issued:
        """A certificate for a node admitted by a join token."""
        if role not in {r.value for r in JOINING_ROLES}:
            raise InvalidArgument(f"role {role!r}: a node joins as agent or edge")
        return self._sign(csr_pem, Peer(PeerRole(role), node_id))

    def renew(self, peer: Peer, csr_pem: bytes) -> Issued:
        """A new certificate for the same role and id as the one the caller presented."""
        return self._sign(csr_pem, Peer(peer.role, peer.id))

    def _sign(self, csr_pem: bytes, peer: Peer) -> Issued:
        now = self.clock()
        cert = self.ca.issue(csr_pem, peer, now, self.lifetime_s)
        return Issued(cert, self.ca_pem, now + self.lifetime_s)

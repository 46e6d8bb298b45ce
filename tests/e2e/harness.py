"""Start a real Portside cluster the way a user does — `portside controlplane|agent|edge` as
separate processes — and clean up after it: processes, their containers, their store keys.

A cluster is secured as a user's is: its store is bootstrapped before its first control plane
starts (unless that one runs with --insecure), agents and edges join with the join token, and
while it lives $PORTSIDE_TOKEN holds the admin token, so that the CLI and the SDK called by a test
(in this process or a child) use it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import docker
import grpc

from portside import net
from portside.net import free_port
from portside.tokens import parse_token
from tests.support import eventually_sync

PORTSIDE = [sys.executable, "-m", "portside"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    address: str
    group: int | None = None  # its own group id, for tests/partition.py rules

    def option(self, flag: str) -> str:
        """The value of `flag` on its command line ("--api-listen" → "127.0.0.2:40123")."""
        args = [str(a) for a in self.popen.args]  # type: ignore[union-attr]
        return args[args.index(flag) + 1]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for_port(address: str, proc: Proc | None = None, within: float = 20.0) -> None:
    """Until `address` accepts connections; at once an error if `proc` exits meanwhile."""
    host, port = address.rsplit(":", 1)

    def port_open() -> bool:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_text()}"
            )
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return True
        except OSError:
            return False

    eventually_sync(port_open, within=within, every=0.05, what=f"{address} open")


@dataclass
class Cluster:
    """One test's cluster. Node ids carry a per-test tag, so containers are cleaned by label."""

    tmp: Path
    store_url: str
    tag: str
    procs: list[Proc] = field(default_factory=list)
    controlplane_address: str = ""
    secure: bool = True  # False once a control plane was started with --insecure
    admin_token: str = ""  # the admin token's text, once bootstrapped
    _saved_token: str | None = None

    @property
    def tokens_dir(self) -> Path:
        return self.tmp / "tokens"

    @property
    def join_token_file(self) -> Path:
        return self.tokens_dir / "join.token"

    @property
    def admin_token_file(self) -> Path:
        return self.tokens_dir / "admin.token"

    @property
    def secrets_key_file(self) -> Path:
        """The gateway secrets key bootstrap wrote: every control plane is started with it."""
        return self.tokens_dir / "secrets.key"

    def bootstrap(self) -> None:
        """`portside bootstrap` of this cluster's store, in-process (the store was emptied for
        this test); the admin token goes into $PORTSIDE_TOKEN until `close()`."""
        from controlplane.identity import bootstrap_url

        # Its own event loop, in a thread: tests may call this from a running loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            done = pool.submit(bootstrap_url, self.store_url, self.tokens_dir).result(60)
        assert done.created, done.report()
        self.admin_token = self.admin_token_file.read_text().strip()
        if self._saved_token is None:
            self._saved_token = os.environ.get("PORTSIDE_TOKEN", "")
        os.environ["PORTSIDE_TOKEN"] = self.admin_token

    def _join_args(self) -> list[str]:
        return ["--join-token-file", str(self.join_token_file)] if self.secure else []

    def channel(self) -> grpc.aio.Channel:
        """A gRPC channel to the control plane, as a client with the admin token calls it."""
        if not self.secure:
            return net.grpc_channel(self.controlplane_address)
        token = parse_token(self.admin_token)
        return net.grpc_channel(
            self.controlplane_address, tls=net.ClientTls(token.ca_pem), bearer=token.bearer
        )

    def _start(
        self,
        name: str,
        args: list[str],
        address: str,
        group: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """`group`: run the process with this group id (still uid 0, so Docker stays reachable),
        so that packet-filter rules can match its traffic alone (tests/partition.py). `env`: more
        environment (DOCKER_HOST for an agent on another engine)."""
        log = self.tmp / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        popen = subprocess.Popen(
            [*PORTSIDE, *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            group=group,
        )
        proc = Proc(name, popen, log, address, group)
        self.procs.append(proc)
        wait_for_port(address, proc)
        return proc

    def start_controlplane(self, *extra: str) -> Proc:
        if "--insecure" in extra:
            self.secure = False
        elif not self.admin_token:
            self.bootstrap()
        address = f"127.0.0.1:{free_port()}"
        proc = self._start(
            f"controlplane-{len(self.procs)}",
            [
                "controlplane",
                "--listen",
                address,
                "--store",
                self.store_url,
                "--metrics-listen",
                f"127.0.0.1:{free_port()}",
                # The test's own image store: never the machine's default, shared by every run.
                *([] if "--image-dir" in extra else ["--image-dir", str(self.tmp / "images")]),
                *(
                    ["--secrets-key-file", str(self.secrets_key_file)]
                    if self.secrets_key_file.exists() and "--secrets-key-file" not in extra
                    else []
                ),
                *extra,
            ],
            address,
        )
        self.controlplane_address = self.controlplane_address or address
        return proc

    def start_agent(
        self,
        region: str,
        host: str = "127.0.0.1",
        *extra: str,
        group: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        port = free_port(host)
        api_port = free_port(host)
        metrics_port = free_port(host)
        node_id = f"{self.tag}-{region}-{port}"
        return self._start(
            f"agent-{node_id}",
            [
                "agent",
                "--controlplane",
                self.controlplane_address,
                "--listen",
                f"{host}:{port}",
                "--api-listen",
                f"{host}:{api_port}",
                "--metrics-listen",
                f"{host}:{metrics_port}",
                "--region",
                region,
                *self._join_args(),
                "--node-id",
                node_id,  # last: tests read it there
                *extra,
            ],
            f"{host}:{port}",
            group,
            env,
        )

    def start_edge(
        self, region: str, host: str = "127.0.0.1", *extra: str, group: int | None = None
    ) -> Proc:
        address = f"{host}:{free_port(host)}"
        return self._start(
            f"edge-{region}-{len(self.procs)}",
            [
                "edge",
                "--controlplane",
                self.controlplane_address,
                "--listen",
                address,
                "--metrics-listen",
                f"{host}:{free_port(host)}",
                "--region",
                region,
                *self._join_args(),
                *extra,
            ],
            address,
            group,
        )

    def restart(self, proc: Proc) -> Proc:
        """Start `proc` again with the same arguments (same node id, same ports)."""
        args = [str(a) for a in proc.popen.args][len(PORTSIDE) :]  # type: ignore[union-attr]
        return self._start(proc.name + "-again", args, proc.address, proc.group)

    def deploy(self, toml_text: str) -> None:
        path = self.tmp / "portside.toml"
        path.write_text(toml_text)
        out = subprocess.run(
            [*PORTSIDE, "deploy", str(path), "--controlplane", self.controlplane_address],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr

    def wait_for_nodes(self, count: int, within: float = 20.0) -> None:
        """Until `portside nodes` lists at least `count` nodes."""

        def registered() -> bool:
            out = subprocess.run(
                [*PORTSIDE, "nodes", "--json", "--controlplane", self.controlplane_address],
                capture_output=True,
                text=True,
            )
            return out.returncode == 0 and out.stdout.count('"id"') >= count

        eventually_sync(registered, within=within, every=0.2, what=f"{count} nodes registered")

    def store_revision(self) -> int:
        """The store's revision now. Events carry store revisions, so a watch from after this one
        sees every later event however late it opens: no need to let a watch "from now" open."""
        out = subprocess.run(
            ["etcdctl", "--endpoints", self.store_url.removeprefix("etcd://")]
            + ["get", "/", "--write-out", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(json.loads(out.stdout)["header"]["revision"])

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
                raise AssertionError(f"{proc.name} did not stop within {timeout_s}s") from None
        return proc.popen.returncode

    def close(self, client: docker.DockerClient) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        if self._saved_token is not None:
            if self._saved_token:
                os.environ["PORTSIDE_TOKEN"] = self._saved_token
            else:
                os.environ.pop("PORTSIDE_TOKEN", None)
            self._saved_token = None
        # The low-level list: no inspect of containers that others may be removing meanwhile.
        for c in client.api.containers(all=True, filters={"label": "portside.node"}):
            if c["Labels"].get("portside.node", "").startswith(self.tag + "-"):
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_container(c["Id"], force=True)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log_text()[-6000:]}" for p in self.procs)

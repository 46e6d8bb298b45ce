"""A real 3-member etcd cluster on loopback for failover tests: free ports, fresh data dirs, and
members that a test may kill (SIGKILL) and start again on the same data dir.

Used as a context manager (`with EtcdCluster(tmp_path) as etcd:`); never touches the shared etcd
on 2379."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from portside.net import free_port
from tests.support import eventually_sync


class MemberExited(Exception):
    """A member's process ended while the cluster was expected to come up."""


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    tmp: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i in range(1, self.size + 1):
            name = f"m{i}"
            self.members.append(
                Member(
                    name=name,
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=self.tmp / f"etcd-{name}",
                    log=self.tmp / f"etcd-{name}.log",
                )
            )

    @property
    def url(self) -> str:
        """`etcd://m1,m2,m3` for --store."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def member(self, endpoint: str) -> Member:
        return next(m for m in self.members if m.endpoint == endpoint)

    def start(self, attempts: int = 3) -> EtcdCluster:
        """Start every member and wait for a healthy cluster. A member that exits at once because
        its port was taken in the meantime (another test's server bound it between `free_port`
        and etcd's bind) makes the whole cluster start again on fresh ports and data dirs."""
        for attempt in range(1, attempts + 1):
            for m in self.members:
                self._spawn(m)
            try:
                self.wait_healthy()
                return self
            except (AssertionError, MemberExited):
                taken = [m for m in self.members if not m.running and self._port_taken(m)]
                self.close()
                if not taken or attempt == attempts:
                    raise AssertionError(f"etcd cluster did not start:\n{self.logs()}") from None
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                    m.client_port, m.peer_port = free_port(), free_port()
        raise AssertionError("unreachable")

    @staticmethod
    def _port_taken(m: Member) -> bool:
        return m.log.exists() and "address already in use" in m.log.read_text(errors="replace")

    def _spawn(self, m: Member) -> None:
        initial = ",".join(f"{o.name}=http://127.0.0.1:{o.peer_port}" for o in self.members)
        m.proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                m.name,
                "--data-dir",
                str(m.data_dir),
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                f"portside-test-{self.members[0].client_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{m.peer_port}",
                "--listen-client-urls",
                f"http://{m.endpoint}",
                "--advertise-client-urls",
                f"http://{m.endpoint}",
            ],
            stdout=m.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self, m: Member) -> None:
        """SIGKILL: no goodbye to its peers or clients, as when a host dies."""
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()

    def restart(self, m: Member) -> None:
        """Start a killed member again on its data dir (it rejoins; --initial-cluster is then
        ignored)."""
        assert not m.running, f"{m.name} is running"
        self._spawn(m)

    def healthy(self, m: Member) -> bool:
        """The member answers a linearizable read: it is up and the cluster has a leader."""
        out = subprocess.run(
            ["etcdctl", "--endpoints", m.endpoint, "--command-timeout=2s", "endpoint", "health"],
            capture_output=True,
        )
        return out.returncode == 0

    def wait_healthy(self, within: float = 30.0) -> None:
        for m in self.members:
            if m.running:
                eventually_sync(
                    functools.partial(self._healthy_or_exited, m),
                    within=within,
                    what=f"etcd member {m.name}",
                )

    def _healthy_or_exited(self, m: Member) -> bool:
        """Healthy; a member that has exited fails at once, without waiting out the deadline."""
        if not m.running:
            raise MemberExited(f"etcd member {m.name} exited ({m.proc and m.proc.returncode})")
        return self.healthy(m)

    def leader(self) -> Member | None:
        """The member that leads, by the status of the running ones; None without a leader."""
        running = [m for m in self.members if m.running]
        out = subprocess.run(
            ["etcdctl", "--endpoints", ",".join(m.endpoint for m in running)]
            + ["--command-timeout=2s", "endpoint", "status", "--write-out", "json"],
            capture_output=True,
            text=True,
        )
        with contextlib.suppress(ValueError):
            for status in json.loads(out.stdout or "[]"):
                if status["Status"]["leader"] == status["Status"]["header"]["member_id"]:
                    return self.member(status["Endpoint"])
        return None

    def wait_leader(self, within: float = 10.0) -> Member:
        leader = eventually_sync(self.leader, within=within, what="an etcd leader")
        assert leader is not None
        return leader

    def move_leader(self, to: Member) -> None:
        """Make `to` the leader (etcdctl move-leader, asked of the current leader)."""
        leader = self.wait_leader()
        if leader is to:
            return
        status = subprocess.run(
            ["etcdctl", "--endpoints", to.endpoint, "endpoint", "status", "--write-out", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        member_id = json.loads(status.stdout)[0]["Status"]["header"]["member_id"]
        subprocess.run(
            ["etcdctl", "--endpoints", leader.endpoint, "move-leader", f"{member_id:x}"],
            capture_output=True,
            check=True,
        )
        eventually_sync(lambda: self.leader() is to, what=f"{to.name} leads")

    def close(self) -> None:
        for m in self.members:
            if m.running:
                assert m.proc is not None
                m.proc.kill()
                m.proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"===== etcd {m.name}\n{m.log.read_text(errors='replace')[-3000:]}"
            for m in self.members
            if m.log.exists()
        )

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

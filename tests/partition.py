"""Network partitions for tests on one machine: a process started with a group id of its own is
cut off from chosen loopback ports by packet-filter rules that match only that group's sockets.

Everything runs over loopback, so a partition is not a cable pulled but an OUTPUT rule:
`-m owner --gid-owner GID -p tcp -d HOST --dport PORT -j DROP`. The process stays uid 0 (it still
reaches Docker); traffic of every other process, and to every other port, is untouched. Each rule
carries the comment `portside-test-<pid of the test process>`, so that a rule left behind by a
test process that died can be found and removed (`remove_leftover_rules`).

    gid = own_group_id()
    agent = cluster.start_agent("fra", "127.0.0.2", group=gid)
    with Partition(gid) as cut:
        cut.calls_to("127.0.0.1:7070", "127.0.0.1:7072")   # its calls to the control plane
        cut.answers_from(agent.option("--api-listen"))      # its answers to the control plane
        ...
        cut.heal()                                          # or at the end of the `with`
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
from types import TracebackType
from typing import Literal

from portside.net import split_hostport

COMMENT = f"portside-test-{os.getpid()}"
_LEFTOVER = re.compile(r"--comment \"?portside-test-(\d+)\"?")
# Group ids nobody on a test machine uses; per test process its own block, so two test runs
# side by side never match each other's processes.
_GROUP_IDS = itertools.count(47_000 + (os.getpid() % 1_000) * 16)

Action = Literal["DROP", "REJECT"]


def own_group_id() -> int:
    """A group id for one process to be cut off (start it with `group=`), unique in this test
    process."""
    return next(_GROUP_IDS)


def _iptables(*args: str) -> None:
    # -w: wait for the xtables lock (agents of other test runs add rules of their own meanwhile).
    subprocess.run(["iptables", "-w", "5", *args], check=True, capture_output=True, text=True)


def _loopback(address: str) -> tuple[str, int]:
    host, port = split_hostport(address)
    if not host.startswith("127."):
        raise ValueError(f"partitions are for loopback addresses only, not {address}")
    return host, port


class Partition:
    """The rules cutting off the processes of one group id. `action`: DROP, a silent network
    (calls wait for their deadlines, connections for keepalives), or REJECT, a refusing one (a
    TCP reset at once). `heal()` removes every rule it added, and so does leaving the `with`
    block, whatever happened inside it."""

    def __init__(self, gid: int, action: Action = "DROP") -> None:
        self.gid = gid
        self.action = action
        self._rules: list[list[str]] = []

    @property
    def active(self) -> bool:
        return bool(self._rules)

    def _add(self, match: list[str]) -> None:
        verdict = ["-j", "DROP"] if self.action == "DROP" else ["-j", "REJECT", "--reject-with"]
        if self.action == "REJECT":
            verdict.append("tcp-reset")
        rule = [
            "OUTPUT",
            "-m",
            "owner",
            "--gid-owner",
            str(self.gid),
            "-p",
            "tcp",
            *match,
            "-m",
            "comment",
            "--comment",
            COMMENT,
            *verdict,
        ]
        _iptables("-I", *rule)
        self._rules.append(rule)

    def calls_to(self, *addresses: str) -> None:
        """Cut what the group sends to each HOST:PORT: its calls to servers there."""
        for address in addresses:
            host, port = _loopback(address)
            self._add(["-d", host, "--dport", str(port)])

    def answers_from(self, *addresses: str) -> None:
        """Cut what the group sends from each of its own HOST:PORT: its answers to callers."""
        for address in addresses:
            host, port = _loopback(address)
            self._add(["-s", host, "--sport", str(port)])

    def heal(self) -> None:
        while self._rules:
            _iptables("-D", *self._rules.pop())

    def __enter__(self) -> Partition:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal()


def remove_leftover_rules() -> list[str]:
    """Remove the rules of test processes that are gone (killed before they could heal); the
    rules of running test processes stay. Returns the rules removed."""
    listing = subprocess.run(
        ["iptables", "-w", "5", "-S", "OUTPUT"], check=True, capture_output=True, text=True
    ).stdout
    removed = []
    for line in listing.splitlines():
        found = _LEFTOVER.search(line)
        if found is None or not line.startswith("-A OUTPUT "):
            continue
        pid = int(found.group(1))
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        _iptables("-D", *shlex.split(line)[1:])
        removed.append(line)
    return removed

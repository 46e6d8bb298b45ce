"""Hanging up what an exec started (nodeagent.runtime.docker_streams): the processes of the
session its command leads (the engine makes every exec's command a session leader), found in
this host's /proc and signalled through pidfds, so that a PID the kernel reuses is never hit."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

_PROC = Path("/proc")


class Session:
    """The live processes of session `leader` (host PIDs), each held by a pidfd from `open` to
    `close`: the leader and what it started that did not leave the session (a daemon that
    called setsid did, as it would leave a terminal's). Empty when this host's /proc does not
    show the leader (an agent outside the engine's PID namespace)."""

    def __init__(self, leader: int) -> None:
        self.leader = leader
        self._members: dict[int, int] = {}  # pid -> pidfd

    def open(self) -> None:
        for entry in _PROC.iterdir():
            if not entry.name.isdigit() or _session_of(int(entry.name)) != self.leader:
                continue
            pid = int(entry.name)
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if _session_of(pid) == self.leader:  # still it, now that the pidfd holds it
                self._members[pid] = pidfd
            else:
                os.close(pidfd)

    def __bool__(self) -> bool:
        return self.leader in self._members

    def signal(self, signum: int) -> None:
        for pidfd in self._members.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)

    def running(self) -> bool:
        """Whether one of its processes still runs (a zombie, waiting for a parent that may
        never reap it, does not)."""
        return any(_session_of(pid) == self.leader for pid in self._members)

    def close(self) -> None:
        for pidfd in self._members.values():
            os.close(pidfd)
        self._members.clear()


def _session_of(pid: int) -> int | None:
    """The session of process `pid`; None if it is gone or a zombie."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[3])


__all__ = ["Session"]

"""Issue 13, interactive exec, end to end: `portside exec -it CLASS NAME -- sh` run on a real
pseudo-terminal against a real cluster, as a user types at it: commands and their output, the
window size (`stty size` inside follows it), Ctrl-C, the exit code, --user, --workdir, --env;
and what exec does to an instance's sleep: it never wakes one unless --wake, and an open session
does not keep one awake (it ends when the instance goes to sleep)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from portside import TerminalSize, connect_sync
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_cli import ok, portside
from tests.support import eventually_sync

pytestmark = pytest.mark.e2e


def config(image: str) -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "10m"

[[containers]]
class_name = "Sleepy"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "3s"
"""


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def is_raw(fd: int) -> bool:
    return not termios.tcgetattr(fd)[3] & (termios.ICANON | termios.ECHO | termios.ISIG)


class Terminal:
    """`portside ARGS` on a pseudo-terminal of its own (its stdin, stdout and stderr), of
    `rows` x `cols`, as someone at a terminal runs it."""

    def __init__(self, cluster: Cluster, *args: str, rows: int = 30, cols: int = 100) -> None:
        env = dict(os.environ, PORTSIDE_CONTROLPLANE=cluster.controlplane_address)
        pid, fd = pty.fork()
        if pid == 0:  # the child: its terminal is the pseudo-terminal's other end
            try:
                set_size(0, rows, cols)
                os.execve(sys.executable, [*PORTSIDE, *args], env)
            finally:
                os._exit(127)  # never back into pytest
        self.pid, self.fd = pid, fd
        self.output = bytearray()
        self._seen = 0  # what `expect` matched so far ends here
        self.exit_status: int | None = None

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def _read(self, timeout: float) -> bool:
        """Read what is there within `timeout`; False once the terminal's other end is gone."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the process and its terminal are gone
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: bytes, within: float = 15.0) -> re.Match[bytes]:
        """The first match of `pattern` in the output after the last match."""
        deadline = time.monotonic() + within
        while True:
            found = re.compile(pattern).search(self.output, self._seen)
            if found:
                self._seen = found.end()
                return found
            remaining = deadline - time.monotonic()
            alive = remaining > 0 and self._read(min(remaining, 0.2))
            if not alive:
                raise AssertionError(f"{pattern!r} not seen in {bytes(self.output)!r}")

    def exit_code(self, within: float = 15.0) -> int:
        """Read to the end, then the process's exit code."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self._read(0.2):
            pass
        for _ in range(int(within / 0.05)):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_status = status
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError(f"still running; output {bytes(self.output)!r}")

    def close(self) -> None:
        if self.exit_status is None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@contextlib.contextmanager
def terminal(cluster: Cluster, *args: str) -> Iterator[Terminal]:
    session = Terminal(cluster, *args)
    try:
        yield session
    finally:
        session.close()


def state_of(cluster: Cluster, class_name: str, name: str) -> str:
    listed = json.loads(ok(portside(cluster, "ps", "--json", "--class", class_name)))
    (info,) = [i for i in listed if i["name"] == name]
    return str(info["state"])


@pytest.fixture
def running(cluster: Cluster, test_image: str) -> Cluster:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    return cluster


def test_a_real_terminal_in_the_container(running: Cluster) -> None:
    refused = portside(running, "exec", "-it", "Echo", "t", "--", "sh")  # stdin: a pipe
    assert refused.returncode == 1 and b"not a TTY" in refused.stderr, refused

    ok(portside(running, "start", "Echo", "t"))
    # The workdir, env and user are the session's; `echo "<...>"` marks output apart from the
    # terminal's echo of what was typed.
    args = ("exec", "-it", "--user", "1234", "--workdir", "/www", "--env", "GREETING=hi")
    with terminal(running, *args, "Echo", "t", "--", "sh") as term:
        term.type(b'echo "<$(id -u) $(pwd) $GREETING>"\r')
        term.expect(rb"<1234 /www hi>")
        assert is_raw(term.fd)  # the CLI put its terminal in raw mode
        term.type(b'echo "<$(stty size)>"\r')
        term.expect(rb"<30 100>")

        # The window changes: the kernel tells the CLI (SIGWINCH), the CLI the container.
        set_size(term.fd, 50, 132)
        os.kill(term.pid, signal.SIGWINCH)

        def resized() -> bool:
            term.type(b'echo "<$(stty size)>"\r')
            return term.expect(rb"<\d+ \d+>").group() == b"<50 132>"

        eventually_sync(resized, within=10, every=0.2, what="the remote terminal resized")

        # Ctrl-C is byte 0x03 on the wire: it interrupts the command, not the shell (nor the CLI).
        term.type(b'echo "<sleeping>"; sleep 100\r')
        term.expect(rb"<sleeping>")
        time.sleep(0.3)  # the shell has started it
        term.type(b"\x03")
        term.type(b'echo "<alive>"\r')
        term.expect(rb"<alive>", within=10)

        term.type(b"exit 3\r")
        assert term.exit_code() == 3
        assert not is_raw(term.fd)  # restored on its way out

    # The SDK's terminal: keys and a resize from `stdin`, whose end is typed as the terminal's
    # end of input (^D): `cat` ends by it.
    with connect_sync(running.controlplane_address) as ps:
        keys: list[bytes | TerminalSize] = [
            TerminalSize(40, 90),
            b'echo "<$(stty size)>"; exit 4\r',
        ]
        result = ps.container("Echo", "t").exec(["sh"], stdin=keys, tty=True)
        typed = ps.container("Echo", "t").exec(["cat"], stdin=b"x", tty=True)
    assert result.exit_code == 4 and b"<40 90>" in result.stdout and result.stderr == b""
    assert typed.exit_code == 0 and typed.stdout.count(b"x") == 2, typed  # the echo, then cat's

    # A session whose CLI is hung up (SIGHUP: its terminal closed) hangs up its shell too: the
    # engine itself would leave it running in the container.
    with terminal(running, "exec", "-it", "Echo", "t", "--", "sh") as term:
        term.type(b'echo "<$$>"\r')
        shell = term.expect(rb"<(\d+)>").group(1).decode()
        os.kill(term.pid, signal.SIGHUP)
        assert term.exit_code() == -signal.SIGHUP

    def shell_gone() -> bool:
        return portside(running, "exec", "Echo", "t", "--", "kill", "-0", shell).returncode == 1

    eventually_sync(shell_gone, within=10, every=0.2, what=f"the session's sh ({shell}) gone")


def test_exec_never_wakes_or_keeps_awake_unless_asked(running: Cluster) -> None:
    ok(portside(running, "start", "Sleepy", "s"))
    eventually_sync(lambda: state_of(running, "Sleepy", "s") == "sleeping", within=15)
    refused = portside(running, "exec", "Sleepy", "s", "--", "true")
    assert refused.returncode == 1, refused
    assert b"is sleeping" in refused.stderr and b"--wake" in refused.stderr, refused.stderr
    assert state_of(running, "Sleepy", "s") == "sleeping"  # not woken

    woken = portside(running, "exec", "--wake", "Sleepy", "s", "--", "echo", "up")
    assert (woken.returncode, woken.stdout) == (0, b"up\n"), woken
    # Without --wake the open session holds nothing: the instance goes to sleep after
    # sleep_after (3 s) as if no one were there, and the session ends with it, saying so.
    ok(portside(running, "start", "Sleepy", "s"))
    started = time.monotonic()
    with terminal(running, "exec", "-it", "Sleepy", "s", "--", "sh") as term:
        term.type(b'echo "<in>"\r')
        term.expect(rb"<in>")
        assert term.exit_code(within=20) == 1
        took = time.monotonic() - started
        assert b"stopped running under it" in term.output, bytes(term.output)
        assert not is_raw(term.fd)
    assert 2.5 <= took < 10, took
    assert state_of(running, "Sleepy", "s") in ("stopping", "sleeping")

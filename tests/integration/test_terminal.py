"""The local terminal of `portside exec -it` (portside.terminal) on real pseudo-terminals: raw
mode while the session runs and the old mode back on every way out (the end, an error, SIGTERM),
keys as typed, a window change as the new size."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import signal
import struct
import sys
import termios

import pytest

from portside import terminal
from portside.terminal import TerminalSize


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def is_raw(fd: int) -> bool:
    lflag = termios.tcgetattr(fd)[3]
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


async def test_keys_and_window_changes_in_order_then_the_old_mode_back() -> None:
    master, slave = os.openpty()
    try:
        set_size(slave, 24, 80)
        assert terminal.size_of(slave) == TerminalSize(24, 80)
        before = termios.tcgetattr(slave)
        async with terminal.raw_input(slave) as typed:
            assert is_raw(slave)
            os.write(master, b"ls\x03")
            assert await anext(typed) == b"ls\x03"  # Ctrl-C is a byte, not a signal
            set_size(slave, 50, 132)
            os.kill(os.getpid(), signal.SIGWINCH)
            assert await asyncio.wait_for(anext(typed), 5) == TerminalSize(50, 132)
        assert termios.tcgetattr(slave) == before and not is_raw(slave)
        with pytest.raises(RuntimeError, match="boom"):
            async with terminal.raw_input(slave):
                raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(slave)
        os.close(master)


def test_no_size_off_a_terminal() -> None:
    with open(os.devnull, "rb") as null:
        assert terminal.size_of(null.fileno()) is None


def test_a_hangup_ends_the_input() -> None:
    async def main(slave: int, master: int) -> list[terminal.TerminalInput]:
        async with terminal.raw_input(slave) as typed:
            os.close(master)  # the terminal goes away: reading it fails with EIO
            return [item async for item in typed]

    master, slave = os.openpty()
    try:
        assert asyncio.run(asyncio.wait_for(main(slave, master), 5)) == []
    finally:
        os.close(slave)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_restores_the_terminal_then_ends_the_process(signum: int) -> None:
    script = (
        "import asyncio, os\n"
        "from portside import terminal\n"
        "async def main():\n"
        "    async with terminal.raw_input(0):\n"
        "        os.write(1, b'raw\\n')\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child, on the pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-c", script])
    try:
        seen = b""
        while b"raw" not in seen:
            seen += os.read(fd, 1024)
        assert is_raw(fd)
        os.kill(pid, signum)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum
        assert not is_raw(fd)
    finally:
        os.close(fd)

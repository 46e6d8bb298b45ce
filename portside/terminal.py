"""Terminal sizes, and the user's own terminal during `portside exec -it`: raw mode (restored on
every way out), its size, and what is typed and every window change as one ordered stream.

Raw mode hands every key to the remote terminal unchanged: Ctrl-C is byte 0x03 there (where the
remote terminal makes it SIGINT), Ctrl-D and Ctrl-Z too; nothing is echoed or edited locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

_READ = 64 * 1024


@dataclass(frozen=True)
class TerminalSize:
    """A terminal's size in character cells."""

    rows: int
    cols: int


#: The size of a remote terminal whose client did not say (the API's default).
DEFAULT_SIZE = TerminalSize(rows=24, cols=80)

#: What a terminal session's input carries: bytes typed, or the terminal's new size.
TerminalInput = bytes | TerminalSize


def size_of(fd: int) -> TerminalSize | None:
    """The size of the terminal on `fd`; None when `fd` is not a terminal or reports none."""
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return None
    return TerminalSize(rows=rows, cols=cols) if rows > 0 and cols > 0 else None


@contextlib.asynccontextmanager
async def raw_input(fd: int) -> AsyncIterator[AsyncIterator[TerminalInput]]:
    """The terminal on `fd` in raw mode while the block runs, restored as it was however the
    block ends. Yields what the user types (bytes as they come, read when the terminal has
    some, so the event loop never blocks) and, after every window change (SIGWINCH), the
    terminal's new size, in the order they happened; it ends when the terminal hangs up.

    SIGTERM and SIGHUP restore the terminal too, then end the process as they would have."""
    # POSIX only, so imported here: the SDK, which has TerminalSize, imports everywhere.
    import termios
    import tty

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TerminalInput | None] = asyncio.Queue()
    saved = termios.tcgetattr(fd)

    def readable() -> None:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        except OSError:  # EIO: the terminal hung up
            data = b""
        if not data:
            loop.remove_reader(fd)
            queue.put_nowait(None)
            return
        queue.put_nowait(data)

    def resized() -> None:
        size = size_of(fd)
        if size is not None:
            queue.put_nowait(size)

    def restore() -> None:
        with contextlib.suppress(termios.error):  # a terminal that hung up keeps no mode
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    def ended(signum: int) -> None:
        restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    async def typed() -> AsyncIterator[TerminalInput]:
        while (item := await queue.get()) is not None:
            yield item

    # The handlers come first and go last: a SIGTERM or SIGHUP at any moment the terminal is
    # raw finds one that restores it before the process ends.
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, ended, signum)
        loop.add_signal_handler(signal.SIGWINCH, resized)
        tty.setraw(fd, termios.TCSADRAIN)
        loop.add_reader(fd, readable)
        yield typed()
    finally:
        try:
            restore()
        finally:
            loop.remove_reader(fd)
            for signum in (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)


__all__ = ["DEFAULT_SIZE", "TerminalInput", "TerminalSize", "raw_input", "size_of"]

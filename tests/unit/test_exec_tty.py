"""Interactive exec's pure parts (issue 13): what the SDK sends for a terminal session, the
terminal size on the wire, `portside exec`'s flags. The local terminal itself is tested on a
real pseudo-terminal in tests/integration/test_terminal.py, the whole path in
tests/e2e/test_exec_tty.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import portside
from portside import cli
from portside.api.v1 import types_pb2 as pb
from portside.client import _async
from portside.convert import terminal_size_from_pb, terminal_size_to_pb
from portside.errors import InvalidArgument
from portside.terminal import DEFAULT_SIZE, TerminalInput, TerminalSize


async def test_a_terminal_session_sends_keys_and_resizes_in_order() -> None:
    start = pb.ExecStart(command=["sh"], stdin=True, tty=True)

    async def typed() -> AsyncIterator[TerminalInput]:
        yield b"ls\r"
        yield TerminalSize(rows=50, cols=132)
        yield b"\x03"

    sent = [m async for m in _async._exec_requests(start, typed())]
    assert [m.WhichOneof("message") for m in sent] == [
        "start",
        "stdin",
        "resize",
        "stdin",
        "stdin_close",
    ]
    assert (sent[2].resize.rows, sent[2].resize.cols) == (50, 132)
    assert sent[3].stdin == b"\x03"


def test_terminal_sizes_on_the_wire_default_to_80x24() -> None:
    size = TerminalSize(rows=40, cols=100)
    assert terminal_size_from_pb(terminal_size_to_pb(size)) == size
    assert terminal_size_from_pb(pb.TerminalSize()) == DEFAULT_SIZE == TerminalSize(24, 80)
    assert terminal_size_from_pb(pb.TerminalSize(rows=40)) == DEFAULT_SIZE
    assert portside.TerminalSize is TerminalSize


async def test_a_size_without_a_terminal_is_refused_before_calling() -> None:
    async with portside.connect("127.0.0.1:1") as ps:
        with pytest.raises(InvalidArgument, match="tty=True"):
            await ps.container("Echo", "a").exec(["sh"], size=TerminalSize(10, 10))


def test_exec_flags_like_docker_exec() -> None:
    args = cli.parse_args(["exec", "-it", "Echo", "a", "--", "sh", "-i"])
    assert (args.interactive, args.tty, cli.exec_command(args.argv)) == (True, True, ["sh", "-i"])
    args = cli.parse_args(
        ["exec", "Echo", "a", "-u", "1000:1000", "--workdir", "/www", "--env", "A=1", "--", "id"]
    )
    assert (args.user, args.workdir, args.env) == ("1000:1000", "/www", ["A=1"])
    assert not (args.interactive or args.tty or args.wake or args.activity)
    args = cli.parse_args(["exec", "--wake", "--activity", "Echo", "a", "--", "true"])
    assert args.wake and args.activity

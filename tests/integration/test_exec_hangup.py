"""An exec's end on the real engine (nodeagent.runtime.docker_streams): a session that ends while
its command runs hangs up the command and what it started (the engine would leave them running
in the container), with a terminal or without, SIGKILL for what ignores SIGHUP; and a terminal's
end of input (stdin_close) is typed as its EOF key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import docker
import pytest

from nodeagent.runtime import DockerRuntime, ExecProcess
from nodeagent.runtime.docker_streams import HANG_UP_GRACE_S
from nodeagent.runtime.labels import LABEL_NODE
from portside.terminal import DEFAULT_SIZE
from tests.support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def container(
    docker_client: docker.DockerClient, echo_image: str, node_id: str
) -> AsyncIterator[tuple[DockerRuntime, str]]:
    """A running container of the test image (removed with the node's), and the runtime."""
    made = docker_client.containers.run(echo_image, detach=True, labels={LABEL_NODE: node_id})
    runtime = DockerRuntime(node_id)
    try:
        yield runtime, made.id
    finally:
        await runtime.close()


async def output_of(process: ExecProcess) -> bytes:
    """Its stdout (a terminal's everything)."""
    return b"".join([data async for stream, data in process.output() if stream == "stdout"])


async def run(runtime: DockerRuntime, container_id: str, *command: str) -> bytes:
    process = await runtime.exec(container_id, command, {}, "", False)
    out = await output_of(process)
    await process.exit_code()
    return out


async def pids_of(runtime: DockerRuntime, container_id: str, *commands: str) -> list[str]:
    """The container's PIDs of the processes named `commands`, once there is one of each."""
    listed = (await run(runtime, container_id, "ps", "-o", "pid,comm")).decode().splitlines()
    rows = [line.split(None, 1) for line in listed[1:]]
    found = {row[1].strip(): row[0] for row in rows if len(row) == 2}
    assert all(c in found for c in commands), listed
    return [found[c] for c in commands]


async def none_running(runtime: DockerRuntime, container_id: str, pids: list[str]) -> bool:
    """None of `pids` runs: gone, or dead and waiting to be reaped (a zombie)."""
    for pid in pids:
        stat = await run(runtime, container_id, "cat", f"/proc/{pid}/stat")
        if stat and stat.rpartition(b")")[2].split()[0] != b"Z":
            return False
    return True


async def test_a_terminal_session_that_ends_hangs_up_its_shell_and_job(
    container: tuple[DockerRuntime, str],
) -> None:
    runtime, container_id = container
    process = await runtime.exec(container_id, ["sh"], {}, "", True, tty=DEFAULT_SIZE)
    await process.write(b"sleep 300\r")  # the terminal's foreground job
    pids = await eventually(lambda: pids_of(runtime, container_id, "sh", "sleep"))
    await process.close()  # the client went away, without a word to the shell
    await eventually(lambda: none_running(runtime, container_id, pids), within=5)


async def test_a_session_without_a_terminal_that_ends_hangs_up_its_command_and_children(
    container: tuple[DockerRuntime, str],
) -> None:
    runtime, container_id = container
    command = ["sh", "-c", "trap '' HUP; sleep 300; echo never"]  # deaf to SIGHUP, and sleep too
    process = await runtime.exec(container_id, command, {}, "", True)
    pids = await eventually(lambda: pids_of(runtime, container_id, "sh", "sleep"))
    started = time.monotonic()
    await process.close()
    await eventually(lambda: none_running(runtime, container_id, pids), within=5)
    assert time.monotonic() - started >= HANG_UP_GRACE_S  # SIGKILL ended them


async def test_the_end_of_a_terminal_s_input_is_its_eof_key(
    container: tuple[DockerRuntime, str],
) -> None:
    runtime, container_id = container
    process = await runtime.exec(container_id, ["cat"], {}, "", True, tty=DEFAULT_SIZE)
    await process.write(b"x")  # a partial line: the first ^D hands it over, the second ends it
    await process.close_stdin()
    assert (await output_of(process)).count(b"x") == 2  # the terminal's echo, then cat's
    assert await process.exit_code() == 0
    await process.close()

"""Raw HTTP/1.1 exchanges with the Docker engine, for the streams its SDK cannot give
asynchronously (exec with stdin, logs by stream), and how the engine's error answers become
Portside's errors (`engine_error`), for these exchanges and the SDK's calls alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from nodeagent.runtime.protocol import Stream
from nodeagent.runtime.sessions import Session
from portside.errors import (
    EngineError,
    EngineUnavailable,
    FailedPrecondition,
    NotFound,
    PortsideError,
)
from portside.terminal import TerminalSize

#: How long a command hung up (SIGHUP) at the end of its exec session has to end before SIGKILL.
HANG_UP_GRACE_S = 2.0
_HANG_UP_POLL_S = 0.05

log = logging.getLogger(__name__)

_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}
_TTY_READ = 64 * 1024
_EOF = b"\x04"  # a terminal's end of input (VEOF), as Docker's pseudo-terminals are set up


def engine_error(status: int | None, message: str) -> PortsideError:
    """The engine answered `status` with `message`: 404 is a missing container (or network),
    409 a container in the wrong state for the call, anything else the engine's own failure."""
    if status == 404:
        return NotFound(f"docker: {message}")
    if status == 409:
        return FailedPrecondition(f"docker: {message}")
    return EngineError(f"docker: {message}")


async def open_stream(
    api: Any, method: str, path: str, body: Mapping[str, Any] | None = None, upgrade: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send one request to the engine and return the connection after the response head, the
    body unread. An error answer is raised as `engine_error` says; no answer as
    EngineUnavailable."""
    try:
        reader, writer = await _connect(api)
    except OSError as exc:
        raise EngineUnavailable(f"the Docker engine is unreachable: {exc}") from exc
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} /v{api.api_version}{path} HTTP/1.1", "Host: docker"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    if upgrade:
        head += ["Connection: Upgrade", "Upgrade: tcp"]
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line, headers = await _read_head(reader)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise EngineUnavailable(
            f"docker: {method} {path.split('?')[0]} got no answer: {exc}"
        ) from exc
    status = int(status_line.split()[1])
    if status >= 300:
        try:
            answer = await _read_body(reader, headers)
        finally:
            writer.close()
        raise _answered_error(status, answer)
    return reader, writer


class EngineCalls:
    """Small calls to the engine on kept-alive connections, on the loop: no thread hop and no
    connect per call, for a call on a request's path (docker unpause as a request thaws its
    instance). A call takes an idle connection or opens one, and puts it back once answered."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str) -> None:
        """POST `path` (API version prefixed, no body); raises as open_stream does."""
        head = f"POST /v{self._api.api_version}{path} HTTP/1.1\r\nHost: docker\r\n"
        request = (head + "Content-Length: 0\r\n\r\n").encode()
        while True:
            reused = bool(self._idle)
            try:
                reader, writer = self._idle.pop() if reused else await _connect(self._api)
            except OSError as exc:
                raise EngineUnavailable(f"the Docker engine is unreachable: {exc}") from exc
            try:
                writer.write(request)
                await writer.drain()
                status_line, headers = await _read_head(reader)
                body = await _read_body(reader, headers)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                writer.close()
                if reused:
                    continue  # the engine closed it while idle (a restart): a new one
                raise EngineUnavailable(f"docker: POST {path} got no answer: {exc}") from exc
            if headers.get("connection", "").lower() == "close":
                writer.close()
            else:
                self._idle.append((reader, writer))
            status = int(status_line.split()[1])
            if status >= 300:
                raise _answered_error(status, body)
            return

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()


def _answered_error(status: int, body: bytes) -> PortsideError:
    text = body.decode(errors="replace")
    try:
        message = str(json.loads(text).get("message", text))
    except ValueError:
        message = text.strip()
    return engine_error(status, message)


class DockerExec:
    """An exec's hijacked connection: Docker multiplexes stdout and stderr on it in frames of
    an 8-byte header (stream, 0, 0, 0, big-endian length) and the payload; we write stdin. With
    a pseudo-terminal (`tty`) the connection carries the terminal's bytes as they are, no frames:
    everything is stdout.

    The engine neither ends nor signals a command whose connection closes, so `close` hangs up
    one that still runs, as a terminal's hang-up would: SIGHUP to its session (the command and
    what it started), then SIGKILL after `HANG_UP_GRACE_S` to what is left."""

    def __init__(
        self,
        exec_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inspect: Callable[[str], Awaitable[Mapping[str, Any]]],
        resize: Callable[[str, TerminalSize], Awaitable[None]] | None = None,
    ) -> None:
        self.exec_id = exec_id
        self._reader, self._writer = reader, writer
        self._inspect = inspect
        self._resize = resize  # None: no pseudo-terminal
        self._at_line_start = True  # of the terminal's input: what its end of input needs
        self._ended = False  # the engine reported the command's exit code, or it was hung up

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        if self._resize is None:
            async for item in frames(self._reader):
                yield item
            return
        while data := await self._reader.read(_TTY_READ):
            yield "stdout", data

    async def resize(self, size: TerminalSize) -> None:
        if self._resize is not None:
            await self._resize(self.exec_id, size)

    async def write(self, data: bytes) -> None:
        if data:
            self._at_line_start = data.endswith((b"\n", b"\r"))
        self._writer.write(data)
        await self._writer.drain()

    async def close_stdin(self) -> None:
        if self._resize is not None:
            # The engine would close the terminal's output with its input, so the end of input
            # is what a user types: EOF (^D) at the start of a line, twice in the middle of one
            # (the first hands the line over).
            await self.write(_EOF if self._at_line_start else _EOF * 2)
            return
        # A half-close: the engine closes the command's stdin and keeps sending its output.
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    async def exit_code(self) -> int:
        # The stream ends a moment before the engine records the code.
        for _ in range(100):
            info = await self._inspect(self.exec_id)
            if not info.get("Running"):
                self._ended = True
                code = info.get("ExitCode")
                return int(code) if code is not None else -1  # -1: the engine does not know
            await asyncio.sleep(0.02)
        raise EngineError(f"docker: exec {self.exec_id[:12]} still running after its output ended")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if not self._ended:
            self._ended = True
            await self._hang_up()

    async def _hang_up(self) -> None:
        """SIGHUP to the command's session if the command still runs, SIGKILL to what of it
        outlives the grace: what a terminal's hang-up does, done from the host through the
        command's host PID (exec inspect's `Pid`; the agent runs beside the engine, in the
        host's PID namespace). An exec inside the container could not do it: its `kill` knows
        the container's PIDs only, and the image may have no `kill` at all."""
        try:
            info = await self._inspect(self.exec_id)
        except PortsideError as exc:
            log.warning("exec %s: cannot hang up its command: %s", self.exec_id[:12], exc)
            return
        if not info.get("Running") or not info.get("Pid"):
            return
        session = Session(int(info["Pid"]))
        try:
            session.open()
            # The session is the command's if the command still runs now that it is held.
            if not (await self._inspect(self.exec_id)).get("Running"):
                return
            if not session:
                log.warning(
                    "exec %s: cannot hang up its command: no process %d on this host",
                    self.exec_id[:12],
                    session.leader,
                )
                return
            session.signal(signal.SIGHUP)
            for _ in range(round(HANG_UP_GRACE_S / _HANG_UP_POLL_S)):
                if not session.running():
                    return
                await asyncio.sleep(_HANG_UP_POLL_S)
            log.info("exec %s: SIGKILL %gs after SIGHUP", self.exec_id[:12], HANG_UP_GRACE_S)
            session.signal(signal.SIGKILL)
        except (PortsideError, OSError) as exc:
            log.warning("exec %s: cannot hang up its command: %s", self.exec_id[:12], exc)
        finally:
            session.close()


async def frames(body: asyncio.StreamReader | ChunkedBody) -> AsyncIterator[tuple[Stream, bytes]]:
    """The (stream, payload) frames of a multiplexed exec or logs body, until it ends."""
    while True:
        try:
            header = await body.readexactly(8)
        except asyncio.IncompleteReadError:
            return
        stream, size = header[0], struct.unpack(">I", header[4:])[0]
        payload = await body.readexactly(size)
        if stream in _STREAMS and payload:
            yield _STREAMS[stream], payload


class ChunkedBody:
    """`readexactly` over an HTTP/1.1 chunked body (how the engine streams logs)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()
        self._done = False

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n and not self._done:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self._done = True
                break
            self._buffer += await self._reader.readexactly(size)
            await self._reader.readexactly(2)
        if len(self._buffer) < n:
            raise asyncio.IncompleteReadError(bytes(self._buffer), n)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


async def _connect(api: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    base = str(api.base_url)
    adapter = getattr(api, "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    if base.startswith("http+docker://localhost") and socket_path:
        return await asyncio.open_unix_connection(socket_path, limit=1 << 20)
    if base.startswith("http://"):
        host, _, port = base.removeprefix("http://").partition(":")
        return await asyncio.open_connection(host, int(port or 2375), limit=1 << 20)
    raise EngineError(
        f"docker: exec and logs need the engine on a unix socket or plain TCP, not {base}"
    )


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return head[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = ChunkedBody(reader)
        out = bytearray()
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                out += await body.readexactly(1)
        return bytes(out)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


__all__ = ["ChunkedBody", "DockerExec", "EngineCalls", "engine_error", "frames", "open_stream"]

"""The synchronous client for scripts: the same shape as the asynchronous one.

One event loop runs in a background thread per client; each call is handed to it and waited
for, so the async client's behaviour (deadlines, resumed watches, errors) is exactly the same.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime
from typing import Any, TypeVar

from portside.client._async import (
    DEFAULT_RESUME_FOR,
    DEFAULT_TIMEOUT,
    INSTANCE_HEADER,
    Container,
    Portside,
)
from portside.client._models import (
    ClassVersion,
    DeployResult,
    ExecChunk,
    ExecResult,
    ImageInfo,
    LogChunk,
    Outbound,
    Response,
    Rollout,
    Schedule,
    SecretInfo,
)
from portside.events import Event
from portside.instances import InstanceInfo
from portside.snapshots import Snapshot
from portside.spec import ContainerClass, NodeInfo
from portside.states import InstanceState
from portside.terminal import TerminalSize
from portside.usage import Usage

T = TypeVar("T")


class _LoopThread:
    """An event loop in a daemon thread, and the two ways to use it from this thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="portside-client", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Pull `iterator` item by item; breaking out of the loop closes it."""
        try:
            while True:
                try:
                    yield self.run(_anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None and self.loop.is_running():
                self.run(aclose())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def _from_sync(items: Iterable[bytes | TerminalSize]) -> AsyncIterator[bytes | TerminalSize]:
    """Feed a blocking iterable (a file, a generator) to exec without blocking the loop."""
    it = iter(items)
    done = object()
    while True:
        piece = await asyncio.to_thread(next, it, done)
        if piece is done:
            return
        if isinstance(piece, TerminalSize):
            yield piece
            continue
        assert isinstance(piece, bytes | bytearray | memoryview)
        yield bytes(piece)


def connect_sync(
    address: str | None = None,
    *,
    edge: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> SyncPortside:
    """The synchronous twin of `portside.connect`, for scripts::

        with portside.connect_sync("127.0.0.1:7070") as ps:
            box = ps.container("CodeExecutor", name="session-42")
            box.start()
            print(box.exec(["echo", "hi"]).stdout)

    Call `close()` (or use `with`) when done: it stops the client's background thread.
    """
    return SyncPortside(address, edge=edge, timeout=timeout, token=token)


class SyncPortside:
    """A synchronous connection to a Portside cluster; see `portside.connect_sync`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        edge: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
    ) -> None:
        # Validates, and finds the token; no network I/O.
        self._async = Portside(address, edge=edge, timeout=timeout, token=token)
        self._loop = _LoopThread()
        self.address, self.edge, self.timeout = self._async.address, self._async.edge, timeout

    def __enter__(self) -> SyncPortside:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.thread.is_alive():
            self._loop.run(self._async.aclose())
            self._loop.close()

    def __repr__(self) -> str:
        return f"<SyncPortside {self.address} edge={self.edge}>"

    def container(self, class_name: str, name: str) -> SyncContainer:
        """A handle on the named instance `name` of class `class_name` (no call is made)."""
        return SyncContainer(self, self._async.container(class_name, name))

    def classes(self) -> list[ContainerClass]:
        return self._loop.run(self._async.classes())

    def instances(
        self,
        class_name: str | None = None,
        node: str | None = None,
        state: InstanceState | str | None = None,
    ) -> list[InstanceInfo]:
        return self._loop.run(self._async.instances(class_name, node, state))

    def nodes(self) -> list[NodeInfo]:
        return self._loop.run(self._async.nodes())

    def usage(self, class_name: str | None = None, since: str | None = None) -> list[Usage]:
        return self._loop.run(self._async.usage(class_name, since))

    def events(
        self,
        class_name: str | None = None,
        *,
        after_revision: int = 0,
        resume_for: float = DEFAULT_RESUME_FOR,
    ) -> Iterator[Event]:
        return self._loop.iterate(
            self._async.events(class_name, after_revision=after_revision, resume_for=resume_for)
        )

    def deploy(
        self,
        path: str | os.PathLike[str],
        *,
        report: Callable[[str], None] | None = None,
        on_build_failure: Callable[[Sequence[str]], None] | None = None,
        rollout: str = "gradual",
    ) -> DeployResult:
        return self._loop.run(
            self._async.deploy(
                path, report=report, on_build_failure=on_build_failure, rollout=rollout
            )
        )

    def images(self) -> list[ImageInfo]:
        return self._loop.run(self._async.images())

    def versions(self, class_name: str) -> list[ClassVersion]:
        return self._loop.run(self._async.versions(class_name))

    def rollout(self, class_name: str) -> Rollout:
        return self._loop.run(self._async.rollout(class_name))

    def pause_rollout(self, class_name: str) -> Rollout:
        return self._loop.run(self._async.pause_rollout(class_name))

    def resume_rollout(self, class_name: str) -> Rollout:
        return self._loop.run(self._async.resume_rollout(class_name))

    def abort_rollout(self, class_name: str) -> Rollout:
        return self._loop.run(self._async.abort_rollout(class_name))

    def rollback(self, class_name: str, version: int = 0, rollout: str = "immediate") -> Rollout:
        return self._loop.run(self._async.rollback(class_name, version, rollout))

    def schedules(self, class_name: str | None = None, name: str | None = None) -> list[Schedule]:
        return self._loop.run(self._async.schedules(class_name, name))

    def snapshots(self, class_name: str = "", name: str = "") -> list[Snapshot]:
        return self._loop.run(self._async.snapshots(class_name, name))

    def delete_snapshot(self, class_name: str, snapshot: str) -> Snapshot:
        return self._loop.run(self._async.delete_snapshot(class_name, snapshot))

    def put_secret(self, name: str, value: str) -> SecretInfo:
        return self._loop.run(self._async.put_secret(name, value))

    def secrets(self) -> list[SecretInfo]:
        return self._loop.run(self._async.secrets())

    def delete_secret(self, name: str) -> SecretInfo:
        return self._loop.run(self._async.delete_secret(name))


class SyncContainer:
    """A named instance, synchronously; the methods are those of `portside.Container`."""

    def __init__(self, portside: SyncPortside, container: Container) -> None:
        self.portside = portside
        self._async = container
        self._loop = portside._loop
        self.class_name, self.name = container.class_name, container.name

    def __repr__(self) -> str:
        return f"<SyncContainer {self.class_name}/{self.name}>"

    def start(
        self,
        entrypoint: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        hint: str | None = None,
        wait: bool = True,
        snapshot: str | Snapshot | None = None,
    ) -> InstanceInfo:
        return self._loop.run(self._async.start(entrypoint, env, hint, wait, snapshot))

    def snapshot(self, name: str | None = None) -> Snapshot:
        return self._loop.run(self._async.snapshot(name))

    def stop(self, signal: int = 15, grace: float = 10.0) -> InstanceInfo:
        return self._loop.run(self._async.stop(signal, grace))

    def signal(self, signal: int) -> None:
        self._loop.run(self._async.signal(signal))

    def destroy(self) -> None:
        self._loop.run(self._async.destroy())

    def state(self) -> InstanceInfo:
        return self._loop.run(self._async.state())

    def renew_activity(self) -> None:
        self._loop.run(self._async.renew_activity())

    def exec(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        stdin: bytes | Iterable[bytes | TerminalSize] | None = None,
        *,
        user: str | None = None,
        tty: bool = False,
        size: TerminalSize | None = None,
        wake: bool = False,
        activity: bool = False,
    ) -> ExecResult:
        """`stdin` is bytes or any iterable of bytes (e.g. a generator reading a file); the
        rest as for `Container.exec`."""
        feed = stdin if stdin is None or isinstance(stdin, bytes) else _from_sync(stdin)
        return self._loop.run(
            self._async.exec(
                command,
                env,
                workdir,
                feed,
                user=user,
                tty=tty,
                size=size,
                wake=wake,
                activity=activity,
            )
        )

    def exec_stream(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        stdin: bytes | Iterable[bytes | TerminalSize] | None = None,
        *,
        user: str | None = None,
        tty: bool = False,
        size: TerminalSize | None = None,
        wake: bool = False,
        activity: bool = False,
    ) -> Iterator[ExecChunk]:
        feed = stdin if stdin is None or isinstance(stdin, bytes) else _from_sync(stdin)
        return self._loop.iterate(
            self._async.exec_stream(
                command,
                env,
                workdir,
                feed,
                user=user,
                tty=tty,
                size=size,
                wake=wake,
                activity=activity,
            )
        )

    def logs(self, follow: bool = False, tail: int = 0) -> Iterator[LogChunk]:
        return self._loop.iterate(self._async.logs(follow, tail))

    def events(
        self, after_revision: int = 0, resume_for: float = DEFAULT_RESUME_FOR
    ) -> Iterator[Event]:
        return self._loop.iterate(self._async.events(after_revision, resume_for))

    def get_state_value(self, key: str) -> bytes:
        return self._loop.run(self._async.get_state_value(key))

    def put_state_value(self, key: str, value: bytes | str) -> None:
        self._loop.run(self._async.put_state_value(key, value))

    def delete_state_value(self, key: str) -> bool:
        return self._loop.run(self._async.delete_state_value(key))

    def schedule(
        self,
        when: float | datetime,
        path: str | None = None,
        *,
        command: Sequence[str] | None = None,
        method: str = "GET",
        no_wake: bool = False,
        no_activity: bool = False,
        id: str | None = None,
    ) -> Schedule:
        return self._loop.run(
            self._async.schedule(
                when,
                path,
                command=command,
                method=method,
                no_wake=no_wake,
                no_activity=no_activity,
                id=id,
            )
        )

    def schedule_every(
        self,
        seconds: float,
        path: str | None = None,
        *,
        command: Sequence[str] | None = None,
        method: str = "GET",
        no_wake: bool = False,
        no_activity: bool = False,
        id: str | None = None,
    ) -> Schedule:
        return self._loop.run(
            self._async.schedule_every(
                seconds,
                path,
                command=command,
                method=method,
                no_wake=no_wake,
                no_activity=no_activity,
                id=id,
            )
        )

    def schedules(self) -> list[Schedule]:
        return self._loop.run(self._async.schedules())

    def delete_schedule(self, schedule_id: str) -> Schedule:
        return self._loop.run(self._async.delete_schedule(schedule_id))

    def set_outbound(
        self,
        *,
        allowed_hosts: Sequence[str] = (),
        denied_hosts: Sequence[str] = (),
        outbound_by_host: Mapping[str, str] | None = None,
        enable_internet: bool = False,
        intercept_https: bool = False,
    ) -> Outbound:
        return self._loop.run(
            self._async.set_outbound(
                allowed_hosts=allowed_hosts,
                denied_hosts=denied_hosts,
                outbound_by_host=outbound_by_host,
                enable_internet=enable_internet,
                intercept_https=intercept_https,
            )
        )

    def clear_outbound(self) -> Outbound:
        return self._loop.run(self._async.clear_outbound())

    def outbound(self) -> Outbound:
        return self._loop.run(self._async.outbound())

    def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        hint: str | None = None,
        name_header: str = INSTANCE_HEADER,
    ) -> Response:
        return self._loop.run(
            self._async.fetch(
                path,
                method=method,
                data=data,
                headers=headers,
                params=params,
                hint=hint,
                name_header=name_header,
            )
        )

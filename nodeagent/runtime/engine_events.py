"""The Docker engine's event stream for one node's containers, followed on a thread of its own and
handed to the event loop as `ContainerEvent`s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

from nodeagent.runtime.labels import LABEL_INSTANCE_ID, LABEL_NODE
from nodeagent.runtime.protocol import ContainerEvent, ContainerEventKind

log = logging.getLogger(__name__)


class EventFeed:
    """A thread that follows one of the engine's event streams for this node's containers and
    hands each event to the loop. The SDK's stream blocks, so it cannot live on the loop. When the
    stream cannot be opened or ends (the engine went away), the feed hands over why, as a str,
    and its thread ends: the consumer decides when to follow again. `close()` cancels the stream
    (closing its socket unblocks the read) and joins the thread."""

    def __init__(
        self,
        api: Any,
        node_id: str,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[ContainerEvent | str],
        since: float | None = None,
    ) -> None:
        self._api, self._node_id, self._loop, self._queue = api, node_id, loop, queue
        self._since = since
        self._closing = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"docker-events-{node_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        why = "the engine ended its event stream"
        try:
            stream = self._api.events(
                decode=True,
                since=self._since,
                filters={"label": f"{LABEL_NODE}={self._node_id}", "type": "container"},
            )
            with self._lock:
                self._stream = stream
            if self._closing.is_set():
                stream.close()
                return
            for raw in stream:
                event = container_event(raw)
                if event is not None:
                    self._hand_over(event)
        except Exception as exc:  # noqa: BLE001 - whatever broke it, the consumer follows anew
            why = f"its event stream failed: {exc}"
        if not self._closing.is_set():
            self._hand_over(why)

    def _hand_over(self, item: ContainerEvent | str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self._closing.set()


def container_event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    """One raw engine event as a `ContainerEvent`; None for kinds the agent does not follow."""
    actor = raw.get("Actor") or {}
    attributes: Mapping[str, str] = actor.get("Attributes") or {}
    action = str(raw.get("Action") or raw.get("status") or "")
    container_id = str(actor.get("ID") or raw.get("id") or "")
    try:
        kind = ContainerEventKind(action)
    except ValueError:
        return None
    if not container_id:
        return None
    code = attributes.get("exitCode")
    nano = int(raw.get("timeNano") or 0)
    return ContainerEvent(
        kind=kind,
        container_id=container_id,
        instance_id=attributes.get(LABEL_INSTANCE_ID, ""),
        time=nano / 1e9 if nano else float(raw.get("time") or 0),
        exit_code=int(code) if code is not None and code.lstrip("-").isdigit() else None,
    )


__all__ = ["EventFeed", "container_event"]

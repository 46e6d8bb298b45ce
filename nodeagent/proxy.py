"""The node agent's HTTP data plane: edges send `Portside-Class` and `Portside-Instance`; the agent
wakes that instance and has the proxy core stream the request (or WebSocket) to its container and
back. What is the agent's own: which container, holding it awake, booting it again, rechecking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from nodeagent import metrics
from nodeagent.fence import Fence
from nodeagent.instances import Hold, InstanceManager
from nodeagent.runtime import ContainerInfo
from portside import headers, proxy
from portside.daemon import Children
from portside.errors import (
    ContainerExited,
    InvalidArgument,
    NodeFenced,
    NotFound,
    NotThroughEdge,
    PortsideError,
    Unavailable,
    UpstreamFailed,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from portside.net import Deadlines, ServerTls, peer_admission, server_ssl_context, split_hostport
from portside.spec import ContainerClass

log = logging.getLogger(__name__)

_PROXIED: Final = Children(metrics.PROXIED_REQUESTS)
_PROXY_SECONDS: Final = Children(metrics.PROXY_SECONDS)

# A container whose server just died can still be "running" for a moment (its init is exiting).
_DYING_GRACE_S: Final = 0.25
_CLIENT_GONE: Final = 499  # nginx's code for "the client closed the request", for metrics only


class DataPlane:
    """The HTTP server edges call: `await plane.listen(address, tls)` (mutual TLS in a secured
    cluster: only edges and control planes get through).

    On SIGTERM the agent `drain`s it: no new connections at once (edges get connection refused
    and go elsewhere), requests in flight finish within a bounded grace, and what is left at its
    end is cut (WebSockets close 1001 going away). `close` stops it at once."""

    def __init__(
        self,
        manager: InstanceManager,
        get_class: Callable[[str], ContainerClass | None],
        deadlines: Deadlines | None = None,
        *,
        transport: proxy.UpstreamTransport | None = None,
        fence: Fence | None = None,
    ) -> None:
        self._manager = manager
        self._get_class = get_class
        self._fence = fence  # None: no fencing (a data plane tested on its own)
        self._deadlines = deadlines or Deadlines()
        # Requests in flight: their handlers' tasks, and whether each is a WebSocket's.
        self._handling: dict[asyncio.Task[object], bool] = {}
        self._draining = False  # no new requests
        self._cutting = False  # the drain's grace is over: what is left is cut, not finished
        # A container's answer never carries Portside-Error: that header says Portside answered.
        self._core = proxy.ProxyCore(
            transport or proxy.HttpTransport(self._deadlines),
            name="node agent",
            drop_from_responses=(headers.ERROR,),
        )
        self._server: proxy.HttpServer | None = None

    async def listen(
        self, address: str, tls: ServerTls | None = None, what: str = "the data port"
    ) -> None:
        """Serve on HOST:PORT; with `tls`, HTTPS whose peers must hold a certificate of the
        roles it names (others get 403 on every request)."""
        host, port = split_hostport(address, "listen address")
        admission = peer_admission(tls.peers, what) if tls is not None and tls.peers else None
        self._server = proxy.HttpServer(self.handle, name="node agent", admission=admission)
        context = server_ssl_context(tls) if tls is not None else None
        try:
            await self._server.listen(host, port, context, reuse_port=False)
        except OSError as exc:
            raise InvalidArgument(f"cannot listen on {address}: {exc.strerror}") from exc

    async def close(self) -> None:
        """Stop at once: WebSockets going-away, requests in flight cut."""
        if self._server is not None:
            await self._core.shutdown(self._server, 0)

    # -- entry --------------------------------------------------------------------------------

    async def handle(self, request: proxy.Request) -> None:
        # Every path is an instance's: /metrics and /healthz are on the agent's metrics port.
        try:
            cls, name = self._addressee(request)
            if self._draining:
                # Only a request already read off a kept-alive connection can get here.
                raise Unavailable("this node agent is shutting down: send the request elsewhere")
        except PortsideError as exc:
            proxy.answer_error(request, exc, close=self._draining)
            return
        started = time.perf_counter()
        task = asyncio.current_task()
        if task is not None:
            self._handling[task] = request.websocket
        try:
            await self._serve(request, cls, name)
        finally:
            if task is not None:
                self._handling.pop(task, None)
                if self._draining and not self._cutting:
                    metrics.DRAINED_REQUESTS.labels("finished").inc()
            status = str(request.status or _CLIENT_GONE)
            _PROXIED(cls.name, status).inc()
            _PROXY_SECONDS(cls.name).observe(time.perf_counter() - started)

    async def drain(self, grace_s: float) -> tuple[int, int]:
        """Stop serving gracefully: close the listening socket at once and idle kept-alive
        connections, let requests in flight finish within `grace_s`, then close the WebSockets
        still open with 1001 going away and cut the requests still waiting. Returns (finished,
        cut); the server and its upstream pool are closed."""
        self._draining = True
        in_flight = len(self._handling)
        server = self._server
        assert server is not None, "drain after listen"
        server.stop_listening()  # new connections are refused from here on
        log.info(
            "draining: %d requests in flight (%d WebSockets), up to %gs",
            in_flight,
            sum(self._handling.values()),
            grace_s,
        )
        if self._handling:
            await asyncio.wait(list(self._handling), timeout=grace_s)
        self._cutting = True
        cut = len(self._handling)
        metrics.DRAINED_REQUESTS.labels("cut").inc(cut)
        requests = [task for task, websocket in self._handling.items() if not websocket]
        for task in requests:
            task.cancel()
        if requests:
            await asyncio.wait(requests, timeout=1.0)
        # The WebSockets hear 1001; their handlers end as both sides close.
        await self._core.shutdown(server, proxy.WS_CLOSE_TIMEOUT)
        finished = in_flight - cut
        if cut:
            log.warning("drained: %d requests finished, %d cut after %gs", finished, cut, grace_s)
        else:
            log.info("drained: %d requests finished", finished)
        return finished, cut

    def _addressee(self, request: proxy.Request) -> tuple[ContainerClass, str]:
        """The class and instance name an edge set; refuses a request that did not come through
        one, or names a class this agent does not know."""
        class_name = request.headers.get(headers.CLASS)
        name = request.headers.get(headers.INSTANCE)
        if not class_name:
            raise NotThroughEdge(
                f"request has no {headers.CLASS} header: send it through a Portside edge"
            )
        if not name:
            raise NotThroughEdge(
                f"request for class {class_name} has no {headers.INSTANCE} header: send it"
                " through a Portside edge"
            )
        cls = self._get_class(class_name)
        if cls is None:
            raise NotFound(f"class {class_name} is not deployed (this node agent does not know it)")
        return cls, name

    async def _serve(self, request: proxy.Request, cls: ContainerClass, name: str) -> None:
        # The container needs no Portside-Class: its class is what it is. Portside-Instance
        # stays, so one image can serve many names.
        forward = proxy.forward_request(request, ingress=False, drop=(headers.CLASS,))
        holds: list[Hold] = []  # more than one when a dead container was booted again
        try:
            await self._check_fence(cls, name)
            holds.append(await self._acquire(cls, name))
            upstream = await self._open(forward, cls, name, holds)
            holds[-1].served()  # its container answered: it is not crash-looping
            try:
                # Again before any of the answer leaves: the wait for it may have crossed the
                # fence (a node frozen mid-request answers nothing after its lease could end).
                await self._check_fence(cls, name)
            except NodeFenced:
                if isinstance(upstream, proxy.UpstreamResponse):
                    upstream.release()
                else:
                    upstream.close(1001)
                raise

            def broke_off(exc: UpstreamFailed) -> None:
                log.warning(
                    "container for %s/%s broke off its answer to %s %s: %s",
                    cls.name,
                    name,
                    request.method,
                    request.path,
                    exc,
                )

            # The hold lasts as long as the answer: an open WebSocket keeps the instance awake.
            await self._core.deliver(request, upstream, on_break=broke_off)
        except PortsideError as exc:
            if request.status:
                request.abort()  # the answer had begun: only a cut says it broke
            else:
                proxy.answer_error(request, exc)
        finally:
            for hold in holds:
                hold.release()

    async def _acquire(self, cls: ContainerClass, name: str) -> Hold:
        """The manager's hold on the instance. When it thaws a paused one, the connection to its
        container is made meanwhile (its kernel accepts while it is frozen), so the request goes
        out on it as soon as docker unpause answered; never before: a thaw that fails must not
        leave a request in a frozen container's socket."""
        frozen = self._manager.frozen_upstream(cls.name, name)
        if frozen is None:
            return await self._manager.acquire(cls, name)
        ahead = asyncio.create_task(self._connect_ahead(f"{frozen.host}:{frozen.port}"))
        try:
            return await self._manager.acquire(cls, name)
        finally:
            ahead.cancel()  # connected long before, as a rule; else the request connects itself

    async def _connect_ahead(self, authority: str) -> None:
        await asyncio.sleep(0)  # once the thaw's docker unpause went out: it is the longer one
        with contextlib.suppress(UpstreamFailed):  # the request's own connect meets it again
            await self._core.transport.prepare(authority)

    async def _check_fence(self, cls: ContainerClass, name: str) -> None:
        """Named instances are served only while this node's lease is confirmed (pools, whose
        members are interchangeable, serve on): NodeFenced tells the edge to resolve again."""
        if self._fence is not None and cls.autoscaling is None:
            await self._fence.admit(cls.name, name)

    async def _open(
        self, forward: proxy.Forward, cls: ContainerClass, name: str, holds: list[Hold]
    ) -> proxy.Upstream:
        """Send `forward` to the container of `holds[-1]`. If the container turns out to have
        died while idle, before this request, boot it again and send once more (appending to
        `holds`); every other failure becomes the error that says what happened to it.

        The transport itself already sends an idempotent request a second time when a kept-alive
        connection the container had closed drops it (RFC 9112 9.3.1)."""
        while True:
            hold = holds[-1]
            sent_at = datetime.now(UTC)
            try:
                return await self._core.open(_authority(hold), forward)
            except proxy.UpgradeRefused as exc:
                raise UpstreamRefused(f"{_container(cls, name)} {exc}") from exc
            except UpstreamRefused as exc:
                info = await self._recheck(hold)
                if info is not None and info.running:
                    raise UpstreamRefused(_refused(cls, name, hold, exc, info)) from exc
                if (
                    len(holds) > 1
                    or _exited_since(info, sent_at)
                    or not proxy.may_resend(forward, exc)
                ):
                    # It died with this request (or aiohttp's own retry) in hand, or again right
                    # after a reboot: sending it once more would do the same.
                    raise _exited(cls, name, info) from exc
                # It died while idle, before this request: boot it again and send once more.
                hold.release()
                holds.append(await self._manager.acquire(cls, name))
            except UpstreamReset as exc:
                info = await self._recheck(hold)
                if info is None or not info.running:
                    raise _exited(cls, name, info) from exc
                raise UpstreamReset(
                    f"{_container(cls, name)} closed the connection before answering ({exc})"
                ) from exc
            except UpstreamTimeout as exc:
                raise UpstreamTimeout(
                    f"{_container(cls, name)} sent no answer within {self._deadlines.first_byte:g}s"
                ) from exc
            except UpstreamFailed as exc:
                raise UpstreamFailed(
                    f"exchange with {_container(cls, name)} failed: {exc}"
                ) from exc

    async def _recheck(self, hold: Hold) -> ContainerInfo | None:
        """The container after a failed exchange; look twice before blaming the app."""
        info = await self._manager.recheck(hold)
        if info is not None and info.running:
            await asyncio.sleep(_DYING_GRACE_S)
            info = await self._manager.recheck(hold)
        return info


def _authority(hold: Hold) -> str:
    host, port = hold.upstream
    return f"{host}:{port}"


def _container(cls: ContainerClass, name: str) -> str:
    return f"container for {cls.name}/{name}"


def _refused(
    cls: ContainerClass, name: str, hold: Hold, exc: UpstreamRefused, info: ContainerInfo | None
) -> str:
    host, port = hold.upstream
    if info is None:
        state = "was removed"
    elif info.running:
        state = "is running but did not accept a connection to"
    else:
        state = f"exited with code {info.exit_code} and did not accept a connection to"
    return f"{_container(cls, name)} {state} its port {port} at {host}: {exc}"


def _exited_since(info: ContainerInfo | None, moment: datetime) -> bool:
    # The engine and the agent share the host's clock. A removed container (None) tells nothing.
    return info is not None and info.finished_at is not None and info.finished_at >= moment


def _exited(cls: ContainerClass, name: str, info: ContainerInfo | None) -> ContainerExited:
    if info is None:
        return ContainerExited(f"{_container(cls, name)} was removed while answering")
    return ContainerExited(
        f"{_container(cls, name)} exited with code {info.exit_code} while answering",
        info.exit_code,
    )

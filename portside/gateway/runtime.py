"""Runs the deployed gateway module's handlers for a host process (an edge: `fetch`; a node:
outbound handlers): loads and swaps the module as configs arrive, builds `env`, holds each call
to the gateway's deadline and turns its failures into Portside's answers.

    runtime = GatewayRuntime(router, ControlPlaneLifecycle(channel), limiter, secrets)
    runtime.load(config)                        # on every config the watch delivers
    response = await runtime.fetch(request)     # raises GatewayError, GatewayTimeout, ...

Failures, one line to the client and the whole story to the log: handler code that raises or
returns something else than a Response is GatewayError (500 gateway-error, its traceback
logged); one that does not answer within `[gateway] deadline` is GatewayTimeout (504); a
Portside error raised through a binding (NoCapacity, NodeUnreachable...) keeps its own kind;
ClientGone (the client left while the handler read its body) is no failure of the gateway's
and goes up as it is, for the host to note in one line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from prometheus_client import Counter

from portside.errors import GatewayError, GatewayTimeout, PortsideError, error_kind
from portside.gateway.env import (
    ControlPlaneLifecycle,
    Env,
    Lifecycle,
    RateLimiter,
    Router,
    env_of_config,
)
from portside.gateway.module import CODE_FAILURES, GatewayModule, Handler, load_module
from portside.gateway.types import Request, Response
from portside.proxy import ClientGone
from portside.spec import Config, Gateway

log = logging.getLogger(__name__)

#: The catch-all outbound handler's name in the gateway module.
OUTBOUND: Final = "outbound"


@dataclass(frozen=True)
class OutboundContext:
    """Which container made an outbound request: `ctx` of `outbound(request, env, ctx)`."""

    class_name: str
    instance: str
    container_id: str
    node_id: str = ""


@dataclass(frozen=True, eq=False)
class _Deployed:
    """One config's gateway: what every call reads with one attribute get."""

    gateway: Gateway
    module: GatewayModule | None  # None: it failed to load
    env: Env

    @property
    def deadline_s(self) -> float:
        return self.gateway.deadline_s


class GatewayRuntime:
    """The gateway of one host process. `secrets` is a live mapping (kept current from
    WatchSecrets by its owner); `router`, `lifecycle` and `limiter` serve the bindings;
    `errors` (a Counter with a label `kind`, named for the host's daemon) counts failures."""

    def __init__(
        self,
        router: Router,
        lifecycle: Lifecycle,
        limiter: RateLimiter,
        secrets: Mapping[str, str],
        *,
        errors: Counter | None = None,
    ) -> None:
        self._router = router
        self._lifecycle = lifecycle
        self._limiter = limiter
        self._secrets = secrets
        self._errors = errors
        self._deployed: _Deployed | None = None

    @property
    def configured(self) -> bool:
        """A gateway module is deployed (loaded or not)."""
        return self._deployed is not None

    @property
    def digest(self) -> str:
        """The digest of the module serving now ("" with none, or one that failed to load)."""
        deployed = self._deployed
        return deployed.module.digest if deployed and deployed.module else ""

    def load(self, config: Config) -> None:
        """Take `config`'s gateway: a module of a new digest is loaded and swapped in (calls in
        flight finish on the one they started with); a module that fails to load is logged
        with its traceback and every call answers gateway-error until a deploy brings a good
        one. The env is rebuilt every time (classes, vars and limits may change alone)."""
        gateway = config.gateway
        previous = self._deployed
        if gateway is None:
            self._deployed = None
            if previous is not None and previous.module is not None:
                previous.module.unload()
                log.info("gateway module %s removed", previous.gateway.module)
            return
        module = previous.module if previous is not None else None
        if previous is None or previous.gateway.digest != gateway.digest:
            module = self._load(gateway)
            if previous is not None and previous.module is not None:
                previous.module.unload()
        env = env_of_config(config, self._router, self._lifecycle, self._limiter, self._secrets)
        self._deployed = _Deployed(gateway, module, env)

    @staticmethod
    def _load(gateway: Gateway) -> GatewayModule | None:
        try:
            module = load_module(gateway)
        except CODE_FAILURES:  # a module's sys.exit() must not end the process
            log.exception(
                "gateway module %s (%s) failed to load; gateway requests answer 500"
                " gateway-error until a deploy brings one that loads",
                gateway.module,
                gateway.digest,
            )
            return None
        log.info(
            "gateway module %s (%s) loaded: %s",
            gateway.module,
            gateway.digest,
            ", ".join(sorted(module.handlers)) or "no handlers",
        )
        return module

    def has(self, name: str) -> bool:
        """The deployed module defines the handler `name` (an `async def` at its top level)."""
        deployed = self._deployed
        return (
            deployed is not None
            and deployed.module is not None
            and (name in deployed.module.handlers)
        )

    async def fetch(self, request: Request) -> Response:
        """`fetch(request, env)` of the module, within the gateway's deadline (to the response
        head: the body may stream on after it). Raises GatewayError, GatewayTimeout, or the
        Portside error a binding raised."""
        deployed = self._deployed
        handler = self._handler(deployed, "fetch")
        assert deployed is not None  # _handler raised otherwise
        return await self._call(deployed, "fetch", handler, request, deployed.env)

    async def outbound(self, handler: str, request: Request, ctx: OutboundContext) -> Response:
        """The outbound handler `handler` (`OUTBOUND`: the catch-all) as
        `handler(request, env, ctx)`, with fetch's deadline and failures."""
        deployed = self._deployed
        function = self._handler(deployed, handler)
        assert deployed is not None
        return await self._call(deployed, handler, function, request, deployed.env, ctx)

    def _handler(self, deployed: _Deployed | None, name: str) -> Handler:
        if deployed is None:
            raise self._failed("gateway-error", GatewayError("no gateway module is deployed"))
        module = deployed.module
        if module is None:
            raise self._failed(
                "gateway-error",
                GatewayError(
                    f"the gateway module {deployed.gateway.module} failed to load; see the"
                    " edge's log"
                ),
            )
        handler = module.handlers.get(name)
        if handler is None:
            raise self._failed(
                "gateway-error",
                GatewayError(f"the gateway module {deployed.gateway.module} defines no {name}"),
            )
        return handler

    async def _call(
        self, deployed: _Deployed, name: str, handler: Handler, request: Request, *args: Any
    ) -> Response:
        deadline = asyncio.timeout(deployed.deadline_s)
        try:
            async with deadline:
                response = await handler(request, *args)
        except TimeoutError as exc:
            # Ours only if the deadline expired; a TimeoutError of the code's own is its failure.
            if not deadline.expired():
                self._raised(deployed, name, request, exc)
            raise self._late(deployed, name) from None
        except PortsideError as exc:
            self.count_error(error_kind(exc).name)
            raise
        except ClientGone:
            raise  # nobody is left to answer; not the code's failure
        except CODE_FAILURES as exc:
            # SystemExit too: a handler's sys.exit() must not end the edge.
            self._raised(deployed, name, request, exc)
        if deadline.expired():
            raise self._late(deployed, name)  # it swallowed the cancellation and went on
        if not isinstance(response, Response):
            log.error(
                "gateway %s (%s) returned %s, not a Response, for %s %s",
                name,
                deployed.gateway.module,
                type(response).__name__,
                request.method,
                request.url,
            )
            raise self._failed(
                "gateway-error",
                GatewayError(
                    f"the gateway's {name} returned {type(response).__name__}, not a Response"
                ),
            )
        return response

    def _raised(
        self, deployed: _Deployed, name: str, request: Request, exc: BaseException
    ) -> NoReturn:
        log.error(
            "gateway %s (%s) failed on %s %s",
            name,
            deployed.gateway.module,
            request.method,
            request.url,
            exc_info=exc,
        )
        raise self._failed(
            "gateway-error",
            GatewayError(
                f"the gateway's {name} raised {type(exc).__name__}; the traceback is in the log"
            ),
        ) from exc

    def _late(self, deployed: _Deployed, name: str) -> GatewayError:
        return self._failed(
            "gateway-timeout",
            GatewayTimeout(
                f"the gateway's {name} did not answer within its deadline"
                f" ({deployed.deadline_s:g}s)"
            ),
        )

    def _failed(self, kind: str, exc: GatewayError) -> GatewayError:
        self.count_error(kind)
        return exc

    def count_error(self, kind: str) -> None:
        """One more failed call of `kind` in the host's counter (a label `kind`): an edge's
        `portside_edge_gateway_errors_total`, an agent's
        `portside_agent_outbound_handler_errors_total`."""
        if self._errors is not None:
            self._errors.labels(kind).inc()


__all__ = [
    "OUTBOUND",
    "ControlPlaneLifecycle",
    "GatewayRuntime",
    "Lifecycle",
    "OutboundContext",
    "RateLimiter",
    "Router",
]

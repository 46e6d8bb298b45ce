"""The `env` a gateway handler gets: a binding per class (stubs of its instances), `vars`,
`secrets` and the rate limiters, over three small protocols the host process implements.

    async def fetch(request, env):
        box = env.CODE_EXECUTOR.get(request.headers["x-session"], location_hint="weur")
        if not await env.LIMITER.limit(key=request.headers.get("x-api-key", "")):
            return Response("slow down\\n", status=429)
        return await box.fetch(request)            # boots the instance if it sleeps

`Router` reaches instances (the edge's proxy, a node's agent), `Lifecycle` drives them
(`ControlPlaneLifecycle`: the control plane's lifecycle RPCs), `RateLimiter` counts calls.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NoReturn, Protocol

import grpc

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.client import Outbound
from portside.convert import instance_info_from_pb, outbound_from_pb, outbound_to_pb
from portside.errors import InvalidArgument, from_rpc
from portside.gateway import scope
from portside.gateway.types import Body, HeadersLike, Request, Response
from portside.instances import InstanceInfo
from portside.outbound import given_policy
from portside.spec import Config, ContainerClass, OutboundPolicy, binding_of

#: Cloudflare's getRandom names its instances "instance-0" .. "instance-<n-1>".
RANDOM_PREFIX = "instance"
# The SDK's deadlines (portside/client): Start waits for the port, the rest are short calls.
_START_TIMEOUT_S = 120.0
_CALL_TIMEOUT_S = 10.0


class Router(Protocol):
    """How a binding reaches instances; the host process implements it (the edge over its
    proxy and route cache, a node agent over its own).

    `fetch` sends `request` to instance `name` of `class_name` (booting it if it sleeps; None
    for a pool class: any member, by pool routing), placing a new one near `location_hint`
    ("": the host's choice, the request's Portside-Location-Hint or else the host's region),
    and returns its response with the body still streaming. `request.target` is what goes on
    the request line. A WebSocket upgrade request
    (`request.is_websocket`) returns a 101 response carrying the upgraded connection, which the
    host splices to its client when the handler returns it. Raises portside.errors (NoCapacity,
    NodeUnreachable, UpstreamTimeout...), which the runtime turns into the client's answer."""

    async def fetch(
        self, class_name: str, name: str | None, request: Request, location_hint: str
    ) -> Response: ...


class Lifecycle(Protocol):
    """The SDK's instance lifecycle (`portside.client.Container`), by class and name: same
    arguments, same results, same errors."""

    async def start(
        self,
        class_name: str,
        name: str,
        *,
        entrypoint: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        location_hint: str | None = None,
    ) -> InstanceInfo: ...

    async def stop(
        self, class_name: str, name: str, signal: int = 15, grace: float = 10.0
    ) -> InstanceInfo: ...

    async def signal(self, class_name: str, name: str, signal: int) -> None: ...

    async def destroy(self, class_name: str, name: str) -> None: ...

    async def state(self, class_name: str, name: str) -> InstanceInfo: ...

    async def set_outbound(
        self, class_name: str, name: str, policy: OutboundPolicy | None
    ) -> Outbound:
        """The instance's own outbound policy (None: clear it, its class's applies again)."""

    async def outbound(self, class_name: str, name: str) -> Outbound: ...


class RateLimiter(Protocol):
    """Counts calls per (binding, key): `limit` returns True while the call is within the
    binding's `[[gateway.rate_limits]]` limit for its period (edge/ratelimits.py documents the
    bound across edges)."""

    async def limit(self, binding: str, key: str) -> bool: ...


class ControlPlaneLifecycle:
    """Lifecycle over the control plane's RPCs (an edge's certificate may call Start, Stop,
    Signal, Destroy and GetState); failures become portside.errors with its reason."""

    def __init__(self, channel: grpc.aio.Channel, controlplane: str = "") -> None:
        self._stub = cp_grpc.ControlPlaneStub(channel)
        self._where = f"control plane {controlplane}".strip()

    async def start(
        self,
        class_name: str,
        name: str,
        *,
        entrypoint: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        location_hint: str | None = None,
    ) -> InstanceInfo:
        if isinstance(entrypoint, str):
            raise InvalidArgument("entrypoint is a list of arguments, e.g. ['/bin/app', '-v']")
        request = cp.StartRequest(
            instance=_ref(class_name, name),
            entrypoint=list(entrypoint or ()),
            env=dict(env or {}),
            location_hint=location_hint or "",
        )
        reply = await self._call(self._stub.Start, request, _START_TIMEOUT_S)
        return instance_info_from_pb(reply.info)

    async def stop(
        self, class_name: str, name: str, signal: int = 15, grace: float = 10.0
    ) -> InstanceInfo:
        request = cp.StopRequest(
            instance=_ref(class_name, name), signal=int(signal), grace_seconds=grace
        )
        reply = await self._call(self._stub.Stop, request, _CALL_TIMEOUT_S + grace)
        return instance_info_from_pb(reply.info)

    async def signal(self, class_name: str, name: str, signal: int) -> None:
        request = cp.SignalRequest(instance=_ref(class_name, name), signal=int(signal))
        await self._call(self._stub.Signal, request, _CALL_TIMEOUT_S)

    async def destroy(self, class_name: str, name: str) -> None:
        request = cp.DestroyRequest(instance=_ref(class_name, name))
        await self._call(self._stub.Destroy, request, _CALL_TIMEOUT_S + 10)

    async def state(self, class_name: str, name: str) -> InstanceInfo:
        request = cp.GetStateRequest(instance=_ref(class_name, name))
        reply = await self._call(self._stub.GetState, request, _CALL_TIMEOUT_S)
        return instance_info_from_pb(reply.info)

    async def set_outbound(
        self, class_name: str, name: str, policy: OutboundPolicy | None
    ) -> Outbound:
        request = cp.SetOutboundRequest(
            instance=_ref(class_name, name),
            policy=outbound_to_pb(policy) if policy is not None else None,
            clear=policy is None,
        )
        reply = await self._call(self._stub.SetOutbound, request, _CALL_TIMEOUT_S)
        return Outbound(outbound_from_pb(reply.policy), reply.own)

    async def outbound(self, class_name: str, name: str) -> Outbound:
        request = cp.GetOutboundRequest(instance=_ref(class_name, name))
        reply = await self._call(self._stub.GetOutbound, request, _CALL_TIMEOUT_S)
        return Outbound(outbound_from_pb(reply.policy), reply.own)

    async def _call(self, method: Any, request: Any, deadline_s: float) -> Any:
        try:
            return await method(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, self._where) from exc


def _ref(class_name: str, name: str) -> pb.InstanceRef:
    return pb.InstanceRef(class_name=class_name, name=name)


def _as_request(
    request_or_path: Request | str,
    method: str,
    headers: HeadersLike,
    body: Body,
) -> Request:
    """A Request goes as it is (its body streams through); a path makes a new one."""
    if isinstance(request_or_path, Request):
        if headers is not None or body is not None or method != "GET":
            raise TypeError("fetch(request) takes no method, headers or body: set them on it")
        return request_or_path
    if not request_or_path.startswith("/"):
        raise ValueError(f"fetch path {request_or_path!r} must start with '/'")
    return Request(request_or_path, method=method, headers=headers, body=body)


class InstanceStub:
    """One named instance of a class, as `env.<BINDING>.get(name)` gives it: `fetch` reaches
    it (booting it if it sleeps), the lifecycle methods are the SDK's `Container`'s. Holds no
    state: make one per request as cheaply as a dict."""

    __slots__ = ("_binding", "location_hint", "name")

    def __init__(self, binding: ClassBinding, name: str, location_hint: str | None) -> None:
        self._binding = binding
        self.name = name
        self.location_hint = location_hint

    @property
    def class_name(self) -> str:
        return self._binding.class_name

    def __repr__(self) -> str:
        return f"<InstanceStub {self.class_name}/{self.name}>"

    async def fetch(
        self,
        request_or_path: Request | str,
        *,
        method: str = "GET",
        headers: HeadersLike = None,
        body: Body = None,
    ) -> Response:
        """Send a request to this instance and return its response (body streaming).
        `request_or_path`: the handler's request (or any Request) as it is, or a path with
        `method`, `headers` and `body`."""
        request = _as_request(request_or_path, method, headers, body)
        return await scope.stub_call(
            self._binding._router.fetch(
                self.class_name, self.name, request, self.location_hint or ""
            )
        )

    async def start(
        self,
        entrypoint: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        hint: str | None = None,
    ) -> InstanceInfo:
        """Place it if needed (near `hint`, else the stub's location hint), boot its container
        and wait until its port answers."""
        return await scope.stub_call(
            self._binding._lifecycle.start(
                self.class_name,
                self.name,
                entrypoint=entrypoint,
                env=env,
                location_hint=hint or self.location_hint,
            )
        )

    async def stop(self, signal: int = 15, grace: float = 10.0) -> InstanceInfo:
        """`signal`, then SIGKILL after `grace` seconds; it keeps its node and writable layer."""
        return await scope.stub_call(
            self._binding._lifecycle.stop(self.class_name, self.name, signal, grace)
        )

    async def signal(self, signal: int) -> None:
        await scope.stub_call(self._binding._lifecycle.signal(self.class_name, self.name, signal))

    async def destroy(self) -> None:
        await scope.stub_call(self._binding._lifecycle.destroy(self.class_name, self.name))

    async def state(self) -> InstanceInfo:
        return await scope.stub_call(self._binding._lifecycle.state(self.class_name, self.name))

    async def set_outbound(
        self,
        *,
        allowed_hosts: Sequence[str] = (),
        denied_hosts: Sequence[str] = (),
        outbound_by_host: Mapping[str, str] | None = None,
        enable_internet: bool = False,
        intercept_https: bool = False,
    ) -> Outbound:
        """Its own outbound policy in place of its class's, whole, applied to its next
        connection without a restart (the SDK's `Container.set_outbound`)."""
        policy = given_policy(
            allowed_hosts=allowed_hosts,
            denied_hosts=denied_hosts,
            outbound_by_host=outbound_by_host,
            enable_internet=enable_internet,
            intercept_https=intercept_https,
        )
        return await scope.stub_call(
            self._binding._lifecycle.set_outbound(self.class_name, self.name, policy)
        )

    async def clear_outbound(self) -> Outbound:
        """Drop its own outbound policy: its class's applies again."""
        return await scope.stub_call(
            self._binding._lifecycle.set_outbound(self.class_name, self.name, None)
        )

    async def outbound(self) -> Outbound:
        """The outbound policy that applies to it: its own, or its class's."""
        return await scope.stub_call(self._binding._lifecycle.outbound(self.class_name, self.name))


class ClassBinding:
    """`env.<BINDING>` of one class: `get(name)` a stub of a named instance, `get_random(n)` one
    of n, and for a pool class `fetch` to any member (pool routing)."""

    __slots__ = ("_lifecycle", "_router", "binding", "class_name", "pool")

    def __init__(self, cls: ContainerClass, router: Router, lifecycle: Lifecycle) -> None:
        self.class_name = cls.name
        self.binding = binding_of(cls)
        self.pool = cls.pool
        self._router = router
        self._lifecycle = lifecycle

    def __repr__(self) -> str:
        return f"<ClassBinding {self.binding} -> {self.class_name}>"

    def get(self, name: str, location_hint: str | None = None) -> InstanceStub:
        """The instance called `name` (made on first use, placed near `location_hint`: a region
        code or area; default: the request's Portside-Location-Hint, else the edge's region)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"instance name of {self.binding} must be a non-empty string")
        return InstanceStub(self, name, location_hint)

    def get_random(
        self, n: int = 3, *, prefix: str = RANDOM_PREFIX, location_hint: str | None = None
    ) -> InstanceStub:
        """Cloudflare's `getRandom`: one of n instances named "<prefix>-0" .. "<prefix>-<n-1>",
        chosen at random on each call, so load spreads over a fixed set of named instances
        (each boots on its first request and sleeps on its own)."""
        if n < 1:
            raise ValueError(f"get_random needs n >= 1, not {n}")
        return self.get(f"{prefix}-{random.randrange(n)}", location_hint)

    async def fetch(
        self,
        request_or_path: Request | str,
        *,
        method: str = "GET",
        headers: HeadersLike = None,
        body: Body = None,
        location_hint: str | None = None,
    ) -> Response:
        """For a pool class: any member serves (the nearest with room, as a pool route)."""
        if not self.pool:
            raise TypeError(
                f"{self.binding} is class {self.class_name}, whose instances are named: use"
                f" env.{self.binding}.get(name).fetch(...)"
            )
        request = _as_request(request_or_path, method, headers, body)
        return await scope.stub_call(
            self._router.fetch(self.class_name, None, request, location_hint or "")
        )


class RateLimitBinding:
    """`env.<LIMITER>` of one `[[gateway.rate_limits]]`."""

    __slots__ = ("_limiter", "binding")

    def __init__(self, binding: str, limiter: RateLimiter) -> None:
        self.binding = binding
        self._limiter = limiter

    def __repr__(self) -> str:
        return f"<RateLimitBinding {self.binding}>"

    async def limit(self, *, key: str) -> bool:
        """True while calls with `key` are within the limit for the current period (this call
        counted); False once over it (answer 429, say)."""
        return await self._limiter.limit(self.binding, str(key))


class Secrets(Mapping[str, str]):
    """The cluster's secrets (`portside secret put NAME`), read-only and live: a secret put
    or deleted shows at once. Its repr never shows a value, so a logged env leaks none."""

    __slots__ = ("_source",)

    def __init__(self, source: Mapping[str, str]) -> None:
        self._source = source

    def __getitem__(self, name: str) -> str:
        try:
            return self._source[name]
        except KeyError:
            raise KeyError(
                f"no secret {name!r}; set it with `portside secret put {name}`"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._source))

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"<Secrets {sorted(self._source)}>"


class Env:
    """What a handler's `env` holds: `env.<BINDING>` per class and per rate limiter, `env.vars`
    (`[gateway.vars]`) and `env.secrets` (a Mapping: `env.secrets["API_KEY"]`). Bindings are
    plain attributes, so `env.X` costs what any attribute does; Env has no other public
    names, so no binding can shadow one. One is built per config (`env_of_config`)."""

    vars: Mapping[str, str]
    secrets: Secrets

    def __init__(
        self,
        bindings: Iterable[ClassBinding | RateLimitBinding],
        variables: Mapping[str, str],
        secrets: Mapping[str, str],
    ) -> None:
        self.vars = MappingProxyType(dict(variables))
        self.secrets = Secrets(secrets)
        for binding in bindings:
            setattr(self, binding.binding, binding)

    def __getattr__(self, name: str) -> NoReturn:
        # Only for names that are not set: a binding of no class or rate limiter.
        if name.startswith("__"):
            raise AttributeError(name)
        known = ", ".join(binding_names(self)) or "none"
        raise AttributeError(f"env has no binding {name!r}; its bindings: {known}")

    def __repr__(self) -> str:
        return f"<Env {' '.join(binding_names(self))}>"


def binding_names(env: Env) -> list[str]:
    return sorted(k for k in vars(env) if k not in ("vars", "secrets"))


def env_of_config(
    config: Config,
    router: Router,
    lifecycle: Lifecycle,
    limiter: RateLimiter,
    secrets: Mapping[str, str],
) -> Env:
    """The env of a deployed config: its classes' bindings, its gateway's vars and rate
    limiters (config validation keeps their names unique)."""
    gateway = config.gateway
    bindings: list[ClassBinding | RateLimitBinding] = [
        ClassBinding(c, router, lifecycle) for c in config.classes
    ]
    if gateway is not None:
        bindings += [RateLimitBinding(r.binding, limiter) for r in gateway.rate_limits]
    return Env(bindings, gateway.vars if gateway is not None else {}, secrets)


__all__ = [
    "RANDOM_PREFIX",
    "ClassBinding",
    "ControlPlaneLifecycle",
    "Env",
    "InstanceStub",
    "Lifecycle",
    "RateLimitBinding",
    "RateLimiter",
    "Router",
    "Secrets",
    "binding_names",
    "env_of_config",
]

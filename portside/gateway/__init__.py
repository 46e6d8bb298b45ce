"""The gateway module's world (issue 14): Python code an edge runs in front of the containers
(`async def fetch(request, env)`) and a node runs behind them (outbound handlers). See
docs/gateway.md."""

from portside.gateway.env import (
    ClassBinding,
    ControlPlaneLifecycle,
    Env,
    InstanceStub,
    Lifecycle,
    RateLimitBinding,
    RateLimiter,
    Router,
    Secrets,
)
from portside.gateway.runtime import OUTBOUND, GatewayRuntime, OutboundContext
from portside.gateway.types import Request, Response

__all__ = [
    "OUTBOUND",
    "ClassBinding",
    "ControlPlaneLifecycle",
    "Env",
    "GatewayRuntime",
    "InstanceStub",
    "Lifecycle",
    "OutboundContext",
    "RateLimitBinding",
    "RateLimiter",
    "Request",
    "Response",
    "Router",
    "Secrets",
]

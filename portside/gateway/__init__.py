"""The gateway module's world (issue 14): Python code an edge runs in front of the containers
(`async def fetch(request, env)`) and a node runs behind them (outbound handlers). See
docs/gateway.md."""

from portside.gateway.types import Request, Response

__all__ = ["Request", "Response"]

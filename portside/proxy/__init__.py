"""The one HTTP/WebSocket proxy core of both hops (edge → node agent, agent → container): header
hygiene, the upstream transport, streaming relay, WebSocket bridge and Portside's error answers.

A daemon keeps only its decisions — where a request goes, what to do when that fails — around:

    forward = forward_request(request, ingress=True, add={CLASS: cls, INSTANCE: name})
    try:
        upstream = await core.open("127.0.0.2:8788", forward)
    except UpstreamRefused as exc:            # no connection: nothing was sent
        ...                                   # retry elsewhere if may_resend(forward, exc)
    return await core.deliver(request, upstream, on_break=note_it)

The transport underneath is an interface (`UpstreamTransport`); `AiohttpTransport` is the one
there is. Its failures arrive classified once, as portside.errors classes: UpstreamRefused (could
not connect), UpstreamReset (closed before a response), UpstreamTimeout (no response in time),
UpgradeRefused (a WebSocket upgrade answered without 101), UpstreamFailed (anything else).
"""

from portside.proxy._aiohttp import AiohttpTransport, classify_failure
from portside.proxy._core import ProxyCore, error_response, forwardable_close_code
from portside.proxy._headers import (
    HOP_BY_HOP,
    connection_tokens,
    is_websocket_upgrade,
    request_headers,
    response_headers,
)
from portside.proxy._transport import (
    IDEMPOTENT_METHODS,
    WS_CLOSE_TIMEOUT,
    WS_MAX_MESSAGE,
    Forward,
    MessageSocket,
    RequestBody,
    UpgradeRefused,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
    UpstreamTransport,
    forward_request,
    may_resend,
)

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "WS_CLOSE_TIMEOUT",
    "WS_MAX_MESSAGE",
    "AiohttpTransport",
    "Forward",
    "MessageSocket",
    "ProxyCore",
    "RequestBody",
    "UpgradeRefused",
    "Upstream",
    "UpstreamResponse",
    "UpstreamSocket",
    "UpstreamTransport",
    "classify_failure",
    "connection_tokens",
    "error_response",
    "forward_request",
    "forwardable_close_code",
    "is_websocket_upgrade",
    "may_resend",
    "request_headers",
    "response_headers",
]

"""The one HTTP/WebSocket proxy core of both hops (edge → node agent, agent → container): a lean
HTTP/1.1 server and upstream transport on asyncio protocols and the llhttp parser, header
hygiene, streaming relay with backpressure, WebSocket tunnels and Portside's error answers.

A daemon keeps only its decisions — where a request goes, what to do when that fails — around:

    server = HttpServer(handle, name="edge")          # handle(request) answers each request
    await server.listen(host, port, tls_context, reuse_port=True)

    async def handle(request):
        forward = forward_request(request, ingress=True, add={CLASS: cls, INSTANCE: name})
        try:
            upstream = await core.open("127.0.0.2:8788", forward)
        except UpstreamRefused as exc:        # no connection: nothing was sent
            ...                               # retry elsewhere if may_resend(forward, exc)
        await core.deliver(request, upstream, on_break=note_it)

The transport underneath is an interface (`UpstreamTransport`); `HttpTransport` is the one
there is. Its failures arrive classified once, as portside.errors classes: UpstreamRefused (could
not connect), UpstreamReset (closed before a response), UpstreamTimeout (no response in time),
UpgradeRefused (a WebSocket upgrade answered without 101), UpstreamFailed (anything else).
"""

from portside.proxy._client import HttpTransport
from portside.proxy._core import ProxyCore, answer_error
from portside.proxy._headers import (
    HOP_BY_HOP,
    connection_tokens,
    is_websocket_upgrade,
    offered_protocols,
    request_headers,
    response_fields,
    response_headers,
)
from portside.proxy._server import BodySink, ClientGone, HttpServer, Request, RequestBody
from portside.proxy._transport import (
    IDEMPOTENT_METHODS,
    WS_CLOSE_TIMEOUT,
    Forward,
    ForwardBody,
    UpgradeRefused,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
    UpstreamTransport,
    forward_request,
    may_resend,
)
from portside.proxy._wire import Framing

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "WS_CLOSE_TIMEOUT",
    "BodySink",
    "ClientGone",
    "Forward",
    "ForwardBody",
    "Framing",
    "HttpServer",
    "HttpTransport",
    "ProxyCore",
    "Request",
    "RequestBody",
    "UpgradeRefused",
    "Upstream",
    "UpstreamResponse",
    "UpstreamSocket",
    "UpstreamTransport",
    "answer_error",
    "connection_tokens",
    "forward_request",
    "is_websocket_upgrade",
    "may_resend",
    "offered_protocols",
    "request_headers",
    "response_fields",
    "response_headers",
]

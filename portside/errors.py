"""Portside's one exception tree, and the one table that says how each error crosses a boundary.

    PortsideError                                 kind                 HTTP  gRPC
     ├── InvalidArgument                          invalid-argument     400   INVALID_ARGUMENT
     │    ├── ConfigError                         invalid-config       400   INVALID_ARGUMENT
     │    ├── NoInstanceName                      no-instance-name     400   INVALID_ARGUMENT
     │    └── NotThroughEdge                      not-through-edge     400   INVALID_ARGUMENT
     ├── NotFound                                 not-found            404   NOT_FOUND
     │    └── NoRoute                             no-route             404   NOT_FOUND
     ├── AlreadyExists                            already-exists       409   ALREADY_EXISTS
     ├── FailedPrecondition                       failed-precondition  409   FAILED_PRECONDITION
     │    ├── ImageUnavailable                    image-unavailable    502   FAILED_PRECONDITION
     │    └── NotRunning                          not-running          409   FAILED_PRECONDITION
     ├── NoCapacity                               no-capacity          503   RESOURCE_EXHAUSTED
     ├── ContainerExited (.exit_code)             container-exited     502   ABORTED
     ├── BootTimeout                              boot-timeout         504   DEADLINE_EXCEEDED
     ├── UpstreamFailed                           upstream-failed      502   UNAVAILABLE
     │    ├── UpstreamRefused                     upstream-refused     502   UNAVAILABLE
     │    ├── UpstreamReset                       upstream-reset       502   UNAVAILABLE
     │    └── UpstreamTimeout                     upstream-timeout     504   DEADLINE_EXCEEDED
     ├── EngineError                              engine-error         502   INTERNAL
     ├── Unauthenticated                          unauthenticated      401   UNAUTHENTICATED
     ├── PermissionDenied                         permission-denied    403   PERMISSION_DENIED
     └── Unavailable                              unavailable          503   UNAVAILABLE
          ├── NodeUnreachable                     node-unreachable     502   UNAVAILABLE
          ├── NodeLost                            node-lost            502   UNAVAILABLE
          ├── NodeFenced                          node-fenced          503   UNAVAILABLE
          ├── EngineUnavailable                   engine-unavailable   503   UNAVAILABLE
          ├── Timeout                             timeout              504   DEADLINE_EXCEEDED
          └── StoreError                          store-unavailable    503   UNAVAILABLE

`kind` is what an HTTP client reads in the `Portside-Error` header and what a gRPC client reads
in the `portside-error` trailing metadata; with it the receiving side rebuilds the same class
(`from_rpc`), so an error keeps its class and fields across every hop (agent → control plane →
SDK). A failed call without that metadata did not come from a Portside handler: the transport
failed, and `from_rpc` says which part could not be reached.

Foreign exceptions (grpc, docker, aiohttp, sqlite, etcd) are translated where they are caught.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import grpc

# gRPC trailing metadata keys (lower case, as gRPC requires).
KIND_METADATA = "portside-error"
EXIT_CODE_METADATA = "portside-exit-code"


class PortsideError(Exception):
    """Base of every error Portside raises on purpose; str() is a one-line reason."""


class InvalidArgument(PortsideError):
    """A request names something malformed; the message names the field and what is allowed."""


class ConfigError(InvalidArgument):
    """Invalid configuration: names the file, the field, the value and what is allowed."""

    def __init__(self, file: str, field: str = "", problem: str = "") -> None:
        self.file, self.field, self.problem = file, field, problem
        if not problem:  # rebuilt from its one-line message on the far side of a call
            super().__init__(file)
        else:
            super().__init__(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")


class NoInstanceName(InvalidArgument):
    """A request for a named instance does not carry the name where its route looks."""


class NotThroughEdge(InvalidArgument):
    """A request reached a node agent's data port without the headers an edge sets."""


class NotFound(PortsideError):
    """Unknown class, instance, route or key."""


class NoRoute(NotFound):
    """No route matches the request's path."""


class AlreadyExists(PortsideError):
    """A request would create something under a name that is taken (a class's snapshot names)."""


class FailedPrecondition(PortsideError):
    """The target exists but its state does not allow the operation (exec into a stopped
    instance); the reason says which state it is in and what to do."""


class NotRunning(FailedPrecondition):
    """The instance does not run and the operation does not wake it (an exec without wake, a
    scheduled call with no_wake): nothing was done. A scheduled run reports it as skipped."""


class ImageUnavailable(FailedPrecondition):
    """The class's image cannot be run on the node: not there, or not a valid reference."""


class NoCapacity(PortsideError):
    """No live node can take the instance, the class is at max_instances, or the instance's node
    is full of awake instances."""


class ContainerExited(PortsideError):
    """The container exited before its port answered (or while answering); see `exit_code`."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        self.exit_code = exit_code
        super().__init__(message)


class BootTimeout(PortsideError):
    """The container runs, but its port did not answer within the class's boot_timeout."""


class UpstreamFailed(PortsideError):
    """The exchange with the container (or with the agent in front of it) failed."""


class UpstreamRefused(UpstreamFailed):
    """The container runs but refused the connection to its port."""


class UpstreamReset(UpstreamFailed):
    """The upstream closed the connection before it answered."""


class UpstreamTimeout(UpstreamFailed):
    """The upstream sent no answer within the proxy's deadline."""


class EngineError(PortsideError):
    """The container engine failed an operation for a reason of its own (Docker's message)."""


class Unauthenticated(PortsideError):
    """The call carries no credential, or one the cluster does not accept (wrong, expired,
    revoked); the reason says which and what to do, never the credential itself."""


class PermissionDenied(PortsideError):
    """The caller is known, but its role (or its token's classes) does not allow the call."""


class Unavailable(PortsideError):
    """A part Portside needs cannot be reached now; trying again later may work."""


class NodeUnreachable(Unavailable):
    """The node agent of the instance cannot be reached."""


class NodeLost(Unavailable):
    """The node's lease expired while a request was in flight there, and the request may have
    run, so it was not sent again (a non-idempotent method, or its body was already read)."""


class NodeFenced(Unavailable):
    """The node agent has lost contact with the control plane for longer than its fence
    window and serves no named instance until it has reconciled: the instance may already run
    on another node. The edge resolves it again."""


class EngineUnavailable(Unavailable):
    """The node's container engine (dockerd) cannot be reached."""


class Timeout(Unavailable):
    """A Portside part did not answer within the call's deadline."""


class StoreError(Unavailable):
    """The store (etcd or the embedded one) failed or did not answer; warm traffic still
    serves, placements wait until it is back."""


class GatewayError(PortsideError):
    """The gateway module's code raised, returned something that is not a Response, or could
    not be loaded; the traceback is in the edge's log, the client gets one line."""


class GatewayTimeout(GatewayError):
    """A gateway handler did not answer within the gateway's deadline."""


class OutboundDenied(PermissionDenied):
    """A container's outbound request went to a host its outbound policy denies."""


@dataclass(frozen=True)
class ErrorKind:
    """How one class of error appears on the wire."""

    name: str  # Portside-Error header and portside-error metadata
    http_status: int
    grpc_code: grpc.StatusCode


_C = grpc.StatusCode

# The one table. A class not listed takes its nearest listed base's row.
ERROR_KINDS: Mapping[type[PortsideError], ErrorKind] = MappingProxyType(
    {
        PortsideError: ErrorKind("internal", 500, _C.INTERNAL),
        InvalidArgument: ErrorKind("invalid-argument", 400, _C.INVALID_ARGUMENT),
        ConfigError: ErrorKind("invalid-config", 400, _C.INVALID_ARGUMENT),
        NoInstanceName: ErrorKind("no-instance-name", 400, _C.INVALID_ARGUMENT),
        NotThroughEdge: ErrorKind("not-through-edge", 400, _C.INVALID_ARGUMENT),
        NotFound: ErrorKind("not-found", 404, _C.NOT_FOUND),
        NoRoute: ErrorKind("no-route", 404, _C.NOT_FOUND),
        AlreadyExists: ErrorKind("already-exists", 409, _C.ALREADY_EXISTS),
        FailedPrecondition: ErrorKind("failed-precondition", 409, _C.FAILED_PRECONDITION),
        ImageUnavailable: ErrorKind("image-unavailable", 502, _C.FAILED_PRECONDITION),
        NotRunning: ErrorKind("not-running", 409, _C.FAILED_PRECONDITION),
        NoCapacity: ErrorKind("no-capacity", 503, _C.RESOURCE_EXHAUSTED),
        ContainerExited: ErrorKind("container-exited", 502, _C.ABORTED),
        BootTimeout: ErrorKind("boot-timeout", 504, _C.DEADLINE_EXCEEDED),
        UpstreamFailed: ErrorKind("upstream-failed", 502, _C.UNAVAILABLE),
        UpstreamRefused: ErrorKind("upstream-refused", 502, _C.UNAVAILABLE),
        UpstreamReset: ErrorKind("upstream-reset", 502, _C.UNAVAILABLE),
        UpstreamTimeout: ErrorKind("upstream-timeout", 504, _C.DEADLINE_EXCEEDED),
        EngineError: ErrorKind("engine-error", 502, _C.INTERNAL),
        Unauthenticated: ErrorKind("unauthenticated", 401, _C.UNAUTHENTICATED),
        PermissionDenied: ErrorKind("permission-denied", 403, _C.PERMISSION_DENIED),
        Unavailable: ErrorKind("unavailable", 503, _C.UNAVAILABLE),
        NodeUnreachable: ErrorKind("node-unreachable", 502, _C.UNAVAILABLE),
        NodeLost: ErrorKind("node-lost", 502, _C.UNAVAILABLE),
        NodeFenced: ErrorKind("node-fenced", 503, _C.UNAVAILABLE),
        EngineUnavailable: ErrorKind("engine-unavailable", 503, _C.UNAVAILABLE),
        Timeout: ErrorKind("timeout", 504, _C.DEADLINE_EXCEEDED),
        StoreError: ErrorKind("store-unavailable", 503, _C.UNAVAILABLE),
        GatewayError: ErrorKind("gateway-error", 500, _C.INTERNAL),
        GatewayTimeout: ErrorKind("gateway-timeout", 504, _C.DEADLINE_EXCEEDED),
        OutboundDenied: ErrorKind("outbound-denied", 403, _C.PERMISSION_DENIED),
    }
)

_BY_NAME: Mapping[str, type[PortsideError]] = MappingProxyType(
    {kind.name: cls for cls, kind in ERROR_KINDS.items()}
)

# A failed call that carries no kind (the transport failed, or a server that is not Portside's
# answered): the nearest class by its code. DEADLINE_EXCEEDED and UNAVAILABLE are the caller's
# own deadline and a connection that failed, never a container's boot timeout.
_BY_CODE: Mapping[grpc.StatusCode, type[PortsideError]] = MappingProxyType(
    {
        _C.INVALID_ARGUMENT: InvalidArgument,
        _C.NOT_FOUND: NotFound,
        _C.ALREADY_EXISTS: AlreadyExists,
        _C.FAILED_PRECONDITION: FailedPrecondition,
        _C.RESOURCE_EXHAUSTED: NoCapacity,
        _C.UNAVAILABLE: Unavailable,
        _C.DEADLINE_EXCEEDED: Timeout,
        _C.UNAUTHENTICATED: Unauthenticated,
        _C.PERMISSION_DENIED: PermissionDenied,
    }
)


def error_kind(exc: PortsideError) -> ErrorKind:
    """The table's row for `exc`: its own class's, else its nearest base's."""
    for cls in type(exc).__mro__:
        kind = ERROR_KINDS.get(cls)
        if kind is not None:
            return kind
    return ERROR_KINDS[PortsideError]


def error_class(kind: str) -> type[PortsideError] | None:
    """The class whose kind is `kind` ("no-capacity" → NoCapacity); None if unknown."""
    return _BY_NAME.get(kind)


def rpc_metadata(exc: PortsideError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a gRPC handler sends with `exc`'s status."""
    pairs = [(KIND_METADATA, error_kind(exc).name)]
    if isinstance(exc, ContainerExited) and exc.exit_code is not None:
        pairs.append((EXIT_CODE_METADATA, str(exc.exit_code)))
    return tuple(pairs)


def from_rpc(
    exc: grpc.aio.AioRpcError,
    unreachable: str = "",
    unreachable_class: type[Unavailable] = Unavailable,
) -> PortsideError:
    """Translate a failed call into Portside's tree. A Portside handler's error comes back as
    the same class with the same reason; a call that failed in transport becomes
    `unreachable_class` (or Timeout) naming `unreachable` (e.g. "control plane 127.0.0.1:7070")."""
    code = exc.code()
    detail = one_line(exc.details() or code.name, most=0)
    metadata = _metadata(exc.trailing_metadata())
    cls = error_class(metadata.get(KIND_METADATA, ""))
    if cls is ContainerExited:
        text = metadata.get(EXIT_CODE_METADATA, "")
        return ContainerExited(detail, int(text) if text.lstrip("-").isdigit() else None)
    if cls is ConfigError:
        return ConfigError(detail)
    if cls is not None:
        return cls(detail)
    fallback = _BY_CODE.get(code, PortsideError)
    if unreachable and code == _C.UNAVAILABLE:
        return unreachable_class(f"{unreachable} is unreachable: {detail}")
    if unreachable and code == _C.DEADLINE_EXCEEDED:
        return Timeout(f"{unreachable} did not answer in time: {detail}")
    return fallback(detail)


def one_line(text: str, most: int = 200) -> str:
    """An error's first line, shortened to `most` characters (0: not shortened): event reasons
    and gRPC details are one line."""
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line if not most or len(line) <= most else line[: most - 1] + "…"


def _metadata(pairs: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    out = {}
    for key, value in pairs or ():
        out[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return out


__all__ = [
    "ERROR_KINDS",
    "EXIT_CODE_METADATA",
    "KIND_METADATA",
    "AlreadyExists",
    "BootTimeout",
    "ConfigError",
    "ContainerExited",
    "EngineError",
    "EngineUnavailable",
    "ErrorKind",
    "FailedPrecondition",
    "GatewayError",
    "GatewayTimeout",
    "ImageUnavailable",
    "InvalidArgument",
    "NoCapacity",
    "NoInstanceName",
    "NoRoute",
    "NodeFenced",
    "NodeLost",
    "NodeUnreachable",
    "NotFound",
    "NotRunning",
    "NotThroughEdge",
    "OutboundDenied",
    "PermissionDenied",
    "PortsideError",
    "StoreError",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "UpstreamRefused",
    "UpstreamReset",
    "UpstreamTimeout",
    "error_class",
    "error_kind",
    "from_rpc",
    "one_line",
    "rpc_metadata",
]

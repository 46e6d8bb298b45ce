"""Portside's one exception tree, and its mapping to gRPC codes and HTTP statuses.

    PortsideError
     ├── ConfigError          bad config file or deploy request   INVALID_ARGUMENT / 400
     ├── InvalidArgument      a request names something malformed  INVALID_ARGUMENT / 400
     ├── NotFound             unknown class, route or instance     NOT_FOUND / 404
     ├── FailedPrecondition   not in a state that allows it        FAILED_PRECONDITION / 409
     ├── NoCapacity           no node can take the instance        RESOURCE_EXHAUSTED / 503
     ├── ContainerExited      the container stopped while booting  ABORTED / 502
     ├── BootTimeout          the port never answered in time      DEADLINE_EXCEEDED / 504
     ├── Unavailable          a Portside service cannot be reached UNAVAILABLE / 503
     └── StoreError           the store failed an operation        INTERNAL / 500

Foreign exceptions (grpc, docker, aiohttp, sqlite) are translated where they are caught.
"""

from __future__ import annotations

import grpc


class PortsideError(Exception):
    """Base of every error Portside raises on purpose; str() is a one-line reason."""


class ConfigError(PortsideError):
    """Invalid configuration: names the file, the field, the value and what is allowed."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file, self.field, self.problem = file, field, problem
        super().__init__(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")


class InvalidArgument(PortsideError):
    pass


class NotFound(PortsideError):
    pass


class FailedPrecondition(PortsideError):
    """The target exists but its state does not allow the operation (exec into a stopped
    instance); the reason says which state it is in and what to do."""


class NoCapacity(PortsideError):
    pass


class ContainerExited(PortsideError):
    def __init__(self, message: str, exit_code: int | None = None) -> None:
        self.exit_code = exit_code
        super().__init__(message)


class BootTimeout(PortsideError):
    pass


class Unavailable(PortsideError):
    pass


class StoreError(PortsideError):
    pass


GRPC_CODE: dict[type[PortsideError], grpc.StatusCode] = {
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NoCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ContainerExited: grpc.StatusCode.ABORTED,
    BootTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    StoreError: grpc.StatusCode.INTERNAL,
}

HTTP_STATUS: dict[type[PortsideError], int] = {
    ConfigError: 400,
    InvalidArgument: 400,
    NotFound: 404,
    FailedPrecondition: 409,
    NoCapacity: 503,
    ContainerExited: 502,
    BootTimeout: 504,
    Unavailable: 503,
    StoreError: 500,
}

_FROM_GRPC: dict[grpc.StatusCode, type[PortsideError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacity,
    grpc.StatusCode.ABORTED: ContainerExited,
    grpc.StatusCode.DEADLINE_EXCEEDED: BootTimeout,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def grpc_code(exc: PortsideError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_CODE:
            return GRPC_CODE[cls]
    return grpc.StatusCode.INTERNAL


def http_status(exc: PortsideError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def from_grpc(exc: grpc.aio.AioRpcError, what: str = "") -> PortsideError:
    """Translate a failed RPC into Portside's tree, keeping the server's one-line reason."""
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and what:
        detail = f"{what} is unreachable: {detail}"
    return _FROM_GRPC.get(code, PortsideError)(detail)

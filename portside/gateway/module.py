"""Loading a deployed gateway module: its source run as a fresh module, its top-level
`async def` functions kept by name (`fetch`, `outbound`, named outbound handlers).

Each deploy's module is its own Python module (`portside_gateway_<digest>`), so requests still
running on the old one keep their globals while new ones use the new; tracebacks name the file
and its digest ("gateway.py@1a2b3c4d") and show its lines.
"""

from __future__ import annotations

import inspect
import linecache
import sys
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from portside.spec import Gateway

Handler = Callable[..., Awaitable[Any]]

#: What the module's code may raise that must stay with the request it ran for: every error,
#: and the two that asyncio would otherwise carry out of the event loop, ending the process.
CODE_FAILURES: Final = (Exception, SystemExit, KeyboardInterrupt)


@dataclass(frozen=True, eq=False)
class GatewayModule:
    """A loaded gateway module: its coroutine functions by name."""

    digest: str
    filename: str  # what its tracebacks name
    handlers: Mapping[str, Handler]
    module: types.ModuleType

    def unload(self) -> None:
        """Forget it in sys.modules and linecache (handlers running on it keep working: their
        globals stay referenced by them)."""
        if sys.modules.get(self.module.__name__) is self.module:
            del sys.modules[self.module.__name__]
        linecache.cache.pop(self.filename, None)


def load_module(gateway: Gateway) -> GatewayModule:
    """Run `gateway.source` as a new module. Raises what its code raises (SyntaxError, an
    ImportError of a package the edge lacks, any error at its top level)."""
    short = gateway.digest.removeprefix("sha256:")[:8]
    filename = f"{gateway.module}@{short}"
    name = f"portside_gateway_{short}"
    # Tracebacks read lines through linecache; no mtime: it is never checked against a file.
    lines = gateway.source.splitlines(keepends=True)
    linecache.cache[filename] = (len(gateway.source), None, lines, filename)
    module = types.ModuleType(name, f"gateway module {gateway.module}")
    module.__file__ = filename
    # Registered while it runs: dataclasses and typing look their module up in sys.modules.
    sys.modules[name] = module
    try:
        code = compile(gateway.source, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - running the user's deployed module is the point
    except BaseException:
        del sys.modules[name]
        linecache.cache.pop(filename, None)
        raise
    handlers = {
        key: value for key, value in module.__dict__.items() if inspect.iscoroutinefunction(value)
    }
    return GatewayModule(gateway.digest, filename, handlers, module)


__all__ = ["CODE_FAILURES", "GatewayModule", "Handler", "load_module"]

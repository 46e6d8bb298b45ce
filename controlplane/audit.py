"""The audit log: one JSON line per mutating API call, allowed or refused, on the logger
`portside.audit` (the control plane's log), counted in `portside_controlplane_audit_total`.

A line says when, who (a token's name, or a certificate's role/id), from where, which method, what
it named (class and instance, a token's name, a joining node) and the result (OK, or the gRPC
status code's name). It never holds a secret: tokens appear by name or id only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.metrics import AUDITED

log = logging.getLogger("portside.audit")


@dataclass(frozen=True)
class Target:
    """What a call names: a class (and instance), a token, or a node. An empty class: the call
    reaches the whole cluster."""

    class_name: str = ""
    name: str = ""
    token: str = ""  # a token's name or id
    role: str = ""  # the role of a token being created
    node: str = ""  # role/id of a joining node
    secret: str = ""  # a gateway secret's name (never its value)


@dataclass
class Audit:
    logger: logging.Logger = field(default=log)
    clock: Callable[[], float] = time.time

    def record(self, method: str, who: str, peer: str, target: Target, result: str) -> None:
        line: dict[str, Any] = {"time": round(self.clock(), 3), "who": who, "method": method}
        if peer:
            line["peer"] = peer
        for key, value in (
            ("class", target.class_name),
            ("instance", target.name),
            ("token", target.token),
            ("role", target.role),
            ("node", target.node),
            ("secret", target.secret),
        ):
            if value:
                line[key] = value
        line["result"] = result
        self.logger.info("%s", json.dumps(line, separators=(",", ":")))
        AUDITED.labels(method, result).inc()

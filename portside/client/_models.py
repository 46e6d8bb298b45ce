"""The SDK's own value types (exec and log output, deploy results, edge responses); the ones
every part shares (InstanceInfo, Event, Usage, NodeInfo, ContainerClass) come from `portside`'s
shared modules, and `portside.convert` builds all of them from the API's messages.
"""

from __future__ import annotations

import json as _json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from portside import headers
from portside.spec import ContainerClass, OutboundPolicy


@dataclass(frozen=True)
class ExecResult:
    """A finished command: its exit code and everything it wrote."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class ExecChunk:
    """A piece of a running command's output (`stream` "stdout" or "stderr", with `data`), or
    its end (`stream` "exit", with `exit_code`): the last chunk `exec_stream` yields."""

    stream: Literal["stdout", "stderr", "exit"]
    data: bytes = b""
    exit_code: int | None = None


@dataclass(frozen=True)
class LogChunk:
    """A piece of a container's output: `stream` is "stdout" or "stderr"."""

    stream: Literal["stdout", "stderr"]
    data: bytes


#: How `deploy` moves running instances to a class's new version, and how `rollback` does.
DEPLOY_ROLLOUTS = ("gradual", "immediate", "none")
ROLLBACK_ROLLOUTS = ("immediate", "gradual")
#: The states of a rollout in progress; the others (done, aborted, rolled_back) are ends.
ROLLOUT_ACTIVE_STATES = frozenset({"rolling", "waiting", "paused"})


@dataclass(frozen=True)
class Rollout:
    """A class's rollout to `to_version` (`portside rollout status CLASS`): its steps (percentages
    of the class's instances on `to_version`, ascending to 100), the step in progress and its
    state (rolling, waiting, paused, done, aborted, rolled_back), with `reason` saying why it
    waits, paused, aborted or rolled back, and how many instances it counts, updated and healthy."""

    class_name: str
    to_version: int
    from_versions: tuple[int, ...] = ()
    mode: str = "gradual"  # gradual, immediate, rollback
    steps: tuple[int, ...] = (100,)
    step: int = 0
    state: str = "rolling"
    reason: str = ""
    started_at: float = 0.0  # unix seconds
    step_started_at: float = 0.0
    instances: int = 0
    updated: int = 0
    healthy: int = 0

    @property
    def active(self) -> bool:
        """In progress (rolling, waiting or paused), not ended."""
        return self.state in ROLLOUT_ACTIVE_STATES

    @property
    def percentage(self) -> int:
        """The share of instances the step in progress wants on `to_version`."""
        if not self.steps:
            return 100
        return self.steps[min(max(self.step, 0), len(self.steps) - 1)]


@dataclass(frozen=True)
class DeployResult:
    """What `deploy` registered, and the rollouts it started (one per class whose new version
    replaces running instances)."""

    classes: int
    routes: int
    rollouts: tuple[Rollout, ...] = ()


@dataclass(frozen=True)
class ImageInfo:
    """An image the cluster knows (`portside images`): its digest (the image id) and readable
    reference, its size, the classes whose current config uses it, the control-plane replicas
    whose image store holds it and the nodes whose engine has it."""

    digest: str
    reference: str
    size_bytes: int
    classes: tuple[str, ...] = ()
    replicas: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    pushed_at: float = 0.0  # unix seconds; 0: not pushed (a registry reference)


@dataclass(frozen=True)
class Schedule:
    """A per-instance schedule (`portside schedule list`): an HTTP request to `path` (with
    `method`) on the class's default_port, or `command` run in the container, once at `at` or
    every `every_s` seconds, and how its runs went. `next_run` 0: done (a one-off that ran);
    `last_result` is "200" ("503 <the body's first line>" for a status of 400 or more),
    "exit 0", "skipped: sleeping", "skipped: deleted", "failed: <reason>" or "lost: <reason>".
    A run wakes a sleeping instance unless `no_wake`, and counts as activity for sleep_after
    unless `no_activity`."""

    id: str
    class_name: str
    name: str  # the instance's
    at: float = 0.0  # unix seconds; 0: a repeating schedule
    every_s: float = 0.0  # 0: a one-off at `at`
    path: str = ""
    method: str = ""  # with path; "" is GET
    command: tuple[str, ...] = ()
    no_wake: bool = False
    no_activity: bool = False
    created_at: float = 0.0  # unix seconds
    next_run: float = 0.0
    last_run: float = 0.0  # 0: never ran
    last_result: str = ""
    runs: int = 0

    @property
    def done(self) -> bool:
        """A one-off that ran: it stays listed until deleted."""
        return self.next_run == 0

    @property
    def action(self) -> str:
        """What a run does, for a listing: "GET /_health" or "exec touch /tmp/x"."""
        if self.path:
            return f"{self.method or 'GET'} {self.path}"
        return "exec " + " ".join(self.command)


@dataclass(frozen=True)
class Outbound:
    """What an instance may reach outside its node (docs/security.md): `policy` is its own (set
    with `Container.set_outbound`) when `own`, else its class's."""

    policy: OutboundPolicy
    own: bool


@dataclass(frozen=True)
class SecretInfo:
    """A gateway secret as a listing shows it (`portside secret list`), never its value:
    `digest` tells its versions apart (keyed with the cluster's secrets key, so it helps no one
    guess the value)."""

    name: str
    updated_at: float  # unix seconds
    digest: str


@dataclass(frozen=True)
class ClassVersion:
    """One version of a class (`portside versions CLASS`): the spec it was deployed with, when,
    which fields changed from the version before ("new" for the first), and how many instances'
    containers run it now, as their nodes last reported."""

    number: int
    spec: ContainerClass
    created_at: float
    changes: tuple[str, ...]
    instances: int = 0
    current: bool = False


@dataclass(frozen=True)
class Response:
    """An HTTP response from an edge, read in full.

    `error` is the edge's `Portside-Error` reason (e.g. "no-capacity") when Portside, not the
    container, answered.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def error(self) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == headers.ERROR.lower():
                return value
        return None

    def json(self) -> Any:
        return _json.loads(self.body)

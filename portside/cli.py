"""The `portside` command: the daemons (controlplane, agent, edge, up) and the client verbs.

Client verbs take --controlplane, defaulting to $PORTSIDE_CONTROLPLANE or 127.0.0.1:7070.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from portside import geo, terminal
from portside.client._models import DEPLOY_ROLLOUTS, ROLLBACK_ROLLOUTS
from portside.errors import (
    InvalidArgument,
    PermissionDenied,
    PortsideError,
    Unauthenticated,
    Unavailable,
)
from portside.states import InstanceState
from portside.usage import PRICE_DISK_GB_SECOND, PRICE_GIB_SECOND, PRICE_VCPU_SECOND

if TYPE_CHECKING:
    from controlplane.store import StoreTls
    from nodeagent.doctor import Check
    from portside.client import DeployResult, Portside, Rollout, Snapshot
    from portside.events import Event
    from portside.instances import InstanceInfo
    from portside.tokens import Token

DEFAULT_CONTROLPLANE = "127.0.0.1:7070"


def _controlplane_default() -> str:
    return os.environ.get("PORTSIDE_CONTROLPLANE", DEFAULT_CONTROLPLANE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portside", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("PORTSIDE_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("controlplane", help="run a control plane replica")
    p.add_argument("--listen", default="127.0.0.1:7070", help="gRPC HOST:PORT")
    p.add_argument(
        "--store",
        required=True,
        help="etcd://HOST:PORT[,HOST:PORT...], etcd+https://... or sqlite:///PATH",
    )
    _store_tls_flags(p)
    p.add_argument("--metrics-listen", help="HOST:PORT for /metrics (default: --listen port + 1)")
    p.add_argument("--region", default="fra", help="hint for resolves that carry none")
    p.add_argument(
        "--node-ttl", type=int, default=10, help="seconds a node lives without a heartbeat"
    )
    p.add_argument("--replica-id", default="", help="this replica's name (default: HOSTNAME-PORT)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="development only: plaintext gRPC, no certificates, no tokens checked (on a store "
        "never bootstrapped; logs a warning at every start)",
    )
    p.add_argument(
        "--cert-lifetime",
        default="24h",
        metavar="DURATION",
        help="lifetime of the certificates this replica issues, its own included (default 24h)",
    )
    p.add_argument(
        "--secrets-key-file",
        default="",
        metavar="PATH",
        help="the cluster's key for gateway secrets, the same file on every replica (`portside "
        "bootstrap` wrote secrets.key); without it, secrets can be listed and deleted but not "
        "set or served",
    )
    p.add_argument(
        "--image-dir",
        default="",
        metavar="DIR",
        help="where this replica's image store keeps the images `portside deploy` pushes, by "
        "digest (default: beside a sqlite:// store's file, else "
        "$XDG_DATA_HOME/portside/images)",
    )
    p.add_argument(
        "--image-gc-every",
        default="10m",
        metavar="DURATION",
        help="how often the leader garbage-collects images no class needs (default 10m)",
    )
    p.add_argument(
        "--image-gc-grace",
        default="1h",
        metavar="DURATION",
        help="garbage collection keeps any image pushed this recently, whatever uses it: a "
        "deploy pushes its images before it registers the classes that use them (default 1h)",
    )
    p.add_argument(
        "--image-keep-versions",
        type=int,
        default=3,
        metavar="N",
        help="garbage collection keeps each class's last N images, its current one among them "
        "(default 3)",
    )
    _metrics_token_flag(p)

    p = sub.add_parser("agent", help="run a node agent")
    p.add_argument("--controlplane", default=_controlplane_default())
    p.add_argument("--listen", required=True, help="HOST:PORT of the HTTP data plane")
    p.add_argument("--api-listen", help="gRPC HOST:PORT (default: --listen port + 1)")
    p.add_argument(
        "--metrics-listen", help="HOST:PORT for /metrics and /healthz (default: --listen port + 2)"
    )
    _join_token_flag(p)
    p.add_argument("--region", required=True, help="region code of this host, e.g. fra")
    p.add_argument("--node-id", help="default: HOSTNAME-PORT")
    p.add_argument("--vcpu", type=float, help="capacity offered (default: all cores)")
    p.add_argument("--memory-mib", type=int, help="capacity offered (default: all memory)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--stop-on-exit",
        action="store_true",
        help="on shutdown, stop this node's containers (kept with their writable layers; the "
        "next agent adopts them and wakes each on its next request) instead of leaving them "
        "running",
    )
    p.add_argument(
        "--drain-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, new connections are refused at once and requests in flight get this "
        "long to finish; WebSockets still open then are closed 1001 going away (default 10)",
    )
    p.add_argument(
        "--allow-host-access",
        action="store_true",
        help="development only: install no packet-filter rules, so containers can reach every "
        "service on this host (the agent's ports included)",
    )
    p.add_argument(
        "--registry-auth",
        metavar="FILE",
        help="credentials for pulling classes' registry images: a JSON or TOML file of registry "
        "host -> {username, password} or {identitytoken} (never logged); default: pull without "
        "credentials",
    )

    p = sub.add_parser("doctor", help="check that this host is ready to be a Portside node")
    p.add_argument("--json", action="store_true", help="JSON for scripts instead of lines")
    p.add_argument(
        "--listen",
        default="0.0.0.0:7080",
        help="the agent's --listen, whose ports (and + 1, + 2) must be free (default "
        "0.0.0.0:7080: free on every address)",
    )
    p.add_argument("--api-listen", help="the agent's --api-listen (default: --listen port + 1)")
    p.add_argument(
        "--metrics-listen", help="the agent's --metrics-listen (default: --listen port + 2)"
    )
    p.add_argument(
        "--controlplane",
        default=_controlplane_default(),
        help="the agent's --controlplane: the clock is compared with the first one's",
    )
    p.add_argument(
        "--controlplane-metrics",
        metavar="HOST:PORT",
        help="that control plane's --metrics-listen (default: its port + 1), whose HTTP Date "
        "header gives its clock",
    )
    _metrics_token_flag(p)

    p = sub.add_parser("edge", help="run an edge proxy")
    p.add_argument("--controlplane", default=_controlplane_default())
    p.add_argument("--listen", default="127.0.0.1:8787", help="HTTP HOST:PORT")
    p.add_argument("--metrics-listen", help="HOST:PORT for /metrics (default: --listen port + 1)")
    p.add_argument("--region", required=True, help="region code of this edge, e.g. fra")
    _join_token_flag(p)
    p.add_argument("--tls-cert", metavar="PATH", help="serve HTTPS: certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="PATH", help="serve HTTPS: private key of --tls-cert")
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="for a connection to a node agent (default: 5)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="edge processes sharing --listen (SO_REUSEPORT), one per core to use; worker i "
        "serves /metrics on the --metrics-listen port + i (default: 1)",
    )
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--first-byte-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="from a request sent to a node agent until its answer begins (504 after it; a"
        " response that has begun streams for as long as its bytes flow; default: 100)",
    )
    _metrics_token_flag(p)

    p = sub.add_parser("up", help="run a whole Portside on this machine from ./portside.toml")
    p.add_argument("--config", default="portside.toml")
    p.add_argument("--listen", default="127.0.0.1:8787", help="the edge's HTTP HOST:PORT")
    p.add_argument("--controlplane-listen", default="127.0.0.1:7070")
    p.add_argument("--agent-listen", default="127.0.0.1:7080")
    p.add_argument("--region", default="fra")
    p.add_argument("--data-dir", default=".portside", help="where the embedded store lives")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="edge processes sharing --listen, one per core to use (default: 1)",
    )

    p = sub.add_parser(
        "bootstrap", help="once per cluster: create its CA in the store, an admin and a join token"
    )
    p.add_argument(
        "--store", required=True, help="etcd://HOST:PORT[,...], etcd+https://... or sqlite:///PATH"
    )
    _store_tls_flags(p)
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where admin.token and join.token go (0600)"
    )

    p = sub.add_parser(
        "deploy",
        help="build the config file's Dockerfile images, push the ones the cluster lacks, and "
        "register its classes and routes",
    )
    p.add_argument("file")
    p.add_argument("--controlplane", default=_controlplane_default())
    p.add_argument(
        "--rollout",
        choices=DEPLOY_ROLLOUTS,
        default="gradual",
        help="how running instances of a class whose version changes move to it: gradual (in "
        "the class's rollout_step_percentage steps; the default), immediate (all at once), "
        "none (they stay on their version; new containers get the new one)",
    )
    _token_flag(p)

    _client_parser(sub, "nodes", "list nodes")
    _client_parser(sub, "images", "list the cluster's images: size, classes, where they are")
    p = _client_parser(
        sub, "versions", "list a class's versions: what changed, when, how many instances run each"
    )
    p.add_argument("class_name", metavar="CLASS")

    p = sub.add_parser("rollout", help="a class's rollout to its new version: status and control")
    actions = p.add_subparsers(dest="rollout_action", required=True, metavar="ACTION")
    p = _client_parser(actions, "status", "the class's latest rollout: progress, step and state")
    p.add_argument("class_name", metavar="CLASS")
    p.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="follow it until it ends (exit 0 when done, 1 when aborted or rolled back)",
    )
    for action, help in (
        ("pause", "hold the class's rollout where it is"),
        ("resume", "go on with the class's paused rollout"),
        ("abort", "end the class's rollout; instances stay on the version they run"),
    ):
        _client_parser(actions, action, help).add_argument("class_name", metavar="CLASS")
    p = _client_parser(
        sub, "rollback", "make an earlier version current again and roll the instances to it"
    )
    p.add_argument("class_name", metavar="CLASS")
    p.add_argument(
        "version",
        metavar="VERSION",
        nargs="?",
        type=_version_number,
        default=0,
        help="the version to go back to (default: the one before the current one)",
    )
    p.add_argument(
        "--rollout",
        choices=ROLLBACK_ROLLOUTS,
        default="immediate",
        help="immediate (all at once; the default) or gradual (in the class's steps)",
    )

    p = sub.add_parser("regions", help="list the region codes and areas Portside knows")
    p.add_argument("--json", action="store_true")

    _add_client_verbs(sub)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Like build_parser().parse_args, but the command of `exec` (and `schedule add`) is
    everything after its `--`, so its own options (`-- sh -c 'ls -l'`) never reach argparse."""
    words = list(argv)
    command: list[str] | None = None
    verb = 0
    while verb < len(words) and words[verb].startswith("-"):  # the global options
        verb += 1 if "=" in words[verb] or words[verb] in ("-h", "--help") else 2
    if words[verb : verb + 1] in (["exec"], ["schedule"]) and "--" in words[verb:]:
        cut = words.index("--", verb)
        words, command = words[:cut], words[cut + 1 :]
    args = build_parser().parse_args(words)
    if command is not None and args.command in ("exec", "schedule"):
        args.argv = command
    return args


def _metrics_token_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-token-file",
        metavar="PATH",
        help="require `Authorization: Bearer <this file's content>` on /metrics (and the "
        "control plane's /prometheus/targets); default: open",
    )


def _store_tls_flags(p: argparse.ArgumentParser) -> None:
    """The PEM files of an etcd+https:// store (docs/security.md, "The store")."""
    p.add_argument("--store-ca", default="", metavar="PATH", help="CA that signed etcd's cert")
    p.add_argument("--store-cert", default="", metavar="PATH", help="client cert for etcd")
    p.add_argument("--store-key", default="", metavar="PATH", help="private key of --store-cert")


def _store_tls(args: argparse.Namespace) -> StoreTls:
    from controlplane.store import StoreTls

    return StoreTls(ca=args.store_ca, cert=args.store_cert, key=args.store_key)


def _join_token_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--join-token-file",
        metavar="PATH",
        help="join the cluster with this token (`portside bootstrap` wrote join.token); default "
        "$PORTSIDE_JOIN_TOKEN (the token itself); without either: plaintext, for a control "
        "plane run with --insecure",
    )


def _token_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="API token to call with (default: $PORTSIDE_TOKEN, else ./.portside/admin.token)",
    )


def _client_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--controlplane", default=_controlplane_default(), help="HOST:PORT[,...]")
    _token_flag(p)
    p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    return p


def _instance_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    p = _client_parser(sub, name, help)
    p.add_argument("class_name", metavar="CLASS")
    p.add_argument("name", metavar="NAME")
    return p


def _add_client_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The verbs on instances and the cluster, all through the SDK (portside.client)."""
    p = _client_parser(sub, "ps", "list placed instances")
    p.add_argument("--class", dest="class_name", help="only this class")
    p.add_argument("--node", help="only on this node")
    p.add_argument("--state", choices=[s.value for s in InstanceState], help="only in this state")

    _client_parser(sub, "classes", "list deployed classes")

    p = _instance_parser(sub, "start", "start an instance (and wait until its port answers)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--entrypoint",
        help="command replacing the class's, split like a shell does ('/bin/sh -c \"exit 3\"')"
        " or a JSON array",
    )
    p.add_argument("--hint", help="location hint: a region code (fra) or an area (weur)")
    p.add_argument("--no-wait", action="store_true", help="return once the container started")
    p.add_argument(
        "--snapshot",
        metavar="S",
        help="make its container again from this snapshot of the class (id or name; another "
        "instance's too); stop it first if it runs",
    )

    p = _instance_parser(sub, "stop", "stop an instance: SIGNAL, then SIGKILL after --grace")
    p.add_argument("--signal", default="TERM", help="name (TERM, SIGINT) or number (default TERM)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL (10)")

    p = _instance_parser(sub, "signal", "send a signal to an instance's main process")
    p.add_argument("signal", metavar="SIGNAL", help="name (HUP, SIGUSR1) or number (1)")

    _instance_parser(sub, "destroy", "remove an instance's container and writable layer")

    p = sub.add_parser("snapshot", help="snapshots of instances' filesystems: create, list, delete")
    actions = p.add_subparsers(dest="snapshot_action", required=True, metavar="ACTION")
    p = _instance_parser(actions, "create", "snapshot an instance's filesystem now")
    p.add_argument(
        "--name", dest="snapshot_name", default="", help="a name to find it by (default: its id)"
    )
    p = _client_parser(actions, "list", "list snapshots (of a class, or of one instance)")
    p.add_argument("class_name", metavar="CLASS", nargs="?", default="")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    p = _client_parser(actions, "delete", "forget a snapshot; its layer is freed at the next GC")
    p.add_argument("class_name", metavar="CLASS")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="its id or name")

    p = _instance_parser(sub, "exec", "run a command in an instance: exec CLASS NAME -- CMD...")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", help="working directory of the command")
    p.add_argument("--user", "-u", help="user[:group] or uid[:gid] (default: the image's user)")
    p.add_argument(
        "--interactive",
        "-i",
        action="store_true",
        help="stream stdin even from a terminal (without -t, piped stdin is streamed anyway)",
    )
    p.add_argument(
        "--tty",
        "-t",
        action="store_true",
        help="a pseudo-terminal for the command; with -i this terminal drives it (raw mode)",
    )
    p.add_argument(
        "--wake",
        action="store_true",
        help="boot the instance first if it does not run, and keep it awake meanwhile",
    )
    p.add_argument(
        "--activity",
        action="store_true",
        help="count the session as activity for sleep_after (its timer restarts at the end)",
    )
    p.add_argument("argv", nargs="*", metavar="-- CMD")

    p = _instance_parser(sub, "logs", "print an instance's output")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new output")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines first (0: all)")

    p = _client_parser(sub, "events", "follow lifecycle events (of everything, a class, or one)")
    p.add_argument("class_name", metavar="CLASS", nargs="?")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--after", type=int, default=0, help="from this store revision + 1 (0: now)")
    p.add_argument("--count", type=int, default=0, help="exit after N events (0: follow)")

    p = _client_parser(sub, "usage", "metered use and its cost per class and UTC day")
    p.add_argument("--class", dest="class_name", help="only this class")
    p.add_argument("--since", help="from this UTC day on, YYYY-MM-DD (default: all kept)")
    p.add_argument(
        "--price-vcpu",
        type=float,
        default=PRICE_VCPU_S,
        help=f"dollars per vCPU-second ({PRICE_VCPU_S})",
    )
    p.add_argument(
        "--price-memory",
        type=float,
        default=PRICE_GIB_S,
        help=f"dollars per GiB-second of memory ({PRICE_GIB_S})",
    )
    p.add_argument(
        "--price-disk",
        type=float,
        default=PRICE_DISK_GB_S,
        help=f"dollars per GB-second of disk ({PRICE_DISK_GB_S})",
    )

    p = _client_parser(sub, "state", "per-instance state values: get, put or delete a KEY")
    p.add_argument("action", choices=["get", "put", "delete"])
    p.add_argument("class_name", metavar="CLASS")
    p.add_argument("name", metavar="NAME")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", nargs="?", help="put: the value (default: stdin)")

    p = sub.add_parser("schedule", help="per-instance schedules: a request or command at times")
    actions = p.add_subparsers(dest="schedule_action", required=True, metavar="ACTION")
    p = _instance_parser(
        actions, "add", "run an HTTP request (--path) or a command (-- CMD...) in an instance"
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="once: an ISO time (UTC unless it says) or +30s")
    when.add_argument("--every", metavar="DURATION", help="repeatedly: 0.5s, 5m, 1h (>= 100ms)")
    p.add_argument("--path", default="", help="an HTTP request to this path on the class's port")
    p.add_argument("--method", default="GET", help="the request's method (GET)")
    p.add_argument("--no-wake", action="store_true", help="skip a run while it sleeps, not wake it")
    p.add_argument(
        "--no-activity", action="store_true", help="runs do not count as activity for sleep_after"
    )
    p.add_argument(
        "--id", dest="schedule_id", default="", metavar="ID", help="its id (default: generated)"
    )
    p.set_defaults(argv=[])
    p = _client_parser(actions, "list", "list schedules (of a class, or of one instance)")
    p.add_argument("class_name", metavar="CLASS", nargs="?", default="")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    _instance_parser(actions, "rm", "delete a schedule").add_argument("schedule_id", metavar="ID")

    p = sub.add_parser("outbound", help="an instance's own outbound policy: set, show, clear")
    actions = p.add_subparsers(dest="outbound_action", required=True, metavar="ACTION")
    p = _instance_parser(
        actions,
        "set",
        "give an instance its own outbound policy, whole, in place of its class's (applied "
        "at once, no restart)",
    )
    p.add_argument(
        "--allow", action="append", default=[], metavar="HOST",
        help="allowed host: a name, *.glob, IP or CIDR (repeat; any set: the rest is denied)",
    )  # fmt: skip
    p.add_argument(
        "--deny", action="append", default=[], metavar="HOST",
        help="denied host, checked first (repeat)",
    )  # fmt: skip
    p.add_argument(
        "--handler", action="append", default=[], metavar="HOST=FUNCTION",
        help="HTTP to HOST is answered by this gateway module function (repeat)",
    )  # fmt: skip
    p.add_argument(
        "--internet", action=argparse.BooleanOptionalAction, default=False,
        help="whether hosts not listed are reachable when no --allow is given (default: no)",
    )  # fmt: skip
    p.add_argument(
        "--intercept-https", action="store_true",
        help="terminate HTTPS to --handler hosts with the instance's CA (/etc/portside/ca.crt)",
    )  # fmt: skip
    _instance_parser(actions, "show", "show the outbound policy that applies to an instance")
    _instance_parser(
        actions, "clear", "drop an instance's own outbound policy: its class's applies"
    )

    p = sub.add_parser("token", help="API and join tokens (needs an admin token)")
    actions = p.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    p = _client_parser(actions, "create", "make a token and print it, this once")
    p.add_argument(
        "--role",
        required=True,
        choices=["read", "deploy", "admin", "join"],
        help="read: list, get, watch, logs, usage; deploy: also deploy, start, stop, signal, "
        "destroy, exec, state values; admin: also tokens; join: a join token for nodes",
    )
    p.add_argument(
        "--class", dest="classes", action="append", default=[], metavar="C",
        help="only this class (repeat for several); default: every class",
    )  # fmt: skip
    p.add_argument("--ttl", help="expires after this long (24h, 30m); default: never")
    p.add_argument("--name", default="", help="a name to list and revoke it by (default: its id)")
    _client_parser(actions, "list", "list tokens (never their secrets)")
    p = _client_parser(actions, "revoke", "revoke a token on every replica")
    p.add_argument("token", metavar="TOKEN|NAME", help="its name, its id, or the whole token")

    p = sub.add_parser("secret", help="gateway secrets (env.secrets): put, list, delete")
    actions = p.add_subparsers(dest="secret_action", required=True, metavar="ACTION")
    _client_parser(
        actions,
        "put",
        "set a secret from standard input (piped, or typed without echo); one trailing newline "
        "is dropped (needs an admin token)",
    ).add_argument("secret_name", metavar="NAME", help="letters, digits and _, like API_KEY")
    _client_parser(actions, "list", "list secrets: names, when set, digests (never values)")
    _client_parser(actions, "delete", "delete a secret (needs an admin token)").add_argument(
        "secret_name", metavar="NAME"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.portside_argv = argv  # for `edge --workers`, which runs its workers with them
    if args.command in ("controlplane", "agent", "edge"):
        from portside.up import stop_with_parent

        stop_with_parent()
    from portside.daemon import setup_logging

    setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except PortsideError as exc:
        print(f"portside {args.command}: {refused(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def refused(exc: PortsideError) -> str:
    """An error's line, saying what to do when the control plane refused the token."""
    if isinstance(exc, Unauthenticated):
        advice = " — give a valid token with --token-file or $PORTSIDE_TOKEN"
        if "--token-file" in str(exc):
            advice = ""  # the reason says it already
        return f"the control plane refused the call (unauthenticated): {exc}{advice}"
    if isinstance(exc, PermissionDenied):
        advice = " — use a token with that role (an admin makes one: portside token create)"
        if "portside token create" in str(exc) or "name the class" in str(exc):
            advice = ""  # the reason says it already
        return f"the control plane refused the call (permission denied): {exc}{advice}"
    return str(exc)


def _dispatch(args: argparse.Namespace) -> int:
    from portside.daemon import run_fast
    from portside.join import join_token
    from portside.net import split_hostport, with_port_offset

    for name in ("listen", "controlplane", "api_listen", "metrics_listen"):
        value = getattr(args, name, None)
        for address in (value or "").split(","):
            if address:
                split_hostport(address, f"--{name.replace('_', '-')}")
    if getattr(args, "region", None):
        geo.lookup(args.region)
    if getattr(args, "metrics_token_file", None):
        from portside.daemon import require_metrics_token

        require_metrics_token(args.metrics_token_file)

    if args.command == "controlplane":
        from controlplane.main import ControlPlaneOptions
        from controlplane.main import run as run_controlplane

        asyncio.run(
            run_controlplane(
                ControlPlaneOptions(
                    listen=args.listen,
                    store_url=args.store,
                    store_tls=_store_tls(args),
                    metrics_listen=args.metrics_listen or with_port_offset(args.listen, 1),
                    region=args.region,
                    node_ttl_s=args.node_ttl,
                    replica_id=args.replica_id,
                    insecure=args.insecure,
                    cert_lifetime_s=_duration(args.cert_lifetime, "--cert-lifetime"),
                    image_dir=args.image_dir,
                    image_gc_every_s=_duration(args.image_gc_every, "--image-gc-every"),
                    image_keep_versions=args.image_keep_versions,
                    image_gc_grace_s=_duration(args.image_gc_grace, "--image-gc-grace"),
                    secrets_key_file=args.secrets_key_file,
                )
            )
        )
        return 0
    if args.command == "agent":
        from nodeagent.agent import AgentOptions
        from nodeagent.agent import run as run_agent

        labels = dict(_key_value(x) for x in args.label)
        run_fast(
            run_agent(
                AgentOptions(
                    controlplane=args.controlplane,
                    listen=args.listen,
                    api_listen=args.api_listen or with_port_offset(args.listen, 1),
                    metrics_listen=args.metrics_listen or with_port_offset(args.listen, 2),
                    join_token=join_token(args.join_token_file),
                    region=args.region,
                    node_id=args.node_id,
                    vcpu=args.vcpu,
                    memory_mib=args.memory_mib,
                    labels=labels,
                    stop_on_exit=args.stop_on_exit,
                    drain_grace=args.drain_grace,
                    allow_host_access=args.allow_host_access,
                    registry_auth=args.registry_auth or "",
                )
            )
        )
        return 0
    if args.command == "edge":
        from edge.main import EdgeOptions
        from edge.main import run as run_edge
        from portside.net import Deadlines

        default = Deadlines()
        deadlines = Deadlines(
            connect=args.connect_timeout or default.connect,
            first_byte=args.first_byte_timeout or default.first_byte,
        )

        if bool(args.tls_cert) != bool(args.tls_key):
            raise InvalidArgument("--tls-cert and --tls-key go together: give both, or neither")
        if args.workers > 1 and args.worker is None:
            from edge.workers import supervise

            return supervise(args.portside_argv, args.workers)
        worker = args.worker or 0
        metrics_listen = args.metrics_listen or with_port_offset(args.listen, 1)
        run_fast(
            run_edge(
                EdgeOptions(
                    controlplane=args.controlplane,
                    listen=args.listen,
                    metrics_listen=with_port_offset(metrics_listen, worker),
                    worker=args.worker,
                    region=args.region,
                    deadlines=deadlines,
                    join_token=join_token(args.join_token_file),
                    tls_cert=args.tls_cert or "",
                    tls_key=args.tls_key or "",
                )
            )
        )
        return 0
    if args.command == "up":
        from portside.up import UpOptions
        from portside.up import run as run_up

        return run_up(
            UpOptions(
                config=args.config,
                listen=args.listen,
                controlplane_listen=args.controlplane_listen,
                agent_listen=args.agent_listen,
                region=args.region,
                data_dir=args.data_dir,
                edge_workers=args.workers,
            )
        )
    if args.command == "bootstrap":
        from controlplane.identity import bootstrap_url

        print(bootstrap_url(args.store, args.out, _store_tls(args)).report())
        return 0
    if args.command == "deploy":
        return asyncio.run(_deploy(args.file, args.controlplane, _api_token(args), args.rollout))
    if args.command == "regions":
        return _regions(args.json)
    if args.command == "doctor":
        from nodeagent.doctor import agent_ports, check_host

        clock = args.controlplane_metrics or with_port_offset(args.controlplane.split(",")[0], 1)
        ports = agent_ports(args.listen, args.api_listen, args.metrics_listen)
        return _doctor(asyncio.run(check_host(ports=ports, controlplane_clock=clock)), args.json)
    if args.command in _CLIENT_VERBS:
        return asyncio.run(_client_verb(args))
    raise AssertionError(args.command)


def _duration(text: str, flag: str) -> float:
    from portside.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidArgument(f"{flag}: {exc}") from None


def _seconds(text: str) -> float:
    """A positive number of seconds, for a deadline flag."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _version_number(text: str) -> int:
    digits = text.removeprefix("v")
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number like 3 or v3")
    return int(digits)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PortsideError(f"--label {text!r}: use KEY=VALUE")
    return key, value


async def deploy_config(
    file: str,
    controlplane: str,
    token: str | None = None,
    *,
    report: Callable[[str], None] | None = None,
    on_build_failure: Callable[[Sequence[str]], None] | None = None,
) -> tuple[int, int]:
    """Read `file`, build its Dockerfile classes' images and push the ones the cluster lacks
    (progress to `report`), and register its classes and routes, with the API token `token`
    (its text; default as `portside.connect` finds one); returns (classes, routes)."""
    result = await deploy_file(
        file, controlplane, token, report=report, on_build_failure=on_build_failure
    )
    return result.classes, result.routes


async def deploy_file(
    file: str,
    controlplane: str,
    token: str | None = None,
    *,
    rollout: str = "gradual",
    report: Callable[[str], None] | None = None,
    on_build_failure: Callable[[Sequence[str]], None] | None = None,
) -> DeployResult:
    """`deploy_config`, with how running instances move to new versions (`rollout`) and the
    whole result: the rollouts the deploy started too."""
    from portside.client import connect
    from portside.net import Deadlines

    async with connect(controlplane, token=token, timeout=Deadlines().rpc) as ps:
        return await ps.deploy(
            file, report=report, on_build_failure=on_build_failure, rollout=rollout
        )


async def _deploy(
    file: str, controlplane: str, token: Token | None, rollout: str = "gradual"
) -> int:
    def report(line: str) -> None:
        print(line, flush=True)

    def build_log(lines: Sequence[str]) -> None:
        if lines:
            print("the build's last lines:", file=sys.stderr)
        for line in lines:
            print(line, file=sys.stderr)

    try:
        result = await deploy_file(
            file,
            controlplane,
            token.text() if token is not None else None,
            rollout=rollout,
            report=report,
            on_build_failure=build_log,
        )
    except Unavailable as exc:
        raise await _plaintext_hint(exc, controlplane, token) from exc
    print(
        f"deployed {result.classes} classes and {result.routes} routes from {file} "
        f"to {controlplane}"
    )
    for started in result.rollouts:
        print(rollout_started_line(started))
    return 0


# --- client verbs: thin over the SDK, tables for people and --json for scripts ---


def parse_signal(text: str) -> int:
    """15, "TERM", "SIGTERM" or "sigterm" -> 15."""
    import signal as signals

    if text.isdigit():
        number = int(text)
        if not 0 < number < 65:
            raise InvalidArgument(f"signal {text}: use 1..64 or a name such as TERM")
        return number
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise InvalidArgument(
            f"signal {text!r}: unknown; use a number or a name such as TERM, HUP, USR1, KILL"
        ) from None


def parse_env(items: Sequence[str], flag: str = "--env") -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{flag} {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def parse_entrypoint(text: str | None) -> list[str] | None:
    """A JSON array as it is, anything else split like a shell does."""
    if text is None:
        return None
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"--entrypoint {text!r}: not a JSON array: {exc}") from exc
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise InvalidArgument(f"--entrypoint {text!r}: a JSON array of strings is needed")
        return value
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(f"--entrypoint {text!r}: {exc}") from exc
    if not words:
        raise InvalidArgument("--entrypoint is empty")
    return words


def exec_command(words: Sequence[str]) -> list[str]:
    """The command after `--` (argparse keeps the `--` in a REMAINDER)."""
    command = list(words)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InvalidArgument("no command: use portside exec CLASS NAME -- CMD [ARG...]")
    return command


def age(since: float, now: float | None = None) -> str:
    """The age of a unix time: 12s, 5m, 3h or 2d; "-" when unknown."""
    if since <= 0:
        return "-"
    seconds = max(0, int((time.time() if now is None else now) - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=list))


def ps_state(i: InstanceInfo, now: float) -> str:
    """`portside ps`'s STATE: "stopped_with_code (3)", and for a crash loop "stopped_with_code
    (3), 2 crashes, retry in 4s"."""
    text = i.state + (f" ({i.exit_code})" if i.exit_code is not None else "")
    if i.restarts:
        text += f", {i.restarts} crash" + ("es" if i.restarts > 1 else "")
    left = i.backoff_left(now)
    if left > 0:
        text += f", retry in {math.ceil(left)}s"
    return text


def _info_row(i: InstanceInfo) -> dict[str, object]:
    return dataclasses.asdict(i)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _api_token(args: argparse.Namespace) -> Token | None:
    """--token-file's token, else $PORTSIDE_TOKEN's, else ./.portside/admin.token's, else None."""
    from portside.client._async import api_token

    return api_token(path=getattr(args, "token_file", None))


def _connect(args: argparse.Namespace) -> Portside:
    from portside.client import connect

    token = args.api_token
    return connect(args.controlplane, token=token.text() if token is not None else None)


async def _client_verb(args: argparse.Namespace) -> int:
    args.api_token = _api_token(args)  # (`token revoke` has an argument named token)
    try:
        return await _CLIENT_VERBS[args.command](args)
    except Unavailable as exc:
        raise await _plaintext_hint(exc, args.controlplane, args.api_token) from exc


async def _plaintext_hint(
    exc: Unavailable, controlplane: str, token: Token | None
) -> PortsideError:
    """A plaintext call to a control plane that requires TLS fails as "unavailable", which says
    nothing useful: say what is missing instead."""
    from portside.net import speaks_tls

    if token is not None or not await speaks_tls(controlplane.split(",")[0]):
        return exc
    return Unauthenticated(
        f"the control plane at {controlplane} requires TLS and an API token: give --token-file "
        "PATH or $PORTSIDE_TOKEN (`portside bootstrap` wrote admin.token)"
    )


async def _nodes(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        nodes = await ps.nodes()
    rows = [
        {
            "id": n.node.id,
            "region": n.node.region,
            "address": n.node.data_address,
            "vcpu": n.node.vcpu,
            "memory_mib": n.node.memory_mib,
            "used_vcpu": n.used.vcpu,
            "used_memory_mib": n.used.memory_mib,
            "instances": n.instances,
            "alive": n.alive,
        }
        for n in nodes
    ]
    if args.json:
        _print_json(rows)
        return 0
    print(
        f"{'NODE':24} {'REGION':6} {'ADDRESS':22} {'VCPU':>11} {'MEMORY MiB':>15} {'INSTANCES':>9}"
    )
    for r in rows:
        print(
            f"{r['id']:24} {r['region']:6} {r['address']:22} "
            f"{r['used_vcpu']:>5.2f}/{r['vcpu']:<5.2f} "
            f"{r['used_memory_mib']:>7}/{r['memory_mib']:<7} {r['instances']:>9}"
        )
    return 0


async def _ps(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        found = await ps.instances(args.class_name, args.node, args.state)
    if args.json:
        _print_json([_info_row(i) for i in found])
        return 0
    now = time.time()
    _print_table(
        ("CLASS", "NAME", "STATE", "NODE", "REGION", "SINCE"),
        [
            (
                i.class_name,
                i.name,
                ps_state(i, now),
                i.node_id or "-",
                i.region or "-",
                age(i.since, now),
            )
            for i in found
        ],
    )
    return 0


async def _classes(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        classes = await ps.classes()
    if args.json:
        _print_json([{**dataclasses.asdict(c), "pool": c.pool} for c in classes])
        return 0
    _print_table(
        ("CLASS", "IMAGE", "PORT", "TYPE", "SLEEP AFTER", "MAX", "POOL"),
        [
            (
                c.name,
                c.image,
                c.default_port,
                c.instance_type.name,
                f"{c.sleep_after_s:g}s",
                c.max_instances or "-",
                "yes" if c.pool else "no",
            )
            for c in classes
        ],
    )
    return 0


async def _images(args: argparse.Namespace) -> int:
    from portside.build import human_size

    async with _connect(args) as ps:
        images = await ps.images()
    if args.json:
        _print_json([dataclasses.asdict(i) for i in images])
        return 0
    now = time.time()
    _print_table(
        ("REFERENCE", "DIGEST", "SIZE", "CLASSES", "NODES", "REPLICAS", "PUSHED"),
        [
            (
                i.reference or "-",
                i.digest.removeprefix("sha256:")[:12] or "-",
                human_size(i.size_bytes),
                ",".join(i.classes) or "-",
                f"{len(i.nodes)} ({','.join(i.nodes)})" if i.nodes else "-",
                ",".join(i.replicas) or "-",
                age(i.pushed_at, now),
            )
            for i in images
        ],
    )
    return 0


async def _versions(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        versions = await ps.versions(args.class_name)
    if args.json:
        _print_json([dataclasses.asdict(v) for v in versions])
        return 0
    now = time.time()
    _print_table(
        ("VERSION", "CREATED", "IMAGE", "CHANGES", "INSTANCES", ""),
        [
            (
                str(v.number),
                age(v.created_at, now),
                v.spec.image,
                ",".join(v.changes),
                str(v.instances),
                "current" if v.current else "",
            )
            for v in versions
        ],
    )
    return 0


# --- rollouts ---

ROLLOUT_BAR_WIDTH = 10
#: How often `rollout status --watch` asks for the rollout.
ROLLOUT_WATCH_INTERVAL_S = 0.5


def rollout_bar(r: Rollout, width: int = ROLLOUT_BAR_WIDTH) -> str:
    """`[#####.....]`: the share of the class's instances on the rollout's version."""
    if r.instances > 0:
        filled = min(width, max(0, r.updated * width // r.instances))
    else:
        filled = width if r.state == "done" else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def rollout_progress(r: Rollout) -> str:
    """`5/10 on v3, step 1 of 2 (10%), waiting: grace period`: counts, step and state."""
    counts = f"{r.updated}/{r.instances} on v{r.to_version}"
    if r.healthy < r.updated:
        counts += f" ({r.healthy} healthy)"
    step = f"step {min(r.step, len(r.steps) - 1) + 1} of {len(r.steps)} ({r.percentage}%)"
    state = r.state.replace("_", " ")
    reason = r.reason or ("grace period, then health checks" if r.state == "waiting" else "")
    return f"{counts}, {step}, {state}" + (f": {reason}" if reason else "")


def rollout_heading(r: Rollout, now: float) -> str:
    """`Echo: gradual rollout to v3 from v1 (steps 10%, 100%), started 2m ago`."""
    what = "rollback" if r.mode == "rollback" else f"{r.mode} rollout"
    source = f" from {', '.join(f'v{v}' for v in r.from_versions)}" if r.from_versions else ""
    steps = ", ".join(f"{p}%" for p in r.steps)
    started = f", started {age(r.started_at, now)} ago" if r.started_at > 0 else ""
    return f"{r.class_name}: {what} to v{r.to_version}{source} (steps {steps}){started}"


def rollout_line(r: Rollout, *, tty: bool) -> str:
    """One line of progress: with a bar in a terminal, plain for a pipe or a file."""
    if tty:
        return f"{rollout_bar(r)} {rollout_progress(r)}"
    return f"{r.class_name} v{r.to_version}: {rollout_progress(r)}"


def rollout_started_line(r: Rollout) -> str:
    """What `deploy` and `rollback` print for a rollout they started."""
    steps = ", ".join(f"{p}%" for p in r.steps)
    verb = "rolling back" if r.mode == "rollback" else f"rolling out ({r.mode})"
    return (
        f"{r.class_name}: {verb} to v{r.to_version} over {r.instances} instances, steps "
        f"{steps}; follow it with: portside rollout status {r.class_name} --watch"
    )


def rollout_row(r: Rollout) -> dict[str, object]:
    return {**dataclasses.asdict(r), "active": r.active, "percentage": r.percentage}


async def _rollout(args: argparse.Namespace) -> int:
    action = args.rollout_action
    async with _connect(args) as ps:
        if action == "status":
            return await _rollout_status(args, ps)
        control = {
            "pause": ps.pause_rollout,
            "resume": ps.resume_rollout,
            "abort": ps.abort_rollout,
        }[action]
        r = await control(args.class_name)
    if args.json:
        _print_json(rollout_row(r))
    else:
        print(rollout_heading(r, time.time()))
        print(rollout_line(r, tty=False))
    return 0


async def _rollout_status(args: argparse.Namespace, ps: Portside) -> int:
    """The rollout once, or (--watch) every change until it ends: in a terminal one bar redrawn
    in place, otherwise a line per change. --watch exits 1 when it aborted or rolled back."""
    r = await ps.rollout(args.class_name)
    tty = sys.stdout.isatty() and not args.json
    if args.json and not args.watch:
        _print_json(rollout_row(r))
        return 0
    if not args.json:
        print(rollout_heading(r, time.time()), flush=True)
    if not args.watch:
        print(rollout_line(r, tty=tty))
        return 0
    last = ""
    try:
        while True:
            shown = json.dumps(rollout_row(r)) if args.json else rollout_line(r, tty=tty)
            if shown != last:
                if tty:
                    print("\r\033[K" + shown, end="", flush=True)
                else:
                    print(shown, flush=True)
                last = shown
            if not r.active:
                break
            await asyncio.sleep(ROLLOUT_WATCH_INTERVAL_S)
            r = await ps.rollout(args.class_name)
    finally:
        if tty and last:
            print()
    return 0 if r.state == "done" else 1


async def _rollback(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        r = await ps.rollback(args.class_name, args.version, args.rollout)
    if args.json:
        _print_json(rollout_row(r))
    else:
        print(rollout_started_line(r))
    return 0


def _print_info(args: argparse.Namespace, info: InstanceInfo) -> None:
    if args.json:
        _print_json(_info_row(info))
        return
    code = f" (exit code {info.exit_code})" if info.exit_code is not None else ""
    where = f" on {info.node_id} ({info.region})" if info.node_id else ""
    print(f"{info.class_name}/{info.name}: {info.state}{code}{where}")


async def _start(args: argparse.Namespace) -> int:
    env = parse_env(args.env)
    entrypoint = parse_entrypoint(args.entrypoint)
    async with _connect(args) as ps:
        info = await ps.container(args.class_name, args.name).start(
            entrypoint=entrypoint,
            env=env,
            hint=args.hint,
            wait=not args.no_wait,
            snapshot=args.snapshot,
        )
    _print_info(args, info)
    return 0


async def _stop(args: argparse.Namespace) -> int:
    sig = parse_signal(args.signal)
    async with _connect(args) as ps:
        info = await ps.container(args.class_name, args.name).stop(signal=sig, grace=args.grace)
    _print_info(args, info)
    return 0


async def _signal(args: argparse.Namespace) -> int:
    sig = parse_signal(args.signal)
    async with _connect(args) as ps:
        await ps.container(args.class_name, args.name).signal(sig)
    if args.json:
        _print_json({"class_name": args.class_name, "name": args.name, "signal": sig})
    else:
        print(f"{args.class_name}/{args.name}: sent signal {sig}")
    return 0


async def _destroy(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        await ps.container(args.class_name, args.name).destroy()
    if args.json:
        _print_json({"class_name": args.class_name, "name": args.name, "destroyed": True})
    else:
        print(f"{args.class_name}/{args.name}: destroyed")
    return 0


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """This process's stdin, read in a daemon thread: a command that exits before stdin ends
    must not keep `portside exec` waiting for a read that never returns."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def pump() -> None:
        fd = sys.stdin.fileno()
        try:
            while True:
                piece = os.read(fd, 64 * 1024)
                asyncio.run_coroutine_threadsafe(queue.put(piece), loop).result()
                if not piece:
                    return
        except (OSError, RuntimeError):
            return  # stdin failed, or the command ended and the loop closed: nothing to send

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    while piece := await queue.get():
        yield piece


async def _exec(args: argparse.Namespace) -> int:
    """Like `docker exec`: -t gives the command a terminal, -it hands it this one (raw mode,
    its window size, keys as typed: Ctrl-C interrupts the command, not this process)."""
    command = exec_command(args.argv)
    env = parse_env(args.env)
    on_terminal = sys.stdin is not None and sys.stdin.isatty()
    if args.tty and args.interactive and not on_terminal:
        raise InvalidArgument("-it: the input device is not a TTY (drop -t to pipe stdin in)")
    size = (terminal.size_of(sys.stdout.fileno()) or terminal.size_of(0)) if args.tty else None
    exit_code = 1
    async with contextlib.AsyncExitStack() as stack:
        box = (await stack.enter_async_context(_connect(args))).container(
            args.class_name, args.name
        )
        stdin: AsyncIterator[terminal.TerminalInput] | None = None
        if args.tty and args.interactive:
            stdin = await stack.enter_async_context(terminal.raw_input(sys.stdin.fileno()))
        elif sys.stdin is not None and (args.interactive or not (args.tty or on_terminal)):
            stdin = _stdin_chunks()  # -t without -i: the terminal gets no stdin (as docker's)
        async for chunk in box.exec_stream(
            command,
            env=env,
            workdir=args.workdir,
            stdin=stdin,
            user=args.user,
            tty=args.tty,
            size=size,
            wake=args.wake,
            activity=args.activity,
        ):
            if chunk.stream == "exit":
                exit_code = chunk.exit_code if chunk.exit_code is not None else 1
            else:
                out = sys.stdout if chunk.stream == "stdout" else sys.stderr
                out.buffer.write(chunk.data)
                out.flush()
    return exit_code


async def _logs(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        async for chunk in ps.container(args.class_name, args.name).logs(
            follow=args.follow, tail=args.tail
        ):
            if args.json:
                text = chunk.data.decode(errors="replace")
                print(json.dumps({"stream": chunk.stream, "data": text}), flush=True)
                continue
            out = sys.stdout if chunk.stream == "stdout" else sys.stderr
            out.buffer.write(chunk.data)
            out.flush()
    return 0


def format_event(e: Event) -> str:
    stamp = datetime.fromtimestamp(e.time, UTC).strftime("%H:%M:%S.%f")[:-3]
    detail = []
    if e.exit_code is not None:
        detail.append(f"exit code {e.exit_code}")
    if e.signal is not None:
        detail.append(f"signal {e.signal}")
    if e.reason:
        detail.append(e.reason)
    return (
        f"{stamp} {e.revision:>8} {e.kind:16} {e.class_name}/{e.name} "
        f"{e.node_id or '-'} {'; '.join(detail)}".rstrip()
    )


async def _events(args: argparse.Namespace) -> int:
    if args.name and not args.class_name:
        raise InvalidArgument("events: NAME needs CLASS")
    seen = 0
    async with _connect(args) as ps:
        if args.name:
            stream = ps.container(args.class_name, args.name).events(after_revision=args.after)
        else:
            stream = ps.events(args.class_name, after_revision=args.after)
        if not args.json:
            print(f"{'TIME':12} {'REVISION':>8} {'KIND':16} INSTANCE NODE DETAIL", flush=True)
        async for event in stream:
            if args.json:
                print(json.dumps(dataclasses.asdict(event)), flush=True)
            else:
                print(format_event(event), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    return 0


async def _state(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        box = ps.container(args.class_name, args.name)
        if args.action == "get":
            if args.value is not None:
                raise InvalidArgument("state get takes no VALUE")
            value = await box.get_state_value(args.key)
            if args.json:
                try:
                    _print_json({"key": args.key, "value": value.decode()})
                except UnicodeDecodeError:
                    _print_json({"key": args.key, "value_base64": base64.b64encode(value).decode()})
            else:
                sys.stdout.buffer.write(value)
                sys.stdout.flush()
        elif args.action == "put":
            data = args.value.encode() if args.value is not None else sys.stdin.buffer.read()
            await box.put_state_value(args.key, data)
            if args.json:
                _print_json({"key": args.key, "bytes": len(data)})
            else:
                print(f"{args.class_name}/{args.name}: {args.key} = {len(data)} bytes")
        else:
            existed = await box.delete_state_value(args.key)
            if args.json:
                _print_json({"key": args.key, "existed": existed})
            else:
                done = "deleted" if existed else "was not set"
                print(f"{args.class_name}/{args.name}: {args.key} {done}")
    return 0


# Cloudflare Containers' prices, the defaults of `portside usage`.
PRICE_VCPU_S = PRICE_VCPU_SECOND
PRICE_GIB_S = PRICE_GIB_SECOND
PRICE_DISK_GB_S = PRICE_DISK_GB_SECOND


async def _usage(args: argparse.Namespace) -> int:
    from portside.usage import Usage

    async with _connect(args) as ps:
        days = await ps.usage(args.class_name, args.since)
    prices = (args.price_vcpu, args.price_memory, args.price_disk)
    total = Usage(
        class_name="TOTAL",
        day="",
        running_ms=sum(u.running_ms for u in days),
        vcpu_seconds=sum(u.vcpu_seconds for u in days),
        memory_gib_seconds=sum(u.memory_gib_seconds for u in days),
        disk_gb_seconds=sum(u.disk_gb_seconds for u in days),
        cpu_seconds_used=sum(u.cpu_seconds_used for u in days),
        egress_bytes=sum(u.egress_bytes for u in days),
    )
    if args.json:
        total_row: dict[str, object] = dataclasses.asdict(total)
        del total_row["class_name"], total_row["day"]
        report: dict[str, object] = {
            "prices": {
                "vcpu_second": prices[0],
                "memory_gib_second": prices[1],
                "disk_gb_second": prices[2],
            },
            "usage": [{**dataclasses.asdict(u), "cost": u.cost(*prices)} for u in days],
            "total": {**total_row, "cost": total.cost(*prices)},
        }
        _print_json(report)
        return 0
    _print_table(
        (
            "CLASS",
            "DAY",
            "RUNNING S",
            "VCPU-S",
            "GIB-S",
            "DISK GB-S",
            "CPU USED S",
            "EGRESS B",
            "COST",
        ),
        [
            (
                u.class_name,
                u.day or "-",
                f"{u.running_ms / 1000:.2f}",
                f"{u.vcpu_seconds:.2f}",
                f"{u.memory_gib_seconds:.2f}",
                f"{u.disk_gb_seconds:.2f}",
                f"{u.cpu_seconds_used:.2f}",
                u.egress_bytes,
                f"${u.cost(*prices):.6f}",
            )
            for u in [*days, total]
        ],
    )
    return 0


async def _token(args: argparse.Namespace) -> int:
    from portside import tokens
    from portside.tokens import TokenRecord

    def row(t: TokenRecord) -> dict[str, object]:
        return {
            "id": t.id,
            "kind": t.kind,
            "name": t.name,
            "role": t.role.value if t.role else "",
            "classes": list(t.classes),
            "created": t.created,
            "expires": t.expires,
        }

    async with _connect(args) as ps:
        if args.token_action == "create":
            ttl = _duration(args.ttl, "--ttl") if args.ttl else 0.0
            text, info = await ps.create_token(
                args.role, classes=args.classes, ttl=ttl, name=args.name
            )
            if args.json:
                _print_json({"token": text, **row(info)})
                return 0
            print(text)
            scope = f", classes {', '.join(info.classes)}" if info.classes else ""
            until = f", expires {_utc_day_time(info.expires)}" if info.expires else ""
            print(
                f"created {info.kind} token {info.name} (role {args.role}{scope}{until}); it is "
                "shown this once: keep it secret",
                file=sys.stderr,
            )
            return 0
        if args.token_action == "list":
            found = await ps.tokens()
            if args.json:
                _print_json([row(t) for t in found])
                return 0
            _print_table(
                ("NAME", "ID", "KIND", "ROLE", "CLASSES", "CREATED", "EXPIRES"),
                [
                    (
                        t.name,
                        t.id,
                        t.kind,
                        t.role or "-",
                        ",".join(t.classes) or "*",
                        _utc_day_time(t.created),
                        _utc_day_time(t.expires) if t.expires else "never",
                    )
                    for t in found
                ],
            )
            return 0
        # A whole token is revoked by its id: its secret never leaves this machine.
        ref = args.token.strip()
        if ref.startswith(tokens.PREFIX + "."):
            ref = tokens.parse_token(ref, "TOKEN").id
        info = await ps.revoke_token(ref)
    if args.json:
        _print_json(row(info))
    else:
        print(f"revoked {info.kind} token {info.name} ({info.id})")
    return 0


def _secret_value(name: str) -> str:
    """The value of `portside secret put`: typed without echo at a terminal, else standard
    input whole, less one trailing newline (what `echo` adds). Never from the command line,
    where other users of the machine and shell history would see it."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"value of {name} (not shown): ")
    value = sys.stdin.read()
    return value[:-2] if value.endswith("\r\n") else value.removesuffix("\n")


async def _secret(args: argparse.Namespace) -> int:
    from portside.client import SecretInfo

    def row(s: SecretInfo) -> dict[str, object]:
        return {"name": s.name, "updated": s.updated_at, "digest": s.digest}

    async with _connect(args) as ps:
        if args.secret_action == "list":
            found = await ps.secrets()
            if args.json:
                _print_json([row(s) for s in found])
            else:
                _print_table(
                    ("NAME", "UPDATED", "DIGEST"),
                    [(s.name, _utc_day_time(s.updated_at), s.digest) for s in found],
                )
            return 0
        if args.secret_action == "put":
            info = await ps.put_secret(args.secret_name, _secret_value(args.secret_name))
            done = "set"
        else:
            info = await ps.delete_secret(args.secret_name)
            done = "deleted"
    if args.json:
        _print_json(row(info))
    else:
        print(f"secret {info.name} {done} ({info.digest})")
    return 0


async def _snapshot(args: argparse.Namespace) -> int:
    from portside.build import human_size

    async with _connect(args) as ps:
        if args.snapshot_action == "list":
            listed = await ps.snapshots(args.class_name, args.name)
            return _print_snapshots(listed, as_json=args.json)
        if args.snapshot_action == "create":
            box = ps.container(args.class_name, args.name)
            snap = await box.snapshot(args.snapshot_name or None)
        else:
            snap = await ps.delete_snapshot(args.class_name, args.snapshot)
    if args.json:
        _print_json(dataclasses.asdict(snap))
        return 0
    verb = "created" if args.snapshot_action == "create" else "deleted"
    print(
        f"{verb} snapshot {snap.id} ({snap.name}) of {snap.class_name}/{snap.instance_name}: "
        f"{human_size(snap.layer_bytes)} of writable layer, class version {snap.version}"
    )
    return 0


def _print_snapshots(snapshots: Sequence[Snapshot], *, as_json: bool) -> int:
    from portside.build import human_size

    if as_json:
        _print_json([dataclasses.asdict(s) for s in snapshots])
        return 0
    now = time.time()
    _print_table(
        ("ID", "NAME", "INSTANCE", "VERSION", "LAYER", "CREATED", "EXPIRES", "TRIGGER"),
        [
            (
                s.id,
                s.name,
                f"{s.class_name}/{s.instance_name}",
                s.version or "-",
                human_size(s.layer_bytes),
                age(s.created_at, now),
                _utc_day_time(s.expires_at),
                s.trigger,
            )
            for s in snapshots
        ],
    )
    return 0


def parse_at(text: str) -> float | datetime:
    """`--at`: "+30s" (seconds from now) or an ISO time, UTC unless it gives an offset."""
    if text.startswith("+"):
        return _duration(text[1:], "--at")
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"--at: {text!r} is neither an ISO time (2026-12-24T18:00Z) nor +DURATION (+30s)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


async def _schedule(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        if args.schedule_action == "list":
            found = await ps.schedules(args.class_name, args.name)
            if args.json:
                _print_json([dataclasses.asdict(s) for s in found])
                return 0
            now = time.time()
            _print_table(
                ("CLASS", "NAME", "ID", "WHEN", "ACTION", "NEXT", "RUNS", "LAST RESULT"),
                [
                    (
                        s.class_name,
                        s.name,
                        s.id,
                        f"every {s.every_s:g}s" if s.every_s else f"at {_utc_day_time(s.at)}",
                        s.action,
                        "done" if s.done else f"in {max(0.0, s.next_run - now):.1f}s",
                        s.runs,
                        f"{s.last_result} ({age(s.last_run, now)} ago)" if s.runs else "-",
                    )
                    for s in found
                ],
            )
            return 0
        box = ps.container(args.class_name, args.name)
        if args.schedule_action == "rm":
            gone = await box.delete_schedule(args.schedule_id)
            print(f"deleted schedule {gone.id} of {gone.class_name}/{gone.name}")
            return 0
        if bool(args.path) == bool(args.argv):
            raise InvalidArgument("give either --path /PATH or -- CMD [ARG...], not both")
        options: dict[str, Any] = {
            "command": args.argv or None,
            "method": args.method,
            "no_wake": args.no_wake,
            "no_activity": args.no_activity,
            "id": args.schedule_id or None,
        }
        if args.every:
            every = _duration(args.every, "--every")
            made = await box.schedule_every(every, args.path or None, **options)
        else:
            made = await box.schedule(parse_at(args.at), args.path or None, **options)
    if args.json:
        _print_json(dataclasses.asdict(made))
    else:
        print(f"scheduled {made.id} in {made.class_name}/{made.name}: {made.action}")
    return 0


async def _outbound(args: argparse.Namespace) -> int:
    async with _connect(args) as ps:
        box = ps.container(args.class_name, args.name)
        if args.outbound_action == "show":
            applied = await box.outbound()
        elif args.outbound_action == "clear":
            applied = await box.clear_outbound()
        else:
            handlers = {}
            for text in args.handler:
                host, sep, function = text.partition("=")
                if not sep or not host or not function:
                    raise InvalidArgument(f"--handler {text!r}: use HOST=FUNCTION")
                handlers[host] = function
            applied = await box.set_outbound(
                allowed_hosts=args.allow,
                denied_hosts=args.deny,
                outbound_by_host=handlers,
                enable_internet=args.internet,
                intercept_https=args.intercept_https,
            )
    policy = applied.policy
    if args.json:
        _print_json({"own": applied.own, **dataclasses.asdict(policy)})
        return 0
    whose = "its own" if applied.own else "its class's"
    print(f"{args.class_name}/{args.name} follows {whose} outbound policy:")
    print(f"  internet         {'yes' if policy.enable_internet else 'no'}")
    print(f"  allowed hosts    {', '.join(policy.allowed_hosts) or '-'}")
    print(f"  denied hosts     {', '.join(policy.denied_hosts) or '-'}")
    handled = ", ".join(f"{h} -> {f}" for h, f in policy.outbound_by_host.items())
    print(f"  handlers         {handled or '-'}")
    print(f"  intercept HTTPS  {'yes' if policy.intercept_https else 'no'}")
    return 0


def _utc_day_time(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M")


_CLIENT_VERBS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "nodes": _nodes,
    "ps": _ps,
    "classes": _classes,
    "images": _images,
    "versions": _versions,
    "rollout": _rollout,
    "rollback": _rollback,
    "start": _start,
    "stop": _stop,
    "signal": _signal,
    "destroy": _destroy,
    "exec": _exec,
    "logs": _logs,
    "events": _events,
    "state": _state,
    "usage": _usage,
    "token": _token,
    "secret": _secret,
    "schedule": _schedule,
    "snapshot": _snapshot,
    "outbound": _outbound,
}


def _doctor(checks: Sequence[Check], as_json: bool) -> int:
    """One line per check (or JSON); non-zero when any failed."""
    failed = any(not c.ok for c in checks)
    if as_json:
        _print_json({"ok": not failed, "checks": [dataclasses.asdict(c) for c in checks]})
    else:
        for c in checks:
            fix = f" — {c.fix}" if c.fix and (c.warning or not c.ok) else ""
            verdict = "FAILED" if not c.ok else "warn" if c.warning else "ok"
            print(f"{verdict:6}  {c.name}: {c.detail}{fix}")
    return 1 if failed else 0


def _regions(as_json: bool) -> int:
    regions = sorted(geo.REGIONS.values(), key=lambda loc: (loc.area, loc.code))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "code": r.code,
                        "name": r.name,
                        "area": r.area,
                        "latitude": r.latitude,
                        "longitude": r.longitude,
                    }
                    for r in regions
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'CODE':5} {'AREA':5} {'LATITUDE':>9} {'LONGITUDE':>10}  NAME")
    for r in regions:
        print(f"{r.code:5} {r.area:5} {r.latitude:>9.3f} {r.longitude:>10.3f}  {r.name}")
    print("areas: " + " ".join(sorted(geo.AREAS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

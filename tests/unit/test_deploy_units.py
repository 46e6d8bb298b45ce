"""deploy/systemd/ against the code: each unit's ExecStart, with its example env file's values put
in as systemd does, parses with the real `portside` parser (so every flag exists and every value
is accepted), and each unit carries the hardening and restart settings docs/operations.md
promises."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from portside import geo
from portside.cli import build_parser
from portside.net import split_hostport

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy/systemd"
DAEMONS = ("controlplane", "agent", "edge")

# Every unit: who it runs as, what it may touch, how it stops and comes back.
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "User": "portside",
    "KillSignal": "SIGTERM",
    "Restart": "always",
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values (a key may repeat), as systemd reads a unit: `#` and `;` start
    comment lines, a trailing backslash continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def expand(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart's words as systemd makes them: `${VAR}` is one word, `$VAR` alone is split at
    blanks (nothing when empty)."""
    words = []
    for word in shlex.split(command):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            words += env[alone.group(1)].split()
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return words


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise AssertionError("portside has no subcommands")


def unit(daemon: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((SYSTEMD / f"portside-{daemon}.service").read_text())


def service(daemon: str) -> dict[str, str]:
    """The [Service] section, each key's last value (as systemd keeps it for these keys)."""
    return {key: values[-1] for key, values in unit(daemon)["Service"].items()}


def example_env(daemon: str) -> dict[str, str]:
    """The example env file of a unit: its EnvironmentFile's name under deploy/systemd/."""
    installed = Path(service(daemon)["EnvironmentFile"].lstrip("-"))
    assert installed.parent == Path("/etc/portside"), installed
    return parse_env((SYSTEMD / f"portside-{installed.name}").read_text())


def test_deploy_has_a_unit_and_an_env_example_per_daemon() -> None:
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == [
        f"portside-{d}.service" for d in sorted(DAEMONS)
    ]
    assert sorted(p.name for p in SYSTEMD.glob("*.env")) == [
        f"portside-{d}.env" for d in sorted(DAEMONS)
    ]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_exec_start_parses_with_the_real_parser(daemon: str) -> None:
    env = example_env(daemon)
    argv = expand(service(daemon)["ExecStart"], env)
    assert argv[0] == "/opt/portside/bin/portside" and argv[1] == daemon
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:  # argparse said why on stderr
        pytest.fail(f"portside-{daemon}.service: {shlex.join(argv)} does not parse")
    assert args.command == daemon
    # argparse takes abbreviations (--list for --listen): a unit must spell each flag whole.
    known = {flag for action in subparser(daemon)._actions for flag in action.option_strings}
    flags = {w.split("=")[0] for w in argv if w.startswith("--")}
    assert flags <= known, sorted(flags - known)
    # What `portside` checks only when it runs, checked here too.
    geo.lookup(args.region)
    for name in ("listen", "api_listen", "metrics_listen", "controlplane"):
        for address in (getattr(args, name, None) or "").split(","):
            if address:
                split_hostport(address, name)
    if daemon == "controlplane":
        assert args.store.startswith("etcd+https://") and args.store_cert and args.store_key
    else:
        assert args.join_token_file == "/etc/portside/join.token"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_every_variable_the_unit_uses_is_in_its_example(daemon: str) -> None:
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", service(daemon)["ExecStart"]))
    assert used <= set(example_env(daemon)), sorted(used - set(example_env(daemon)))


@pytest.mark.parametrize("daemon", DAEMONS)
def test_hardening_and_restart(daemon: str) -> None:
    settings = service(daemon)
    for key, value in HARDENING.items():
        assert settings.get(key) == value, f"portside-{daemon}.service: {key}={settings.get(key)}"
    assert float(settings["RestartSec"]) > 0
    assert settings["Type"] == "exec"
    assert "StartLimitIntervalSec" in unit(daemon)["Unit"]
    if daemon in ("agent", "edge"):
        assert settings["LimitNOFILE"] == "1048576"


def test_capabilities_are_only_what_each_needs() -> None:
    assert service("controlplane")["CapabilityBoundingSet"] == ""
    assert service("controlplane")["AmbientCapabilities"] == ""
    agent = service("agent")  # packet-filter rules; the Docker socket through its group
    assert agent["AmbientCapabilities"] == agent["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert agent["SupplementaryGroups"] == "docker"
    assert "AF_NETLINK" in agent["RestrictAddressFamilies"].split()  # iptables-nft
    assert "ProtectProc" not in agent  # the containers' /proc/PID/cgroup must stay visible
    edge = service("edge")  # --listen may be :80 or :443
    assert edge["AmbientCapabilities"] == edge["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"


def test_stop_timeouts_cover_each_daemons_drain() -> None:
    from controlplane.main import ControlPlaneOptions
    from nodeagent.agent import AgentOptions

    # The control plane gives calls in flight grace_s, then closes its metrics server.
    cp_grace = ControlPlaneOptions.__dataclass_fields__["grace_s"].default
    assert isinstance(cp_grace, float)
    assert float(service("controlplane")["TimeoutStopSec"]) >= cp_grace + 10
    # The agent drains for drain_grace, then ends its heartbeat (2 s) and its API (2 s).
    drain = AgentOptions.__dataclass_fields__["drain_grace"].default
    assert isinstance(drain, float)
    assert float(service("agent")["TimeoutStopSec"]) >= drain + 2 + 2 + 10
    # The edge lets requests in flight finish for DRAIN_GRACE_S, then closes its upstream pool.
    from edge.main import DRAIN_GRACE_S

    assert float(service("edge")["TimeoutStopSec"]) >= DRAIN_GRACE_S + 10
    for daemon in DAEMONS:
        assert service(daemon)["KillMode"] == "mixed"  # SIGTERM to the daemon alone

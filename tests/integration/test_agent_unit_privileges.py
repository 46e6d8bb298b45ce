"""deploy/systemd/ against the real tools: the agent's unit runs it as a user in the group docker
with CAP_NET_ADMIN as its only capability, and that is enough for what the agent does at start
(list and install its packet-filter rules with iptables, reach the Docker socket under a
read-only /run), while the same user without the capability cannot install the rules. And
`systemd-analyze verify` finds nothing wrong with any unit.

The rules go into a network namespace of the test's own (`unshare -n`), never the host's; /run
is made read-only in a mount namespace of its own. No systemd runs here (no PID 1 systemd), so the
unit's user, groups and capabilities are applied with setpriv, as systemd would apply them."""

from __future__ import annotations

import grp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.firewall import IPV4, XTABLES_WAIT_S, install_script, parse_listing, problems
from tests.unit.test_deploy_units import SYSTEMD, service

pytestmark = pytest.mark.integration

NOBODY = 65534
BRIDGE = "br-unittest0"


def as_agent_unit(script: str, *, capabilities: bool = True) -> subprocess.CompletedProcess[str]:
    """`script` (sh) in fresh network and mount namespaces, /run read-only, as an unprivileged
    user with the agent unit's supplementary group and (or without) its ambient capabilities,
    under no-new-privileges."""
    settings = service("agent")
    assert settings["NoNewPrivileges"] == "yes"
    groups = ",".join(str(grp.getgrnam(g).gr_gid) for g in settings["SupplementaryGroups"].split())
    caps = ",".join(
        "+" + c.lower().removeprefix("cap_") for c in settings["AmbientCapabilities"].split()
    )
    if not capabilities:
        caps = "-all"
    bounding = "-all," + caps if capabilities else "-all"
    privileges = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        f"--groups={groups}",
        f"--inh-caps={caps}",
        *([f"--ambient-caps={caps}"] if capabilities else []),
        f"--bounding-set={bounding}",
        "--no-new-privs",
        "--",
        "sh",
        "-c",
        script,
    ]
    readonly_run = (
        "mount --make-rprivate / && mount --bind /run /run && mount -o remount,bind,ro /run"
    )
    outer = f'{readonly_run} && exec "$@"'
    return subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", outer, "sh", *privileges],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    for tool in ("unshare", "setpriv", "iptables", "iptables-restore", "docker"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed", pytrace=False)


def test_the_agent_units_privileges_install_and_check_the_rules_and_reach_docker() -> None:
    script = install_script(parse_listing(""), IPV4, [BRIDGE])
    assert script is not None
    done = as_agent_unit(
        "id -u; echo ---; "
        f"printf '%s' '{script}' | iptables-restore -w {XTABLES_WAIT_S} --noflush || exit 10; "
        f"iptables -w {XTABLES_WAIT_S} -S || exit 11; echo ---; "
        "touch /run/portside-test 2>/dev/null && exit 12; "  # /run is read-only, as in the unit
        "docker version --format '{{.Server.APIVersion}}' 2>/dev/null || exit 13"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    uid, listing, api = done.stdout.split("---\n")
    assert uid.strip() == str(NOBODY)
    assert problems(parse_listing(listing), IPV4, [BRIDGE]) == []  # exactly the agent's rules
    assert api.strip().startswith("1.")  # the Docker API answered through the socket


def test_without_the_capability_the_rules_cannot_be_installed() -> None:
    script = install_script(parse_listing(""), IPV4, [BRIDGE])
    done = as_agent_unit(
        f"printf '%s' '{script}' | iptables-restore -w {XTABLES_WAIT_S} --noflush",
        capabilities=False,
    )
    assert done.returncode != 0
    assert "Permission denied" in done.stderr or "Operation not permitted" in done.stderr


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd)", pytrace=False)
    for unit in sorted(SYSTEMD.glob("*.service")):
        # The installed path of `portside` does not exist here: any executable stands in.
        text = unit.read_text().replace("/opt/portside/bin/portside", sys.executable)
        (tmp_path / unit.name).write_text(text)
        done = subprocess.run(
            [analyze, "verify", str(tmp_path / unit.name)], capture_output=True, text=True
        )
        assert done.returncode == 0 and not done.stderr.strip(), f"{unit.name}: {done.stderr}"

"""Unit tests of the host isolation rules: the text iptables gets, what a listing lacks, installing
twice adding nothing, removal keeping what other bridges use, and the agent refusing to start.
iptables itself is a fake here (tests/integration/test_host_isolation.py runs the real one)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from nodeagent.firewall import (
    CHAIN,
    IPV4,
    IPV6,
    Completed,
    HostFirewall,
    Listing,
    families,
    install_script,
    isolate_host,
    jump,
    parse_listing,
    problems,
    removal_script,
)
from nodeagent.runtime.docker_engine import NetworkBridge, network_bridge
from portside.errors import FailedPrecondition

INTERNAL = NetworkBridge("portside-internal", "br-06ba06e1b493", False, ("127.18.0.1",))
EGRESS = NetworkBridge("portside-egress", "br-9e572d514125", False, ("127.19.0.1",))
DUAL = NetworkBridge("dual", "br-0123456789ab", True, ("127.20.0.1", "fd00:20::1"))

DOCKER_LISTING = """\
-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
"""
INSTALLED = (
    DOCKER_LISTING
    + f"-N {CHAIN}\n"
    + f"-A INPUT -i br-9e572d514125 -j {CHAIN}\n"
    + f"-A INPUT -i br-06ba06e1b493 -j {CHAIN}\n"
    + "".join(f"-A {CHAIN} {rule}\n" for rule in IPV4.chain_rules)
)


def test_the_chain_lets_only_replies_through_and_rejects_the_rest() -> None:
    assert IPV4.chain_rules == (
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-m conntrack --ctstate DNAT -j RETURN",  # redirected to the egress proxy or DNS
        "-p tcp -j REJECT --reject-with tcp-reset",
        "-j REJECT --reject-with icmp-port-unreachable",
    )
    assert IPV6.chain_rules[0] == IPV4.chain_rules[0]
    assert IPV6.chain_rules[-1] == "-j REJECT --reject-with icmp6-port-unreachable"
    assert jump("br-06ba06e1b493") == f"-i br-06ba06e1b493 -j {CHAIN}"


@pytest.mark.parametrize("name", ["", "br-x -j ACCEPT", "br-0123456789abcdef", "br\nx", "-i"])
def test_an_interface_name_that_is_not_one_is_refused(name: str) -> None:
    with pytest.raises(FailedPrecondition):
        jump(name)


def test_the_bridge_is_dockers_name_unless_the_network_names_its_own() -> None:
    listed = {
        "Name": "portside-internal",
        "Id": "06ba06e1b49328399fb7db2fd9c9db8f6af3b6e3d2165396974be24875dc8413",
        "EnableIPv6": False,
        "IPAM": {"Config": [{"Subnet": "127.18.0.0/16", "Gateway": "127.18.0.1"}]},
        "Options": {"com.docker.network.bridge.enable_icc": "false"},
    }
    assert network_bridge(listed) == dataclasses.replace(INTERNAL, subnets=("127.18.0.0/16",))
    named = {**listed, "Options": {"com.docker.network.bridge.name": "ps0"}, "IPAM": None}
    assert network_bridge(named) == NetworkBridge("portside-internal", "ps0", False, ())


def test_ipv6_rules_only_for_networks_with_ipv6() -> None:
    assert families([INTERNAL, EGRESS]) == [(IPV4, (INTERNAL.interface, EGRESS.interface))]
    assert families([INTERNAL, DUAL, INTERNAL]) == [
        (IPV4, (INTERNAL.interface, DUAL.interface)),
        (IPV6, (DUAL.interface,)),
    ]
    assert families([]) == []


def test_a_fresh_host_gets_the_chain_and_one_jump_per_bridge_in_one_transaction() -> None:
    script = install_script(parse_listing(DOCKER_LISTING), IPV4, ["br-a", "br-b", "br-a"])
    assert script == (
        "*filter\n"
        f":{CHAIN} - [0:0]\n"
        f"-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"
        f"-A {CHAIN} -m conntrack --ctstate DNAT -j RETURN\n"
        f"-A {CHAIN} -p tcp -j REJECT --reject-with tcp-reset\n"
        f"-A {CHAIN} -j REJECT --reject-with icmp-port-unreachable\n"
        f"-I INPUT 1 -i br-a -j {CHAIN}\n"
        f"-I INPUT 1 -i br-b -j {CHAIN}\n"
        "COMMIT\n"
    )


def test_rules_in_place_need_nothing_and_a_missing_jump_only_itself() -> None:
    listing = parse_listing(INSTALLED)
    bridges = [INTERNAL.interface, EGRESS.interface]
    assert install_script(listing, IPV4, bridges) is None
    assert problems(listing, IPV4, bridges) == []
    assert install_script(listing, IPV4, ["br-new"]) == (
        f"*filter\n-I INPUT 1 -i br-new -j {CHAIN}\nCOMMIT\n"
    )
    assert problems(listing, IPV4, ["br-new"]) == [
        f"iptables: INPUT does not send br-new's packets to {CHAIN}"
    ]


def test_a_chain_with_other_rules_is_replaced_whole() -> None:
    tampered = INSTALLED.replace(f"-A {CHAIN} -p tcp -j REJECT --reject-with tcp-reset\n", "")
    listing = parse_listing(tampered + f"-A {CHAIN} -j ACCEPT\n")
    assert problems(listing, IPV4, [INTERNAL.interface]) == [
        f"iptables: chain {CHAIN} holds other rules than Portside's"
    ]
    script = install_script(listing, IPV4, [INTERNAL.interface])
    assert script is not None and script.startswith(f"*filter\n:{CHAIN} - [0:0]\n")
    assert "-I INPUT" not in script


def test_nothing_installed_is_named_per_missing_piece() -> None:
    assert problems(Listing(), IPV6, ["br-a"]) == [
        f"ip6tables: no chain {CHAIN}",
        f"ip6tables: INPUT does not send br-a's packets to {CHAIN}",
    ]


def test_removal_keeps_the_chain_while_another_bridge_jumps_to_it() -> None:
    listing = parse_listing(INSTALLED + f"-A INPUT -i br-06ba06e1b493 -j {CHAIN}\n")
    assert removal_script(listing, IPV4, [INTERNAL.interface]) == (
        "*filter\n"
        f"-D INPUT -i br-06ba06e1b493 -j {CHAIN}\n"
        f"-D INPUT -i br-06ba06e1b493 -j {CHAIN}\n"
        "COMMIT\n"
    )
    assert removal_script(listing, IPV4, [INTERNAL.interface, EGRESS.interface]) == (
        "*filter\n"
        f"-D INPUT -i br-9e572d514125 -j {CHAIN}\n"
        f"-D INPUT -i br-06ba06e1b493 -j {CHAIN}\n"
        f"-D INPUT -i br-06ba06e1b493 -j {CHAIN}\n"
        f"-F {CHAIN}\n-X {CHAIN}\n"
        "COMMIT\n"
    )
    assert removal_script(parse_listing(DOCKER_LISTING), IPV4, ["br-a"]) is None


class FakeIptables:
    """iptables and ip6tables as far as HostFirewall uses them, one filter table each."""

    def __init__(self, listing: str = DOCKER_LISTING) -> None:
        self.tables = {"iptables": _table(listing), "ip6tables": _table(DOCKER_LISTING)}
        self.calls: list[list[str]] = []

    async def __call__(self, argv: Sequence[str], stdin: str | None = None) -> Completed:
        self.calls.append(list(argv))
        tool = argv[0].removesuffix("-restore")
        chains, rules = self.tables[tool]
        if argv[1:] == ["--version"]:
            return Completed(0, f"{tool} v1.8.9 (nf_tables)\n", "")
        if argv[-1] == "-S":
            lines = [f"-N {c}" for c in chains] + [f"-A {c} {r}" for c in rules for r in rules[c]]
            return Completed(0, "".join(f"{line}\n" for line in lines), "")
        for line in (stdin or "").splitlines():
            word, _, rest = line.partition(" ")
            chain, _, rule = rest.partition(" ")
            if word.startswith(":"):
                chains.add(word[1:])
                rules[word[1:]] = []
            elif word == "-A":
                rules.setdefault(chain, []).append(rule)
            elif word == "-I":
                rules.setdefault(chain, []).insert(0, rule.removeprefix("1 "))
            elif word == "-D":
                rules[chain].remove(rule)
            elif word == "-F":
                rules[chain] = []
            elif word == "-X":
                chains.discard(chain)
                del rules[chain]
        return Completed(0, "", "")

    def rules(self, tool: str = "iptables") -> dict[str, list[str]]:
        return self.tables[tool][1]


def _table(listing: str) -> tuple[set[str], dict[str, list[str]]]:
    parsed = parse_listing(listing)
    return set(parsed.chains), {c: list(r) for c, r in parsed.rules.items()}


async def test_installing_twice_adds_nothing_the_second_time(tmp_path: Path) -> None:
    iptables = FakeIptables()
    firewall = HostFirewall(iptables, lock_path=str(tmp_path / "lock"))
    await firewall.install([INTERNAL, EGRESS])
    restores = [c for c in iptables.calls if c[0] == "iptables-restore"]
    assert len(restores) == 1 and not any(c[0].startswith("ip6tables") for c in iptables.calls)
    await firewall.install([INTERNAL, EGRESS])
    await HostFirewall(iptables, lock_path=str(tmp_path / "lock")).install([EGRESS])
    assert [c for c in iptables.calls if c[0] == "iptables-restore"] == restores
    assert iptables.rules()["INPUT"] == [jump(EGRESS.interface), jump(INTERNAL.interface)]
    assert iptables.rules()[CHAIN] == list(IPV4.chain_rules)
    assert await firewall.check([INTERNAL, EGRESS]) == []


async def test_ipv6_networks_get_ip6tables_rules_too(tmp_path: Path) -> None:
    iptables = FakeIptables()
    firewall = HostFirewall(iptables, lock_path=str(tmp_path / "lock"))
    await firewall.enforce([INTERNAL, DUAL])
    assert iptables.rules("ip6tables")["INPUT"] == [jump(DUAL.interface)]
    assert iptables.rules("ip6tables")[CHAIN] == list(IPV6.chain_rules)
    await firewall.remove([DUAL])
    assert await firewall.check([DUAL]) == [
        f"iptables: INPUT does not send {DUAL.interface}'s packets to {CHAIN}",
        f"ip6tables: no chain {CHAIN}",
        f"ip6tables: INPUT does not send {DUAL.interface}'s packets to {CHAIN}",
    ]
    assert await firewall.check([INTERNAL]) == []


class FakeRuntime:
    def __init__(self, bridges: list[NetworkBridge]) -> None:
        self.bridges = bridges
        self.guard: Callable[[list[NetworkBridge]], Awaitable[None]] | None = None

    async def guard_networks(self, guard: Callable[[list[NetworkBridge]], Awaitable[None]]) -> None:
        self.guard = guard
        await guard(self.bridges)


async def test_the_agent_guards_its_networks_for_as_long_as_it_runs(tmp_path: Path) -> None:
    iptables = FakeIptables()
    runtime = FakeRuntime([INTERNAL, EGRESS])
    firewall = HostFirewall(iptables, lock_path=str(tmp_path / "lock"))
    await isolate_host(runtime, allow_host_access=False, firewall=firewall)
    assert await firewall.check([INTERNAL, EGRESS]) == []
    # The networks were removed and made again: new bridges, guarded before any container joins.
    assert runtime.guard is not None
    renewed = NetworkBridge("portside-internal", "br-aaaaaaaaaaaa", False, ("127.18.0.1",))
    await runtime.guard([renewed, EGRESS])
    assert await firewall.check([renewed]) == []


async def test_the_agent_refuses_to_start_with_one_line_without_iptables(tmp_path: Path) -> None:
    async def missing(argv: Sequence[str], stdin: str | None = None) -> Completed:
        raise FailedPrecondition(f"{argv[0]} is not installed")

    firewall = HostFirewall(missing, lock_path=str(tmp_path / "lock"))
    with pytest.raises(SystemExit) as refused:
        await isolate_host(FakeRuntime([INTERNAL]), allow_host_access=False, firewall=firewall)
    message = str(refused.value.code)
    assert "\n" not in message and message.startswith("portside agent: ")
    assert "iptables is not installed" in message and "--allow-host-access" in message


async def test_the_agent_refuses_to_start_when_not_root(tmp_path: Path) -> None:
    async def not_root(argv: Sequence[str], stdin: str | None = None) -> Completed:
        said = "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: "
        return Completed(4, "", said + "Permission denied (you must be root)\n")

    firewall = HostFirewall(not_root, lock_path=str(tmp_path / "lock"))
    with pytest.raises(SystemExit) as refused:
        await isolate_host(FakeRuntime([INTERNAL]), allow_host_access=False, firewall=firewall)
    assert "iptables -w 10 -S failed (4):" in str(refused.value.code)
    assert "you must be root" in str(refused.value.code)


async def test_allow_host_access_installs_nothing_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    iptables = FakeIptables()
    runtime = FakeRuntime([INTERNAL])
    firewall = HostFirewall(iptables, lock_path=str(tmp_path / "lock"))
    with caplog.at_level(logging.WARNING, logger="nodeagent.firewall"):
        await isolate_host(runtime, allow_host_access=True, firewall=firewall)
    assert iptables.calls == [] and runtime.guard is None
    assert any("--allow-host-access" in r.getMessage() for r in caplog.records)

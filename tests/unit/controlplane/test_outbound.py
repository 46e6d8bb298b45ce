"""An instance's own outbound policy as the control plane checks and stores it."""

from __future__ import annotations

import pytest

from controlplane.outbound import checked_policy, decode_policy, encode_policy, outbound_key
from portside.errors import InvalidArgument
from portside.spec import Gateway, OutboundPolicy

GATEWAY = Gateway(module="gateway.py", source="async def billing(request, env, ctx): ...\n")


def test_patterns_are_stripped_and_kept_in_order() -> None:
    policy = OutboundPolicy(
        allowed_hosts=(" api.example.com ", "*.example.org", "192.0.2.0/24"),
        denied_hosts=("203.0.113.7",),
        outbound_by_host={"billing.internal ": "billing"},
    )
    checked = checked_policy(policy, GATEWAY)
    assert checked.allowed_hosts == ("api.example.com", "*.example.org", "192.0.2.0/24")
    assert checked.denied_hosts == ("203.0.113.7",)
    assert dict(checked.outbound_by_host) == {"billing.internal": "billing"}


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (OutboundPolicy(allowed_hosts=("ok.example.com", "bad host")), "policy.allowed_hosts[1]"),
        (OutboundPolicy(denied_hosts=("",)), "policy.denied_hosts[0]"),
        (OutboundPolicy(outbound_by_host={"a b": "billing"}), "policy.outbound_by_host['a b']"),
        (OutboundPolicy(outbound_by_host={"x.internal": "not-a-name"}), "'x.internal'"),
    ],
)
def test_a_bad_pattern_or_handler_names_its_field(policy: OutboundPolicy, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        checked_policy(policy, GATEWAY)


def test_handlers_need_a_deployed_gateway_module() -> None:
    policy = OutboundPolicy(outbound_by_host={"billing.internal": "billing"})
    with pytest.raises(InvalidArgument, match="no gateway module is deployed"):
        checked_policy(policy, None)
    # Lists alone need none.
    assert checked_policy(OutboundPolicy(allowed_hosts=("a.example",)), None).allowed_hosts


def test_a_policy_survives_the_store_and_the_strictest_one_is_empty() -> None:
    policy = OutboundPolicy(
        enable_internet=True,
        allowed_hosts=("a.example",),
        denied_hosts=("203.0.113.0/24",),
        outbound_by_host={"sub.service": "route_sub"},
        intercept_https=True,
    )
    assert decode_policy(encode_policy(policy)) == policy
    # An own policy with nothing in it is a real one: no internet, nothing allowed.
    assert encode_policy(OutboundPolicy()) == b"{}"
    assert decode_policy(b"{}") == OutboundPolicy()


def test_keys_sit_under_the_instance_id() -> None:
    assert outbound_key("App", "abc") == "/portside/outbound/App/abc"

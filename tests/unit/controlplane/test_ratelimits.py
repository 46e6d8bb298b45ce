"""The control plane's rate-limit helpers (controlplane/ratelimits.py): which periods count as
current, record keys, and the cap on a reply's counts."""

from __future__ import annotations

from controlplane import records
from controlplane.ratelimits import is_current, largest, record_key
from portside.spec import RateLimit

RULE = RateLimit("LIMITER", limit=10, period_s=60.0)


def test_periods_are_fixed_windows_of_unix_time() -> None:
    assert RULE.period_at(0.0) == 0
    assert RULE.period_at(59.999) == 0
    assert RULE.period_at(60.0) == 1
    assert RateLimit("L", 1, 0.5).period_at(10.25) == 20


def test_the_period_now_and_its_neighbours_are_current() -> None:
    now = 6000.0  # period 100
    assert [p for p in range(97, 104) if is_current(RULE, p, now)] == [99, 100, 101]


def test_record_keys_name_binding_period_and_edge() -> None:
    key = record_key("LIMITER", 100, "host-127.0.0.1:8787-w1")
    assert key == records.RATE_LIMITS + "LIMITER/100/host-127.0.0.1:8787-w1"


def test_a_reply_keeps_the_largest_counts() -> None:
    counts = {("L", f"k{i}", 1): i for i in range(10)}
    assert largest(counts, 20) is counts
    assert largest(counts, 3) == {("L", "k9", 1): 9, ("L", "k8", 1): 8, ("L", "k7", 1): 7}

"""Pool sizing: how many instances a pool should have, from its CPU samples, like Kubernetes' HPA,
with a burst ("panic") mode like Knative's. The rule is in `decide`'s docstring.

A pure function over a snapshot; the leader's loop gathers samples and applies the decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from portside.spec import CPU_SAMPLE_INTERVAL_S, Autoscaling

# Which limit set `desired`; stable strings, so metrics and logs can group by them.
CLAMP_NONE = ""
CLAMP_MINIMUM = "minimum"
CLAMP_MAXIMUM = "maximum"  # autoscaling.maximum_instances
CLAMP_MAX_INSTANCES = "max_instances"  # the class's max_instances, when the pool sets no maximum
CLAMP_CAPACITY = "capacity"
CLAMP_STABILISED = "stabilised"
CLAMP_PANIC = "panic"  # a scale-down held while the pool is in panic mode

DEFAULT_TOLERANCE = 0.1
# A scale-up must be called for by the samples of this many ticks in a row (one tick a sample,
# CPU_SAMPLE_INTERVAL_S apart): one noisy 1 s sample does not grow a pool under steady load.
STABLE_SAMPLES = 2
# Panic (burst) mode: a single sample at PANIC_RATIO times the target scales up at once and
# holds every scale-down for PANIC_WINDOW_S (Knative: 200% of target, a 6 s panic window). CPU
# cannot read above 100% of the instance type, so for targets above 45% the threshold is
# SATURATED_PERCENT: a pool at its CPU quota may want any multiple of what it shows.
PANIC_RATIO = 2.0
SATURATED_PERCENT = 90.0
PANIC_WINDOW_S = 6.0
# The window of STABLE_SAMPLES ticks, with half a tick of slack for timer jitter.
STABLE_WINDOW_S = (STABLE_SAMPLES - 0.5) * CPU_SAMPLE_INTERVAL_S
# current × ratio carries float noise: 15 × (155 / 75) is 31.000000000000004, which must be 31.
RATIO_DIGITS = 9


@dataclass(frozen=True)
class InstanceSample:
    """One current (non-draining) pool instance and its latest CPU sample.

    `cpu_percent` is CPU used in % of the instance type's vCPU (briefly above 100 is possible);
    None while the instance has no sample yet or is not ready.
    """

    instance_id: str
    cpu_percent: float | None


@dataclass(frozen=True)
class PoolState:
    """What the autoscaler sees of one pool: its settings, one sample per instance, free room."""

    class_name: str
    autoscaling: Autoscaling
    max_instances: int  # the class's max_instances; 0: none
    samples: tuple[InstanceSample, ...]
    room: int  # how many more instances of this class the live nodes can hold now


@dataclass(frozen=True)
class Recommendation:
    """A raw recommendation at time `at` (seconds, on whatever clock the caller passes as now)."""

    at: float
    desired: int


@dataclass(frozen=True)
class ScaleDecision:
    """The outcome of one autoscaler tick for one pool.

    `raw` is ceil(current × utilisation / target) before stabilisation and clamps; `desired` is
    what to converge to; `clamp` is a CLAMP_* constant naming what last moved `desired` off `raw`.
    `history` and `panic_until` are what the caller passes back on the next tick.
    """

    current: int
    desired: int
    raw: int
    utilisation: float | None  # average CPU % that produced raw; None without samples
    clamp: str
    reason: str
    history: tuple[Recommendation, ...]
    panic_until: float | None = None  # while panicking: when the panic window ends


@dataclass(frozen=True)
class _Raw:
    """The metric step's result: the raw count, the utilisation behind it, and how it got there."""

    count: int
    utilisation: float | None
    note: str


def pool_maximum(state: PoolState) -> tuple[int, str]:
    """The pool's upper bound (0: none) and the CLAMP_* constant that names it."""
    if state.autoscaling.maximum_instances > 0:
        return state.autoscaling.maximum_instances, CLAMP_MAXIMUM
    return state.max_instances, CLAMP_MAX_INSTANCES


def raw_recommendation(
    samples: tuple[InstanceSample, ...], cpu_target: float, tolerance: float
) -> _Raw:
    """The count the CPU samples call for, with HPA's tolerance and missing-sample rules."""
    current = len(samples)
    measured = [s.cpu_percent for s in samples if s.cpu_percent is not None]
    if not measured:
        return _Raw(current, None, "no samples")
    average = sum(measured) / len(measured)
    ratio = average / cpu_target
    if abs(ratio - 1) <= tolerance:
        return _Raw(current, average, "within tolerance")

    missing = current - len(measured)
    if missing:
        # Instances without a sample are usually still booting and about to take load. Counting
        # them as idle when scaling up and as exactly at target when scaling down damps both
        # moves: they never make the pool grow faster than the measured ones ask, nor shrink.
        fill = 0.0 if ratio > 1 else cpu_target
        filled_average = (sum(measured) + missing * fill) / current
        filled_ratio = filled_average / cpu_target
        flipped = (ratio > 1) != (filled_ratio > 1)
        if flipped or abs(filled_ratio - 1) <= tolerance:
            return _Raw(current, filled_average, f"{missing} unsampled cancel the change")
        average, ratio = filled_average, filled_ratio

    count = math.ceil(round(current * ratio, RATIO_DIGITS))
    note = f"{missing} unsampled filled in" if missing else ""
    return _Raw(count, average, note)


def stabilise(
    raw: int,
    current: int,
    history: tuple[Recommendation, ...],
    now: float,
    window_s: float,
    up_window_s: float = STABLE_WINDOW_S,
) -> tuple[int, tuple[Recommendation, ...]]:
    """A change must be called for for a whole window, this tick's raw count included: scale up
    only to the lowest raw count of the last `up_window_s` seconds (STABLE_SAMPLES ticks), scale
    down only to the highest of the last `window_s` (the pool's scale_down_delay).

    Returns that count and the history to keep: this tick's raw plus the ones still in a window.
    """
    if not history:
        # A new leader knows no past: seeding with the current count, as HPA does, keeps a
        # failover from shrinking every pool on its first tick's samples. Dated one stable
        # window back, it holds scale-down but not scale-up: a new leader's first tick scales up
        # on one sample, as a pool with a tick missed does.
        history = (Recommendation(now - up_window_s, current),)
    # A recommendation from the future (a wall clock that stepped back) counts as made now, so
    # it holds scale-down for at most one window rather than for as long as the step.
    keep_s = max(window_s, up_window_s)
    kept = tuple(Recommendation(min(r.at, now), r.desired) for r in history if r.at > now - keep_s)
    kept = (*kept, Recommendation(now, raw))
    if raw > current:
        lowest = min(r.desired for r in kept if r.at > now - up_window_s)
        return max(lowest, current), kept
    highest = max((r.desired for r in kept if r.at > now - window_s), default=raw)
    return min(highest, current), kept


def panic_threshold(cpu_target: float) -> float:
    """The average CPU % of one sample that puts a pool in panic mode."""
    return min(PANIC_RATIO * cpu_target, SATURATED_PERCENT)


def decide(
    state: PoolState,
    history: tuple[Recommendation, ...],
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
    panic_until: float | None = None,
) -> ScaleDecision:
    """How many instances `state`'s pool should converge to, and why. Called once a CPU sample
    (every CPU_SAMPLE_INTERVAL_S); `history` and `panic_until` are the previous decision's.

    1. Raw count: ceil(current × average CPU / target), unchanged within `tolerance`
       (raw_recommendation: HPA's rule, with its handling of unsampled instances).
    2. Stable mode (stabilise): scale up to the lowest raw count of the last STABLE_SAMPLES
       ticks, scale down to the highest of the last `scale_down_delay_s`. Steady load does not
       flap: a count changes only when every sample of a window asks for it, and a pool that
       grew shrinks back no sooner than a whole scale-down delay of lower samples later.
    3. Panic mode: a sample whose average reaches `panic_threshold` (twice the target, at most
       SATURATED_PERCENT) and asks for more scales up to its raw count at once and starts a
       PANIC_WINDOW_S panic window; while it lasts every sample may scale up at once and none
       scales down. Each such sample restarts the window.
    4. Clamps: [minimum, maximum], and growth to what the cluster has room for.
    """
    scaling = state.autoscaling
    if scaling.cpu_target <= 0:
        raise ValueError(f"class {state.class_name}: cpu_target must be above 0")
    current = len(state.samples)
    raw = raw_recommendation(state.samples, scaling.cpu_target, tolerance)
    desired, kept = stabilise(raw.count, current, history, now, scaling.scale_down_delay_s)
    clamp = CLAMP_STABILISED if desired != raw.count else CLAMP_NONE

    burst = (
        raw.count > current
        and raw.utilisation is not None
        and raw.utilisation >= panic_threshold(scaling.cpu_target)
    )
    if burst:
        panic_until = now + PANIC_WINDOW_S
    panicking = panic_until is not None and now < panic_until
    if panicking:
        desired = max(raw.count, current)
        clamp = CLAMP_PANIC if desired != raw.count else CLAMP_NONE

    if desired < scaling.minimum_instances:
        desired, clamp = scaling.minimum_instances, CLAMP_MINIMUM
    maximum, maximum_clamp = pool_maximum(state)
    if 0 < maximum < desired:
        desired, clamp = maximum, maximum_clamp
    # Capacity only caps growth: instances already running keep running even if the nodes
    # that hold them now count as full.
    room = max(state.room, 0)
    if desired > current + room:
        desired, clamp = current + room, CLAMP_CAPACITY

    sampled = sum(1 for s in state.samples if s.cpu_percent is not None)
    cpu = "no CPU" if raw.utilisation is None else f"CPU {raw.utilisation:.1f}%"
    reason = (
        f"{state.class_name}: {current} instances, {sampled} sampled, "
        f"{cpu} for target {scaling.cpu_target:g}%"
        f"{f' ({raw.note})' if raw.note else ''}: raw {raw.count}, desired {desired}"
    )
    if burst:
        reason += f" (panic: {panic_threshold(scaling.cpu_target):g}% or more in one sample)"
    if clamp == CLAMP_STABILISED and raw.count > current:
        reason += f" (scale-up waits for {STABLE_SAMPLES} samples in a row)"
    elif clamp == CLAMP_STABILISED:
        reason += f" (scale-down held at the highest of the last {scaling.scale_down_delay_s:g}s)"
    elif clamp == CLAMP_PANIC:
        reason += " (panic mode: no scale-down)"
    elif clamp == CLAMP_CAPACITY:
        reason += f" (capacity: room for {room} more)"
    elif clamp:
        reason += f" ({clamp} {desired})"
    return ScaleDecision(
        current,
        desired,
        raw.count,
        raw.utilisation,
        clamp,
        reason,
        kept,
        panic_until if panicking else None,
    )

"""The contract every process shares (portside/states, events, instances, usage, headers,
errors, capacity, convert): one vocabulary, one table, one converter each way. No I/O."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest

from portside import convert, errors, headers
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import types_pb2 as pb
from portside.capacity import VCPU_EPSILON, Resources
from portside.events import Event, EventKind
from portside.instances import InstanceInfo, InstanceStatus, PoolAssignment, PoolMember
from portside.spec import INSTANCE_TYPES, Node, NodeInfo
from portside.states import InstanceState
from portside.usage import Usage

# --- states -----------------------------------------------------------------------------------


def test_states_have_cloudflares_names_and_portsides_own() -> None:
    names = {s.value for s in InstanceState}
    assert {"running", "healthy", "stopping", "stopped", "stopped_with_code"} <= names
    assert {"placed", "starting", "sleeping"} <= names


@pytest.mark.parametrize(
    ("state", "awake", "running", "ready"),
    [
        (InstanceState.PLACED, False, False, False),
        (InstanceState.STARTING, True, False, False),
        (InstanceState.RUNNING, True, True, False),
        (InstanceState.HEALTHY, True, True, True),
        (InstanceState.STOPPING, True, False, False),
        (InstanceState.SLEEPING, False, False, False),
        (InstanceState.STOPPED, False, False, False),
        (InstanceState.STOPPED_WITH_CODE, False, False, False),
    ],
)
def test_what_each_state_means(
    state: InstanceState, awake: bool, running: bool, ready: bool
) -> None:
    assert (state.awake, state.running, state.ready) == (awake, running, ready)


def test_a_state_is_read_back_from_its_wire_name_or_refused_with_the_choices() -> None:
    for state in InstanceState:
        assert InstanceState.parse(state.value) is state
    with pytest.raises(errors.InvalidArgument, match="stopped_with_code") as caught:
        InstanceState.parse("exited", "ListInstancesRequest.state")
    assert str(caught.value).startswith("ListInstancesRequest.state: 'exited' is not a state")


# --- headers ----------------------------------------------------------------------------------


def test_header_names_are_distinct_and_portsides() -> None:
    names = [headers.CLASS, headers.INSTANCE, headers.ERROR, headers.LOCATION_HINT]
    assert len({n.lower() for n in names}) == len(names)
    assert all(n.startswith("Portside-") for n in names)


# --- converters -------------------------------------------------------------------------------

NODE = Node("n1", "127.0.0.1:7080", "127.0.0.1:7081", "fra", 50.1, 8.7, 4.0, 8192, {"a": "b"})
INFO = InstanceInfo(
    class_name="Echo",
    name="a",
    instance_id="i1",
    state=InstanceState.STOPPED_WITH_CODE,
    exit_code=3,
    node_id="n1",
    region="fra",
    since=12.5,
    pool=True,
    in_flight=2,
    backoff_until=1_700_000_004.5,
    restarts=3,
)

ROUND_TRIPS: list[tuple[Any, Any, Any]] = [
    (INFO, convert.instance_info_to_pb, convert.instance_info_from_pb),
    (InstanceInfo("Echo", "b"), convert.instance_info_to_pb, convert.instance_info_from_pb),
    (
        InstanceStatus(INFO, cpu_percent=12.5, memory_bytes=1 << 20),
        convert.instance_status_to_pb,
        convert.instance_status_from_pb,
    ),
    (InstanceStatus(INFO), convert.instance_status_to_pb, convert.instance_status_from_pb),
    (
        Event(EventKind.EXITED, 1.5, "C", "n", "i", "nd", exit_code=143, signal=15, revision=7),
        convert.event_to_pb,
        convert.event_from_pb,
    ),
    (Event(EventKind.READY, 2.0, "C", "n"), convert.event_to_pb, convert.event_from_pb),
    (
        Usage("C", "2026-11-27", "i1", 1000, 0.25, 1.0, 4.0, 0.1, 10),
        convert.usage_to_pb,
        convert.usage_from_pb,
    ),
    (
        PoolMember("P", "P-1", "i1", "n1", "127.0.0.1:7080", "fra", 50.1, 8.7, True, False),
        convert.pool_member_to_pb,
        convert.pool_member_from_pb,
    ),
    (
        PoolAssignment("P", "P-1", "i1", draining=True),
        convert.pool_assignment_to_pb,
        convert.pool_assignment_from_pb,
    ),
    (
        NodeInfo(NODE, True, Resources(0.5, 256), 2),
        convert.node_info_to_pb,
        convert.node_info_from_pb,
    ),
]


@pytest.mark.parametrize(
    ("value", "to_pb", "from_pb"), ROUND_TRIPS, ids=[type(v[0]).__name__ for v in ROUND_TRIPS]
)
def test_every_shared_type_round_trips_through_its_message(
    value: Any, to_pb: Any, from_pb: Any
) -> None:
    assert from_pb(to_pb(value)) == value


def test_every_field_of_the_shared_types_reaches_the_wire() -> None:
    # A field added to a domain type but not to its converter would be dropped silently.
    for value, to_pb, _ in ROUND_TRIPS:
        message = to_pb(value)
        for f in dataclasses.fields(value):
            if f.name in ("info", "node", "used"):
                continue  # nested: covered by their own round trips
            assert message.DESCRIPTOR.fields_by_name.get(f.name) is not None or f.name in (
                "instances",
                "alive",
            ), (type(value).__name__, f.name)


def test_an_unset_exit_code_stays_unset_and_states_are_the_enum() -> None:
    info = convert.instance_info_from_pb(pb.InstanceInfo(class_name="C", name="a", state="healthy"))
    assert info.exit_code is None and info.state is InstanceState.HEALTHY and info.running


def test_a_message_with_an_unknown_state_or_kind_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument):
        convert.instance_info_from_pb(pb.InstanceInfo(state="exited"))
    with pytest.raises(ValueError, match="event kind"):
        convert.event_from_pb(pb.Event(kind="rebooted"))


def test_a_node_info_keeps_its_node() -> None:
    m = cp.NodeInfo(node=convert.node_to_pb(NODE), used_vcpu=0.5, used_memory_mib=256)
    n = convert.node_info_from_pb(m)
    assert n.node == NODE and n.used == Resources(0.5, 256) and not n.alive


# --- errors -----------------------------------------------------------------------------------


C = grpc.StatusCode


def _all_error_classes() -> list[type[errors.PortsideError]]:
    found, todo = [], [errors.PortsideError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == "portside.errors"]


def test_every_error_class_has_its_own_row_and_kind() -> None:
    classes = _all_error_classes()
    assert set(classes) == set(errors.ERROR_KINDS)
    names = [k.name for k in errors.ERROR_KINDS.values()]
    assert len(names) == len(set(names))
    for cls in classes:
        assert errors.error_class(errors.ERROR_KINDS[cls].name) is cls


@pytest.mark.parametrize(
    ("exc", "kind", "http", "code"),
    [
        (errors.NoCapacity("full"), "no-capacity", 503, C.RESOURCE_EXHAUSTED),
        (errors.ContainerExited("gone", 3), "container-exited", 502, C.ABORTED),
        (errors.BootTimeout("slow"), "boot-timeout", 504, C.DEADLINE_EXCEEDED),
        (errors.StoreError("etcd"), "store-unavailable", 503, C.UNAVAILABLE),
        (errors.FailedPrecondition("x"), "failed-precondition", 409, C.FAILED_PRECONDITION),
        (errors.NoRoute("/x"), "no-route", 404, C.NOT_FOUND),
        (errors.NodeUnreachable("n1"), "node-unreachable", 502, C.UNAVAILABLE),
        (errors.ImageUnavailable("img"), "image-unavailable", 502, C.FAILED_PRECONDITION),
        (errors.NotRunning("asleep"), "not-running", 409, C.FAILED_PRECONDITION),
        (errors.ConfigError("f.toml", "a", "bad"), "invalid-config", 400, C.INVALID_ARGUMENT),
    ],
)
def test_the_table(exc: errors.PortsideError, kind: str, http: int, code: grpc.StatusCode) -> None:
    row = errors.error_kind(exc)
    assert (row.name, row.http_status, row.grpc_code) == (kind, http, code)


def test_a_subclass_outside_the_table_takes_its_bases_row() -> None:
    class Mine(errors.NoCapacity):
        pass

    assert errors.error_kind(Mine("x")).name == "no-capacity"


def rpc_error(
    code: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*metadata), details)


@pytest.mark.parametrize("exc", [cls("one line") for cls in _all_error_classes()], ids=str)
def test_an_error_crosses_a_call_as_its_own_class_and_reason(exc: errors.PortsideError) -> None:
    if isinstance(exc, errors.ConfigError):
        exc = errors.ConfigError("portside.toml", "routes[0].path", "must start with /")
    rpc = rpc_error(errors.error_kind(exc).grpc_code, str(exc), errors.rpc_metadata(exc))
    back = errors.from_rpc(rpc, "control plane 127.0.0.1:7070")
    assert type(back) is type(exc) and str(back) == str(exc)


def test_an_exit_code_crosses_a_call() -> None:
    exc = errors.ContainerExited("exited with code 3 before its port answered", exit_code=3)
    rpc = rpc_error(grpc.StatusCode.ABORTED, str(exc), errors.rpc_metadata(exc))
    back = errors.from_rpc(rpc)
    assert isinstance(back, errors.ContainerExited) and back.exit_code == 3


def test_a_call_that_timed_out_on_the_way_is_no_boot_timeout() -> None:
    # The caller's own deadline (ListClasses, say): DEADLINE_EXCEEDED without a kind.
    back = errors.from_rpc(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "cp")
    assert type(back) is errors.Timeout and "cp did not answer in time" in str(back)
    assert not isinstance(back, errors.BootTimeout)


def test_a_call_that_failed_in_transport_names_what_was_unreachable() -> None:
    rpc = rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses\nmore")
    back = errors.from_rpc(rpc, "the agent of node n1", errors.NodeUnreachable)
    assert type(back) is errors.NodeUnreachable
    assert str(back) == "the agent of node n1 is unreachable: failed to connect to all addresses"
    # An UNAVAILABLE a Portside handler answered with is its own error, not the transport's.
    store = errors.StoreError("etcd at 127.0.0.1:2379 did not answer")
    rpc = rpc_error(grpc.StatusCode.UNAVAILABLE, str(store), errors.rpc_metadata(store))
    assert type(errors.from_rpc(rpc, "cp")) is errors.StoreError


# --- usage and capacity -----------------------------------------------------------------------


def test_usage_adds_amounts_and_keeps_its_keys() -> None:
    a = Usage("C", "2026-11-27", "i1", running_ms=10, vcpu_seconds=1.0, egress_bytes=5)
    b = Usage("C", "2026-11-27", "i2", running_ms=20, vcpu_seconds=0.5, egress_bytes=1)
    total = Usage("C", "2026-11-27") + a + b
    assert (total.instance_id, total.running_ms, total.vcpu_seconds, total.egress_bytes) == (
        "",
        30,
        1.5,
        6,
    )


def test_the_one_fit_rule_forgives_float_sums_and_nothing_more() -> None:
    basic = Resources.of(INSTANCE_TYPES["basic"])  # 0.25 vCPU, 1024 MiB
    left = Resources(1.0, 4096) - Resources(0.1 + 0.2 + 0.45, 0)
    assert left.fits(basic) and left.how_many(basic) == 1
    assert not Resources(0.25 - 10 * VCPU_EPSILON, 4096).fits(basic)
    assert not Resources(1.0, 1023).fits(basic)
    assert Resources(2.0, 3 * 1024).how_many(basic) == 3
    assert Resources(-1.0, 0).how_many(basic) == 0

"""The lifecycle API's logic: find an instance's placement (placing it on Start), forward the verb
to the agent of its node, and keep the control plane's part (records, state values, events).

Exec and log chunks are relayed as the agent sends them: this module is a relay between two gRPC
streams, and converting each chunk twice would buy nothing. Everything else is domain types."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace

import grpc

from controlplane import records
from controlplane.agents import AgentClients, translate
from controlplane.events import EventLog
from controlplane.outbound import InstanceOutbound
from controlplane.placebatch import PlacementBatcher
from controlplane.placement import resolve_named
from controlplane.records import InstanceRecord
from controlplane.scheduleloop import delete_instance_schedules
from controlplane.statevalues import StateValues
from controlplane.store import Store
from controlplane.view import ClusterView
from portside import geo
from portside.api.v1 import nodeagent_pb2 as na
from portside.api.v1 import types_pb2 as pb
from portside.convert import class_to_pb, instance_info_from_pb, outbound_to_pb, snapshot_to_pb
from portside.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PortsideError,
    Unavailable,
)
from portside.events import Event, EventKind
from portside.instances import InstanceInfo
from portside.net import Deadlines
from portside.snapshots import Snapshot
from portside.spec import ContainerClass, Node, instance_id
from portside.states import InstanceState

log = logging.getLogger(__name__)
_DRAIN_S = 1.0  # how long a failing exec waits for its client to finish sending

DEFAULT_GRACE_S = 10.0  # Stop's grace period when the request gives none
DESTROY_S = 30.0  # removing a container and its writable layer can take a while on a busy disk


@dataclass(frozen=True)
class Located:
    """A placed instance and its node; `node` is None when that node is gone (lease expired):
    the instance is then not running anywhere, and its next Start places it again."""

    cls: ContainerClass
    record: InstanceRecord
    node: Node | None

    @property
    def label(self) -> str:
        return f"{self.cls.name}/{self.record.name}"


class Lifecycle:
    def __init__(
        self,
        store: Store,
        view: ClusterView,
        agents: AgentClients,
        events: EventLog,
        *,
        default_region: str,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.store = store
        self.view = view
        self.agents = agents
        self.events = events
        # Every placement of this replica's Start and Resolve calls, written in groups.
        self.placements = PlacementBatcher(store, events)
        self.values = StateValues(store)
        self.outbound = InstanceOutbound(store, view, agents)
        self.default_region = default_region
        self.deadlines = deadlines or Deadlines()

    def class_named(self, name: str) -> ContainerClass:
        cls = self.view.classes.get(name)
        if cls is None:
            raise NotFound(f"unknown class {name!r}: deploy it with `portside deploy`")
        return cls

    def _class_and_id(self, class_name: str, name: str) -> tuple[ContainerClass, str]:
        cls = self.class_named(class_name)
        if not name:
            raise InvalidArgument("instance.name: must not be empty")
        return cls, instance_id(cls.name, name)

    async def locate(self, class_name: str, name: str) -> Located:
        """NotFound for an unknown class or an instance never placed (or destroyed)."""
        cls, iid = self._class_and_id(class_name, name)
        key = records.instance_key(cls.name, iid)
        record = self.view.instances.get(key)
        if record is None:
            # Another replica may have placed it a moment ago; its watch event is on the way.
            kv = await self.store.get(key)
            if kv is None:
                raise NotFound(f"instance {cls.name}/{name} was never placed: start it first")
            record = InstanceRecord.decode(kv.value)
        return Located(cls, record, self.view.nodes.get(record.node_id))

    def _running_node(self, where: Located, verb: str) -> Node:
        if where.node is None:
            raise FailedPrecondition(
                f"cannot {verb} {where.label}: it is not running (its node "
                f"{where.record.node_id} is gone); start it again first"
            )
        return where.node

    def _info(self, reply: pb.InstanceInfo, node: Node) -> InstanceInfo:
        return replace(instance_info_from_pb(reply), node_id=node.id, region=node.region)

    def _not_running_info(self, where: Located) -> InstanceInfo:
        """Placed but never booted on its node (placed), or its node is gone (stopped)."""
        return InstanceInfo(
            class_name=where.cls.name,
            name=where.record.name,
            instance_id=where.record.instance_id,
            state=InstanceState.PLACED if where.node else InstanceState.STOPPED,
            node_id=where.record.node_id,
            region=where.node.region if where.node else "",
            since=where.record.placed_at,
            pool=where.record.pool,
        )

    async def _node_to_run(
        self, cls: ContainerClass, iid: str, name: str, location_hint: str = ""
    ) -> Node:
        """The node to run instance `name` on: where it is placed, placing it first (near
        `location_hint`) if it is not or its node is gone. A pool's member must exist."""
        try:
            near = geo.lookup(location_hint or self.default_region)
        except InvalidArgument as exc:
            raise InvalidArgument(f"location_hint: {exc}") from exc
        if cls.autoscaling is not None:
            # Pool members are placed by the autoscaler only; a member is started by its name.
            record = self.view.instances.get(records.instance_key(cls.name, iid))
            if record is None:
                raise NotFound(
                    f"class {cls.name} is an autoscaled pool and has no instance {name!r}: "
                    "its instances are started by the autoscaler (see ListInstances)"
                )
            node = self.view.nodes.get(record.node_id)
            if node is None:
                raise Unavailable(f"pool instance {cls.name}/{name} is gone with its node")
            return node
        resolved = await resolve_named(
            self.store, self.view, cls, name, near, events=self.events, batch=self.placements
        )
        if resolved.placed:
            await self.outbound.placed(resolved.record, resolved.node, resolved.own_outbound)
        return resolved.node

    async def start(
        self,
        class_name: str,
        name: str,
        *,
        entrypoint: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        location_hint: str = "",
        no_wait: bool = False,
        snapshot: Snapshot | None = None,
    ) -> InstanceInfo:
        """Place the instance if it is not, and have its agent start it (from `snapshot`, one
        of the class's that controlplane.snapshots checked can be restored)."""
        cls, iid = self._class_and_id(class_name, name)
        node = await self._node_to_run(cls, iid, name, location_hint)
        request = na.AgentStartRequest(
            name=name, entrypoint=list(entrypoint), env=dict(env or {}), no_wait=no_wait
        )
        getattr(request, "class").CopyFrom(class_to_pb(cls))
        if snapshot is not None:
            request.snapshot.CopyFrom(snapshot_to_pb(snapshot))
        own = await self.outbound.own(cls.name, iid)  # unset: the agent drops any it holds
        if own is not None:
            request.outbound.CopyFrom(outbound_to_pb(own))
        # The agent waits for the port (boot_timeout) and maybe for a stop in progress first.
        reply = await self.agents.call(
            node,
            f"start {cls.name}/{name}",
            lambda s: s.Start,
            request,
            cls.boot_timeout_s + DEFAULT_GRACE_S + self.deadlines.rpc,
        )
        return self._info(reply.info, node)

    async def stop(
        self, class_name: str, name: str, *, signal: int = 0, grace_s: float = 0.0
    ) -> InstanceInfo:
        where = await self.locate(class_name, name)
        if where.node is None:
            return self._not_running_info(where)  # gone with its node: stopped already
        try:
            reply = await self.agents.call(
                where.node,
                f"stop {where.label}",
                lambda s: s.Stop,
                na.AgentStopRequest(
                    instance_id=where.record.instance_id, signal=signal, grace_seconds=grace_s
                ),
                (grace_s or DEFAULT_GRACE_S) + self.deadlines.rpc,
            )
        except NotFound:
            return self._not_running_info(where)  # placed, never booted: stopped is what was asked
        return self._info(reply.info, where.node)

    async def signal(self, class_name: str, name: str, signal: int) -> None:
        if signal <= 0:
            raise InvalidArgument(f"signal: {signal} is not a signal number (1..64)")
        where = await self.locate(class_name, name)
        node = self._running_node(where, f"send signal {signal} to")
        await self.agents.call(
            node,
            f"signal {where.label}",
            lambda s: s.Signal,
            na.AgentSignalRequest(instance_id=where.record.instance_id, signal=signal),
        )

    async def renew_activity(self, class_name: str, name: str) -> None:
        where = await self.locate(class_name, name)
        node = self._running_node(where, "renew the activity of")
        await self.agents.call(
            node,
            f"renew activity of {where.label}",
            lambda s: s.RenewActivity,
            na.AgentRenewActivityRequest(instance_id=where.record.instance_id),
        )

    async def destroy(self, class_name: str, name: str) -> None:
        """Remove the container, then forget the own outbound policy, the placement and the
        state values: in this order, so that a failure leaves something a retry can find and
        finish."""
        where = await self.locate(class_name, name)
        if where.node is not None:
            try:
                await self.agents.call(
                    where.node,
                    f"destroy {where.label}",
                    lambda s: s.Destroy,
                    na.AgentDestroyRequest(instance_id=where.record.instance_id),
                    DESTROY_S,
                )
            except NotFound:
                pass  # placed but never booted there: no container to remove
        await self.outbound.forget(where.record, where.node)
        # Its schedules first: a run must not place it again once it is forgotten.
        schedules = await delete_instance_schedules(
            self.store, where.cls.name, where.record.instance_id
        )
        key = records.instance_key(where.cls.name, where.record.instance_id)
        await self.store.delete(key)
        self.view.note_removed(key)
        removed = await self.values.delete_all(where.cls.name, where.record.instance_id)
        log.info(
            "destroyed %s (and %d state values, %d schedules)", where.label, removed, schedules
        )
        await self.events.record(
            Event(
                kind=EventKind.REMOVED,
                time=time.time(),
                class_name=where.cls.name,
                name=where.record.name,
                instance_id=where.record.instance_id,
                node_id=where.record.node_id,
            )
        )

    async def get_state(self, class_name: str, name: str) -> InstanceInfo:
        where = await self.locate(class_name, name)
        if where.node is None:
            return self._not_running_info(where)
        try:
            reply = await self.agents.call(
                where.node,
                f"get the state of {where.label}",
                lambda s: s.GetInstance,
                na.AgentGetInstanceRequest(instance_id=where.record.instance_id),
            )
        except NotFound:
            return self._not_running_info(where)  # placed, never booted
        return self._info(reply.info, where.node)

    async def exec(
        self, requests: AsyncIterator[pb.ExecRequest]
    ) -> AsyncGenerator[pb.ExecResponse, None]:
        """Relay an exec stream both ways (stdin and terminal resizes to the agent, output
        back); when either side ends, the other is cancelled. With `wake` the instance is placed
        first if it is not (as Start does), and its agent boots it if it does not run."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("message") != "start":
            raise InvalidArgument("start: the first exec message must carry start")
        start = first.start
        if not start.command:
            raise InvalidArgument("start.command: must not be empty")
        ref = start.instance
        label = f"{ref.class_name}/{ref.name}"
        try:
            if start.wake:
                cls, iid = self._class_and_id(ref.class_name, ref.name)
                node = await self._node_to_run(cls, iid, ref.name)
            else:
                where = await self.locate(ref.class_name, ref.name)
                node = self._running_node(where, "exec into")
        except PortsideError:
            if not start.stdin:
                # The client half-closes right after its start: let it, before answering with
                # the error. A call ended while the client still writes can reach it as gRPC's
                # "Internal error from Core" instead of this error.
                with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                    async with asyncio.timeout(_DRAIN_S):
                        async for _ in requests:
                            pass
            raise
        call = self.agents.stub(node).Exec()

        async def forward_stdin() -> None:
            await call.write(first)
            async for message in requests:
                await call.write(message)
            await call.done_writing()

        stdin = asyncio.create_task(forward_stdin(), name=f"exec stdin {label}")
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, node, f"exec in {label}") from exc
        finally:
            call.cancel()
            stdin.cancel()
            # The writer fails once the call ends (or the client left): nothing to report then.
            with contextlib.suppress(BaseException):
                await stdin

    async def logs(self, request: pb.LogsRequest) -> AsyncGenerator[pb.LogsResponse, None]:
        where = await self.locate(request.instance.class_name, request.instance.name)
        if where.node is None:
            raise NotFound(
                f"{where.label} has no container: its node {where.record.node_id} is gone"
            )
        call = self.agents.stub(where.node).Logs(request)
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, where.node, f"logs of {where.label}") from exc
        finally:
            call.cancel()

    async def _value_target(self, class_name: str, name: str) -> tuple[str, str]:
        """State values need no placement (hooks load them before the first start)."""
        cls, iid = self._class_and_id(class_name, name)
        return cls.name, iid

    async def get_value(self, class_name: str, name: str, key: str) -> bytes:
        cls, iid = await self._value_target(class_name, name)
        return await self.values.get(cls, iid, name, key)

    async def put_value(self, class_name: str, name: str, key: str, value: bytes) -> None:
        cls, iid = await self._value_target(class_name, name)
        await self.values.put(cls, iid, name, key, value)

    async def delete_value(self, class_name: str, name: str, key: str) -> bool:
        cls, iid = await self._value_target(class_name, name)
        return await self.values.delete(cls, iid, key)

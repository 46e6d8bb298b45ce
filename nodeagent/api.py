"""The NodeAgent gRPC service: the lifecycle verbs the control plane forwards to an instance's
node (Start, Stop, Signal, Destroy, Exec, Logs, GetInstance, RenewActivity, Snapshot, Call) and
listings.

Protobuf stays here: requests become domain values, PortsideErrors become gRPC statuses with
their one-line reason, and the instance manager never sees a `_pb2` type.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from nodeagent.calls import CALL_TIMEOUT_S, call_instance
from nodeagent.egress.policies import OutboundPolicies
from nodeagent.fence import Fence
from nodeagent.instances import InstanceManager
from nodeagent.pools import Sample
from nodeagent.runtime import ExecProcess, Overrides
from portside.api.v1 import nodeagent_pb2 as na
from portside.api.v1 import nodeagent_pb2_grpc as na_grpc
from portside.api.v1 import types_pb2 as pb
from portside.convert import (
    class_from_pb,
    instance_info_to_pb,
    instance_status_to_pb,
    outbound_from_pb,
    pool_assignment_from_pb,
    snapshot_from_pb,
    snapshot_to_pb,
    terminal_size_from_pb,
)
from portside.errors import FailedPrecondition, InvalidArgument, NotFound
from portside.instances import InstanceInfo, InstanceStatus, PoolAssignment
from portside.rpc import grpc_errors
from portside.snapshots import CREATE, TRIGGERS
from portside.spec import ContainerClass, OutboundPolicy, instance_id


def status_of(info: InstanceInfo, sample: Sample | None) -> InstanceStatus:
    """What the heartbeat reports of one instance. Only pools scale on CPU: leaving it out for
    named instances spares the store a write every heartbeat on nodes that run no pool."""
    if sample is None:
        return InstanceStatus(info)
    cpu = sample.cpu_percent if info.pool else None
    return InstanceStatus(info, cpu_percent=cpu, memory_bytes=sample.memory_bytes)


def _instance_of(ref: pb.InstanceRef) -> str:
    if not ref.class_name:
        raise InvalidArgument("instance.class_name: must not be empty")
    if not ref.name:
        raise InvalidArgument("instance.name: must not be empty")
    return instance_id(ref.class_name, ref.name)


def _required_id(iid: str) -> str:
    if not iid:
        raise InvalidArgument("instance_id: must not be empty")
    return iid


class NodeAgentService(na_grpc.NodeAgentServicer):
    """The agent's API over its instance manager; see nodeagent.proto for each RPC's codes."""

    def __init__(
        self,
        manager: InstanceManager,
        fence: Fence | None = None,
        outbound: OutboundPolicies | None = None,
        assign_pool: Callable[[PoolAssignment], None] | None = None,
    ) -> None:
        self.manager = manager
        self.fence = fence
        # The egress proxy's policy table (None: this agent runs no egress, in tests of others).
        self.outbound = outbound
        # PoolKeeper.assign (None: pool assignments come in heartbeat replies only).
        self.assign_pool = assign_pool

    @grpc_errors
    async def ListInstances(
        self, request: na.ListAgentInstancesRequest, context: Any
    ) -> na.ListAgentInstancesResponse:
        return na.ListAgentInstancesResponse(
            instances=[instance_status_to_pb(status_of(i, None)) for i in self.manager.infos()]
        )

    @grpc_errors
    async def StopInstance(
        self, request: na.StopInstanceRequest, context: Any
    ) -> na.StopInstanceResponse:
        if not await self.manager.stop(request.instance_id):
            raise NotFound(f"this agent has no instance {request.instance_id}")
        return na.StopInstanceResponse()

    async def _admitted(
        self, request: na.AgentStartRequest | na.AgentCallRequest
    ) -> ContainerClass:
        """The class of a request for instance `request.name` of it, both names checked, once
        the fence admits a named instance here (pool members are the control plane's to place,
        not fenced)."""
        spec = getattr(request, "class")  # `class` is a Python keyword
        if not spec.name:
            raise InvalidArgument("class.name: must not be empty")
        if not request.name:
            raise InvalidArgument("name: must not be empty")
        cls = class_from_pb(spec)
        if self.fence is not None and cls.autoscaling is None:
            await self.fence.admit(cls.name, request.name)
        return cls

    @grpc_errors
    async def Start(self, request: na.AgentStartRequest, context: Any) -> na.AgentInstanceResponse:
        if not getattr(request, "class").image:  # `class` is a Python keyword
            raise InvalidArgument("class.image: must not be empty")
        cls = await self._admitted(request)
        # The control plane sends the instance's own outbound policy with every Start; none
        # means its class's (an own policy dropped meanwhile is dropped here too).
        self._set_outbound(
            cls.name, request.name, request.outbound if request.HasField("outbound") else None
        )
        overrides = Overrides(tuple(request.entrypoint), dict(request.env))
        snapshot = snapshot_from_pb(request.snapshot) if request.HasField("snapshot") else None
        info = await self.manager.start(
            cls, request.name, overrides, wait=not request.no_wait, snapshot=snapshot
        )
        return na.AgentInstanceResponse(info=instance_info_to_pb(info))

    @grpc_errors
    async def AssignPool(
        self, request: na.AgentAssignPoolRequest, context: Any
    ) -> na.AgentAssignPoolResponse:
        """A pool instance just placed here: start it now rather than at the next heartbeat."""
        if not request.assignment.instance_id:
            raise InvalidArgument("assignment.instance_id: must not be empty")
        if self.assign_pool is not None:
            self.assign_pool(pool_assignment_from_pb(request.assignment))
        return na.AgentAssignPoolResponse()

    @grpc_errors
    async def SetOutbound(
        self, request: na.AgentSetOutboundRequest, context: Any
    ) -> na.AgentSetOutboundResponse:
        """An instance's own outbound policy (unset: its class's again), for its next
        connection on; the instance need not have a container here yet."""
        if not request.class_name:
            raise InvalidArgument("class_name: must not be empty")
        if not request.name:
            raise InvalidArgument("name: must not be empty")
        own = request.policy if request.HasField("policy") else None
        self._set_outbound(request.class_name, request.name, own)
        return na.AgentSetOutboundResponse()

    def _set_outbound(self, class_name: str, name: str, own: pb.OutboundPolicy | None) -> None:
        if self.outbound is None:
            return
        policy: OutboundPolicy | None = outbound_from_pb(own) if own is not None else None
        try:
            self.outbound.set_policy(class_name, name, policy)
        except ValueError as exc:
            raise InvalidArgument(f"policy: {exc}") from exc

    @grpc_errors
    async def Snapshot(
        self, request: na.AgentSnapshotRequest, context: Any
    ) -> na.AgentSnapshotResponse:
        iid = _required_id(request.instance_id)
        trigger = request.trigger or CREATE
        if trigger not in TRIGGERS:
            raise InvalidArgument(f"trigger: {trigger!r} is not one of {', '.join(TRIGGERS)}")
        snapshot = await self.manager.take_snapshot(iid, request.name, trigger)
        if snapshot is None:  # a sleep's, not needed: its layer is the last snapshot's
            raise FailedPrecondition(f"instance {iid} has not changed since its last snapshot")
        return na.AgentSnapshotResponse(snapshot=snapshot_to_pb(snapshot))

    @grpc_errors
    async def Stop(self, request: na.AgentStopRequest, context: Any) -> na.AgentInstanceResponse:
        iid = _required_id(request.instance_id)
        if request.signal < 0 or request.signal > 64:
            raise InvalidArgument(f"signal: {request.signal} is not a signal number (1-64)")
        if request.grace_seconds < 0:
            raise InvalidArgument("grace_seconds: must not be negative")
        # Zero means unset in proto3: the image's stop signal, and the agent's grace period.
        if not await self.manager.stop(iid, request.signal or None, request.grace_seconds or None):
            raise NotFound(f"this agent has no instance {iid}")
        return na.AgentInstanceResponse(info=instance_info_to_pb(self.manager.info(iid)))

    @grpc_errors
    async def Signal(self, request: na.AgentSignalRequest, context: Any) -> na.AgentSignalResponse:
        iid = _required_id(request.instance_id)
        if not 0 < request.signal <= 64:
            raise InvalidArgument(f"signal: {request.signal} is not a signal number (1-64)")
        await self.manager.signal(iid, request.signal)
        return na.AgentSignalResponse()

    @grpc_errors
    async def Destroy(
        self, request: na.AgentDestroyRequest, context: Any
    ) -> na.AgentDestroyResponse:
        await self.manager.destroy(_required_id(request.instance_id))
        return na.AgentDestroyResponse()

    @grpc_errors
    async def GetInstance(
        self, request: na.AgentGetInstanceRequest, context: Any
    ) -> na.AgentInstanceResponse:
        return na.AgentInstanceResponse(
            info=instance_info_to_pb(self.manager.info(_required_id(request.instance_id)))
        )

    @grpc_errors
    async def RenewActivity(
        self, request: na.AgentRenewActivityRequest, context: Any
    ) -> na.AgentRenewActivityResponse:
        self.manager.renew(_required_id(request.instance_id))
        return na.AgentRenewActivityResponse()

    @grpc_errors
    async def Call(self, request: na.AgentCallRequest, context: Any) -> na.AgentCallResponse:
        """A scheduled run's HTTP request (nodeagent.calls), fenced like an edge's."""
        if not request.path.startswith("/"):
            raise InvalidArgument(f"path: {request.path!r} must start with '/'")
        cls = await self._admitted(request)
        status, body = await call_instance(
            self.manager,
            cls,
            request.name,
            request.method or "GET",
            request.path,
            wake=not request.no_wake,
            activity=not request.no_activity,
            timeout_s=request.timeout_seconds or CALL_TIMEOUT_S,
        )
        return na.AgentCallResponse(status=status, body=body)

    @grpc_errors
    async def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncIterator[pb.LogsResponse]:
        iid = _instance_of(request.instance)
        self.manager.info(iid)  # NOT_FOUND before the stream starts
        if request.tail < 0:
            raise InvalidArgument("tail: must not be negative")
        async for stream, data in self.manager.logs(iid, request.follow, request.tail):
            yield (
                pb.LogsResponse(stdout=data) if stream == "stdout" else pb.LogsResponse(stderr=data)
            )

    @grpc_errors
    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Any
    ) -> AsyncIterator[pb.ExecResponse]:
        """First message `start`; then stdin chunks, terminal resizes and `stdin_close` (or the
        end of the client's stream, which closes stdin too). Output streams back; `exit_code`
        is last. The session holds the instance awake only with `wake` (which boots it first,
        fenced like a Start): an instance that stops running under it (asleep, paused, stopped)
        ends it with FAILED_PRECONDITION instead of an exit code."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "start":
            raise InvalidArgument("the first Exec message must carry `start`")
        start = first.start
        if not start.command:
            raise InvalidArgument("start.command: must not be empty")
        ref = start.instance
        iid = _instance_of(ref)
        if start.wake and self.fence is not None and iid not in self.manager.pinned:
            await self.fence.admit(ref.class_name, ref.name)
        async with self.manager.exec_session(
            ref.class_name, ref.name, wake=start.wake, activity=start.activity
        ) as ended:
            process = await self.manager.exec(
                iid,
                list(start.command),
                dict(start.env),
                start.working_dir,
                start.stdin,
                tty=terminal_size_from_pb(start.size) if start.tty else None,
                user=start.user,
            )
            feeder = (
                asyncio.create_task(_feed_stdin(request_iterator, process)) if start.stdin else None
            )
            # A frozen (paused) command never ends by itself: drop it when the instance stops.
            closer = asyncio.create_task(_close_when(ended, process))
            try:
                async for stream, data in process.output():
                    yield (
                        pb.ExecResponse(stdout=data)
                        if stream == "stdout"
                        else pb.ExecResponse(stderr=data)
                    )
                if ended.is_set():
                    snapshot = self.manager.get(iid)
                    raise FailedPrecondition(
                        f"the exec session ended: instance {ref.class_name}/{ref.name} stopped "
                        f"running under it (it is {snapshot.state if snapshot else 'gone'}); "
                        "exec --wake holds it awake"
                    )
                yield pb.ExecResponse(exit_code=await process.exit_code())
            finally:
                for task in (feeder, closer):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                await process.close()


async def _feed_stdin(requests: AsyncIterator[pb.ExecRequest], process: ExecProcess) -> None:
    async for message in requests:
        kind = message.WhichOneof("message")
        if kind == "stdin":
            await process.write(message.stdin)
        elif kind == "resize":
            await process.resize(terminal_size_from_pb(message.resize))
        elif kind == "stdin_close":
            break
    await process.close_stdin()


async def _close_when(ended: asyncio.Event, process: ExecProcess) -> None:
    await ended.wait()
    await process.close()

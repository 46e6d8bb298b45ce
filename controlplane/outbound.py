"""Per-instance outbound policies (issue 14, SetOutbound): an instance's own policy replaces its
class's, is kept in the store beside it, and reaches the agent of its node at once and again
whenever that agent may not have it (a placement, a Start, an agent that registers anew).

The agent holds an instance's own policy in memory; these deliveries keep it told. Its egress
proxy applies a delivered policy to the next connection, so a change needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from google.protobuf import json_format

from controlplane import records
from controlplane.agents import AgentClients
from controlplane.records import InstanceRecord
from controlplane.store import Store
from controlplane.view import ClusterView
from portside.api.v1 import nodeagent_pb2 as na
from portside.api.v1 import types_pb2 as pb
from portside.convert import outbound_from_pb, outbound_to_pb
from portside.errors import InvalidArgument, NotFound
from portside.outbound import pattern_problem
from portside.spec import ContainerClass, Gateway, Node, OutboundPolicy, instance_id

log = logging.getLogger(__name__)

# A registering node's policies are told before its first reconciling heartbeat reply (its fence
# opens with that reply); an agent that does not take them in this long does not hold the reply
# up further, and its instances follow their class's policy until the next delivery.
REGISTER_DELIVERY_S = 2.0


def outbound_key(class_name: str, iid: str) -> str:
    return f"{records.OUTBOUND}{class_name}/{iid}"


def encode_policy(policy: OutboundPolicy) -> bytes:
    text: str = json_format.MessageToJson(outbound_to_pb(policy), indent=None)
    return text.encode()


def decode_policy(data: bytes) -> OutboundPolicy:
    return outbound_from_pb(json_format.Parse(data, pb.OutboundPolicy()))


def checked_policy(policy: OutboundPolicy, gateway: Gateway | None) -> OutboundPolicy:
    """`policy` with its patterns stripped, or InvalidArgument naming the field at fault: every
    host is a pattern of portside.outbound, every handler a function name, and handlers need a
    deployed gateway module (whether it defines them shows when one is called: a missing one
    answers 500 gateway-error, as a handler that raises does)."""
    fields = (("allowed_hosts", policy.allowed_hosts), ("denied_hosts", policy.denied_hosts))
    for field, hosts in fields:
        for index, host in enumerate(hosts):
            problem = pattern_problem(host)
            if problem:
                raise InvalidArgument(f"policy.{field}[{index}]: {problem}")
    for host, handler in policy.outbound_by_host.items():
        problem = pattern_problem(host)
        if problem:
            raise InvalidArgument(f"policy.outbound_by_host[{host!r}]: {problem}")
        if not handler.isidentifier():
            raise InvalidArgument(
                f"policy.outbound_by_host[{host!r}]: {handler!r} is not a function name of the "
                "gateway module"
            )
    if policy.outbound_by_host and gateway is None:
        raise InvalidArgument(
            "policy.outbound_by_host: names gateway handlers, but no gateway module is deployed "
            '(add [gateway] module = "gateway.py" to the config and deploy it)'
        )
    return replace(
        policy,
        allowed_hosts=tuple(h.strip() for h in policy.allowed_hosts),
        denied_hosts=tuple(h.strip() for h in policy.denied_hosts),
        outbound_by_host={h.strip(): f for h, f in policy.outbound_by_host.items()},
    )


@dataclass(frozen=True)
class Applied:
    """The policy that applies to an instance now, and whether it is its own (else its
    class's)."""

    policy: OutboundPolicy
    own: bool


class InstanceOutbound:
    """The store's own policies, and their delivery to agents (NodeAgent.SetOutbound)."""

    def __init__(self, store: Store, view: ClusterView, agents: AgentClients) -> None:
        self.store = store
        self.view = view
        self.agents = agents

    def _class(self, class_name: str, name: str) -> ContainerClass:
        cls = self.view.classes.get(class_name)
        if cls is None:
            raise NotFound(f"unknown class {class_name!r}: deploy it with `portside deploy`")
        if not name:
            raise InvalidArgument("instance.name: must not be empty")
        return cls

    async def own(self, class_name: str, iid: str) -> OutboundPolicy | None:
        kv = await self.store.get(outbound_key(class_name, iid))
        return decode_policy(kv.value) if kv is not None else None

    async def get(self, class_name: str, name: str) -> Applied:
        cls = self._class(class_name, name)
        own = await self.own(cls.name, instance_id(cls.name, name))
        return (
            Applied(own, True) if own is not None else Applied(OutboundPolicy.of_class(cls), False)
        )

    async def set(self, class_name: str, name: str, policy: OutboundPolicy | None) -> Applied:
        """Make `policy` the instance's own (None: drop its own, its class's applies), then tell
        the agent of its node if it is placed on a live one. The store is written first: an
        agent that cannot be told now (the error says so; set again to retry) is told when it
        registers again, and a node the instance moves to is told at the placement."""
        cls = self._class(class_name, name)
        iid = instance_id(cls.name, name)
        key = outbound_key(cls.name, iid)
        if policy is None:
            await self.store.delete(key)
            applied = Applied(OutboundPolicy.of_class(cls), False)
        else:
            policy = checked_policy(policy, self.view.gateway)
            await self.store.put(key, encode_policy(policy))
            applied = Applied(policy, True)
        record = self.view.instances.get(records.instance_key(cls.name, iid))
        node = self.view.nodes.get(record.node_id) if record is not None else None
        if node is not None:
            await self.deliver(node, cls.name, name, policy)
        log.info(
            "outbound policy of %s/%s: %s", cls.name, name, "its own" if policy else "its class's"
        )
        return applied

    async def deliver(
        self, node: Node, class_name: str, name: str, policy: OutboundPolicy | None
    ) -> None:
        """Tell `node`'s agent the instance's own policy (None: it follows its class's)."""
        request = na.AgentSetOutboundRequest(class_name=class_name, name=name)
        if policy is not None:
            request.policy.CopyFrom(outbound_to_pb(policy))
        await self.agents.call(
            node,
            f"set the outbound policy of {class_name}/{name}",
            lambda s: s.SetOutbound,
            request,
        )

    async def placed(self, record: InstanceRecord, node: Node, own: OutboundPolicy | None) -> None:
        """A placement (new, or a move from a lost node): the new node learns the instance's own
        policy `own` (read with the placement, in its transaction) before the first request boots
        it there. Nothing to tell without one: an agent drops an instance's own policy when it
        removes the instance."""
        if own is not None:
            await self.deliver(node, record.class_name, record.name, own)

    async def forget(self, record: InstanceRecord, node: Node | None) -> None:
        """On Destroy: the agent drops the instance's own policy (it may hold one for an
        instance it never booted), then the store does."""
        key = outbound_key(record.class_name, record.instance_id)
        if await self.store.get(key) is None:
            return
        if node is not None:
            await self.deliver(node, record.class_name, record.name, None)
        await self.store.delete(key)

    async def reconciled(self, node: Node) -> None:
        """A node's heartbeat reconciles (its lease is new: an agent started, or came back after
        its lease ran out; or it was fenced): its agent may hold no own policy, or stale ones.
        Tell it those of the instances placed on it, within REGISTER_DELIVERY_S; failures are
        logged, not raised (the heartbeat goes on)."""
        kvs, _ = await self.store.range(records.OUTBOUND)
        due = []
        for kv in kvs:
            class_name, _, iid = kv.key[len(records.OUTBOUND) :].partition("/")
            record = self.view.instances.get(records.instance_key(class_name, iid))
            if record is not None and record.node_id == node.id:
                due.append((record, decode_policy(kv.value)))
        if not due:
            return
        told = [asyncio.create_task(self.deliver(node, r.class_name, r.name, p)) for r, p in due]
        done, pending = await asyncio.wait(told, timeout=REGISTER_DELIVERY_S)
        for task in pending:
            task.cancel()
        failed = [t.exception() for t in done if t.exception() is not None]
        if pending or failed:
            log.error(
                "node %s: its agent did not take the own outbound policies of %d of %d instances "
                "(they follow their class's until told): %s",
                node.id,
                len(pending) + len(failed),
                len(due),
                failed[0] if failed else f"no answer within {REGISTER_DELIVERY_S:g}s",
            )

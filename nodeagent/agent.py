"""`portside agent`: one per host — runs the instance manager and the HTTP data plane, serves the
NodeAgent gRPC API, and keeps the node registered through a heartbeat stream.

With a join token it first joins the cluster (a certificate for its node id) and from then on
speaks only TLS: mutual TLS to the control plane, its API admits only control planes, its data
port edges, control planes and agents; /metrics and /healthz are on their own plain-HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from nodeagent.api import NodeAgentService, status_of
from nodeagent.egress.service import Egress
from nodeagent.egress_tls import TlsInterception, files_for, node_roots
from nodeagent.events import EventOutbox
from nodeagent.fence import Fence
from nodeagent.firewall import isolate_host
from nodeagent.images import ControlPlaneImages, ImageKeeper, RegistryAuth, load_registry_auth
from nodeagent.instances import Capacity, InstanceManager
from nodeagent.metrics import RECONCILE_REMOVED
from nodeagent.outbound import dropping_own_policies, outbound_runtime
from nodeagent.pools import PoolKeeper, UsageSampler
from nodeagent.proxy import DataPlane
from nodeagent.runtime import DockerRuntime
from nodeagent.snapshots import Snapshots
from nodeagent.usage import UsageMeter, follow_runs, observe_sample
from portside import daemon, geo, net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import nodeagent_pb2_grpc as na_grpc
from portside.cluster import first_config, follow_config
from portside.convert import (
    event_to_pb,
    instance_status_to_pb,
    node_to_pb,
    pool_assignment_from_pb,
    usage_to_pb,
)
from portside.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PortsideError,
    Unauthenticated,
)
from portside.join import take_part
from portside.pki import PeerRole
from portside.proxy import HttpTransport
from portside.rpc import Backoff, follow_stream
from portside.secretwatch import follow_secrets
from portside.spec import Config, ContainerClass, Node
from portside.tokens import Token

log = logging.getLogger("portside.agent")


@dataclass(frozen=True)
class AgentOptions:
    controlplane: str
    listen: str
    api_listen: str
    region: str
    metrics_listen: str = ""  # default: --listen port + 2
    join_token: Token | None = None  # None: a cluster run with --insecure (plaintext)
    node_id: str | None = None
    vcpu: float | None = None
    memory_mib: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # A busy container's accept queue can overflow (busybox httpd listens with a backlog of 9):
    # connects then wait for SYN retransmits, so the connect deadline must allow a few seconds.
    deadlines: net.Deadlines = net.Deadlines()
    # On shutdown, stop this node's awake containers (kept, with their writable layers, for the
    # next agent to adopt and wake) instead of leaving them running.
    stop_on_exit: bool = False
    # On SIGTERM, how long requests in flight may take to finish (new ones are refused at once).
    drain_grace: float = 10.0
    # Development only: leave the host open to containers (no host isolation rules).
    allow_host_access: bool = False
    # A JSON or TOML file of registry host -> {username, password} or {identitytoken}, for
    # classes whose image is a registry reference ("": pull without credentials).
    registry_auth: str = ""


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def metrics_listen(opts: AgentOptions) -> str:
    return opts.metrics_listen or net.with_port_offset(opts.listen, 2)


def build_node(opts: AgentOptions) -> Node:
    location = geo.lookup(opts.region)
    _, port = net.split_hostport(opts.listen)
    return Node(
        id=opts.node_id or f"{socket.gethostname()}-{port}",
        data_address=opts.listen,
        api_address=opts.api_listen,
        metrics_address=metrics_listen(opts),
        region=location.code,
        latitude=location.latitude,
        longitude=location.longitude,
        vcpu=opts.vcpu if opts.vcpu is not None else float(os.cpu_count() or 1),
        memory_mib=opts.memory_mib if opts.memory_mib is not None else host_memory_mib(),
        labels=dict(opts.labels),
    )


class _Relay:
    """Forwards instance state changes to whoever listens once the heartbeat exists."""

    def __init__(self) -> None:
        self.target: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.target is not None:
            self.target()


class ClassCatalog:
    """The deployed classes by name, replaced whole on every config the control plane sends."""

    def __init__(self) -> None:
        self._classes: dict[str, ContainerClass] = {}

    def apply(self, config: Config) -> None:
        self._classes = {c.name: c for c in config.classes}

    def get(self, name: str) -> ContainerClass | None:
        return self._classes.get(name)

    def classes(self) -> list[ContainerClass]:
        return list(self._classes.values())

    def size_of(self, name: str) -> tuple[int, bool] | None:
        """What usage metering needs of a class beyond vCPU and memory: disk MB, internet."""
        cls = self._classes.get(name)
        return None if cls is None else (cls.instance_type.disk_mb, cls.enable_internet)


# The longest time between heartbeat messages, whatever the lease (usage and the prefetch list
# ride on them too).
HEARTBEAT_MAX_PERIOD_S = 2.0
# A heartbeat answered with these will not be admitted by trying again.
# How long a heartbeat waits to tell a change (see Heartbeat.changed): a thaw's request takes
# about 2 ms from the thaw to its first byte (docs/benchmarks.md, "Pause mode").
CHANGE_DELAY_S = 0.01

_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class Heartbeat:
    """Keeps the node registered: one stream, a message every third of the lease, reconnecting
    with backoff when the control plane goes away (containers keep serving meanwhile). `leave()`
    ends the stream cleanly, which tells the control plane to drop the node at once.

    Lifecycle events ride on the same stream: a queued event wakes the sender, and the events of
    messages the control plane has not answered go again after a reconnect (see EventOutbox).

    Fencing rides on it too: each reply says whether its message refreshed the lease, and the
    fence (nodeagent/fence.py) closes named instances when none has for its window; a reply
    with `reconciled` lists the reported instances that were placed elsewhere, which are
    removed here.

    Images too: the Portside images the engine has go on a stream's first message and whenever
    they change, and each reply's prefetch list is handed to the image keeper.

    Rollouts too: each reply's `replace` lists instances to move to their class's current
    version now; the instance manager replaces each once (InstanceManager.replace)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        node: Node,
        manager: InstanceManager,
        usage: UsageSampler,
        pools: PoolKeeper,
        outbox: EventOutbox | None = None,
        meter: UsageMeter | None = None,
        fence: Fence | None = None,
        images: ImageKeeper | None = None,
    ) -> None:
        self.stub = cp_grpc.ControlPlaneStub(channel)
        self.images = images
        self._images_sent = -1  # the version of the images the current stream was told
        self.fence = fence if fence is not None else Fence()
        self._removing: set[asyncio.Task[None]] = set()
        self.node = node
        self.manager = manager
        self.usage = usage
        self.pools = pools
        self.outbox = outbox if outbox is not None else EventOutbox()
        self.meter = meter if meter is not None else UsageMeter()
        self.period = 1.0
        self.leaving = asyncio.Event()
        self.registered = False
        self.stream = 0  # the number of the current heartbeat stream
        self.wake = asyncio.Event()  # set by leave(), instance state changes and new events
        self._telling = False  # a change is to be told within CHANGE_DELAY_S

    def changed(self) -> None:
        """An instance woke or slept, or an event is queued: tell the control plane within
        CHANGE_DELAY_S (it accounts capacity by awake instances, and users watch events as they
        happen). Not at once: the request whose wake or thaw changed the state goes on first,
        instead of waiting behind the message's making and sending, and a burst of changes goes
        in one message."""
        if not self._telling:
            self._telling = True
            asyncio.get_running_loop().call_later(CHANGE_DELAY_S, self._tell)

    def _tell(self) -> None:
        self._telling = False
        self.wake.set()

    def _message(self, first: bool) -> cp.NodeHeartbeatRequest:
        latest = self.usage.latest
        msg = cp.NodeHeartbeatRequest(
            instances=[
                instance_status_to_pb(status_of(i, latest.get(i.instance_id)))
                for i in self.manager.infos()
            ],
            events=[event_to_pb(e) for e in self.outbox.take()],
            fenced=self.fence.check(),
        )
        batch = self.meter.take()  # usage rides like events: resent until a reply acknowledges it
        if batch is not None:
            msg.usage_source, msg.usage_sequence = batch.source, batch.sequence
            msg.usage.extend(usage_to_pb(u) for u in batch.totals.values())
        if first:
            msg.node.CopyFrom(node_to_pb(self.node))
        if self.images is not None:
            digests, version = self.images.reported()
            if first or version != self._images_sent:
                msg.images.extend(sorted(digests))
                msg.images_changed = True
                self._images_sent = version
        self.fence.sent()
        return msg

    async def _messages(self, stream: int) -> AsyncIterator[cp.NodeHeartbeatRequest]:
        """The messages of stream number `stream`. Replies acknowledge batches in the order
        they were taken, so a generator whose stream is lost must take nothing more: gRPC may
        still pull from it after the stream broke, and its batch would then be "acknowledged" by
        the next stream's first reply without ever having been sent."""
        if stream != self.stream:
            return
        yield self._message(first=True)
        while True:
            if not self.outbox.has_pending:  # more than one message's worth: send on at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.period)
            if stream != self.stream:
                return
            if self.leaving.is_set():
                # The last events (a shutdown's) and the usage metered until now go out first.
                if self.outbox.has_pending or self.meter.has_usage:
                    yield self._message(first=False)
                return
            self.wake.clear()
            yield self._message(first=False)

    def _stream_lost(self) -> None:
        self.stream += 1
        self.outbox.stream_lost()
        self.meter.stream_lost()
        self.fence.stream_lost()
        self.registered = False

    def _handle(self, reply: cp.NodeHeartbeatResponse) -> None:
        if reply.store_unavailable:
            # Nothing of the message was recorded: its events and usage go again.
            self.outbox.refused()
            self.meter.refused()
        else:
            self.outbox.acknowledge()
            self.meter.acknowledge()
        self.fence.replied(
            confirmed=reply.lease_confirmed or reply.store_unavailable,
            fence_after_s=reply.fence_after_seconds,
        )
        if reply.reconciled:
            elsewhere = set(reply.elsewhere)
            self.fence.reconciled(elsewhere)
            for iid in elsewhere:
                task = asyncio.create_task(self._remove(iid), name=f"remove {iid}")
                self._removing.add(task)
                task.add_done_callback(self._removing.discard)
        for iid in reply.replace:
            # A rollout's ask, on every reply while wanted: the manager replaces each once per
            # version. A fenced node replaces nothing (its lease may be gone: the instance may
            # be placed elsewhere, and no container of it may start here).
            if self.fence.allows_named(iid):
                self.manager.replace(iid)
            else:
                self.manager.refuse_replace(iid)
        # A third of the lease keeps the node alive; pool CPU samples go as taken (changed()).
        self.period = max(0.2, min(reply.lease_ttl_seconds / 3, HEARTBEAT_MAX_PERIOD_S))
        self.pools.apply([pool_assignment_from_pb(a) for a in reply.pool])
        if self.images is not None:
            self.images.want(reply.prefetch_images)
            if reply.HasField("keep_images"):  # absent: the control plane has not said yet
                self.images.keep(reply.keep_images.digests)

    async def _remove(self, iid: str) -> None:
        """An instance placed on another node while this one was out of touch: its copy here
        is stopped and removed, never served (the fence refuses it meanwhile)."""
        try:
            await self.manager.destroy(iid)
        except NotFound:
            pass  # gone already
        except PortsideError as exc:
            log.error("could not remove %s, which now lives on another node: %s", iid, exc)
            return  # still refused by the fence: never served
        RECONCILE_REMOVED.inc()
        self.fence.removed(iid)
        log.warning("removed instance %s: the control plane placed it on another node", iid)

    async def run(self) -> None:
        replies = follow_stream(
            lambda: self.stub.NodeHeartbeat(self._messages(self.stream)),
            what=f"heartbeat stream of {self.node.id}",
            backoff=Backoff(most=2.0),
            fatal=lambda exc: exc.code() in _REFUSALS,
            on_break=self._stream_lost,
            done=self.leaving.is_set,
        )
        try:
            async for reply in replies:
                self._handle(reply)
                if not self.registered and reply.lease_confirmed:
                    log.info(
                        "node %s registered (lease %gs)", self.node.id, reply.lease_ttl_seconds
                    )
                    self.registered = True
        except (InvalidArgument, Unauthenticated, PermissionDenied) as exc:
            raise SystemExit(f"portside agent: the control plane refused this node: {exc}") from exc

    async def leave(self, task: asyncio.Task[None], timeout_s: float = 2.0) -> None:
        self.leaving.set()
        self.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except (TimeoutError, grpc.aio.AioRpcError):
            task.cancel()


async def watch_fence(fence: Fence, every_s: float = 0.25) -> None:
    """Notice the fence closing even when no request asks (the metric, the log line)."""
    while True:
        fence.check()
        await asyncio.sleep(every_s)


async def run(opts: AgentOptions, stop: asyncio.Event | None = None) -> None:
    stop = stop or daemon.stop_on_signals()
    node = build_node(opts)
    # Read before joining: a bad file stops the agent at once, naming the file and the host.
    registry_auth = load_registry_auth(opts.registry_auth) if opts.registry_auth else RegistryAuth()
    membership = await take_part(
        opts.controlplane,
        opts.join_token,
        PeerRole.AGENT,
        node.id,
        deadline_s=opts.deadlines.rpc,
        stop=stop,
    )
    if membership is None:
        return  # told to stop before it could join
    catalog = ClassCatalog()
    # The cluster's gateway secrets for outbound handlers (env.secrets), kept current in place.
    secrets: dict[str, str] = {}
    runtime = DockerRuntime(node.id)
    # Outbound control: the egress proxy, DNS responder and rules (nodeagent/egress/service.py).
    egress = Egress(node.id, catalog.get, opts.deadlines, network=runtime.egress_network)
    await isolate_host(runtime, allow_host_access=opts.allow_host_access, egress=egress.guard)
    # intercept_https: a CA for each intercepting instance's new container, read back by the
    # egress proxy to terminate its TLS (nodeagent/egress_tls.py).
    runtime.container_files = functools.partial(files_for, egress.policies, roots=node_roots())
    egress.proxy.interception = TlsInterception(runtime.read_file)
    # Outbound handlers' bindings reach other nodes' data planes as an agent (mutual TLS).
    to_agents = HttpTransport(opts.deadlines, tls=membership.client_tls(PeerRole.AGENT))
    to_controlplane = membership.client_tls(PeerRole.CONTROLPLANE)
    async with net.grpc_channel(membership.target, tls=to_controlplane) as channel:
        changes = _Relay()
        outbox = EventOutbox(wake=changes)
        meter = UsageMeter(class_size=catalog.size_of)
        # Boots and the heartbeat's prefetch list get images through it, over the same channel.
        images = ImageKeeper(
            runtime,
            ControlPlaneImages(channel),
            catalog.classes,
            node_id=node.id,
            registry_auth=registry_auth,
            on_change=changes,
        )
        # Snapshots are pushed and recorded over the same channel, with the node's identity.
        snapshots = Snapshots(runtime, channel, node_id=node.id, deadline_s=opts.deadlines.rpc)

        def instances_changed() -> None:
            changes()
            egress.containers_changed(manager.snapshot())  # the egress table follows at once

        manager = InstanceManager(
            runtime,
            catalog.get,
            on_change=instances_changed,
            on_event=dropping_own_policies(egress.policies, outbox.put),
            on_run=follow_runs(meter),
            capacity=Capacity(node.id, node.vcpu, node.memory_mib),
            node_id=node.id,
            images=images,
            snapshots=snapshots,
        )
        adopted = await manager.adopt()
        if adopted:
            log.info("adopted %d containers of node %s", len(adopted), node.id)
        egress.containers_changed(manager.snapshot())
        await snapshots.remove_leftover_commits()
        # Only a control plane may call the API; edges, control planes and agents (outbound
        # handlers' bindings, nodeagent/outbound.py) the data port.
        api_tls = membership.server_tls(PeerRole.CONTROLPLANE)
        data_tls = membership.server_tls(PeerRole.EDGE, PeerRole.CONTROLPLANE, PeerRole.AGENT)
        api = net.grpc_server(api_tls, f"the API of agent {node.id}")
        fence = Fence()  # fenced until the first heartbeat reply has reconciled its instances
        keeper = PoolKeeper(manager, catalog.get)
        na_grpc.add_NodeAgentServicer_to_server(
            NodeAgentService(manager, fence, egress.policies, assign_pool=keeper.assign), api
        )
        net.add_grpc_port(api, opts.api_listen, api_tls)
        scrape = await net.start_http_server(daemon.metrics_app(), node.metrics_address)
        data_plane = None
        try:
            async with asyncio.TaskGroup() as tasks:
                background = []
                renewal = membership.renewal(channel)
                if renewal is not None:
                    background.append(tasks.create_task(renewal.run()))
                background.append(tasks.create_task(follow_secrets(channel, secrets)))
                # The gateway module's outbound handlers run here (nodeagent/outbound.py).
                gateway = outbound_runtime(
                    channel, opts.controlplane, to_agents, secrets, opts.deadlines
                )
                egress.proxy.handlers = gateway

                def apply_config(config: Config) -> None:
                    catalog.apply(config)
                    gateway.load(config)
                    # Which containers go through the egress proxy follows their classes (an
                    # agent's first config comes after it adopted its containers).
                    egress.containers_changed(manager.snapshot())

                got_config = asyncio.Event()
                watch = tasks.create_task(follow_config(channel, apply_config, got_config))
                await first_config(got_config, opts.deadlines.rpc, opts.controlplane, "classes")
                plane = DataPlane(manager, catalog.get, opts.deadlines, fence=fence)
                await plane.listen(opts.listen, data_tls, f"the data port of agent {node.id}")
                data_plane = plane
                await api.start()
                usage = UsageSampler(manager, runtime)
                # The first heartbeat message reports the images the engine has now.
                await images.refresh_quietly()
                heartbeat = Heartbeat(
                    channel, node, manager, usage, keeper, outbox, meter, fence=fence, images=images
                )
                changes.target = heartbeat.changed
                beat = tasks.create_task(heartbeat.run())
                background.append(tasks.create_task(images.run()))
                sleeper = tasks.create_task(manager.run())
                background.append(tasks.create_task(watch_fence(fence)))

                def sampled() -> None:
                    observe_sample(meter, usage, manager)
                    if usage.pool_sampled:  # the autoscaler wants each pool sample at once
                        heartbeat.changed()

                sampling = tasks.create_task(usage.run(on_sample=sampled))
                log.info(
                    "agent %s (%s) serving %s, API %s, metrics %s, control plane %s (%s)",
                    node.id,
                    node.region,
                    opts.listen,
                    opts.api_listen,
                    node.metrics_address,
                    opts.controlplane,
                    membership.security,
                )
                await stop.wait()
                await keeper.close()
                # New connections are refused at once (edges go elsewhere); requests in flight
                # finish within the grace, WebSockets close 1001 at its end.
                await plane.drain(opts.drain_grace)
                data_plane = None
                if opts.stop_on_exit:
                    # Nothing may wake what is being stopped: no more Starts.
                    await api.stop(2)
                    await manager.stop_all()
                if opts.stop_on_exit:
                    await heartbeat.leave(beat)  # its last message carries the stops' events
                else:
                    # The containers run on for the next agent to adopt: the stream is cut, not
                    # ended, so the lease runs out (TTL) rather than ending now — an agent
                    # restarted within it (an upgrade) keeps its instances where they are.
                    beat.cancel()
                for task in (*background, watch, sleeper, sampling):
                    task.cancel()
        finally:
            # Without stop_on_exit containers keep running: the next agent on this node adopts
            # them (running or stopped alike).
            if data_plane is not None:
                await data_plane.close()
            await api.stop(2)
            await scrape.cleanup()
            await images.close()
            await manager.close()
            await egress.close()
            await to_agents.close()
            await runtime.close()
            log.info("agent %s stopped", node.id)

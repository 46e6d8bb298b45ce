"""The `portside` command: the daemons (controlplane, agent, edge, up) and the client verbs.

Client verbs take --controlplane, defaulting to $PORTSIDE_CONTROLPLANE or 127.0.0.1:7070.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

import grpc

from portside import geo
from portside.errors import PortsideError, from_grpc

DEFAULT_CONTROLPLANE = "127.0.0.1:7070"


def _controlplane_default() -> str:
    return os.environ.get("PORTSIDE_CONTROLPLANE", DEFAULT_CONTROLPLANE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portside", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("PORTSIDE_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("controlplane", help="run a control plane replica")
    p.add_argument("--listen", default="127.0.0.1:7070", help="gRPC HOST:PORT")
    p.add_argument(
        "--store", required=True, help="etcd://HOST:PORT[,HOST:PORT...] or sqlite:///PATH"
    )
    p.add_argument("--metrics-listen", help="HOST:PORT for /metrics (default: --listen port + 1)")
    p.add_argument("--region", default="fra", help="hint for resolves that carry none")
    p.add_argument(
        "--node-ttl", type=int, default=10, help="seconds a node lives without a heartbeat"
    )
    p.add_argument("--replica-id", default="", help="this replica's name (default: HOSTNAME-PORT)")

    p = sub.add_parser("agent", help="run a node agent")
    p.add_argument("--controlplane", default=_controlplane_default())
    p.add_argument("--listen", required=True, help="HOST:PORT of the HTTP data plane and /metrics")
    p.add_argument("--api-listen", help="gRPC HOST:PORT (default: --listen port + 1)")
    p.add_argument("--region", required=True, help="region code of this host, e.g. fra")
    p.add_argument("--node-id", help="default: HOSTNAME-PORT")
    p.add_argument("--vcpu", type=float, help="capacity offered (default: all cores)")
    p.add_argument("--memory-mib", type=int, help="capacity offered (default: all memory)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("edge", help="run an edge proxy")
    p.add_argument("--controlplane", default=_controlplane_default())
    p.add_argument("--listen", default="127.0.0.1:8787", help="HTTP HOST:PORT")
    p.add_argument("--metrics-listen", help="HOST:PORT for /metrics (default: --listen port + 1)")
    p.add_argument("--region", required=True, help="region code of this edge, e.g. fra")

    p = sub.add_parser("up", help="run a whole Portside on this machine from ./portside.toml")
    p.add_argument("--config", default="portside.toml")
    p.add_argument("--listen", default="127.0.0.1:8787", help="the edge's HTTP HOST:PORT")
    p.add_argument("--controlplane-listen", default="127.0.0.1:7070")
    p.add_argument("--agent-listen", default="127.0.0.1:7080")
    p.add_argument("--region", default="fra")
    p.add_argument("--data-dir", default=".portside", help="where the embedded store lives")

    p = sub.add_parser("deploy", help="register the classes and routes of a config file")
    p.add_argument("file")
    p.add_argument("--controlplane", default=_controlplane_default())

    p = sub.add_parser("nodes", help="list nodes")
    p.add_argument("--controlplane", default=_controlplane_default())
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("regions", help="list the region codes and areas Portside knows")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from portside.daemon import setup_logging

    setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except PortsideError as exc:
        print(f"portside {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from portside.net import split_hostport, with_port_offset

    for name in ("listen", "controlplane", "api_listen", "metrics_listen"):
        value = getattr(args, name, None)
        for address in (value or "").split(","):
            if address:
                split_hostport(address, f"--{name.replace('_', '-')}")
    if getattr(args, "region", None):
        geo.lookup(args.region)

    if args.command == "controlplane":
        from controlplane.main import ControlPlaneOptions
        from controlplane.main import run as run_controlplane

        asyncio.run(
            run_controlplane(
                ControlPlaneOptions(
                    listen=args.listen,
                    store_url=args.store,
                    metrics_listen=args.metrics_listen or with_port_offset(args.listen, 1),
                    region=args.region,
                    node_ttl_s=args.node_ttl,
                    replica_id=args.replica_id,
                )
            )
        )
        return 0
    if args.command == "agent":
        from nodeagent.agent import AgentOptions
        from nodeagent.agent import run as run_agent

        labels = dict(_key_value(x) for x in args.label)
        asyncio.run(
            run_agent(
                AgentOptions(
                    controlplane=args.controlplane,
                    listen=args.listen,
                    api_listen=args.api_listen or with_port_offset(args.listen, 1),
                    region=args.region,
                    node_id=args.node_id,
                    vcpu=args.vcpu,
                    memory_mib=args.memory_mib,
                    labels=labels,
                )
            )
        )
        return 0
    if args.command == "edge":
        from edge.main import EdgeOptions
        from edge.main import run as run_edge

        asyncio.run(
            run_edge(
                EdgeOptions(
                    controlplane=args.controlplane,
                    listen=args.listen,
                    metrics_listen=args.metrics_listen or with_port_offset(args.listen, 1),
                    region=args.region,
                )
            )
        )
        return 0
    if args.command == "up":
        from portside.up import UpOptions
        from portside.up import run as run_up

        return run_up(
            UpOptions(
                config=args.config,
                listen=args.listen,
                controlplane_listen=args.controlplane_listen,
                agent_listen=args.agent_listen,
                region=args.region,
                data_dir=args.data_dir,
            )
        )
    if args.command == "deploy":
        return asyncio.run(_deploy(args.file, args.controlplane))
    if args.command == "nodes":
        return asyncio.run(_nodes(args.controlplane, args.json))
    if args.command == "regions":
        return _regions(args.json)
    raise AssertionError(args.command)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PortsideError(f"--label {text!r}: use KEY=VALUE")
    return key, value


async def deploy_config(file: str, controlplane: str) -> tuple[int, int]:
    """Read `file` and register its classes and routes; returns (classes, routes)."""
    from portside import config as config_file
    from portside import net
    from portside.api.v1 import controlplane_pb2 as cp
    from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
    from portside.convert import config_to_pb

    config = config_file.load_config(file)
    async with net.grpc_channel(controlplane) as channel:
        stub = cp_grpc.ControlPlaneStub(channel)
        try:
            reply = await stub.Deploy(
                cp.DeployRequest(config=config_to_pb(config)),
                timeout=net.Deadlines().rpc,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, f"control plane {controlplane}") from exc
    return reply.classes, reply.routes


async def _deploy(file: str, controlplane: str) -> int:
    classes, routes = await deploy_config(file, controlplane)
    print(f"deployed {classes} classes and {routes} routes from {file} to {controlplane}")
    return 0


async def _nodes(controlplane: str, as_json: bool) -> int:
    from portside import net
    from portside.api.v1 import controlplane_pb2 as cp
    from portside.api.v1 import controlplane_pb2_grpc as cp_grpc

    async with net.grpc_channel(controlplane) as channel:
        try:
            reply = await cp_grpc.ControlPlaneStub(channel).ListNodes(
                cp.ListNodesRequest(), timeout=net.Deadlines().rpc
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, f"control plane {controlplane}") from exc
    rows = [
        {
            "id": n.node.id,
            "region": n.node.region,
            "address": n.node.data_address,
            "vcpu": n.node.vcpu,
            "memory_mib": n.node.memory_mib,
            "used_vcpu": n.used_vcpu,
            "used_memory_mib": n.used_memory_mib,
            "instances": n.instances,
            "alive": n.alive,
        }
        for n in reply.nodes
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'NODE':24} {'REGION':6} {'ADDRESS':22} {'VCPU':>11} {'MEMORY MiB':>15} {'INSTANCES':>9}"
    )
    for r in rows:
        print(
            f"{r['id']:24} {r['region']:6} {r['address']:22} "
            f"{r['used_vcpu']:>5.2f}/{r['vcpu']:<5.2f} "
            f"{r['used_memory_mib']:>7}/{r['memory_mib']:<7} {r['instances']:>9}"
        )
    return 0


def _regions(as_json: bool) -> int:
    regions = sorted(geo.REGIONS.values(), key=lambda loc: (loc.area, loc.code))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "code": r.code,
                        "name": r.name,
                        "area": r.area,
                        "latitude": r.latitude,
                        "longitude": r.longitude,
                    }
                    for r in regions
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'CODE':5} {'AREA':5} {'LATITUDE':>9} {'LONGITUDE':>10}  NAME")
    for r in regions:
        print(f"{r.code:5} {r.area:5} {r.latitude:>9.3f} {r.longitude:>10.3f}  {r.name}")
    print("areas: " + " ".join(sorted(geo.AREAS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

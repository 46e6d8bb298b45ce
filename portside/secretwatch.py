"""Following the cluster's gateway secrets (issue 14) in the parts that run gateway code: the edge
(its `fetch` handlers) and the node agent (its outbound handlers) keep one dict current.

The dict is updated in place, so whoever holds it (the gateway runtime's `env.secrets`) sees
every change at once; while the control plane is out of reach the last secrets stay (static
stability). Values are never logged: only how many there are.
"""

from __future__ import annotations

import logging

import grpc

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.rpc import follow_stream

log = logging.getLogger(__name__)


async def follow_secrets(channel: grpc.aio.Channel, target: dict[str, str]) -> None:
    """Keep `target` equal to the cluster's secrets (WatchSecrets: all of them on opening and
    after each change); runs until cancelled, reconnecting with backoff."""
    stub = cp_grpc.ControlPlaneStub(channel)
    async for message in follow_stream(
        lambda: stub.WatchSecrets(cp.WatchSecretsRequest()), what="secret watch"
    ):
        secrets = dict(message.secrets)
        if secrets != target:
            # No await between the two: no handler sees the dict half updated.
            target.clear()
            target.update(secrets)
            log.info("gateway secrets: %d (%s)", len(secrets), ", ".join(sorted(secrets)))

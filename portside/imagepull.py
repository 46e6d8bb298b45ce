"""The client side of PullImage, shared by node agents (an image their engine lacks) and control
plane replicas (an image another replica holds): the archive's bytes as they arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import grpc

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import Timeout, from_rpc

PULL_STALL_S = 60.0  # a pull that sends nothing this long has failed


async def pull_image(
    stub: cp_grpc.ControlPlaneStub,
    digest: str,
    have_chain_ids: Sequence[str],
    *,
    name: str,
    stall_s: float = PULL_STALL_S,
) -> AsyncGenerator[bytes, None]:
    """The `docker load` archive of `digest` from the replica behind `stub` (`name` in errors),
    leaving out the layers whose chain ids the caller has. Raises Timeout when nothing comes for
    `stall_s`, and the error tree's translation of the call's status otherwise."""
    call = stub.PullImage(cp.PullImageRequest(digest=digest, have_chain_ids=list(have_chain_ids)))
    replies = call.__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout(stall_s):
                    reply = await anext(replies)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Timeout(f"{name} sent nothing of image {digest} for {stall_s:g}s") from None
            if reply.data:
                yield bytes(reply.data)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, unreachable=name) from exc
    finally:
        call.cancel()

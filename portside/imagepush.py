"""The client side of PushImage, shared by `portside deploy` and the SDK (an image it built) and
node agents (a snapshot they took): an archive's bytes, cut into messages as they come."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.build import PushResult

#: The bytes of an image archive one PushImageRequest carries (the last may carry fewer).
PUSH_CHUNK = 256 * 1024


async def push_image(
    stub: cp_grpc.ControlPlaneStub,
    digest: str,
    reference: str,
    data: AsyncIterable[bytes],
    *,
    deadline_s: float | None = None,
) -> PushResult:
    """Upload the image `digest` (its id, sha256:<64 hex>), tagged `reference`, from `data`, the
    bytes of an archive `docker load` reads (it may leave out layers the store has). The store
    verifies the archive against `digest`. `deadline_s` bounds the whole upload. A failed call
    raises grpc's error: the caller translates it at its own boundary."""
    reply = await stub.PushImage(push_requests(digest, reference, data), timeout=deadline_s)
    return PushResult(
        digest=reply.digest, size_bytes=reply.size_bytes, stored_bytes=reply.stored_bytes
    )


async def push_requests(
    digest: str, reference: str, data: AsyncIterable[bytes], size: int = PUSH_CHUNK
) -> AsyncIterator[cp.PushImageRequest]:
    """The messages of a push: digest and reference on the first; then `data` cut and joined
    into pieces of exactly `size` bytes, the last one shorter. An empty `data` is one message."""
    buffer = bytearray()
    first = True
    async for piece in data:
        buffer += piece
        while len(buffer) >= size:
            chunk = bytes(buffer[:size])
            del buffer[:size]
            if first:
                yield cp.PushImageRequest(digest=digest, reference=reference, data=chunk)
                first = False
            else:
                yield cp.PushImageRequest(data=chunk)
    if first:
        yield cp.PushImageRequest(digest=digest, reference=reference, data=bytes(buffer))
    elif buffer:
        yield cp.PushImageRequest(data=bytes(buffer))

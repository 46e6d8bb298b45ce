"""What every part says about snapshots (issue 13; docs/architecture.md "Snapshots"): the
`Snapshot` record the control plane keeps and the SDK returns, what may take one, and how long
one may take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

CREATE: Final = "create"  # asked for (CreateSnapshot, `portside snapshot create`)
SLEEP: Final = "sleep"  # taken as the instance went to sleep (snapshot_on_sleep)
TRIGGERS: Final = (CREATE, SLEEP)  # what took a snapshot (Snapshot.trigger)

#: How long taking a snapshot may take, end to end (the agent commits the writable layer, saves
#: it and pushes it to the image store: for a large layer on a busy disk that takes a while).
#: The control plane waits this long for the agent, the SDK as long for the control plane.
SNAPSHOT_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a named instance's filesystem (`portside snapshot list`): its container's
    writable layer on top of the class image it was taken on, kept in the cluster's image store
    as the image `reference` (`digest`). Memory is not kept. A snapshot restores only into its
    class while the class runs `image_digest`; it expires at `expires_at` (its creation, or its
    last restore, plus the class's snapshot_retention). `trigger`: create (asked for) or sleep
    (snapshot_on_sleep)."""

    id: str  # the digest's first 12 hex: unique in the cluster
    name: str  # the user's name for it; default: its id
    class_name: str
    instance_name: str  # the instance it was taken from
    digest: str
    reference: str
    image_digest: str
    version: int = 0  # the class version of the container it was taken from
    layer_bytes: int = 0  # the writable layer, uncompressed
    created_at: float = 0.0  # unix seconds
    expires_at: float = 0.0
    trigger: str = CREATE


__all__ = ["CREATE", "SLEEP", "SNAPSHOT_TIMEOUT_S", "TRIGGERS", "Snapshot"]

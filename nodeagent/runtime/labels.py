"""The Docker labels Portside puts on its containers and networks: how an agent finds its node's
containers again, and what an adopting agent learns of each. Only the Docker adapter and its event
feed read them; above it they are `ContainerInfo` fields."""

from __future__ import annotations

LABEL_CLASS = "portside.class"
LABEL_INSTANCE = "portside.instance"  # the instance's name
LABEL_INSTANCE_ID = "portside.instance_id"
LABEL_NODE = "portside.node"
# The port is baked into the container (its PORT env) when it is created, so a redeployed class
# with another default_port must not change where an existing container is reached.
LABEL_PORT = "portside.port"
# The instance type's size, so that an agent that adopts the container can account for it.
LABEL_VCPU = "portside.vcpu"
LABEL_MEMORY_MIB = "portside.memory_mib"
LABEL_MANAGED = "portside.managed"  # on the networks Portside creates
# A hash of the entrypoint and env a Start asked for ("" for none): a Start with other overrides
# must make the container again, since Docker cannot change them on an existing container.
LABEL_OVERRIDES = "portside.overrides"
# The class version the container was made from (controlplane/versions.py; "0" or none: unknown).
LABEL_VERSION = "portside.version"
# The class image its filesystem stands on (a digest, or a registry reference), and the snapshot
# it was made from (none: its class's image): a snapshot of it records the class image it is on.
LABEL_CLASS_IMAGE = "portside.class_image"
LABEL_SNAPSHOT = "portside.snapshot"

__all__ = [
    "LABEL_CLASS",
    "LABEL_CLASS_IMAGE",
    "LABEL_INSTANCE",
    "LABEL_INSTANCE_ID",
    "LABEL_MANAGED",
    "LABEL_MEMORY_MIB",
    "LABEL_NODE",
    "LABEL_OVERRIDES",
    "LABEL_VERSION",
    "LABEL_PORT",
    "LABEL_SNAPSHOT",
    "LABEL_VCPU",
]

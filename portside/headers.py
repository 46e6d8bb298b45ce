"""The HTTP headers Portside's parts and its users exchange, named once."""

from __future__ import annotations

from typing import Final

#: The class of the instance a request is for; set by the edge for the node agent.
CLASS: Final = "Portside-Class"
#: The instance a request is for; set by the edge (a client's value is replaced), and the
#: header `Container.fetch` names the instance in by default.
INSTANCE: Final = "Portside-Instance"
#: The kind of an error Portside itself answered with (see portside.errors); absent when the
#: container answered.
ERROR: Final = "Portside-Error"
#: A region code or area where a new instance should be placed.
LOCATION_HINT: Final = "Portside-Location-Hint"
#: Set by the edge on a response when the request's location hint (its LOCATION_HINT, else the
#: edge's region) lies outside the class's placement constraints: the allowed region placement
#: used instead, and the hint, as in `dub; hint=iad`.
LOCATION: Final = "Portside-Location"

__all__ = ["CLASS", "ERROR", "INSTANCE", "LOCATION", "LOCATION_HINT"]

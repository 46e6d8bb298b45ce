"""Portside: containers on demand, near the people who use them.

The SDK lives here (issue 4); the daemons are `controlplane`, `nodeagent` and `edge`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

"""Outbound control on a node (issue 14, docs/security.md): every connection of a container on
the egress network is redirected to the agent's egress proxy, its DNS to the agent's responder,
and everything else it sends is dropped. Import the modules themselves (`rules`, `policies`,
`proxy`, `dns`, `service`): the container runtime imports `policies`, so this package imports
nothing."""

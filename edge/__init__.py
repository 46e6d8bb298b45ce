"""The edge: HTTP/WebSocket ingress that routes each request to the node agent of its instance,
with a route cache kept current by the control plane's watch stream."""

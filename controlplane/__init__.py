"""The control plane: API server, store, scheduler, autoscaler and leader election."""

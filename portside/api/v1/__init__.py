"""Generated gRPC code for portside.v1 (scripts/gen_proto.py)."""

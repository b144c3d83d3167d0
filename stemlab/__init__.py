"""stemlab: the client side of the pipeline — the `stemlab` command line and the gRPC contracts.

`stemlab.v1` holds the Python code generated from `protos/stemlab/v1/*.proto` by `make protos`;
it is never committed.
"""

"""Serving room: a TensorFlow-Serving-compatible model server and the separation client.

The server (``python -m services.serving``) speaks TF Serving's gRPC and REST protocols so callers
cannot tell it from ``tensorflow_model_server``; the client (:mod:`services.serving.client`) turns
a whole song into instrument and rest stems through either of them.
"""

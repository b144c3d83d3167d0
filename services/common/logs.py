"""Logging set-up shared by every process: one line per record, with the service name."""

import logging
import sys


def setup_logging(level: str = "INFO", service: str = "stemlab") -> None:
    root = logging.getLogger()
    if getattr(root, "_stemlab_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    root._stemlab_configured = True  # type: ignore[attr-defined]

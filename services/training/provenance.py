"""What a run or an exported model records of where it came from: the code version and the time."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path


def code_version() -> str:
    """`git describe` of the source tree when it is a git checkout with commits, else the package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return version("stemlab")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def now() -> str:
    """The UTC time as run.yaml and stemlab.json write it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

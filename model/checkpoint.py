"""Reading a training run's result: run.yaml and the best weights, rebuilt into a network.

Training writes runs (services/training/trainer.py); training's export and evaluation's
"--run" source both read them through this one module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from model.config import ModelConfig, config_from_dict
from services.common.errors import FailedPreconditionError, NotFoundError

RUN_FILE = "run.yaml"
BEST_WEIGHTS = "best.weights.h5"


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """run.yaml of a run folder."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise NotFoundError(f"no training run at {run_dir}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise FailedPreconditionError(f"{path}: unreadable run.yaml ({e})") from e


def load_best_network(run_dir: str | os.PathLike) -> tuple[Any, ModelConfig]:
    """The run's network with its best (lowest validation loss) weights, and its config."""
    from model.network import build_network

    run_dir = Path(run_dir)
    info = read_run(run_dir)
    if not (run_dir / BEST_WEIGHTS).is_file():
        raise FailedPreconditionError(f"run {run_dir.name} has no best weights yet (no epoch finished)")
    try:
        config = config_from_dict(info["config"])
    except (KeyError, TypeError) as e:
        raise FailedPreconditionError(f"run {run_dir.name}: run.yaml has no valid config") from e
    network = build_network(config)
    network.load_weights(str(run_dir / BEST_WEIGHTS))
    return network, config

"""Make a training run of weights trained by research.thesis_gpu.train_jax, so stemlab can use them.

    .venv/bin/python -m research.thesis_gpu.import_run --from DIR --instrument guitar \
        --data /work/testroot --run-id thesis-gpu-guitar

Joins DIR/<instrument>.weights.h5.part* into DATA/runs/<run>/best.weights.h5, after loading them
into the TensorFlow network their config describes (so a mismatch fails here, not in a service),
and writes run.yaml and history.csv as the training service would, marking the run completed and
naming the tool, device and data that trained it. `stemlab evaluate --run` and `stemlab export`
then take it like any other run. The dataset is named by the packed index; its manifest path is
recorded when the data root holds that exact version (same checksum), so an export knows the
instrument.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

from model.checkpoint import BEST_WEIGHTS, RUN_FILE
from model.config import ConfigError, config_from_dict
from model.network import build_network
from services.common.errors import InvalidArgumentError
from services.common.manifest import find_manifest, load_manifest
from services.common.paths import atomic_path, atomic_write_text
from services.training.jobs import validate_name
from services.training.provenance import code_version
from services.training.trainer import write_history


class ImportFailed(SystemExit):
    """The trained files are missing, incomplete or do not fit their config (exit status 1, the
    message on stderr; nothing is written)."""

    def __init__(self, message: str):
        super().__init__(f"import_run: {message}")


def _joined_parts(source: Path, summary: dict) -> bytes:
    """The weights file, from exactly the parts the summary lists, in its order."""
    listed = summary.get("parts")
    if not isinstance(listed, list) or not listed:
        raise ImportFailed(f"{source}: the summary lists no weight parts")
    missing = [name for name in listed if not (source / name).is_file()]
    if missing:
        raise ImportFailed(f"{source}: missing weight parts {missing}")
    return b"".join((source / name).read_bytes() for name in listed)


# What train_jax's <instrument>.json must hold for a run to be written from it.
SUMMARY_KEYS = ("preset", "overrides", "config", "options", "seed", "batch_size", "best_epoch", "best_val_loss",
                "history", "steps", "chunks", "training_seconds", "wall_seconds", "finished", "parts", "device",
                "jax", "keras", "train_songs", "data_index")


def _manifest_record(data: Path, dataset: dict) -> dict:
    record = {"name": dataset["name"], "version": dataset["version"], "checksum": dataset["checksum"]}
    try:
        path = find_manifest(data, dataset["name"], dataset["version"])
        if load_manifest(path).checksum == dataset["checksum"]:
            record = {"path": str(path), **record}
    except Exception:  # noqa: BLE001 - another data root: the run is still usable, without the path
        pass
    return record


def import_run(source: Path, instrument: str, data: Path, run_id: str) -> Path:
    """Write DATA/runs/<run_id> from train_jax's output in `source`; returns the run folder."""
    validate_name(run_id, "run id")
    summary_path = source / f"{instrument}.json"
    if not summary_path.is_file():
        raise ImportFailed(f"no {summary_path}")
    try:
        summary = json.loads(summary_path.read_text())
        missing = [k for k in SUMMARY_KEYS if k not in summary]
    except (OSError, ValueError, TypeError) as e:
        raise ImportFailed(f"{summary_path} is not a train_jax summary: {e}") from e
    if missing:
        raise ImportFailed(f"{summary_path} lacks {missing}; was it written by train_jax?")
    blob = _joined_parts(source, summary)
    run_dir = data / "runs" / run_id
    if run_dir.exists():
        raise ImportFailed(f"{run_dir} exists; choose another --run-id")
    try:
        config = config_from_dict(summary["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ImportFailed(f"{summary_path}: no valid config ({e})") from e
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / BEST_WEIGHTS
        weights.write_bytes(blob)
        try:
            build_network(config).load_weights(str(weights))
        except Exception as e:  # noqa: BLE001 - h5py and Keras raise many kinds; all mean "not these weights"
            raise ImportFailed(f"the weights do not load into the network of their config: {e}") from e
    run_dir.mkdir(parents=True)
    with atomic_path(run_dir / BEST_WEIGHTS) as tmp_weights:
        tmp_weights.write_bytes(blob)
    write_history(run_dir, summary["history"])
    dataset = summary["data_index"]["datasets"][instrument]
    info = {
        "run_id": run_id, "state": "completed",
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "preset": summary["preset"], "overrides": summary["overrides"], "config": summary["config"],
        "options": summary["options"], "manifest": _manifest_record(data, dataset), "data_root": str(data),
        "seed": summary["seed"], "batch_size": summary["batch_size"],
        "best_epoch": summary["best_epoch"], "best_val_loss": summary["best_val_loss"],
        "epochs_completed": len(summary["history"]), "code_version": code_version(),
        "trained_by": {
            "tool": "research/thesis_gpu/train_jax.py", "device": summary["device"], "jax": summary["jax"],
            "keras": summary["keras"], "steps": summary["steps"], "chunks": summary["chunks"],
            "training_seconds": round(summary["training_seconds"], 1),
            "wall_seconds": round(summary["wall_seconds"], 1), "finished": summary["finished"],
            "train_songs": len(summary["train_songs"]),
            "validation_songs": len(summary["data_index"]["songs"]["validation"]),
            "packed_quality": summary["data_index"]["quality"], "packed_seed": summary["data_index"]["seed"],
        },
    }
    atomic_write_text(run_dir / RUN_FILE, yaml.safe_dump(info, sort_keys=False))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="train_jax's --out folder")
    parser.add_argument("--instrument", required=True)
    parser.add_argument("--data", type=Path, required=True, help="data root whose runs/ receives the run")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    try:
        run_dir = import_run(args.source, args.instrument, args.data, args.run_id)
    except InvalidArgumentError as e:
        raise ImportFailed(str(e)) from e
    print(f"imported {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

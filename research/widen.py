"""Make a training run of a wider copy of one exported network that computes exactly what it computed.

    .venv/bin/python -m research.widen --model DATA/models/guitar/11 --member 1 --hourglass-filters 48 \
        --data DATA --run-id guitar-11-1-wide48
    stemlab train --init-from guitar-11-1-wide48 …   # then fine-tune it (naming --preset, add --set hourglass_filters=48)

A wider network from scratch costs hours here, and the question "does capacity help on real
recordings?" would then be asked against a network that never had the shipped one's training. So
the hourglass gets more filters while keeping the shipped weights: each weight tensor of the wide
network holds the narrow one's in its first channels, and every weight from a new input channel to
an old output channel is zero, so the old channels (and the mask) are untouched by the new ones
until training moves those weights. The new channels keep the fresh network's random start
(Net2Net-style function-preserving widening; here the new units are fed, and read by zeros).

The run folder (DATA/runs/<run>/: best.weights.h5, run.yaml, history.csv) is what `stemlab train
--init-from` takes; run.yaml records where the weights came from. The masks of the two networks are
compared on a random input before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import yaml

from model.checkpoint import BEST_WEIGHTS, RUN_FILE
from model.config import config_from_dict, config_to_dict
from model.export import read_export_info
from model.network import build_network
from research.thesis_gpu.member_weights import read_member
from services.common.errors import InvalidArgumentError
from services.common.paths import atomic_path, atomic_write_text
from services.training.jobs import validate_name
from services.training.provenance import code_version
from services.training.trainer import write_history

# The widest difference in the mask that still counts as "the same network" (float rounding).
SAME_MASK_TOLERANCE = 1e-4


def embed(narrow: np.ndarray, wide: np.ndarray) -> np.ndarray:
    """`wide` with `narrow` in its first entries along every axis; for a kernel (…, in, out), the
    weights from a new input channel to an old output channel are zero, so old outputs stay as they were."""
    if narrow.ndim != wide.ndim or any(n > w for n, w in zip(narrow.shape, wide.shape, strict=True)):
        raise ValueError(f"cannot widen {narrow.shape} into {wide.shape}")
    out = wide.copy()
    out[tuple(slice(0, n) for n in narrow.shape)] = narrow
    if narrow.ndim >= 2:
        n_in, n_out = narrow.shape[-2:]
        out[..., n_in:, :n_out] = 0.0
    return out


def widen_network(narrow: keras.Model, wide: keras.Model) -> None:
    """Set `wide`'s weights (a network of the same layers, more hourglass filters) from `narrow`'s."""
    for layer in wide.layers:
        if not layer.weights:
            continue
        source = narrow.get_layer(layer.name)
        layer.set_weights([embed(n, w) for n, w in zip(source.get_weights(), layer.get_weights(), strict=True)])


def largest_mask_difference(a: keras.Model, b: keras.Model, rows: int, seed: int) -> float:
    """Largest absolute difference of the two networks' masks (inference mode) on one random input."""
    x = np.random.default_rng(seed).random((2, rows, 64, 1), dtype=np.float32)
    return float(np.max(np.abs(a(x, training=False).numpy() - b(x, training=False).numpy())))


def widen(version_dir: Path, member: int, filters: int, data: Path, run_id: str, seed: int = 0) -> Path:
    """Write DATA/runs/<run_id> holding `member` of the export at `version_dir`, widened to `filters`."""
    validate_name(run_id, "run id")
    run_dir = data / "runs" / run_id
    if run_dir.exists():
        raise SystemExit(f"widen: {run_dir} exists; choose another --run-id")
    narrow, narrow_config = read_member(version_dir, member, tool="widen")
    if filters <= narrow_config.hourglass_filters:
        raise SystemExit(f"widen: the network has {narrow_config.hourglass_filters} hourglass filters; "
                         f"ask for more than that, not {filters}")
    config = config_from_dict({**config_to_dict(narrow_config), "hourglass_filters": filters})
    keras.utils.set_random_seed(seed)  # the new channels' random start, reproducibly
    wide = build_network(config)
    widen_network(narrow, wide)
    difference = largest_mask_difference(narrow, wide, config.freq_rows, seed)
    if difference > SAME_MASK_TOLERANCE:
        raise SystemExit(f"widen: the wide network's mask differs by {difference:.2e}; not written")
    run_dir.mkdir(parents=True)
    with atomic_path(run_dir / BEST_WEIGHTS, suffix=".weights.h5") as tmp:  # Keras insists on the suffix
        wide.save_weights(str(tmp))
    write_history(run_dir, [])
    source = read_export_info(version_dir)
    info = {
        "run_id": run_id, "state": "completed", "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "preset": source.get("preset"), "config": config_to_dict(config), "options": {},
        "data_root": str(data), "seed": seed, "best_epoch": None, "epochs_completed": 0,
        "code_version": code_version(),
        "widened_from": {"model": str(version_dir.resolve()), "member": member,
                         "hourglass_filters": narrow_config.hourglass_filters, "largest_mask_difference": difference},
    }
    atomic_write_text(run_dir / RUN_FILE, yaml.safe_dump(info, sort_keys=False))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported version folder, e.g. DATA/models/guitar/11")
    parser.add_argument("--member", type=int, default=1, help="which network of an ensemble, from 1 (default 1)")
    parser.add_argument("--hourglass-filters", type=int, required=True, help="the wide network's hourglass filters")
    parser.add_argument("--data", type=Path, required=True, help="data root whose runs/ receives the run")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the new channels' random start (default 0)")
    args = parser.parse_args(argv)
    try:
        run_dir = widen(args.model, args.member, args.hourglass_filters, args.data, args.run_id, args.seed)
    except InvalidArgumentError as e:
        raise SystemExit(f"widen: {e}") from e
    print(f"wrote {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write one network of an exported model as a Keras weights file, to start a GPU run from it.

    .venv/bin/python -m research.thesis_gpu.member_weights --model DATA/models/guitar/10 --member 2 \
        --out .gpu/init/guitar.weights.h5

The shipped models come without their training runs; an ensemble holds several networks. This
reads one of them (1: the first) from the SavedModel's variables, as `stemlab train
--init-from-model NAME:VERSION#MEMBER` does, and saves it where research.thesis_gpu.train_jax
--init-weights reads it (Keras' weights files are the same under every backend). Next to it,
<out>.json records the network config, so train_jax can refuse another network before it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras

from model.config import ModelConfig, config_to_dict
from model.export import ExportError, load_exported_networks, member_configs, read_export_info
from services.common.paths import atomic_path, atomic_write_text


def read_member(version_dir: Path, member: int, tool: str = "member_weights") -> tuple[keras.Model, ModelConfig]:
    """One network of an export (1: the first) with its weights, and its config; SystemExit naming
    `tool` when the folder is no export or has no such member."""
    try:
        networks, _ = load_exported_networks(version_dir)
        config = member_configs(read_export_info(version_dir))[member - 1] if 1 <= member <= len(networks) else None
    except (ExportError, OSError, ValueError) as e:
        raise SystemExit(f"{tool}: {version_dir}: {e}") from e
    if config is None:
        raise SystemExit(f"{tool}: {version_dir} has {len(networks)} network(s), no member {member}")
    return networks[member - 1], config


def write_member(version_dir: Path, member: int, out: Path) -> dict:
    """Save `member`'s weights to `out` (renamed into place) and its config to `out`.json; returns that record."""
    network, config = read_member(version_dir, member)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".weights.h5") as tmp:  # Keras insists on the suffix
        network.save_weights(str(tmp))
    record = {"model": str(version_dir), "member": member, "config": config_to_dict(config)}
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported version folder, e.g. DATA/models/guitar/10")
    parser.add_argument("--member", type=int, default=1, help="which network of an ensemble, from 1 (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="the .weights.h5 file to write")
    args = parser.parse_args(argv)
    record = write_member(args.model, args.member, args.out)
    print(f"wrote {args.out}: member {record['member']} of {record['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

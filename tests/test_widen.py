"""research/widen.py: a wider copy of an exported network computes the same mask and starts a fine-tune."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from model.config import config_to_dict, init_mismatch, make_config
from model.export import export_saved_model
from model.network import build_network
from research.widen import embed, largest_mask_difference, widen
from services.training.trainer import check_init_from


def _export_pair(tmp_path, config):
    members = [build_network(config) for _ in range(2)]
    rng = np.random.default_rng(3)
    for network in members:  # trained-looking weights: nothing zero, batch norm statistics not at their start
        network.set_weights([rng.normal(0.5 if w.ndim == 1 else 0.0, 0.2, w.shape).astype(w.dtype) ** (2 if w.ndim == 1 else 1)
                             + (0.1 if w.ndim == 1 else 0.0) for w in network.get_weights()])
    record = {"preset": "tiny", "config": config_to_dict(config)}
    version = export_saved_model(members, config, tmp_path / "models" / "pair", {**record, "members": [record, record]})
    return members, tmp_path / "models" / "pair" / str(version)


def test_embed_keeps_old_outputs_apart_from_new_inputs():
    narrow = np.ones((3, 3, 2, 4))
    wide = np.full((3, 3, 5, 6), 7.0)
    out = embed(narrow, wide)
    assert np.all(out[:, :, :2, :4] == 1)  # the old weights
    assert np.all(out[:, :, 2:, :4] == 0)  # new input -> old output: zero
    assert np.all(out[:, :, :, 4:] == 7)  # new outputs keep their fresh start
    assert np.all(embed(np.arange(3.0), np.zeros(5)) == [0, 1, 2, 0, 0])
    with pytest.raises(ValueError, match="cannot widen"):
        embed(np.ones((3, 3, 2, 8)), wide)


def test_a_widened_member_gives_the_same_mask_and_starts_a_run_of_the_wide_config(tmp_path):
    config = make_config("tiny")
    members, exported = _export_pair(tmp_path, config)
    run_dir = widen(exported, 2, config.hourglass_filters * 2, tmp_path / "data", "wide", seed=1)
    info = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert info["config"]["hourglass_filters"] == config.hourglass_filters * 2
    assert info["widened_from"]["member"] == 2 and info["widened_from"]["largest_mask_difference"] < 1e-4
    wide_config = make_config("tiny", {"hourglass_filters": config.hourglass_filters * 2})
    wide = build_network(wide_config)
    wide.load_weights(str(run_dir / "best.weights.h5"))
    assert largest_mask_difference(members[1], wide, config.freq_rows, seed=5) < 1e-4
    assert largest_mask_difference(members[0], wide, config.freq_rows, seed=5) > 1e-3  # member 2, not 1
    assert check_init_from(run_dir, wide_config)["run_id"] == "wide"  # what `stemlab train --init-from` checks
    assert init_mismatch(info["config"], config) == [
        f"hourglass_filters {config.hourglass_filters * 2} there, {config.hourglass_filters} here"]


def test_widen_refuses_a_narrower_network_a_missing_member_and_an_existing_run(tmp_path):
    config = make_config("tiny")
    _, exported = _export_pair(tmp_path, config)
    data = tmp_path / "data"
    with pytest.raises(SystemExit, match="ask for more"):
        widen(exported, 1, config.hourglass_filters, data, "same")
    with pytest.raises(SystemExit, match="no member 3"):
        widen(exported, 3, config.hourglass_filters * 2, data, "three")
    assert not (data / "runs" / "same").exists() and not (data / "runs" / "three").exists()
    widen(exported, 1, config.hourglass_filters * 2, data, "wide")
    before = (data / "runs" / "wide" / "best.weights.h5").read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        widen(exported, 2, config.hourglass_filters * 2, data, "wide")
    assert (data / "runs" / "wide" / "best.weights.h5").read_bytes() == before

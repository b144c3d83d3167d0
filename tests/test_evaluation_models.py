"""Evaluating real (tiny, untrained) networks: an exported SavedModel and a training run's best weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from services.common.errors import FailedPreconditionError
from services.common.paths import DataRoot
from services.evaluation.evaluate import EvaluationSettings, evaluate_dataset
from services.evaluation.sources import RunSource, SavedModelSource, open_source
from tests.evaluation_data import RATE_HZ, make_dataset, track_signals

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """One tiny network saved two ways: as a run folder and as an exported SavedModel version."""
    from model.config import config_to_dict, make_config
    from model.export import export_saved_model
    from model.network import build_network

    root = tmp_path_factory.mktemp("data")
    data = DataRoot(root).ensure()
    make_dataset(root, tracks={f"Song{i:02d}": track_signals(i, seconds=1.5) for i in range(2)})
    config = make_config("tiny")
    tf.keras.utils.set_random_seed(7)
    network = build_network(config)
    run = data.runs / "tiny-run"
    run.mkdir()
    network.save_weights(str(run / "best.weights.h5"))
    (run / "run.yaml").write_text(yaml.safe_dump({"config": config_to_dict(config), "preset": "tiny",
                                                  "best_epoch": 1}))
    version = export_saved_model(network, config, data.models / "guitar", {"preset": "tiny"})
    return data, run, data.models / "guitar" / str(version), config


def test_saved_model_source_separates_with_the_serving_signature(tiny_model):
    data, _, version_dir, config = tiny_model
    source = SavedModelSource(version_dir)
    assert source.model_rate_hz == config.rate_hz == RATE_HZ
    mix = np.sum(track_signals(0, seconds=1.0), axis=0)
    instrument, rest = source.separate(mix, RATE_HZ, "Song00")
    assert instrument.shape == rest.shape == mix.shape
    np.testing.assert_allclose(instrument + rest, mix, atol=1e-6)
    assert np.any(instrument != 0)


def test_a_run_and_its_export_score_the_same(tiny_model):
    data, run, version_dir, config = tiny_model
    settings = EvaluationSettings(baselines=("mixture",), workers=1, plot_tracks=1)
    by_run = evaluate_dataset(data, RunSource(data, run.name), "evalset", settings=settings)
    by_export = evaluate_dataset(data, SavedModelSource(version_dir), "evalset", settings=settings)
    run_sdr = by_run["medians"]["model"]["whole"]["instrument"]["sdr"]
    assert run_sdr == pytest.approx(by_export["medians"]["model"]["whole"]["instrument"]["sdr"], abs=1e-3)
    doc = json.loads((data.evaluations / by_export["report_id"] / "report.json").read_text())
    assert doc["provenance"]["model"]["kind"] == "saved_model"
    assert doc["provenance"]["model"]["export_info"]["preset"] == "tiny"
    # The oracle uses the model's own STFT: the tiny preset's, read from the export.
    assert doc["settings"]["stft"]["n_fft"] == config.n_fft == 256
    run_doc = json.loads((data.evaluations / by_run["report_id"] / "report.json").read_text())
    assert run_doc["provenance"]["model"]["run"] == "tiny-run"


def test_a_run_can_be_scored_with_a_softer_mask_like_its_export_with_one(tiny_model, tmp_path):
    from model.config import config_to_dict
    from model.export import export_saved_model
    from model.network import build_network

    data, run, _, config = tiny_model
    network = build_network(config)
    network.load_weights(str(run / "best.weights.h5"))
    soft = config.model_copy(update={"mask_exponent": 0.5})
    exported = tmp_path / "soft" / str(export_saved_model(network, soft, tmp_path / "soft"))
    mix = np.sum(track_signals(1, seconds=1.0), axis=0)
    by_run, _ = RunSource(data, run.name, {"mask_exponent": 0.5}).separate(mix, RATE_HZ, "Song01")
    plain, _ = RunSource(data, run.name).separate(mix, RATE_HZ, "Song01")
    by_export, _ = SavedModelSource(exported).separate(mix, RATE_HZ, "Song01")
    np.testing.assert_allclose(by_run, by_export, atol=1e-5)
    assert np.sum(by_run**2) > 1.05 * np.sum(plain**2)  # sqrt of a [0, 1] mask keeps more
    source = RunSource(data, run.name, {"mask_exponent": 0.5})
    assert source.provenance()["overrides"] == {"mask_exponent": 0.5}
    assert source.model_config() == {**config_to_dict(config), "mask_exponent": 0.5}
    from services.evaluation.report import model_label

    assert model_label({"provenance": {"model": source.provenance()}}) == "run tiny-run (mask_exponent=0.5)"
    from services.common.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="cannot change after training"):
        RunSource(data, run.name, {"n_fft": 512})
    with pytest.raises(InvalidArgumentError, match="training run or a SavedModel folder only"):
        open_source(data, estimates_dir=str(tmp_path), overrides={"mask_exponent": 0.5})


def test_an_export_can_be_scored_with_another_mask_exponent_like_a_run(tiny_model, tmp_path):
    """--saved-model --set: the export's weights applied with other inference settings, as its run would be."""
    from services.common.errors import InvalidArgumentError
    from services.evaluation.report import model_label

    data, run, version_dir, config = tiny_model
    mix = np.sum(track_signals(1, seconds=1.0), axis=0)
    changed = {"mask_exponent": 0.5, "chunk_overlap": 0.75}
    source = open_source(data, saved_model_dir=str(version_dir), overrides=changed)
    by_export, rest = source.separate(mix, RATE_HZ, "Song01")
    by_run, _ = RunSource(data, run.name, changed).separate(mix, RATE_HZ, "Song01")
    as_exported, _ = SavedModelSource(version_dir).separate(mix, RATE_HZ, "Song01")
    np.testing.assert_allclose(by_export, by_run, atol=1e-5)
    np.testing.assert_allclose(by_export + rest, mix, atol=1e-5)
    assert np.sum(by_export**2) > 1.05 * np.sum(as_exported**2)  # the override took effect
    assert source.provenance()["overrides"] == changed
    assert source.model_config()["mask_exponent"] == 0.5 and source.model_config()["n_fft"] == config.n_fft
    doc = {"provenance": {"model": source.provenance()}}
    assert model_label(doc) == f"SavedModel {version_dir.name} (chunk_overlap=0.75, mask_exponent=0.5)"
    with pytest.raises(InvalidArgumentError, match="cannot change after training"):
        SavedModelSource(version_dir, {"n_fft": 512})
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "saved_model.pb").write_bytes((version_dir / "saved_model.pb").read_bytes())
    with pytest.raises(FailedPreconditionError, match="records no network config"):
        SavedModelSource(bare, {"mask_exponent": 0.5})


@pytest.mark.slow
def test_a_served_model_scores_like_its_saved_model(tiny_model):
    """Through the serving room's client and its compatible server, as `--model guitar:1` would."""
    from services.serving.local import running_server, write_config

    data, _, version_dir, _ = tiny_model
    config = write_config(data.root / "models.config", {"guitar": data.models / "guitar"})
    settings = EvaluationSettings(baselines=("mixture", "oracle"), workers=1, plot_tracks=0)
    with running_server(config, data.root / "serving.log", ready_model="guitar") as server:
        served = open_source(data, model=f"guitar:{version_dir.name}", serving_address=server.grpc_address)
        served.verify()
        by_serving = evaluate_dataset(data, served, "evalset", settings=settings)
        # The newest version, named by nothing but the reply: its export's grid all the same.
        latest = open_source(data, model="guitar", serving_address=server.grpc_address)
        assert latest.model_config()["n_fft"] == SavedModelSource(version_dir).model_config()["n_fft"]
        missing = open_source(data, model="piano", serving_address=server.grpc_address)
        with pytest.raises(FailedPreconditionError, match="served model piano"):
            missing.verify()
    local = evaluate_dataset(data, SavedModelSource(version_dir), "evalset", settings=settings)
    served_sdr = by_serving["medians"]["model"]["whole"]["instrument"]["sdr"]
    # The oracle on the model's own STFT grid, as for the same export evaluated as a folder (it was
    # computed on the default grid for a served model: another ceiling, another share of the way).
    assert by_serving["medians"]["oracle"] == local["medians"]["oracle"]
    # The client cuts segments and cross-fades them; on 1.5-s tracks that is one segment, so the same numbers.
    assert served_sdr == pytest.approx(local["medians"]["model"]["whole"]["instrument"]["sdr"], abs=0.05)
    doc = json.loads((data.evaluations / by_serving["report_id"] / "report.json").read_text())
    assert doc["provenance"]["model"] == {"kind": "served_model", "model": "guitar", "version": int(version_dir.name),
                                          "served_version": int(version_dir.name), "address": server.grpc_address,
                                          "rate_hz": 22050}

"""A model that leaves another instrument's model out (export --without-model; docs/experiments/46, 47):
the rule on each bin, the export that holds both models, its checks, and every way it is applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.paths import DataRoot

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


class ConstantMask(keras.Model):
    """A 'network' whose mask is `value` in every bin: what the rule does becomes a gain."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def call(self, x, training=False):
        return tf.fill(tf.shape(x), self.value)


def gain(instrument: np.ndarray, mix: np.ndarray) -> float:
    """instrument = gain * mix, away from the edges (a constant mask scales a zero-mean signal)."""
    a, b = instrument[0, 2000:-2000], mix[0, 2000:-2000]
    return float(a.dot(b) / b.dot(b))


def test_the_other_model_is_taken_out_only_where_its_mask_is_the_larger():
    from model.config import make_config
    from model.separate import separate_waveform

    config = make_config("tiny")
    t = np.arange(config.rate_hz * 2) / config.rate_hz
    mix = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t)).astype(np.float32)[None]

    def kept(own, other, other_config=config):
        return gain(separate_waveform([ConstantMask(own)], mix, config, ([ConstantMask(other)], other_config))[0].numpy(),
                    mix)

    assert kept(0.6, 0.8) == pytest.approx(0.6 * (1 - 0.8), abs=1e-4)  # the other is surer: it takes its share
    assert kept(0.6, 0.4) == pytest.approx(0.6, abs=1e-4)  # this one is surer: its mask stands
    # The other model's mask is shaped by its own exponent first (0.9 ** 2 = 0.81 > 0.6).
    assert kept(0.6, 0.9, config.model_copy(update={"mask_exponent": 2.0})) == pytest.approx(0.6 * 0.19, abs=1e-4)
    # The mean of the other's networks decides, as it would separate alone.
    two = separate_waveform([ConstantMask(0.6)], mix, config, ([ConstantMask(1.0), ConstantMask(0.4)], config))[0]
    assert gain(two.numpy(), mix) == pytest.approx(0.6 * 0.3, abs=1e-4)
    instrument, rest = separate_waveform([ConstantMask(0.6)], mix, config, ([ConstantMask(0.8)], config))
    np.testing.assert_allclose(instrument.numpy() + rest.numpy(), mix, atol=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny untrained exports: a guitar model, a piano model, and a piano model cutting another spectrogram."""
    from model.config import make_config
    from model.export import export_saved_model
    from model.network import build_network

    data = DataRoot(tmp_path_factory.mktemp("data")).ensure()
    config = make_config("tiny")
    for name, seed, instrument, cfg in (("guitar", 1, "guitar", config), ("piano", 2, "piano", config),
                                        ("piano-hop", 3, "piano", config.model_copy(update={"hop_length": 32}))):
        tf.keras.utils.set_random_seed(seed)
        export_saved_model(build_network(cfg), cfg, data.models / name, {"instrument": instrument})
    return data, config


def test_an_export_without_another_model_serves_the_rule_and_keeps_its_own_networks(models):
    from model.export import load_exported_networks, load_exported_weights
    from model.network import build_network
    from model.separate import separate_waveform
    from services.evaluation.sources import SavedModelSource
    from services.training import jobs
    from services.training.export import export_run

    data, config = models
    job = jobs.validate_export(data, {"run_id": "", "model_name": "guitar-np", "with_models": ["guitar"],
                                      "without_model": "piano"})
    assert job["without_model"] == "piano:1"  # the version fixed when asked, as for with_models
    assert export_run(None, data.models, "guitar-np", with_models=[(data.models / "guitar" / "1", None)],
                      without_model=data.models / "piano" / "1") == 1
    export = data.models / "guitar-np" / "1"
    info = json.loads((export / "assets.extra" / "stemlab.json").read_text())
    assert (info["excluded"]["model"], info["excluded"]["version"], info["excluded"]["instrument"]) == ("piano", 1, "piano")

    mix = (np.random.default_rng(4).standard_normal((1, 20_000)) * 0.2).astype(np.float32)
    served = tf.saved_model.load(str(export)).signatures["serving_default"](waveform=tf.constant(mix))
    guitar, _ = load_exported_networks(data.models / "guitar" / "1")
    piano, piano_config = load_exported_networks(data.models / "piano" / "1")
    expected = separate_waveform(guitar, mix, config, (piano, piano_config))[0].numpy()
    np.testing.assert_allclose(served["instrument"].numpy(), expected, atol=1e-5)
    alone = separate_waveform(guitar, mix, config)[0].numpy()
    assert np.max(np.abs(alone - expected)) > 1e-3  # the piano model did take something out

    # Evaluated with overrides, the networks are applied here: the left-out model comes too.
    same = SavedModelSource(export, {"mask_exponent": config.mask_exponent})
    by_overrides, _ = same.separate(mix[0], config.rate_hz, "x")
    np.testing.assert_allclose(by_overrides, served["instrument"].numpy()[0], atol=1e-5)
    # A fine-tune from the export starts from its own network, not the left-out one's.
    network = build_network(config)
    load_exported_weights(network, config, export)
    for a, b in zip(network.weights, guitar[0].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_only_a_whole_model_of_another_instrument_cutting_the_same_spectrogram_is_left_out(models):
    from services.training import jobs
    from services.training.export import export_run

    data, _ = models
    asked = {"run_id": "", "model_name": "refused", "with_models": ["guitar"]}
    with pytest.raises(InvalidArgumentError, match="separates guitar too"):
        jobs.validate_export(data, {**asked, "without_model": "guitar"})
    with pytest.raises(InvalidArgumentError, match="a whole model"):
        jobs.validate_export(data, {**asked, "without_model": "piano#1"})
    with pytest.raises(FailedPreconditionError, match="another spectrogram.*hop_length"):
        jobs.validate_export(data, {**asked, "without_model": "piano-hop"})
    with pytest.raises(FailedPreconditionError, match="hop_length"):
        export_run(None, data.models, "refused", with_models=[(data.models / "guitar" / "1", None)],
                   without_model=data.models / "piano-hop" / "1")
    with pytest.raises(InvalidArgumentError, match="separates guitar too"):
        export_run(None, data.models, "refused", with_models=[(data.models / "guitar" / "1", None)],
                   without_model=data.models / "guitar" / "1")
    assert not (data.models / "refused").exists()  # nothing half-written


def test_exported_again_a_model_keeps_what_it_leaves_out(models):
    """`stemlab export --model guitar --with-model guitar:13` (e.g. to take newer export code) keeps
    guitar 13's exclusion; `--without-model` names another instead; disagreeing sources are refused."""
    from model.export import export_saved_model
    from model.network import build_network
    from services.training.export import export_run

    data, config = models
    mix = (np.random.default_rng(5).standard_normal((1, 20_000)) * 0.2).astype(np.float32)

    def export(*sources, without=None):
        version = export_run(None, data.models, "guitar-kept", with_models=[(s, None) for s in sources],
                             without_model=without)
        return data.models / "guitar-kept" / str(version)

    def info(folder):
        return json.loads((folder / "assets.extra" / "stemlab.json").read_text())

    def served(folder):
        return tf.saved_model.load(str(folder)).signatures["serving_default"](waveform=tf.constant(mix))["instrument"]

    first = export(data.models / "guitar" / "1", without=data.models / "piano" / "1")
    again = export(first)
    assert info(again)["excluded"] == info(first)["excluded"]
    np.testing.assert_allclose(served(again).numpy(), served(first).numpy(), atol=1e-6)

    tf.keras.utils.set_random_seed(7)
    export_saved_model(build_network(config), config, data.models / "drums", {"instrument": "drums"})
    other = export(first, without=data.models / "drums" / "1")
    assert info(other)["excluded"]["model"] == "drums"
    with pytest.raises(InvalidArgumentError, match="leave out different models.*--without-model"):
        export(first, other)
    assert "excluded" not in info(export(data.models / "guitar" / "1"))

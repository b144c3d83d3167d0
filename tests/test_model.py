"""The model package: config presets, spectral front end, network, loss, separation and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import librosa
import numpy as np
import pytest
import tensorflow as tf

from model.config import ConfigError, config_from_dict, config_to_dict, make_config
from model.export import ExportError, export_saved_model, load_exported_networks, read_export_info, versions
from model.loss import masked_l1
from model.network import build_network, fold_batch_norm, trainable_parameter_count
from model.separate import crossfade_weights, separate_waveform, spectrogram_mask
from model.spectral import _window, from_network_rows, istft, magnitude, stft, to_network_rows
from model.windows import hann, triangle
from services.serving.client import segment_window


@pytest.fixture(scope="module")
def tiny():
    config = make_config("tiny")
    keras.utils.set_random_seed(1)
    return config, build_network(config)


def _noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3


@pytest.mark.parametrize("filters, expected", [(192, 7_713_857), (256, 12_546_689), (92, 2_671_757)])
def test_thesis_preset_has_the_thesis_parameter_counts(filters, expected):
    network = build_network(make_config("thesis", {"hourglass_filters": filters}))
    assert trainable_parameter_count(network) == expected


def test_thesis_preset_matches_the_published_parameters():
    config = make_config("thesis")
    assert (config.rate_hz, config.n_fft, config.hop_length, config.chunk_frames) == (22050, 1536, 384, 64)
    assert config.freq_rows == 768 and config.hourglass_depth == 6 and config.hourglass_filters == 192


def test_unknown_or_impossible_overrides_are_rejected():
    with pytest.raises(ConfigError, match="unknown config keys"):
        make_config("tiny", {"filterz": 3})
    with pytest.raises(ConfigError, match="divisible"):
        make_config("thesis", {"hourglass_depth": 7})  # 64 frames cannot halve 7 times
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("huge")
    config = make_config("cpu", {"hourglass_filters": 24})
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_one_hann_window_and_one_triangle_serve_every_side():
    """The STFT window is librosa's periodic Hann to the bit, so the evaluation baselines' librosa STFT
    and the model's are one; the chunk cross-fade inside the SavedModel is the client's segment window."""
    config = make_config("thesis")
    for n_fft in (256, 1536):
        assert np.array_equal(hann(n_fft), librosa.filters.get_window("hann", n_fft, fftbins=True).astype(np.float32))
    assert np.array_equal(_window(config).numpy(), hann(config.n_fft))
    assert segment_window is triangle
    assert np.array_equal(crossfade_weights(config).numpy(), triangle(config.chunk_frames))
    weights = triangle(7)
    assert weights.max() == 1.0 and weights.min() > 0 and np.array_equal(weights, weights[::-1])
    assert np.allclose(np.diff(weights[:4]), weights[0])  # a straight ramp up to the middle


def test_stft_matches_librosa_and_inverse_returns_exact_length_and_signal():
    config = make_config("thesis")
    for samples in (769, 1000, 22050, 22050 + 383):
        x = _noise((2, samples), seed=samples)
        spectrum = stft(x, config).numpy()
        reference = librosa.stft(x[1], n_fft=1536, hop_length=384, window="hann", center=True, pad_mode="reflect")
        assert spectrum.shape == (2, 1 + samples // 384, 769)
        np.testing.assert_allclose(spectrum[1].T, reference, atol=1e-4)
        back = istft(spectrum, config, samples).numpy()
        assert back.shape == (2, samples)
        # Edges included: the overlap is normalised where frames actually overlap.
        np.testing.assert_allclose(back, x, atol=1e-5)


def test_network_rows_drop_dc_and_the_mask_puts_zero_there():
    config = make_config("tiny")
    mags = magnitude(stft(_noise((1, 4000)), config))
    rows = to_network_rows(mags)
    assert rows.shape == (1, config.freq_rows, mags.shape[1], 1)
    np.testing.assert_array_equal(rows[0, :, :, 0].numpy().T, mags[0, :, 1:].numpy())
    back = from_network_rows(rows).numpy()
    assert np.all(back[..., 0] == 0) and np.array_equal(back[..., 1:], mags.numpy()[..., 1:])


def test_mask_is_bounded_to_zero_one_for_any_input(tiny):
    config, network = tiny
    shape = (3, config.freq_rows, config.chunk_frames, 1)
    for data in (np.zeros(shape), np.full(shape, 1e6), np.abs(_noise(shape)) * 1e-9, np.abs(_noise(shape)) * 50):
        mask = network(tf.constant(data, tf.float32), training=True).numpy()
        assert mask.shape == shape and np.all(np.isfinite(mask))
        assert mask.min() >= 0.0 and mask.max() <= 1.0


def test_network_output_does_not_depend_on_the_chunk_level(tiny):
    """Normalisation is inside the model: a chunk 100x louder gets the same mask."""
    config, network = tiny
    chunk = np.abs(_noise((1, config.freq_rows, config.chunk_frames, 1)))
    quiet = network(tf.constant(chunk), training=False).numpy()
    loud = network(tf.constant(chunk * 100), training=False).numpy()
    np.testing.assert_allclose(quiet, loud, atol=1e-5)


def test_log_compressed_input_keeps_zero_one_and_level_invariance_and_exports(tmp_path):
    """input_log_scale lifts quiet bins (0 -> 0, peak -> 1, 1e-3 of the peak -> about 0.1) and the
    exported model reproduces the eager network."""
    from model.network import LogCompress

    squashed = LogCompress(1000.0)(tf.constant([0.0, 1e-3, 1.0])).numpy()
    np.testing.assert_allclose(squashed, [0.0, np.log1p(1.0) / np.log1p(1000.0), 1.0], rtol=1e-6)
    assert config_from_dict(config_to_dict(make_config("tiny"))).input_log_scale == 0  # old exports load
    config = make_config("tiny", {"input_log_scale": 1000.0})
    keras.utils.set_random_seed(1)
    network = build_network(config)
    assert any(layer.name == "log_compress" for layer in network.layers)
    chunk = np.abs(_noise((1, config.freq_rows, config.chunk_frames, 1)))
    np.testing.assert_allclose(network(tf.constant(chunk), training=False).numpy(),
                               network(tf.constant(chunk * 100), training=False).numpy(), atol=1e-5)
    model_dir = tmp_path / "guitar"
    export_saved_model(network, config, model_dir, {"preset": "tiny"})
    assert read_export_info(model_dir / "1")["config"]["input_log_scale"] == 1000.0
    mix = _noise((1, 9000), seed=3)
    out = tf.saved_model.load(str(model_dir / "1")).signatures["serving_default"](waveform=tf.constant(mix))
    np.testing.assert_allclose(out["instrument"].numpy(), separate_waveform(network, mix, config)[0].numpy(), atol=1e-5)
    with pytest.raises(ConfigError):
        make_config("tiny", {"input_log_scale": -1})


def test_loss_is_zero_for_the_ideal_mask_and_grows_with_error():
    mix = tf.constant(np.abs(_noise((2, 8, 4, 1))) + 0.1)
    ideal = tf.constant(np.random.default_rng(3).uniform(0, 1, (2, 8, 4, 1)).astype(np.float32))
    target = ideal * mix
    assert float(masked_l1(mix, target, ideal, 1e-6)) == pytest.approx(0.0, abs=1e-7)
    assert float(masked_l1(mix, target, tf.zeros_like(ideal), 1e-6)) > float(masked_l1(mix, target, ideal * 0.9, 1e-6)) > 0


def test_loss_peak_power_weighs_loud_chunks_as_a_whole_track_sdr_does():
    from model.loss import masked_l1_per_chunk

    mix = np.abs(_noise((1, 8, 4, 1))) + 0.1
    mask = np.random.default_rng(4).uniform(0, 1, (1, 8, 4, 1)).astype(np.float32)
    target = 0.5 * mix
    # The same chunk at two levels 20 dB apart: alike with power 0 (the thesis' normalisation) ...
    mixes, targets = tf.constant(np.concatenate([mix, 10 * mix])), tf.constant(np.concatenate([target, 10 * target]))
    masks = tf.constant(np.concatenate([mask, mask]))
    equal = masked_l1_per_chunk(mixes, targets, masks, 1e-6).numpy()
    assert equal[0] == pytest.approx(equal[1], rel=1e-5)
    # ... and with power 1 the plain L1 of the magnitudes: the loud one weighs 10 times more.
    plain = masked_l1_per_chunk(mixes, targets, masks, 1e-6, peak_power=1.0).numpy()
    expected = np.abs(np.concatenate([target, 10 * target]) - np.concatenate([mask, mask]) * mixes.numpy())
    np.testing.assert_allclose(plain, expected.mean(axis=(1, 2, 3)), rtol=1e-5)
    assert plain[1] == pytest.approx(10 * plain[0], rel=1e-5)


def test_separation_keeps_length_and_instrument_plus_rest_is_the_mix(tiny):
    config, network = tiny
    for samples in (0, 50, 300, 7001):
        mix = _noise((2, samples), seed=samples)
        instrument, rest = separate_waveform(network, mix, config)
        assert instrument.shape == rest.shape == (2, samples)
        np.testing.assert_allclose(instrument.numpy() + rest.numpy(), mix, atol=1e-6)


class _ChunkMean(keras.Model):
    """A stand-in network whose mask is one number per chunk: its mean normalised level."""

    def call(self, rows, training=False):
        level = tf.reduce_mean(rows, axis=[1, 2, 3], keepdims=True) / (tf.reduce_max(rows) + 1e-6)
        return tf.ones_like(rows) * level


def test_overlapping_chunks_cross_fade_the_mask_instead_of_jumping():
    # A mix that grows louder over time: every chunk gets a different constant mask.
    frames = 400
    ramp = np.linspace(0.05, 1.0, frames, dtype=np.float32)
    mags = tf.constant(np.tile(ramp[None, :, None], (1, 1, 129)))
    jumps = {}
    for overlap in (0.0, 0.5):
        config = make_config("tiny", {"chunk_overlap": overlap})
        mask = spectrogram_mask(_ChunkMean(), mags, config).numpy()[0, :, 5]
        assert mask.shape == (frames,)
        jumps[overlap] = np.abs(np.diff(mask)).max()
    # Without overlap the mask steps at each border; blended, the largest step is much smaller.
    assert jumps[0.5] < jumps[0.0] / 2


def test_export_writes_versions_with_both_signatures_and_matches_eager_separation(tiny, tmp_path):
    config, network = tiny
    model_dir = tmp_path / "models" / "guitar"
    assert export_saved_model(network, config, model_dir, {"preset": "tiny", "source_run": "r1"}) == 1
    assert export_saved_model(network, config, model_dir, {"preset": "tiny"}) == 2
    assert versions(model_dir) == [1, 2]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]  # no temporary folder left behind
    info = read_export_info(model_dir / "1")
    assert info["rate_hz"] == 22050 and info["source_run"] == "r1" and info["config"]["n_fft"] == config.n_fft

    loaded = tf.saved_model.load(str(model_dir / "1"))
    serve = loaded.signatures["serving_default"]
    assert set(serve.structured_input_signature[1]) == {"waveform"}
    assert set(serve.structured_outputs) == {"instrument", "rest"}
    mix = _noise((2, 9000), seed=7)
    out = serve(waveform=tf.constant(mix))
    instrument, _ = separate_waveform(network, mix, config)
    # Same graph and weights; only float summation order may differ.
    np.testing.assert_allclose(out["instrument"].numpy(), instrument.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["instrument"].numpy() + out["rest"].numpy(), mix, atol=1e-6)
    rate = loaded.signatures["sample_rate"](x=tf.zeros([3]))["sample_rate"]
    assert rate.dtype == tf.int32 and rate.numpy().tolist() == [22050] * 3


def _trained_looking(config, seed):
    """A tiny network whose batch norms are not the identity they start as (a trained one's are not)."""
    keras.utils.set_random_seed(seed)
    network = build_network(config)
    rng = np.random.default_rng(seed)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2.0, channels), rng.normal(0, 0.5, channels),
                               rng.normal(0, 0.5, channels), rng.uniform(0.2, 3.0, channels)])
    return network


def test_folded_batch_norm_gives_the_same_mask_and_exports_serve_it_but_keep_the_originals(tmp_path):
    config = make_config("tiny")
    network = _trained_looking(config, seed=3)
    folded = fold_batch_norm(network, config)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    chunks = np.abs(_noise((3, config.freq_rows, config.chunk_frames, 1), seed=4))
    mask = network(chunks, training=False).numpy()
    np.testing.assert_allclose(folded(chunks).numpy(), mask, atol=2e-6)
    plain = build_network(config, batch_norm=False)  # the same convolutions, batch norm dropped unfolded
    plain.set_weights([w.numpy() for layer in network.layers if isinstance(layer, keras.layers.Conv2D)
                       for w in (layer.kernel, layer.bias)])
    assert np.abs(plain(chunks).numpy() - mask).max() > 0.01  # so the folding is what makes them agree

    second = _trained_looking(config, seed=5)
    members = [{"config": config_to_dict(config)}] * 2
    version_dir = tmp_path / "m" / str(export_saved_model([network, second], config, tmp_path / "m",
                                                          {"members": members}))
    stored = [k for k, _ in tf.train.list_variables(str(version_dir / "variables" / "variables"))]
    assert any(k.startswith("folded/1/") for k in stored)  # the serving copies are in the SavedModel
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    mix = _noise((2, 9000), seed=6)
    instrument, _ = separate_waveform([network, second], mix, config)
    np.testing.assert_allclose(serve(waveform=tf.constant(mix))["instrument"].numpy(), instrument.numpy(), atol=1e-5)

    # Reading back gives the networks with their batch norms (what a fine-tune starts from), exactly.
    read, _ = load_exported_networks(version_dir)
    assert [len(n.weights) for n in read] == [len(network.weights)] * 2
    for original, back in zip([network, second], read, strict=True):
        for a, b in zip(original.weights, back.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    served, _ = load_exported_networks(version_dir, folded=True)  # or what it serves, for inference
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in served[1].layers)
    np.testing.assert_allclose(served[1](chunks).numpy(), second(chunks, training=False).numpy(), atol=2e-6)


def test_an_export_without_folded_copies_still_reads_and_another_networks_weights_do_not(tmp_path):
    from model.export import _Separator

    config = make_config("tiny")
    network = _trained_looking(config, seed=7)
    old = tmp_path / "1"  # the layout of exports before the folded copies (shipped models until guitar 11)
    tf.saved_model.save(_Separator(network, config), str(old))
    (old / "assets.extra").mkdir()
    (old / "assets.extra" / "stemlab.json").write_text(json.dumps({"config": config_to_dict(config)}))
    read, _ = load_exported_networks(old)
    for a, b in zip(network.weights, read[0].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    wider = config.model_copy(update={"head_filters": (8, 8), "head_kernels": (1, 1)})
    (old / "assets.extra" / "stemlab.json").write_text(json.dumps({"config": config_to_dict(wider)}))
    with pytest.raises(ExportError, match="another network's weights"):
        load_exported_networks(old)


def test_saved_model_cli_lists_the_signatures(tiny, tmp_path):
    config, network = tiny
    version = export_saved_model(network, config, tmp_path / "m")
    cli = Path(sys.executable).parent / "saved_model_cli"
    if not cli.exists():
        pytest.skip("saved_model_cli is not installed beside this Python")
    out = subprocess.run([str(cli), "show", "--dir", str(tmp_path / "m" / str(version)), "--all"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "signature_def['serving_default']" in out and "signature_def['sample_rate']" in out
    assert "inputs['waveform']" in out and "outputs['instrument']" in out and "outputs['rest']" in out


def test_loss_error_power_two_is_the_squared_error_and_weighs_a_large_leak_more():
    from model.loss import masked_l1_per_chunk

    mix = np.abs(_noise((2, 8, 4, 1))) + 0.1
    target = 0.5 * mix
    # Two masks with the same summed error: one leaks a little everywhere, one a lot in one bin.
    spread = np.full_like(mix, 0.5)
    spread += 0.1 / mix  # error 0.1 in every bin (in magnitude units)
    lumped = np.full_like(mix, 0.5)
    lumped[:, 0, 0, 0] += 0.1 * mix[0].size / mix[:, 0, 0, 0]  # the same total error in one bin
    args = (tf.constant(mix), tf.constant(target))
    l1 = [masked_l1_per_chunk(*args, tf.constant(m), 1e-6, peak_power=1.0).numpy() for m in (spread, lumped)]
    l2 = [masked_l1_per_chunk(*args, tf.constant(m), 1e-6, peak_power=1.0, error_power=2.0).numpy()
          for m in (spread, lumped)]
    np.testing.assert_allclose(l1[0], l1[1], rtol=1e-4)  # L1 cannot tell them apart ...
    assert np.all(l2[1] > 10 * l2[0])  # ... the squared error weighs the lumped leak far more
    expected = ((target - spread * mix) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(l2[0], expected, rtol=1e-4)  # peak_power 1: plain squared magnitudes


def test_export_info_is_read_in_one_place_and_a_broken_one_is_refused(tmp_path):
    version = tmp_path / "7"
    (version / "assets.extra").mkdir(parents=True)
    assert read_export_info(version, missing_ok=True) == {}  # a SavedModel exported elsewhere
    with pytest.raises(ExportError, match="has no assets.extra/stemlab.json"):
        read_export_info(version)
    info = version / "assets.extra" / "stemlab.json"
    info.write_text('{"config": ')
    with pytest.raises(ExportError, match="not valid JSON"):
        read_export_info(version, missing_ok=True)
    info.write_text("[1, 2]")
    with pytest.raises(ExportError, match="not a JSON object"):
        read_export_info(version)
    info.write_text('{"rate_hz": 22050}')
    assert read_export_info(version) == {"rate_hz": 22050}

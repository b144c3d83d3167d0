"""Training domain: input pipeline, the training loop, cancel, resume, export (processes of their own:
test_training_processes.py)."""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from model.checkpoint import load_best_network, read_run
from model.config import config_to_dict, make_config
from model.separate import separate_waveform
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.training import data, sampling
from services.training.export import export_run
from services.training.trainer import read_history, resume_run, split_overrides, train_run
from tests.training_data import FAST, RATE, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, make_dataset(root)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One tiny run of 4 epochs, shared by the tests that only read it."""
    root, manifest = dataset
    run_dir = tmp_path_factory.mktemp("runs") / "run-a"
    updates = []
    result = train_run(run_dir, manifest, root, epochs=4, progress=lambda *a, **kw: updates.append((a, kw)), **FAST)
    return run_dir, result, updates


# ---- input pipeline ---------------------------------------------------------------------------


def _fake_tracks(sources_and_lengths):
    return [sampling.TrackAudio(f"t{i}", s, np.full(n, i + 1, np.float32), np.full(n, -(i + 1), np.float32))
            for i, (s, n) in enumerate(sources_and_lengths)]


def test_chunks_are_drawn_by_source_weight_across_tracks():
    tracks = _fake_tracks([("recorded", 5000)] * 3 + [("solo", 5000)])
    sampler = sampling.ChunkSampler(tracks, {"recorded": 3, "solo": 1}, 1000, RATE, sampling.Augmentation(gain_db=0, remix_probability=0))
    instrument, rest = sampler.draw(np.random.default_rng(0), 4000)
    track_of = instrument[:, 0].astype(int) - 1
    assert abs(np.mean(track_of == 3) - 0.25) < 0.03  # the solo source gets its 1 in 4
    assert len(set(track_of[:20])) > 1  # consecutive chunks come from different tracks
    np.testing.assert_array_equal(rest[:, 0], -instrument[:, 0])  # no remixing asked for


def test_remixing_and_gain_change_training_chunks_but_are_seeded():
    tracks = _fake_tracks([("a", 3000)] * 4)
    sampler = sampling.ChunkSampler(tracks, {}, 1000, RATE, sampling.Augmentation(gain_db=6, remix_probability=1.0))
    inst, rest = sampler.draw(np.random.default_rng(5), 200)
    assert np.mean(np.abs(inst[:, 0]) != np.abs(rest[:, 0])) > 0.5  # rest from another track, other gain
    again = sampler.draw(np.random.default_rng(5), 200)
    np.testing.assert_array_equal(inst, again[0])
    first = list(sampling.training_segments(sampler, 1, 2, 4, 3))
    replay = list(sampling.training_segments(sampler, 1, 2, 4, 3, skip_steps=2))
    np.testing.assert_array_equal(first[2][0], replay[0][0])  # skipping replays the same epoch


def _band_energy(audio, lo_hz, hi_hz, rate=RATE):
    spectrum = np.abs(np.fft.rfft(audio, axis=-1)) ** 2
    f = np.fft.rfftfreq(audio.shape[-1], 1.0 / rate)
    return spectrum[..., (f >= lo_hz) & (f < hi_hz)].sum(axis=-1)


def test_random_eq_curves_are_bounded_smooth_and_sometimes_low_pass():
    f = np.fft.rfftfreq(8192, 1.0 / RATE)
    rng = np.random.default_rng(1)
    curves = np.stack([sampling.random_eq_db(rng, f, 9.0) for _ in range(300)])
    assert curves.max() <= 9.0 and curves.min() >= -60.0
    # Smooth, so a short filter: its impulse response has all but 0.1 % of its energy within
    # 20 ms of time zero, and the circular FFT filter barely wraps around a chunk's ends.
    response = np.fft.irfft(10.0 ** (curves / 20.0), n=8192, axis=1) ** 2
    near = response[:, :441].sum(axis=1) + response[:, -441:].sum(axis=1)
    assert np.min(near / response.sum(axis=1)) > 0.999
    top = curves[:, np.argmin(np.abs(f - 10_500))] - curves[:, np.argmin(np.abs(f - 5000))]
    assert 0.15 < np.mean(top < -15) < 0.5  # about a third roll off steeply (low-pass)
    assert np.std(curves[:, np.argmin(np.abs(f - 1000))]) > 1.0  # and the mids move too
    np.testing.assert_array_equal(sampling.random_eq_db(np.random.default_rng(1), f, 9.0), curves[0])


def test_equalise_is_a_filter_flat_curve_identity_low_pass_removes_highs():
    t = np.arange(8192) / RATE
    low, high = np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 8000 * t)
    f = np.fft.rfftfreq(t.shape[0], 1.0 / RATE)
    np.testing.assert_allclose(sampling.equalise((low + high).astype(np.float32), np.zeros_like(f)), low + high, atol=1e-5)
    cut = np.where(f > 2000, -60.0, 0.0)
    out = sampling.equalise((low + high).astype(np.float32), cut)
    assert _band_energy(out, 7000, 9000) < 1e-5 * _band_energy(high, 7000, 9000)
    assert abs(_band_energy(out, 100, 300) / _band_energy(low, 100, 300) - 1) < 0.01


def test_eq_augmentation_bends_each_source_on_its_own_and_is_seeded():
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal(6000).astype(np.float32) for _ in range(4)]
    tracks = [sampling.TrackAudio(f"t{i}", "a", noise[i], noise[(i + 1) % 4]) for i in range(4)]
    plain = sampling.ChunkSampler(tracks, {}, 4096, RATE, sampling.Augmentation(gain_db=0, remix_probability=0))
    eq = sampling.ChunkSampler(tracks, {}, 4096, RATE, sampling.Augmentation(gain_db=0, remix_probability=0, eq_db=9))
    inst0, rest0 = plain.draw(np.random.default_rng(7), 64)
    inst, rest = eq.draw(np.random.default_rng(7), 64)
    # Brightness (high band over low band) of each source, relative to the unequalised chunk.
    def tilt(x, x0):
        return np.log10(_band_energy(x, 4000, 8000) / _band_energy(x, 200, 800)
                        / (_band_energy(x0, 4000, 8000) / _band_energy(x0, 200, 800)))
    plain_again = plain.draw(np.random.default_rng(7), 64)[0]
    np.testing.assert_array_equal(plain_again, inst0)
    assert np.std(tilt(inst, inst0)) > 0.2  # envelopes vary chunk to chunk ...
    assert np.mean(np.abs(tilt(inst, inst0) - tilt(rest, rest0)) > 0.2) > 0.5  # ... and per source
    np.testing.assert_array_equal(eq.draw(np.random.default_rng(7), 64)[1], rest)  # replayable


def test_change_speed_moves_a_tone_by_the_ratio_and_keeps_its_level_to_the_ends():
    t = np.arange(RATE * 3) / RATE
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    f = np.fft.rfftfreq(8192, 1.0 / RATE)
    for semitones in (-2.0, 0.5, 2.0):
        read, becomes = sampling.speed_sizes(8192, 2.0 ** (semitones / 12.0))
        assert abs(read / becomes / 2.0 ** (semitones / 12.0) - 1) < 0.01
        out = sampling.change_speed(tone[:read], 8192)
        assert out.shape == (8192,) and out.dtype == np.float32
        peak = f[np.argmax(np.abs(np.fft.rfft(out * np.hanning(8192))))]
        assert abs(peak - 1000 * read / becomes) < 3.0
        # The resampling's wrap-around stays in the dropped margins: full level at both ends.
        assert 0.95 < np.abs(out[:100]).max() < 1.05 and 0.95 < np.abs(out[-100:]).max() < 1.05
    # Played faster, what would alias above the new Nyquist frequency is dropped, not folded down.
    high = np.sin(2 * np.pi * 10_500 * t).astype(np.float32)
    sped = sampling.change_speed(high[: sampling.speed_sizes(8192, 2.0 ** (2 / 12))[0]], 8192)
    assert np.abs(sped).max() < 1e-3


def test_speed_augmentation_moves_both_sources_of_a_chunk_alike_and_leaves_runs_without_it_unchanged():
    t = np.arange(RATE * 2) / RATE
    tracks = [sampling.TrackAudio(f"t{i}", "a", np.sin(2 * np.pi * 500 * t).astype(np.float32),
                                  np.sin(2 * np.pi * 2000 * t).astype(np.float32)) for i in range(3)]
    plain = sampling.ChunkSampler(tracks, {}, 8192, RATE, sampling.Augmentation(gain_db=3, remix_probability=0))
    sped = sampling.ChunkSampler(tracks, {}, 8192, RATE,
                                 sampling.Augmentation(gain_db=3, remix_probability=0, pitch_semitones=2))
    f = np.fft.rfftfreq(8192, 1.0 / RATE)

    def peaks(x):
        return f[np.argmax(np.abs(np.fft.rfft(x * np.hanning(8192), axis=-1)), axis=-1)]

    inst, rest = sped.draw(np.random.default_rng(4), 60)
    ratio = peaks(inst) / 500.0
    np.testing.assert_allclose(peaks(rest) / 2000.0, ratio, atol=0.004)  # one factor per chunk
    assert ratio.min() > 2 ** (-2 / 12) - 0.01 and ratio.max() < 2 ** (2 / 12) + 0.01
    assert ratio.std() > 0.02  # and it varies from chunk to chunk
    np.testing.assert_array_equal(sped.draw(np.random.default_rng(4), 60)[0], inst)  # replayable
    # Off (the default), a sampler makes exactly the draws it made before the option existed
    # (track, remix coin, then start and gain per source), so older runs resume and replay alike.
    inst0, rest0 = plain.draw(np.random.default_rng(4), 2)
    rng = np.random.default_rng(4)
    for i in range(2):
        track = tracks[int(rng.choice(3, p=plain.track_probability))]
        rng.random()
        for out, audio in ((inst0, track.instrument), (rest0, track.rest)):
            start = int(rng.integers(0, audio.shape[0] - 8192 + 1))
            gain = 10.0 ** (rng.uniform(-3, 3) / 20.0)
            np.testing.assert_array_equal(out[i], audio[start : start + 8192] * np.float32(gain))


def test_validation_segments_are_fixed_and_unaugmented():
    tracks = _fake_tracks([("a", 10_000), ("b", 500)])
    one = sampling.validation_segments(tracks, 1000, per_track=4)
    two = sampling.validation_segments(tracks, 1000, per_track=4)
    np.testing.assert_array_equal(one[0], two[0])
    assert one[0].shape == (5, 1000)  # 4 from the long track, 1 zero-padded from the short one
    np.testing.assert_array_equal(one[0] + one[1], 0)


def test_phase_sensitive_target_makes_the_squared_error_that_of_the_played_back_spectrum():
    from model.loss import masked_l1_per_chunk
    from model.spectral import stft

    config = make_config("tiny")
    rng = np.random.default_rng(3)
    instrument = tf.constant(rng.standard_normal((2, config.segment_samples)), tf.float32)
    rest = tf.constant(rng.standard_normal((2, config.segment_samples)), tf.float32)
    mix_rows, magnitude_rows = data.chunk_features(instrument, rest, config)
    _, target_rows = data.chunk_features(instrument, rest, config, phase_sensitive=True)
    assert target_rows.shape == magnitude_rows.shape
    # The projection is never longer than |S|, and with independent noises often against the mix.
    assert np.all(target_rows.numpy() <= magnitude_rows.numpy() + 1e-4)
    assert 0.1 < np.mean(target_rows.numpy() < 0) < 0.5
    # Where the rest is silent, the instrument is the mix: the target is its magnitude.
    _, alone = data.chunk_features(instrument, tf.zeros_like(rest), config, phase_sensitive=True)
    np.testing.assert_allclose(alone.numpy(), magnitude_rows.numpy(), rtol=1e-4, atol=1e-4)

    # For any real mask, squared error against the target = |m X - S|^2 minus a constant.
    mix_spectrum = stft(instrument + rest, config, center=False).numpy()[:, :, 1:]
    source_spectrum = stft(instrument, config, center=False).numpy()[:, :, 1:]
    differences = []
    for seed in (1, 2):
        mask = np.random.default_rng(seed).uniform(size=mix_rows.shape).astype(np.float32)
        loss = masked_l1_per_chunk(mix_rows, target_rows, tf.constant(mask), 1e-6,
                                   peak_power=1.0, error_power=2.0).numpy()
        played = mask[..., 0].transpose(0, 2, 1) * mix_spectrum
        differences.append(loss - np.mean(np.abs(played - source_spectrum) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(differences[0], differences[1], rtol=1e-3)
    assert np.all(differences[0] < 0)  # the constant: the part of S orthogonal to the mix's phase


def test_audio_is_decoded_once_and_then_memory_mapped(dataset, tmp_path, monkeypatch):
    root, manifest_path = dataset
    from services.common.manifest import load_manifest

    calls = []
    real = data.read_audio
    monkeypatch.setattr(data, "read_audio", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    manifest = load_manifest(manifest_path)
    config = make_config("tiny")
    tracks = data.load_tracks(manifest, root, config, tmp_path / "cache")
    assert len(calls) == 16 and len(tracks["train"]) == 6 and len(tracks["validation"]) == 2
    again = data.load_tracks(manifest, root, config, tmp_path / "cache")
    assert len(calls) == 16  # second load reads the cache
    assert isinstance(again["train"][0].instrument, np.memmap)
    np.testing.assert_array_equal(again["train"][0].instrument, tracks["train"][0].instrument)


def _mapped_files_under(folder: Path) -> set[str]:
    """Files under `folder` this process has memory-mapped (Linux: /proc/self/maps)."""
    prefix = str(folder.resolve())
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[-1] for line in lines if prefix in line}


def test_a_run_that_ends_leaves_none_of_its_decoded_audio_mapped(tmp_path):
    # A training service runs many jobs in one process: each run's decoded pairs must be unmapped
    # when it ends, or deleting DATA/cache never frees the disk and memory grows run after run.
    root = tmp_path / "data"
    manifest = make_dataset(root)
    cache = data.decoded_cache_dir(root)
    done = [0]  # cancelled in the middle of its first epoch, while the input pipeline prefetches
    cancelled = train_run(tmp_path / "cancelled", manifest, root, epochs=2,
                          progress=lambda steps, *a, **kw: done.append(steps), should_stop=lambda: done[-1] >= 3, **FAST)
    assert cancelled["state"] == "cancelled" and cancelled["epochs_completed"] == 0
    assert len(list(cache.glob("*.npy"))) == 16
    completed = train_run(tmp_path / "completed", manifest, root, epochs=1, **FAST)
    assert completed["state"] == "completed"
    gc.collect()
    assert _mapped_files_under(cache) == set()


def test_a_dataset_at_another_rate_is_refused(dataset):
    root, manifest_path = dataset
    from services.common.manifest import load_manifest

    with pytest.raises(data.DataError, match="22050 Hz but the model runs at 44100"):
        data.load_tracks(load_manifest(manifest_path), root, make_config("tiny", {"rate_hz": 44100}), root / "c")


def test_unknown_override_is_refused():
    with pytest.raises(InvalidArgumentError, match="unknown overrides"):
        split_overrides("tiny", {"learning_rat": 1})
    config, options = split_overrides("tiny", {"learning_rate": 0.01, "remix_probability": 0.5, "augment_eq_db": 9})
    assert config.learning_rate == 0.01 and options.remix_probability == 0.5 and options.augment_eq_db == 9
    with pytest.raises(InvalidArgumentError, match="augment_eq_db"):
        split_overrides("tiny", {"augment_eq_db": -1})
    with pytest.raises(InvalidArgumentError, match="augment_pitch_semitones"):
        split_overrides("tiny", {"augment_pitch_semitones": 13})


# ---- training ---------------------------------------------------------------------------------


def test_tiny_preset_trains_and_validation_loss_falls(trained):
    run_dir, result, updates = trained
    assert result["state"] == "completed" and result["epochs_completed"] == 4
    val = [row["val_loss"] for row in result["history"]]
    assert val[-1] < val[0] * 0.9, val
    assert read_history(run_dir) == result["history"]
    info = read_run(run_dir)
    assert info["state"] == "completed" and info["config"]["n_fft"] == 256 and info["manifest"]["checksum"]
    assert info["best_epoch"] == result["best_epoch"] == int(np.argmin(val)) + 1
    assert (run_dir / "best.weights.h5").is_file() and any((run_dir / "logs").iterdir())
    assert "PATH" not in (run_dir / "run.yaml").read_text()  # no environment dump
    (done, total, message), metrics = updates[-1]
    assert (done, total) == (32, 32) and {"epoch", "loss", "val_loss", "steps_per_second", "eta_seconds"} <= set(metrics)


def test_run_yaml_follows_the_best_weights_while_training_and_an_export_then_names_their_epoch(dataset, tmp_path):
    root, manifest = dataset
    run_dir = tmp_path / "live"
    seen = []

    def progress(done, total, message, **metrics):
        if " done: " in message:  # reported after the epoch's files are written
            info = read_run(run_dir)
            history = read_history(run_dir)
            seen.append((info["state"], info["epochs_completed"], info["best_epoch"], history))
            if info["epochs_completed"] == 2:  # an export while the run trains, as the service's export lane does
                version = export_run(run_dir, tmp_path / "models", "live")
                meta = json.loads((tmp_path / "models" / "live" / str(version) / "assets.extra" / "stemlab.json").read_text())
                seen.append(("export", meta["best_epoch"], meta["best_val_loss"]))

    train_run(run_dir, manifest, root, epochs=3, progress=progress, **FAST)
    epochs = [s for s in seen if s[0] == "running"]
    assert [s[1] for s in epochs] == [1, 2, 3]
    for _, completed, best_epoch, history in epochs:
        losses = [h["val_loss"] for h in history[:completed]]
        assert best_epoch == 1 + losses.index(min(losses))
    exported = next(s for s in seen if s[0] == "export")
    best_at_two = epochs[1][2]
    assert exported[1] == best_at_two
    assert exported[2] == pytest.approx(epochs[1][3][best_at_two - 1]["val_loss"], abs=1e-6)


def test_calling_again_resumes_with_epochs_and_history_intact(trained, tmp_path):
    run_dir, first, _ = trained
    # Train a copy further, so the shared run stays as it was for the other tests.
    import shutil

    copy = tmp_path / "run-a"
    shutil.copytree(run_dir, copy)
    result = resume_run(copy, epochs=5)
    assert result["epochs_completed"] == 5 and result["global_step"] == 5 * 8
    assert [r["epoch"] for r in result["history"]] == [1, 2, 3, 4, 5]
    assert result["history"][:4] == first["history"]


def _kernels(checkpoint: str) -> dict[str, np.ndarray]:
    """The trainable weights in a checkpoint (the optimiser tracks them; its slots are elsewhere)."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("optimizer/_trainable_variables/")}


def _largest_change(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a and a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_resume_with_a_lower_learning_rate_steps_with_it_and_records_it(trained, tmp_path):
    import shutil

    run_dir, first, _ = trained
    copy = tmp_path / "run-lr"
    shutil.copytree(run_dir, copy)
    lr = make_config("tiny").learning_rate
    assert [r["learning_rate"] for r in first["history"]] == [lr] * 4
    # A step of 1e-12 leaves every kernel where it was; the epoch before, at the preset's rate, moved them.
    moved = _largest_change(_kernels(str(run_dir / "checkpoints" / "ckpt-24")),
                            _kernels(str(run_dir / "checkpoints" / "ckpt-32")))
    result = resume_run(copy, epochs=5, changes={"learning_rate": 1e-12})
    assert [r["learning_rate"] for r in result["history"]] == [lr] * 4 + [1e-12]
    assert [r["learning_rate"] for r in read_history(copy)] == [lr] * 4 + [1e-12]
    held = _largest_change(_kernels(str(copy / "checkpoints" / "ckpt-32")),
                           _kernels(str(copy / "checkpoints" / "ckpt-40")))
    assert moved > 1e-4 and held < 1e-8, (moved, held)
    info = read_run(copy)
    assert info["config"]["learning_rate"] == 1e-12 and info["overrides"]["learning_rate"] == 1e-12
    assert info["changes"] == [{"from_epoch": 5, "from_step": 1, "learning_rate": 1e-12}]
    # Resuming again without changes keeps the lowered rate (the checkpoint holds it).
    again = resume_run(copy, epochs=6)
    assert again["history"][-1]["learning_rate"] == 1e-12
    with pytest.raises(InvalidArgumentError, match="cannot change when resuming"):
        resume_run(copy, epochs=7, changes={"hourglass_filters": 4})
    with pytest.raises(InvalidArgumentError, match="learning_rate"):
        resume_run(copy, epochs=7, changes={"learning_rate": -1})
    assert read_run(copy)["changes"] == info["changes"] and len(read_history(copy)) == 6  # refused: nothing written


def test_resume_with_another_loss_weighting_chooses_the_best_epoch_afresh(trained, tmp_path):
    import shutil

    run_dir, first, _ = trained
    copy = tmp_path / "run-loss"
    shutil.copytree(run_dir, copy)
    best_before = read_run(copy)["best_epoch"]
    assert best_before >= 1
    result = resume_run(copy, epochs=5, changes={"loss_peak_power": 1.0})
    info = read_run(copy)
    assert info["options"]["loss_peak_power"] == 1.0
    assert info["changes"] == [{"from_epoch": 5, "from_step": 1, "loss_peak_power": 1.0}]
    # The new loss is the plain L1 of magnitudes, on another scale than the normalised one, so
    # epoch 5 is the best of the new loss whatever its value beside the earlier epochs.
    assert result["best_epoch"] == info["best_epoch"] == 5
    assert result["best_val_loss"] == pytest.approx(result["history"][-1]["val_loss"], rel=1e-5)
    assert abs(np.log(result["history"][-1]["val_loss"] / first["history"][-1]["val_loss"])) > np.log(2)
    # best.weights.h5 now holds epoch 5's weights: the export takes them.
    network, _ = load_best_network(copy)
    saved = _kernels(str(copy / "checkpoints" / "ckpt-40"))
    assert sorted(v.tobytes() for v in saved.values()) == sorted(w.numpy().tobytes() for w in network.trainable_weights)


def test_resume_with_another_augmentation_draws_with_it_and_chooses_the_best_epoch_afresh(trained, tmp_path,
                                                                                         monkeypatch):
    import shutil

    from services.training import sampling as training_sampling

    run_dir, _, _ = trained
    copy = tmp_path / "run-eq"
    shutil.copytree(run_dir, copy)
    before = read_run(copy)
    used = []

    class Recording(training_sampling.ChunkSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self.augmentation)

    monkeypatch.setattr(training_sampling, "ChunkSampler", Recording)
    # A huge equaliser makes epoch 5 worse on the unaugmented validation chunks than the earlier
    # best, so only a fresh choice makes it the best (and the weights an export takes).
    changes = {"augment_eq_db": 24.0, "remix_probability": 0.5, "augment_pitch_semitones": 1.0}
    result = resume_run(copy, epochs=5, changes=changes)
    assert used == [training_sampling.Augmentation(before["options"]["augment_gain_db"], 0.5, 24.0, 1.0)]
    info = read_run(copy)
    assert {k: info["options"][k] for k in changes} == changes
    assert info["changes"] == [{"from_epoch": 5, "from_step": 1, **changes}]
    assert result["best_epoch"] == info["best_epoch"] == 5
    network, _ = load_best_network(copy)
    saved = _kernels(str(copy / "checkpoints" / "ckpt-40"))
    assert sorted(v.tobytes() for v in saved.values()) == sorted(w.numpy().tobytes() for w in network.trainable_weights)
    # A new learning rate alone keeps the choice: epoch 6 is the best only if it beats epoch 5.
    again = resume_run(copy, epochs=6, changes={"learning_rate": 1e-12})
    assert again["best_epoch"] == 5 or again["history"][-1]["val_loss"] < result["history"][-1]["val_loss"]


def test_resume_with_the_phase_sensitive_target_trains_and_validates_on_it(trained, tmp_path, monkeypatch):
    import shutil

    from services.training import data as training_data

    run_dir, _, _ = trained
    copy = tmp_path / "run-psa"
    shutil.copytree(run_dir, copy)
    features = training_data.chunk_features
    targets = []

    def recording(instrument, rest, config, phase_sensitive=False):
        targets.append(phase_sensitive)  # once per traced map function: training and validation
        return features(instrument, rest, config, phase_sensitive)

    monkeypatch.setattr(training_data, "chunk_features", recording)
    result = resume_run(copy, epochs=5, changes={"loss_phase_sensitive": True})
    assert targets and all(targets)
    assert len(targets) >= 2  # the validation chunks too, or val_loss would judge another target
    info = read_run(copy)
    assert info["options"]["loss_phase_sensitive"] is True
    assert result["best_epoch"] == info["best_epoch"] == 5  # a TARGET_KEY: the best epoch afresh


def test_a_new_run_can_start_from_another_runs_best_weights(dataset, trained, tmp_path):
    from services.common.errors import FailedPreconditionError
    from services.training.trainer import check_init_from

    root, manifest = dataset
    source, _, _ = trained
    source_weights = [w.numpy() for w in load_best_network(source)[0].trainable_weights]

    def largest_change_from_source(run_dir):
        weights = [w.numpy() for w in load_best_network(run_dir)[0].trainable_weights]
        return max(float(np.max(np.abs(a - b))) for a, b in zip(weights, source_weights, strict=True))

    # A step of 1e-12 leaves the weights where they started: the source's best.
    fast = {**FAST, "seed": 11}
    warm = tmp_path / "warm"
    train_run(warm, manifest, root, epochs=1, overrides={"learning_rate": 1e-12}, init_from=source, **fast)
    assert largest_change_from_source(warm) < 1e-6
    info = read_run(warm)
    assert info["init_from"]["run_id"] == "run-a" and info["init_from"]["best_epoch"] == read_run(source)["best_epoch"]
    assert len(info["init_from"]["sha256"]) == 64
    # Resuming it later restores its own checkpoint, not the source's weights again.
    resumed = resume_run(warm, epochs=2)
    assert resumed["epochs_completed"] == 2
    cold = tmp_path / "cold"
    train_run(cold, manifest, root, epochs=1, overrides={"learning_rate": 1e-12}, **fast)
    assert largest_change_from_source(cold) > 1e-2
    # Another network, or a source without weights, is refused before anything is written.
    with pytest.raises(FailedPreconditionError, match="hourglass_filters"):
        train_run(tmp_path / "wider", manifest, root, epochs=1, init_from=source,
                  overrides={"hourglass_filters": 12}, **fast)
    assert not (tmp_path / "wider").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run.yaml").write_text(yaml.safe_dump({**read_run(source), "run_id": "empty"}))
    with pytest.raises(FailedPreconditionError, match="no best weights"):
        check_init_from(tmp_path / "empty", split_overrides("tiny", None)[0])


def test_the_service_checks_init_from_when_the_job_is_asked_for(dataset, trained, tmp_path):
    import shutil

    from services.common.errors import FailedPreconditionError, NotFoundError
    from services.common.paths import DataRoot
    from services.training import jobs

    root, _ = dataset
    data = DataRoot(root)
    shutil.copytree(trained[0], data.runs / "tiny-source")
    asked = {"dataset": "synth", "preset": "tiny", "run_id": "warm-job"}
    assert jobs.validate_train(data, {**asked, "init_from": "tiny-source"})["init_from"] == "tiny-source"
    with pytest.raises(NotFoundError):
        jobs.validate_train(data, {**asked, "init_from": "no-such-run"})
    with pytest.raises(FailedPreconditionError, match="hourglass_filters 8 there, 12 here"):
        jobs.validate_train(data, {**asked, "init_from": "tiny-source", "overrides": {"hourglass_filters": 12}})
    # Refused before a job (and its run folder, which kept the id) exists.
    from services.common.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="at 22050 Hz but the model runs at 16000 Hz"):
        jobs.validate_train(data, {**asked, "overrides": {"rate_hz": 16000}})
    with pytest.raises(InvalidArgumentError, match="seed must be between"):
        jobs.validate_train(data, {**asked, "seed": -1})
    done = jobs.trainer.read_run(data.runs / "tiny-source")["epochs_completed"]
    with pytest.raises(InvalidArgumentError, match=f"has done {done} epochs already"):
        jobs.validate_resume(data, {"run_id": "tiny-source", "epochs": done})
    assert jobs.validate_resume(data, {"run_id": "tiny-source", "epochs": done + 1})


def test_a_new_run_can_start_from_an_exported_model(dataset, trained, tmp_path):
    # The shipped models come without their runs: fine-tuning one on your own songs starts from the
    # SavedModel's variables.
    from services.common.errors import FailedPreconditionError
    from services.training.trainer import check_init_from

    root, manifest = dataset
    source, _, _ = trained
    version = export_run(source, tmp_path / "models", "synth")
    exported = tmp_path / "models" / "synth" / str(version)
    source_weights = [w.numpy() for w in load_best_network(source)[0].trainable_weights]

    warm = tmp_path / "warm"
    train_run(warm, manifest, root, epochs=1, overrides={"learning_rate": 1e-12}, init_from=exported,
              **{**FAST, "seed": 11})
    weights = [w.numpy() for w in load_best_network(warm)[0].trainable_weights]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(weights, source_weights, strict=True)) < 1e-6
    info = read_run(warm)["init_from"]
    assert (info["model"], info["version"], info["run_id"]) == ("synth", version, "run-a")
    assert info["best_epoch"] == read_run(source)["best_epoch"] and len(info["sha256"]) == 64

    with pytest.raises(FailedPreconditionError, match=f"model synth version {version} has another network"):
        train_run(tmp_path / "wider", manifest, root, epochs=1, init_from=exported,
                  overrides={"hourglass_filters": 12}, **FAST)
    assert not (tmp_path / "wider").exists()
    with pytest.raises(FailedPreconditionError, match="neither a training run nor an exported model"):
        check_init_from(tmp_path / "models" / "synth", split_overrides("tiny", None)[0])


def test_the_service_resolves_init_from_model_to_one_version_when_the_job_is_asked_for(dataset, trained, tmp_path):
    from services.common.errors import InvalidArgumentError, NotFoundError
    from services.common.paths import DataRoot
    from services.training import jobs

    root, _ = dataset
    data = DataRoot(root)
    for _ in range(2):
        export_run(trained[0], data.models, "tiny-shipped")
    asked = {"dataset": "synth", "preset": "tiny", "run_id": "from-model"}
    # The newest version when none is named, written into the job, so a restarted job starts alike;
    # with no preset asked for, the source's network.
    job = jobs.validate_train(data, {"dataset": "synth", "run_id": "from-model", "init_from_model": "tiny-shipped"})
    assert (job["init_from_model"], job["preset"]) == ("tiny-shipped:2", "tiny")
    assert jobs.validate_train(data, {"dataset": "synth", "run_id": "x"})["preset"] == "thesis"
    assert jobs.validate_train(data, {**asked, "init_from_model": "tiny-shipped:1"})["init_from_model"] == "tiny-shipped:1"
    with pytest.raises(NotFoundError, match="has no version 7 \\(it has 1, 2\\)"):
        jobs.validate_train(data, {**asked, "init_from_model": "tiny-shipped:7"})
    with pytest.raises(NotFoundError, match="no exported model 'nothing'"):
        jobs.validate_train(data, {**asked, "init_from_model": "nothing"})
    with pytest.raises(InvalidArgumentError, match="invalid model"):
        jobs.validate_train(data, {**asked, "init_from_model": "../models"})
    with pytest.raises(InvalidArgumentError, match="not both"):
        jobs.validate_train(data, {**asked, "init_from_model": "tiny-shipped", "init_from": "run-a"})


def test_a_fine_tune_that_names_no_preset_builds_the_network_its_weights_fit(dataset, trained, tmp_path):
    """Starting from a widened network (more hourglass filters than its preset's), a job that names
    no preset takes the source's network settings, so `stemlab train --init-from-model guitar` works
    whatever width the shipped network has; one that asks for another width is still refused."""
    from research.widen import widen
    from services.common.errors import FailedPreconditionError
    from services.common.paths import DataRoot
    from services.training import jobs

    root, _ = dataset
    data = DataRoot(root)
    version = export_run(trained[0], data.models, "tiny-narrow")
    filters = make_config("tiny").hourglass_filters * 2
    widen(data.models / "tiny-narrow" / str(version), 1, filters, root, "tiny-wide")
    job = jobs.validate_train(data, {"dataset": "synth", "run_id": "from-wide", "init_from": "tiny-wide"})
    assert job["preset"] == "tiny" and job["overrides"] == {"hourglass_filters": filters}
    narrow = jobs.validate_train(data, {"dataset": "synth", "run_id": "from-narrow", "init_from_model": "tiny-narrow"})
    assert narrow["overrides"] == {}
    with pytest.raises(FailedPreconditionError, match=f"hourglass_filters {filters} there, 12 here"):
        jobs.validate_train(data, {"dataset": "synth", "run_id": "w", "init_from": "tiny-wide",
                                   "overrides": {"hourglass_filters": 12}})
    with pytest.raises(FailedPreconditionError, match=f"hourglass_filters {filters} there"):
        jobs.validate_train(data, {"dataset": "synth", "run_id": "w", "init_from": "tiny-wide", "preset": "tiny"})


def test_plateau_rule_reduces_after_patience_epochs_without_a_better_loss():
    from services.training.trainer import TrainingOptions, _plateau_learning_rate

    off = TrainingOptions()
    assert _plateau_learning_rate(off, 1e-3, epoch=30, best_epoch=1, changed_epoch=0) is None
    on = TrainingOptions(lr_plateau_patience=3, lr_plateau_factor=0.5, min_learning_rate=2e-4)
    assert _plateau_learning_rate(on, 1e-3, epoch=5, best_epoch=3, changed_epoch=0) is None  # 2 epochs: wait
    assert _plateau_learning_rate(on, 1e-3, epoch=6, best_epoch=3, changed_epoch=0) == 5e-4
    # Counted from the last reduction too, so the rate does not fall every epoch of a long plateau.
    assert _plateau_learning_rate(on, 5e-4, epoch=7, best_epoch=3, changed_epoch=6) is None
    assert _plateau_learning_rate(on, 5e-4, epoch=9, best_epoch=3, changed_epoch=6) == 2.5e-4
    assert _plateau_learning_rate(on, 2.5e-4, epoch=12, best_epoch=3, changed_epoch=9) == 2e-4  # floor
    assert _plateau_learning_rate(on, 2e-4, epoch=15, best_epoch=3, changed_epoch=12) is None


def test_plateau_reductions_survive_a_restart(dataset, tmp_path, monkeypatch):
    """The reduced rate lives in the checkpoint: a resumed run goes on from it, not from the config's."""
    from services.training import trainer

    root, manifest = dataset
    monkeypatch.setattr(trainer, "_plateau_learning_rate", lambda options, lr, *a: lr / 2)
    lr = make_config("tiny").learning_rate
    overrides = {"lr_plateau_patience": 1}
    train_run(tmp_path / "run", manifest, root, epochs=2, overrides=overrides, **FAST)
    result = train_run(tmp_path / "run", manifest, root, epochs=3, overrides=overrides, **FAST)
    assert [r["learning_rate"] for r in result["history"]] == pytest.approx([lr, lr / 2, lr / 4])


def test_cancel_checkpoints_and_a_later_call_finishes_the_same_steps(dataset, tmp_path):
    root, manifest = dataset
    steps_done = [0]
    result = train_run(tmp_path / "run", manifest, root, epochs=2,
                       progress=lambda done, total, message, **kw: steps_done.append(done),
                       should_stop=lambda: steps_done[-1] >= 10, **FAST)
    assert result["state"] == "cancelled" and result["global_step"] == 10  # stopped at once, mid-epoch 2
    assert read_run(tmp_path / "run")["state"] == "cancelled"
    resumed = train_run(tmp_path / "run", manifest, root, epochs=2, **FAST)
    assert resumed["state"] == "completed" and resumed["global_step"] == 16 and resumed["epochs_completed"] == 2


def test_two_runs_in_one_process_take_turns_and_both_finish(dataset, tmp_path, monkeypatch):
    """A training service with two workers runs two loops in one process. Concurrent TF train steps
    can collide on per-step temporary variables (AlreadyExistsError), and a checkpoint save beside
    another run's step hung the service, as did a run building its network and datasets beside another
    run's steps, so every TF call takes turns: both runs finish every step, no two turns ever
    overlap, and checkpoints, networks and datasets are made and restored only in a run's turn."""
    import threading

    from services.training import trainer, turns

    inside, order, overlaps = [0], [], []

    class CountingLock:
        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            self.lock.acquire()
            self.owner = threading.current_thread()
            inside[0] += 1
            overlaps.append(inside[0] > 1)
            order.append(threading.current_thread().name)

        def __exit__(self, *exc):
            inside[0] -= 1
            self.owner = None
            self.lock.release()

    lock = CountingLock()
    monkeypatch.setattr(turns, "_TURN", lock)
    outside_turn = []

    def in_turn(real):
        def call(*args, **kwargs):
            outside_turn.append(getattr(lock, "owner", None) is not threading.current_thread())
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(tf.train.CheckpointManager, "save", in_turn(tf.train.CheckpointManager.save))
    monkeypatch.setattr(tf.train.Checkpoint, "restore", in_turn(tf.train.Checkpoint.restore))
    monkeypatch.setattr(trainer, "_save_best_weights", in_turn(trainer._save_best_weights))
    monkeypatch.setattr(trainer, "build_network", in_turn(trainer.build_network))
    monkeypatch.setattr(trainer.data, "validation_dataset", in_turn(trainer.data.validation_dataset))
    monkeypatch.setattr(trainer.data, "training_dataset", in_turn(trainer.data.training_dataset))
    root, manifest = dataset
    results, errors = {}, []
    a_is_stepping = threading.Event()

    def go(name):
        try:
            def progress(done, total, message, **metrics):
                if done >= 2:
                    a_is_stepping.set()
            train_run(tmp_path / name, manifest, root, epochs=2, progress=progress, **FAST)
            results[name] = train_run(tmp_path / name, manifest, root, epochs=3, **FAST)  # restores
        except Exception as e:  # reported below with the run's name
            errors.append(f"{name}: {e!r}")
        finally:
            a_is_stepping.set()

    threads = [threading.Thread(target=go, args=(name,), name=name) for name in ("a", "b")]
    threads[0].start()
    a_is_stepping.wait(timeout=300)  # b builds its run while a steps (how a second job starts)
    threads[1].start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "the runs hung"
    assert not errors, errors
    assert {r["state"] for r in results.values()} == {"completed"} and len(results) == 2
    # Per run: two starts (building the run, and restoring it the second time), and per epoch its
    # training iterator, its steps, and its close (validation, checkpoint, run.yaml and, when it beat
    # the ones before, the best weights): each in a turn of its own.
    def improving(name):
        losses = [h["val_loss"] for h in results[name]["history"]]
        return sum(loss < min(losses[:i], default=np.inf) for i, loss in enumerate(losses))

    assert order.count("a") == order.count("b") == 2 + 3 * (1 + FAST["steps_per_epoch"] + 1)
    assert not any(overlaps) and not any(outside_turn)
    # per run: 3 checkpoint saves, 1 restore, 2 networks built, 2 validation sets, 3 training iterators
    assert len(outside_turn) == 2 * (3 + 1 + 2 + 2 + 3) + improving("a") + improving("b")


def test_a_run_folder_in_training_refuses_a_second_trainer_and_is_free_again_after(dataset, tmp_path):
    from services.training import trainer

    root, manifest = dataset
    run_dir = tmp_path / "held"
    held = trainer._lock_run(run_dir)  # as a trainer holds it for the whole run
    with pytest.raises(FailedPreconditionError, match=f"being trained by another process \\(pid {os.getpid()}\\)"):
        train_run(run_dir, manifest, root, epochs=1, **FAST)
    held.release()
    assert train_run(run_dir, manifest, root, epochs=1, **FAST)["state"] == "completed"


def test_cancel_while_decoding_stops_before_training(dataset, tmp_path):
    root, manifest = dataset
    result = train_run(tmp_path / "run", manifest, root, epochs=2, should_stop=lambda: True, **FAST)
    assert result["state"] == "cancelled" and result["epochs_completed"] == 0
    assert read_run(tmp_path / "run")["state"] == "cancelled" and not (tmp_path / "run" / "checkpoints").exists()


def test_runs_share_one_decoded_cache_on_the_data_root(dataset, tmp_path, monkeypatch):
    """A per-run copy of the decoded audio (4 GB for 800 songs) filled the disk after a few runs:
    the cache is DATA/cache/decoded, and a second run decodes nothing."""
    root, manifest = dataset
    train_run(tmp_path / "first", manifest, root, epochs=1, **FAST)
    cache = data.decoded_cache_dir(root)
    assert len(list(cache.glob("*.npy"))) == 16 and not (tmp_path / "first" / "cache").exists()
    calls = []
    real = data.read_audio
    monkeypatch.setattr(data, "read_audio", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    assert train_run(tmp_path / "second", manifest, root, epochs=1, **FAST)["state"] == "completed"
    assert calls == [] and len(list(cache.glob("*.npy"))) == 16


def test_export_uses_best_weights_and_separates_like_the_training_model(trained, tmp_path):
    run_dir, result, _ = trained
    version = export_run(run_dir, tmp_path / "models", "guitar")
    assert version == 1
    loaded = tf.saved_model.load(str(tmp_path / "models" / "guitar" / "1"))
    network, config = load_best_network(run_dir)
    mix = (np.random.default_rng(2).standard_normal((2, 20_000)) * 0.2).astype(np.float32)
    served = loaded.signatures["serving_default"](waveform=tf.constant(mix))
    instrument, rest = separate_waveform(network, mix, config)
    # Tolerance 1e-5 absolute on audio of peak ~0.8: same weights and graph, float32 ordering only.
    np.testing.assert_allclose(served["instrument"].numpy(), instrument.numpy(), atol=1e-5)
    np.testing.assert_allclose(served["rest"].numpy(), rest.numpy(), atol=1e-5)
    info = json.loads((tmp_path / "models" / "guitar" / "1" / "assets.extra" / "stemlab.json").read_text())
    assert info["source_run"] == "run-a" and info["best_epoch"] == result["best_epoch"] and info["instrument"] == "guitar"
    with pytest.raises(InvalidArgumentError):
        export_run(run_dir, tmp_path / "models", "../escape")


def test_export_can_soften_the_mask_but_not_change_the_network(trained, tmp_path):
    run_dir, _, _ = trained
    network, config = load_best_network(run_dir)
    mix = (np.random.default_rng(4).standard_normal((1, 20_000)) * 0.2).astype(np.float32)
    plain = separate_waveform(network, mix, config)[0].numpy()
    assert export_run(run_dir, tmp_path / "models", "guitar", {"mask_exponent": 0.5}) == 1
    info = json.loads((tmp_path / "models" / "guitar" / "1" / "assets.extra" / "stemlab.json").read_text())
    assert info["config"]["mask_exponent"] == 0.5 and info["config"]["hourglass_filters"] == config.hourglass_filters
    served = tf.saved_model.load(str(tmp_path / "models" / "guitar" / "1")).signatures["serving_default"](
        waveform=tf.constant(mix))["instrument"].numpy()
    # The square root of a mask in [0, 1] keeps at least as much of every bin: a louder instrument.
    assert np.sum(served**2) > 1.05 * np.sum(plain**2)
    softened = separate_waveform(network, mix, config.model_copy(update={"mask_exponent": 0.5}))[0].numpy()
    np.testing.assert_allclose(served, softened, atol=1e-5)
    for bad in ({"hourglass_filters": 16}, {"mask_exponent": 0}):
        with pytest.raises(InvalidArgumentError):
            export_run(run_dir, tmp_path / "models", "guitar", bad)
    assert sorted(p.name for p in (tmp_path / "models" / "guitar").iterdir()) == ["1"]  # nothing half-written


def test_export_with_more_runs_serves_the_mean_of_their_masks_and_fine_tunes_from_the_first(dataset, trained,
                                                                                             tmp_path):
    """An ensemble export: runs trained apart, one SavedModel, the mean of their (exponent-shaped) masks."""
    import dataclasses
    import shutil

    from services.common.errors import NotFoundError
    from services.common.manifest import load_manifest, publish_manifest
    from services.common.paths import DataRoot
    from services.evaluation.sources import SavedModelSource
    from services.training import jobs

    root, manifest = dataset
    run_a, _, _ = trained
    run_b = tmp_path / "run-b"
    train_run(run_b, manifest, root, epochs=1, **{**FAST, "seed": 11})
    models = tmp_path / "models"
    assert export_run(run_a, models, "ens", {"mask_exponent": 1.5}, with_runs=[run_b]) == 1
    exported = models / "ens" / "1"
    info = json.loads((exported / "assets.extra" / "stemlab.json").read_text())
    assert [m["source_run"] for m in info["members"]] == ["run-a", "run-b"]
    assert info["source_run"] == "run-a" and info["config"]["mask_exponent"] == 1.5

    (net_a, config), (net_b, _) = load_best_network(run_a), load_best_network(run_b)
    config = config.model_copy(update={"mask_exponent": 1.5})
    mix = (np.random.default_rng(5).standard_normal((2, 20_000)) * 0.2).astype(np.float32)
    served = tf.saved_model.load(str(exported)).signatures["serving_default"](waveform=tf.constant(mix))
    alone = [separate_waveform(net, mix, config)[0].numpy() for net in (net_a, net_b)]
    np.testing.assert_allclose(served["instrument"].numpy(), (alone[0] + alone[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(served["instrument"].numpy() + served["rest"].numpy(), mix, atol=1e-6)
    assert np.max(np.abs(alone[0] - alone[1])) > 1e-3  # two different networks, so the mean is news
    # Evaluation can apply the ensemble's weights with other settings, as its members' runs could be.
    plain, _ = SavedModelSource(exported, {"mask_exponent": 1.0}).separate(mix[0], config.rate_hz, "t")
    alone = [separate_waveform(net, mix[:1], config.model_copy(update={"mask_exponent": 1.0}))[0].numpy()[0]
             for net in (net_a, net_b)]
    np.testing.assert_allclose(plain, (alone[0] + alone[1]) / 2, atol=1e-5)

    # Fine-tuning the ensemble (e.g. a shipped one) starts from its first member's weights.
    warm = tmp_path / "warm"
    train_run(warm, manifest, root, epochs=1, overrides={"learning_rate": 1e-12}, init_from=exported,
              **{**FAST, "seed": 11})
    weights = [w.numpy() for w in load_best_network(warm)[0].trainable_weights]
    first = [w.numpy() for w in net_a.trainable_weights]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(weights, first, strict=True)) < 1e-6
    assert read_run(warm)["init_from"]["run_id"] == "run-a"

    # The service checks the members when the export is asked for: each once, existing, alike.
    data = DataRoot(root)
    shutil.copytree(run_a, data.runs / "ens-a")
    shutil.copytree(run_b, data.runs / "ens-b")
    other = yaml.safe_load((run_b / "run.yaml").read_text())
    other["config"]["hop_length"] //= 2
    shutil.copytree(run_b, data.runs / "ens-c")
    (data.runs / "ens-c" / "run.yaml").write_text(yaml.safe_dump(other))
    asked = {"run_id": "ens-a", "model_name": "ens"}
    assert jobs.validate_export(data, {**asked, "with_runs": ["ens-b"]})["with_runs"] == ["ens-b"]
    with pytest.raises(InvalidArgumentError, match="each run once"):
        jobs.validate_export(data, {**asked, "with_runs": ["ens-b", "ens-a"]})
    with pytest.raises(NotFoundError):
        jobs.validate_export(data, {**asked, "with_runs": ["no-such-run"]})
    with pytest.raises(FailedPreconditionError, match="member 2 has another spectrogram or chunk than the first: hop"):
        jobs.validate_export(data, {**asked, "with_runs": ["ens-c"]})
    with pytest.raises(FailedPreconditionError, match="hop_length"):
        export_run(data.runs / "ens-a", models, "ens", with_runs=[data.runs / "ens-c"])
    # A run that learnt another instrument is refused when asked, not in the queued job.
    piano = dataclasses.replace(load_manifest(manifest), name="pianoset", instrument="piano")
    piano_path, _ = publish_manifest(data, piano)
    other = yaml.safe_load((run_b / "run.yaml").read_text())
    other["manifest"]["path"] = str(piano_path)
    shutil.copytree(run_b, data.runs / "ens-d")
    (data.runs / "ens-d" / "run.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(InvalidArgumentError, match=r"one instrument; these runs learnt \['guitar', 'piano'\]"):
        jobs.validate_export(data, {**asked, "with_runs": ["ens-d"]})
    with pytest.raises(InvalidArgumentError, match="one instrument"):
        export_run(data.runs / "ens-a", models, "ens", with_runs=[data.runs / "ens-d"])
    assert sorted(p.name for p in (models / "ens").iterdir()) == ["1"]  # nothing half-written


def test_one_member_of_an_exported_ensemble_starts_a_run_or_joins_another_ensemble(dataset, trained, tmp_path):
    """A shipped ensemble's second network can be fine-tuned on its own (NAME:VERSION#MEMBER), and an
    exported network can join a run trained since in a new ensemble (export --with-model)."""
    from services.common.errors import NotFoundError
    from services.common.paths import DataRoot
    from services.training import jobs

    root, manifest = dataset
    data = DataRoot(root)
    run_a, _, _ = trained
    run_b = tmp_path / "run-b"
    train_run(run_b, manifest, root, epochs=1, **{**FAST, "seed": 12})
    assert export_run(run_a, data.models, "pair", {"mask_exponent": 1.5}, with_runs=[run_b]) == 1
    exported = data.models / "pair" / "1"
    (net_a, config), (net_b, _) = load_best_network(run_a), load_best_network(run_b)

    def largest_difference(x, y):
        return max(float(np.max(np.abs(a.numpy() - b.numpy())))
                   for a, b in zip(x.trainable_weights, y.trainable_weights, strict=True))

    # Member 2 starts a run: its weights, its run and epoch recorded; the job names the version.
    job = jobs.validate_train(data, {"dataset": "synth", "run_id": "from-b", "init_from_model": "pair#2"})
    assert (job["init_from_model"], job["preset"]) == ("pair:1#2", "tiny")
    warm = tmp_path / "warm"
    train_run(warm, manifest, root, epochs=1, overrides={"learning_rate": 1e-12}, init_from=exported, init_member=2,
              **{**FAST, "seed": 13})
    assert largest_difference(load_best_network(warm)[0], net_b) < 1e-6
    assert largest_difference(load_best_network(warm)[0], net_a) > 1e-3
    source = read_run(warm)["init_from"]
    assert (source["member"], source["run_id"], source["best_epoch"]) == (2, "run-b", read_run(run_b)["best_epoch"])
    with pytest.raises(FailedPreconditionError, match="has 2 network\\(s\\), no member 3"):
        jobs.validate_train(data, {"dataset": "synth", "run_id": "x", "init_from_model": "pair:1#3"})
    with pytest.raises(InvalidArgumentError, match="members counted from 1"):
        jobs.validate_train(data, {"dataset": "synth", "run_id": "x", "init_from_model": "pair#0"})
    with pytest.raises(FailedPreconditionError, match="members belong to exported models"):
        train_run(tmp_path / "bad", manifest, root, epochs=1, init_from=run_a, init_member=1, **FAST)
    assert not (tmp_path / "bad").exists()

    # Run b with the export's first network (run a's): the mean of their masks, each named.
    asked = {"run_id": "b", "model_name": "pair"}
    shutil.copytree(run_b, data.runs / "b")
    job = jobs.validate_export(data, {**asked, "with_models": ["pair#1"]})
    assert job["with_models"] == ["pair:1#1"]
    assert export_run(data.runs / "b", data.models, "pair", {"mask_exponent": 1.5},
                      with_models=[(exported, 1)]) == 2
    info = json.loads((data.models / "pair" / "2" / "assets.extra" / "stemlab.json").read_text())
    assert [m["source_run"] for m in info["members"]] == ["run-b", "run-a"]
    assert info["members"][1]["from_model"] == {"model": "pair", "version": 1, "member": 1}
    config = config.model_copy(update={"mask_exponent": 1.5})
    mix = (np.random.default_rng(6).standard_normal((1, 20_000)) * 0.2).astype(np.float32)
    served = tf.saved_model.load(str(data.models / "pair" / "2")).signatures["serving_default"](waveform=tf.constant(mix))
    alone = [separate_waveform(net, mix, config)[0].numpy() for net in (net_b, net_a)]
    np.testing.assert_allclose(served["instrument"].numpy(), (alone[0] + alone[1]) / 2, atol=1e-5)
    # A whole export joins with all its networks; a network named twice, or a missing model, is refused.
    assert export_run(data.runs / "b", data.models, "trio", with_models=[(exported, None)]) == 1
    trio = json.loads((data.models / "trio" / "1" / "assets.extra" / "stemlab.json").read_text())
    assert [m["source_run"] for m in trio["members"]] == ["run-b", "run-a", "run-b"]
    with pytest.raises(InvalidArgumentError, match="each network once"):
        jobs.validate_export(data, {**asked, "with_models": ["pair:1#1", "pair:1"]})
    with pytest.raises(NotFoundError, match="no exported model 'nothing'"):
        jobs.validate_export(data, {**asked, "with_models": ["nothing"]})
    with pytest.raises(FailedPreconditionError, match="no member 5"):
        jobs.validate_export(data, {**asked, "with_models": ["pair:1#5"]})


def test_an_exported_model_alone_is_exported_again_with_the_same_separation(dataset, trained, tmp_path):
    """export with no run: an export's networks in the current form, applied as that export applied them."""
    from model.export import _Separator
    from services.common.paths import DataRoot
    from services.training import jobs

    root, _ = dataset
    data = DataRoot(root)
    run_a, _, _ = trained
    network, config = load_best_network(run_a)
    config = config.model_copy(update={"mask_exponent": 1.5})
    old = data.models / "older" / "1"  # as exports were before the folded serving copies
    module = _Separator(network, config)
    tf.saved_model.save(module, str(old), signatures={"serving_default": module.separate.get_concrete_function()})
    (old / "assets.extra").mkdir()
    (old / "assets.extra" / "stemlab.json").write_text(json.dumps(
        {"config": config_to_dict(config), "source_run": "run-a", "instrument": "guitar"}))

    job = jobs.validate_export(data, {"run_id": "", "model_name": "older", "with_models": ["older"]})
    assert job["with_models"] == ["older:1"]
    assert export_run(None, data.models, "older", with_models=[(old, None)]) == 2
    again = data.models / "older" / "2"
    info = json.loads((again / "assets.extra" / "stemlab.json").read_text())
    assert info["config"]["mask_exponent"] == 1.5  # the model's own exponent, not a default
    assert info["source_run"] == "run-a" and info["from_model"] == {"model": "older", "version": 1, "member": 1}
    mix = (np.random.default_rng(8).standard_normal((2, 20_000)) * 0.2).astype(np.float32)
    before, after = (tf.saved_model.load(str(v)).signatures["serving_default"](waveform=tf.constant(mix))["instrument"]
                     for v in (old, again))
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-5)
    assert any(k.startswith("folded/") for k, _ in tf.train.list_variables(str(again / "variables" / "variables")))
    assert export_run(None, data.models, "older", {"mask_exponent": 1.0}, with_models=[(old, None)]) == 3
    assert json.loads((data.models / "older" / "3" / "assets.extra" / "stemlab.json").read_text())[
        "config"]["mask_exponent"] == 1.0
    with pytest.raises(InvalidArgumentError, match="nothing to export"):
        jobs.validate_export(data, {"run_id": "", "model_name": "older", "with_models": []})
    with pytest.raises(InvalidArgumentError, match="nothing to export"):
        export_run(None, data.models, "older")


def test_a_run_interrupted_again_and_again_is_not_resumed_at_every_start(tmp_path):
    # A run that takes the service down (out of memory) was resumed at every start, forever.
    from services.common.jobs import FAILED, JobStore
    from services.common.paths import DataRoot
    from services.training.jobs import RESUME, TRAIN, resumable_runs

    data = DataRoot(tmp_path).ensure()
    store = JobStore(tmp_path / "jobs.sqlite", service="training")
    for run_id, interruptions in (("twice", 2), ("thrice", 3)):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "run.yaml").write_text("state: running\n")
        for n in range(interruptions):
            job_id = f"training-{run_id[:5]}{n:07d}"
            store.create(job_id, TRAIN if n == 0 else RESUME, {"run_id": run_id})
            store.update(job_id, state=FAILED, error="interrupted")
    assert resumable_runs(store, data, max_attempts=3) == ["twice"]
    assert resumable_runs(store, data, max_attempts=4) == ["thrice", "twice"]
    store.close()


def test_a_run_that_diverges_fails_and_keeps_its_last_good_epoch(tmp_path):
    from model.checkpoint import read_run
    from model.config import ConfigError
    from services.training.trainer import TrainingDiverged

    root = tmp_path / "data"
    manifest = make_dataset(root)
    with pytest.raises(ConfigError, match="finite"):
        make_config("tiny", {"learning_rate": float("inf")})
    run_dir = tmp_path / "wild"
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1") as e:
        train_run(run_dir, manifest, root, epochs=2, overrides={"learning_rate": 1e30}, **FAST)
    assert "stemlab resume wild --set learning_rate=" in str(e.value)
    record = read_run(run_dir)
    assert record.get("epochs_completed", 0) == 0 and not (run_dir / "best.weights.h5").exists()


def test_a_run_being_trained_is_not_resumed_beside_itself(tmp_path):
    from services.common.errors import FailedPreconditionError
    from services.common.jobs import RUNNING, JobStore
    from services.training.jobs import TRAIN, require_idle_run

    store = JobStore(tmp_path / "jobs.sqlite", service="training")
    store.create("training-000000000001", TRAIN, {"run_id": "busy"})
    store.update("training-000000000001", state=RUNNING)
    with pytest.raises(FailedPreconditionError, match="run busy is being trained by training-000000000001"):
        require_idle_run(store, "busy")
    require_idle_run(store, "other")
    store.close()

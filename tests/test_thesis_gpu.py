"""research/thesis_gpu: the features in keras.ops, the packing of songs, and the import of JAX-trained weights.

The trainer itself needs JAX (a GPU machine); what it computes is held here to the training
service's own TensorFlow code, and its output format to what evaluation and export read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import yaml

from model.checkpoint import load_best_network
from model.config import config_to_dict, make_config
from model.loss import masked_l1_per_chunk
from model.network import build_network
from research.thesis_gpu import features
from research.thesis_gpu.import_run import ImportFailed, import_run
from research.thesis_gpu.pack import pack
from research.thesis_gpu.train_jax import load_tracks, parse_sets, write_parts
from services.common.audio import write_audio
from services.common.manifest import Manifest, Pair, publish_manifest
from services.common.paths import DataRoot
from services.training.data import chunk_features
from services.training.trainer import read_history

RATE = 22050


@pytest.mark.parametrize("phase_sensitive", [False, True])
def test_keras_ops_features_and_loss_equal_the_training_services(phase_sensitive):
    config = make_config("tiny")
    rng = np.random.default_rng(3)
    instrument = rng.standard_normal((3, config.segment_samples)).astype(np.float32) * 0.2
    rest = rng.standard_normal((3, config.segment_samples)).astype(np.float32) * 0.3
    rest[2] = -instrument[2]  # a silent mix: the phase-sensitive target must be 0 there, not NaN
    mix_rows, target_rows = chunk_features(tf.constant(instrument), tf.constant(rest), config, phase_sensitive)
    ours_mix, ours_target = features.chunk_features(tf.constant(instrument), tf.constant(rest), config, phase_sensitive)
    np.testing.assert_allclose(np.asarray(ours_mix), mix_rows.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_target), target_rows.numpy(), rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(ours_target)))
    mask = tf.constant(rng.uniform(size=mix_rows.shape).astype(np.float32))
    for peak_power, error_power in ((0.0, 1.0), (1.0, 2.0), (0.0, 2.0)):
        expected = masked_l1_per_chunk(mix_rows, target_rows, mask, config.normalise_eps, peak_power, error_power)
        got = features.loss_per_chunk(mix_rows, target_rows, mask, config.normalise_eps, peak_power, error_power)
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-5)


def _song(seed: int, seconds: float = 2.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return {"guitar": (0.3 * np.sin(2 * np.pi * (196 + 20 * seed) * t)).astype(np.float32),
            "piano": (0.2 * np.sin(2 * np.pi * (440 + 30 * seed) * t) * np.exp(-t)).astype(np.float32),
            "other": (0.05 * rng.standard_normal(len(t))).astype(np.float32)}


def _publish(data: DataRoot, name: str, songs: dict[str, tuple[str, dict]], broken: str | None = None) -> None:
    """Dataset `name` (guitar or piano): its instrument against the song's two other sources."""
    pairs = []
    for track, (split, sources) in songs.items():
        rest = sum(v for k, v in sources.items() if k != name)
        if track == broken:  # this dataset's rest is of other stems than the other dataset's
            rest = rest + 0.1
        folder = data.mixes / name / str(RATE) / track
        folder.mkdir(parents=True, exist_ok=True)
        write_audio(folder / "instrument.wav", sources[name][np.newaxis], RATE)
        write_audio(folder / "rest.wav", rest[np.newaxis], RATE)
        pairs.append(Pair(track=track, source="synthetic", split=split, instrument=data.relative(folder / "instrument.wav"),
                          rest=data.relative(folder / "rest.wav"), seconds=len(rest) / RATE))
    publish_manifest(data, Manifest(name=name, version=0, instrument=name, rate=RATE, channels=1, created="",
                                    code_version="test", params={}, sources={"synthetic": 1.0}, pairs=pairs))


def test_the_equaliser_on_the_device_filters_as_the_samplers_and_draws_the_same_chunks():
    """A GPU trainer draws chunks unequalised and filters them in keras.ops: the same chunks as the
    training service's sampler (same seed, same random numbers), the same filter to float32 precision."""
    from services.training.sampling import Augmentation, ChunkSampler, TrackAudio

    config = make_config("tiny")
    rng = np.random.default_rng(4)
    tracks = [TrackAudio(f"t{i}", "s", rng.standard_normal(3 * config.segment_samples).astype(np.float32) * 0.2,
                         rng.standard_normal(3 * config.segment_samples).astype(np.float32) * 0.2) for i in range(5)]
    sampler = ChunkSampler(tracks, {}, config.segment_samples, config.rate_hz, Augmentation(6.0, 0.25, 9.0))
    instrument, rest = sampler.draw(np.random.default_rng(7), 24)
    raw_instrument, raw_rest, eq = sampler.draw_unequalised(np.random.default_rng(7), 24)
    assert eq.shape == (24, 2, 9) and np.all(eq[:, :, 0] != 0)  # every source got a curve
    assert 0 < np.mean(eq[:, :, 8] > 0) < 1  # and some, not all, a low-pass
    for numpy_side, raw, source in ((instrument, raw_instrument, 0), (rest, raw_rest, 1)):
        device = np.asarray(features.equalise(raw, eq[:, source], config, 9.0))
        scale = np.max(np.abs(numpy_side))
        np.testing.assert_allclose(device, numpy_side, atol=2e-5 * scale)
        assert np.max(np.abs(raw - numpy_side)) > 0.05 * scale  # the filter did change them
    # Off, nothing is drawn for it and the chunks are as before.
    plain = ChunkSampler(tracks, {}, config.segment_samples, config.rate_hz, Augmentation(6.0, 0.25, 0.0))
    a, b, eq = plain.draw_unequalised(np.random.default_rng(7), 4)
    np.testing.assert_array_equal(a, plain.draw(np.random.default_rng(7), 4)[0])
    assert not eq.any()


def test_packed_songs_rebuild_both_instruments_pairs(tmp_path):
    data = DataRoot(tmp_path / "data").ensure()
    songs = {f"Song{i}": ("validation" if i == 4 else "train", _song(i)) for i in range(5)}
    _publish(data, "guitar", songs, broken="Song2")
    _publish(data, "piano", songs)
    out = tmp_path / "packed"
    with pytest.raises(SystemExit, match="only 3 train songs"):
        pack(data.root, out, train_songs=4, validation_songs=1, quality=0.5, seed=1)
    index = pack(data.root, out, train_songs=3, validation_songs=1, quality=0.5, seed=1)
    assert sorted(index["songs"]["train"]) == ["Song0", "Song1", "Song3"]  # Song2's mixes disagree
    assert index["songs"]["validation"] == ["Song4"]
    assert json.loads((out / "index.json").read_text()) == index
    # The codec's cost is measured on what was written: finite, and worse at a lower quality.
    assert set(index["codec_snr_db"]) == {"guitar", "piano", "other"} and all(v > 3 for v in index["codec_snr_db"].values())
    low = pack(data.root, tmp_path / "low", train_songs=3, validation_songs=1, quality=0.0, seed=1)
    assert all(low["codec_snr_db"][k] < index["codec_snr_db"][k] for k in index["codec_snr_db"])
    for instrument in ("guitar", "piano"):
        tracks = {t.track: t for t in load_tracks(out, "train", instrument)}
        assert sorted(tracks) == ["Song0", "Song1", "Song3"]
        for name, track in tracks.items():
            sources = songs[name][1]
            rest = sum(v for k, v in sources.items() if k != instrument)
            n = len(rest)
            # Vorbis is lossy (worst on white noise, as here): the pair comes back within 10 dB of
            # its noise; a wrong source or sum would be off by the whole signal.
            for got, want in ((track.instrument[:n], sources[instrument]), (track.rest[:n], rest)):
                assert np.sum((got - want) ** 2) < 0.1 * np.sum(want**2)
    with pytest.raises(SystemExit, match="--instrument"):
        load_tracks(out, "train", "other")


def test_shards_of_one_order_never_overlap_and_train_jax_joins_them(tmp_path):
    from research.thesis_gpu.train_jax import load_all_tracks, read_indexes

    data = DataRoot(tmp_path / "data").ensure()
    songs = {f"Song{i}": ("validation" if i == 6 else "train", _song(i, 1.0)) for i in range(7)}
    _publish(data, "guitar", songs, broken="Song2")
    _publish(data, "piano", songs)
    whole = pack(data.root, tmp_path / "whole", train_songs=5, validation_songs=1, quality=0.3, seed=2)
    first = pack(data.root, tmp_path / "s0", train_songs=2, validation_songs=1, quality=0.3, seed=2)
    second = pack(data.root, tmp_path / "s1", train_songs=3, validation_songs=1, quality=0.3, seed=2,
                  skip_train_songs=2)
    assert first["songs"]["train"] + second["songs"]["train"] == whole["songs"]["train"]
    assert not set(first["songs"]["train"]) & set(second["songs"]["train"])
    assert sorted((tmp_path / "s1" / "train").iterdir()) == sorted(
        tmp_path / "s1" / "train" / f"{t}.ogg" for t in second["songs"]["train"])  # nothing of shard 0 written
    with pytest.raises(SystemExit, match="only 3 train songs are in both sets after the 2 passed over"):
        pack(data.root, tmp_path / "s2", train_songs=4, validation_songs=1, quality=0.3, seed=2, skip_train_songs=2)
    joined = read_indexes([tmp_path / "s0", tmp_path / "s1"])
    assert joined["songs"] == {"train": whole["songs"]["train"], "validation": ["Song6"]}
    assert [t.track for t in load_all_tracks([tmp_path / "s0", tmp_path / "s1"], "validation", "piano")] == ["Song6"]
    assert len(load_all_tracks([tmp_path / "s0", tmp_path / "s1"], "train", "guitar")) == 5
    other = json.loads((tmp_path / "s1" / "index.json").read_text())
    other["datasets"]["guitar"]["checksum"] = "another"
    (tmp_path / "s1" / "index.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="packed from another datasets"):
        read_indexes([tmp_path / "s0", tmp_path / "s1"])


def test_songs_of_one_set_only_are_packed_for_that_instrument_alone(tmp_path):
    data = DataRoot(tmp_path / "data").ensure()
    songs = {f"Song{i}": ("validation" if i == 5 else "train", _song(i, 1.0)) for i in range(6)}
    _publish(data, "guitar", {k: v for k, v in songs.items() if k != "Song1"})  # Song1 has no guitar
    _publish(data, "piano", {k: v for k, v in songs.items() if k != "Song3"})  # Song3 no piano
    both = pack(data.root, tmp_path / "both", train_songs=3, validation_songs=1, quality=0.5, seed=1)
    assert sorted(both["songs"]["train"]) == ["Song0", "Song2", "Song4"]
    index = pack(data.root, tmp_path / "all", train_songs=5, validation_songs=1, quality=0.5, seed=1,
                 single_instrument_songs=True)
    assert sorted(index["songs"]["train"]) == ["Song0", "Song1", "Song2", "Song3", "Song4"]
    assert sorted(index["sets"]["guitar"]["train"]) == ["Song0", "Song2", "Song3", "Song4"]
    assert sorted(index["sets"]["piano"]["train"]) == ["Song0", "Song1", "Song2", "Song4"]
    for instrument, only in (("guitar", "Song3"), ("piano", "Song1")):
        tracks = {t.track: t for t in load_tracks(tmp_path / "all", "train", instrument)}
        assert sorted(tracks) == sorted(index["sets"][instrument]["train"])
        sources = songs[only][1]
        rest = sum(v for k, v in sources.items() if k != instrument)  # its own set's pair, exactly
        n = len(rest)
        for got, want in ((tracks[only].instrument[:n], sources[instrument]), (tracks[only].rest[:n], rest)):
            assert np.sum((got - want) ** 2) < 0.1 * np.sum(want**2)


def test_one_network_of_an_export_becomes_start_weights_for_a_gpu_run(tmp_path):
    """member_weights writes an ensemble member's weights; train_jax --init-weights loads them, and
    refuses those of another network or spectrogram before training."""
    from model.export import export_saved_model
    from research.thesis_gpu.member_weights import write_member
    from research.thesis_gpu.train_jax import load_init_weights

    config = make_config("tiny")
    members = [build_network(config) for _ in range(2)]
    for i, network in enumerate(members):  # two different networks
        network.set_weights([np.full_like(w, 0.01 * (i + 1) * (j + 1)) for j, w in enumerate(network.get_weights())])
    record = {"preset": "tiny", "config": config_to_dict(config)}
    version = export_saved_model(members, config, tmp_path / "models" / "pair", {**record, "members": [record, record]})
    exported = tmp_path / "models" / "pair" / str(version)
    out = tmp_path / "init" / "guitar.weights.h5"
    assert write_member(exported, 2, out)["member"] == 2
    fresh = build_network(config)
    load_init_weights(fresh, config, out)
    for got, want in zip(fresh.get_weights(), members[1].get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(SystemExit, match="no member 3"):
        write_member(exported, 3, tmp_path / "init" / "three.weights.h5")
    assert not (tmp_path / "init" / "three.weights.h5").exists()
    other = make_config("tiny", {"hop_length": config.hop_length // 2})
    with pytest.raises(SystemExit, match="another network or spectrogram: hop_length"):
        load_init_weights(build_network(other), other, out)


def test_parse_sets_reads_values_as_the_services_do():
    assert parse_sets(["input_log_scale=1000", "dropout=0.1", "front_filters=[8, 16]", "x = true"]) == {
        "input_log_scale": 1000, "dropout": 0.1, "front_filters": [8, 16], "x": True}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_sets(["dropout"])


def _trained_output(folder, config, network, val_loss=0.5):
    """What train_jax writes: the weights in parts and <instrument>.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "whole.weights.h5"
    network.save_weights(str(weights))
    parts = write_parts(weights, folder, "guitar.weights.h5")
    weights.unlink()
    history = [{"epoch": 1, "loss": 0.9, "val_loss": 0.7, "seconds": 45.0, "steps_per_second": 7.9,
                "learning_rate": 1e-4, "step": 300},
               {"epoch": 2, "loss": 0.6, "val_loss": val_loss, "seconds": 45.0, "steps_per_second": 7.9,
                "learning_rate": 5e-5, "step": 600}]
    summary = {"instrument": "guitar", "preset": "tiny", "overrides": {}, "config": config_to_dict(config),
               "options": {"loss_error_power": 2.0}, "batch_size": 16, "seed": 1, "best_epoch": 2,
               "best_val_loss": val_loss, "history": history, "steps": 600, "chunks": 9600,
               "training_seconds": 90.0, "wall_seconds": 120.0, "finished": True, "parts": parts,
               "device": "cuda:0", "jax": "0.0", "keras": "3", "train_songs": ["Song0"],
               "data_index": {"quality": 0.5, "seed": 1, "songs": {"train": ["Song0"], "validation": ["Song4"]},
                              "datasets": {"guitar": {"name": "guitar", "version": 9, "checksum": "abc"}}}}
    (folder / "guitar.json").write_text(json.dumps(summary))
    return summary


def test_imported_weights_become_a_run_that_evaluation_and_export_read(tmp_path, monkeypatch):
    monkeypatch.setattr("research.thesis_gpu.train_jax.PART_BYTES", 20_000)  # several parts, joined in order
    config = make_config("tiny")
    network = build_network(config)
    network(np.random.default_rng(0).uniform(size=(2, config.freq_rows, 16, 1)).astype(np.float32), training=True)
    summary = _trained_output(tmp_path / "out", config, network)
    assert len(summary["parts"]) > 2
    data = tmp_path / "data"
    run_dir = import_run(tmp_path / "out", "guitar", data, "thesis-gpu")
    loaded, loaded_config = load_best_network(run_dir)
    assert loaded_config == config
    x = np.random.default_rng(1).uniform(size=(1, config.freq_rows, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), network(x, training=False).numpy())
    info = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert info["state"] == "completed" and info["best_epoch"] == 2 and info["preset"] == "tiny"
    assert info["trained_by"]["tool"] == "research/thesis_gpu/train_jax.py" and info["trained_by"]["chunks"] == 9600
    assert info["manifest"] == {"name": "guitar", "version": 9, "checksum": "abc"}  # not on this root: no path
    assert [row["val_loss"] for row in read_history(run_dir)] == [0.7, 0.5]
    with pytest.raises(ImportFailed, match="exists"):
        import_run(tmp_path / "out", "guitar", data, "thesis-gpu")


def test_weights_that_do_not_fit_their_config_or_are_incomplete_are_refused(tmp_path):
    config = make_config("tiny")
    other = build_network(make_config("tiny", {"hourglass_filters": 4}))
    _trained_output(tmp_path / "out", config, other)
    data = tmp_path / "data"
    with pytest.raises(ImportFailed, match="do not load"):
        import_run(tmp_path / "out", "guitar", data, "mismatch")
    assert not (data / "runs" / "mismatch").exists()
    _trained_output(tmp_path / "cut", config, build_network(config))
    (tmp_path / "cut" / "guitar.weights.h5.part0").rename(tmp_path / "cut" / "guitar.weights.h5.part7")
    with pytest.raises(ImportFailed, match=r"missing weight parts \['guitar.weights.h5.part0'\]"):
        import_run(tmp_path / "cut", "guitar", data, "cut")
    (tmp_path / "cut" / "guitar.weights.h5.part7").rename(tmp_path / "cut" / "guitar.weights.h5.part0")
    (tmp_path / "cut" / "guitar.weights.h5.part0").write_bytes(b"")
    with pytest.raises(ImportFailed, match="do not load"):
        import_run(tmp_path / "cut", "guitar", data, "cut")
    (tmp_path / "cut" / "guitar.json").write_text('{"preset": "tiny"')
    with pytest.raises(ImportFailed, match="not a train_jax summary"):
        import_run(tmp_path / "cut", "guitar", data, "cut")
    (tmp_path / "cut" / "guitar.json").write_text('{"preset": "tiny"}')
    with pytest.raises(ImportFailed, match="lacks"):
        import_run(tmp_path / "cut", "guitar", data, "cut")
    assert not (data / "runs" / "cut").exists()

"""Training input: decoded pairs cached once, and the chunks of services/training/sampling as tf.data.

Audio is decoded once per run (mono, at the model rate) into .npy files under the run folder and
memory-mapped afterwards, never decoded again per epoch. The drawing of chunks (random tracks,
gains, remixes, equalisers; fixed validation segments) lives in `sampling`, free of TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from model.config import ModelConfig
from model.spectral import magnitude, stft, to_network_rows
from services.common.audio import read_audio
from services.common.manifest import Manifest
from services.common.paths import atomic_path
from services.training.sampling import ChunkSampler, DataError, TrackAudio, training_segments


class LoadingStopped(Exception):
    """`should_stop` turned true while the dataset was being decoded."""


def _cache_key(path: Path, rate_hz: int) -> str:
    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{rate_hz}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def decoded_cache_dir(data_root: str | os.PathLike) -> Path:
    """DATA/cache/decoded: shared by every run and worker on the data root; safe to delete any time.

    Workers write entries to a temporary name and rename them into place, so two of them decoding
    the same file at once both end with the same complete entry.
    """
    return Path(data_root) / "cache" / "decoded"


def decode_cached(path: Path, rate_hz: int, cache_dir: Path) -> np.ndarray:
    """Mono float32 (samples,) at `rate_hz`, decoded at most once into `cache_dir` and memory-mapped.

    The key is the file's resolved path, size, modification time and the rate, so a re-mixed file
    is decoded again and an unchanged one is shared by every dataset version that lists it.
    """
    cached = cache_dir / f"{_cache_key(path, rate_hz)}.npy"
    if not cached.is_file():
        audio, _ = read_audio(path, rate=rate_hz, mono=True)
        with atomic_path(cached) as tmp:
            np.save(tmp, np.ascontiguousarray(audio[0], dtype=np.float32))
    return np.load(cached, mmap_mode="r")


def load_tracks(
    manifest: Manifest, data_root: str | os.PathLike, config: ModelConfig, cache_dir: str | os.PathLike,
    progress: Callable[..., None] | None = None, should_stop: Callable[[], bool] | None = None,
) -> dict[str, list[TrackAudio]]:
    """Decoded pairs by split ("train", "validation"), in manifest order.

    `progress(done_pairs, total_pairs, message)`; `should_stop()` true raises LoadingStopped
    between pairs (what was decoded stays cached).
    """
    if manifest.rate != config.rate_hz:
        raise DataError(f"dataset {manifest.name} is at {manifest.rate} Hz but the model runs at "
                        f"{config.rate_hz} Hz; build the dataset at the model's rate")
    if not manifest.pairs:
        raise DataError(f"dataset {manifest.name} v{manifest.version} has no pairs")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tracks: dict[str, list[TrackAudio]] = {"train": [], "validation": []}
    for i, pair in enumerate(manifest.pairs):
        if should_stop and should_stop():
            raise LoadingStopped(f"stopped after decoding {i} of {len(manifest.pairs)} pairs")
        instrument = decode_cached(Manifest.path_of(pair.instrument, data_root), config.rate_hz, cache)
        rest = decode_cached(Manifest.path_of(pair.rest, data_root), config.rate_hz, cache)
        # Resampling may leave the two files a few samples apart; the shorter length rules.
        n = min(instrument.shape[0], rest.shape[0])
        tracks[pair.split].append(TrackAudio(pair.track, pair.source, instrument[:n], rest[:n]))
        if progress:
            progress(i + 1, len(manifest.pairs), f"decoded {pair.track}")
    if not tracks["train"]:
        raise DataError(f"dataset {manifest.name} has no training pairs")
    if not tracks["validation"]:
        raise DataError(f"dataset {manifest.name} has no validation pairs (needed for early stopping)")
    return tracks


def chunk_features(instrument: tf.Tensor, rest: tf.Tensor, config: ModelConfig,
                   phase_sensitive: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Network input and target for segments.

    instrument, rest: (batch, segment_samples). Returns mix_rows, instrument_rows, each
    (batch, freq_rows, chunk_frames, 1): magnitudes of the uncentred STFT (every frame sees real
    audio, none reflect-padded), DC row dropped.
    With `phase_sensitive` the target is not |S| but its projection on the mix's phase,
    |S| cos(angle(S) - angle(X)) = Re(S conj(X)) / |X| (Erdogan et al. 2015): the masked mix
    m|X| e^(i angle X) is what separation plays back, and |m X - S|^2 equals
    (m|X| - Re(S conj X)/|X|)^2 plus a term no mask changes, so a squared error against this target
    is the error of the played-back spectrum, which is what SDR counts. It can be negative (the
    source against the mix's phase); a [0, 1] mask then aims at 0.
    """
    mix = instrument + rest
    mix_spectrum = stft(mix, config, center=False)
    instrument_spectrum = stft(instrument, config, center=False)
    mix_magnitude = magnitude(mix_spectrum)
    if phase_sensitive:
        projection = tf.math.real(instrument_spectrum * tf.math.conj(mix_spectrum))
        target = tf.math.divide_no_nan(projection, mix_magnitude)  # 0 where the mix is silent
    else:
        target = magnitude(instrument_spectrum)
    return to_network_rows(mix_magnitude), to_network_rows(target)


def training_dataset(sampler: ChunkSampler, config: ModelConfig, seed: int, epoch: int, steps: int,
                     batch: int, worker: int = 0, skip_steps: int = 0,
                     phase_sensitive: bool = False) -> tf.data.Dataset:
    """tf.data of (mix_rows, instrument_rows) batches for one epoch (see `training_segments`)."""
    seg = config.segment_samples
    spec = tf.TensorSpec((batch, seg), tf.float32)
    dataset = tf.data.Dataset.from_generator(
        lambda: training_segments(sampler, seed, epoch, steps, batch, worker, skip_steps),
        output_signature=(spec, spec),
    )
    options = tf.data.Options()
    # Each worker draws its own stream (seeded by worker index); nothing to shard.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)
    return dataset.map(lambda i, r: chunk_features(i, r, config, phase_sensitive), num_parallel_calls=1).prefetch(2)


def validation_dataset(segments: tuple[np.ndarray, np.ndarray], config: ModelConfig, batch: int,
                       phase_sensitive: bool = False) -> tf.data.Dataset:
    """tf.data of (mix_rows, instrument_rows) over the fixed validation segments, in order."""
    dataset = tf.data.Dataset.from_tensor_slices(segments).batch(batch)
    return dataset.map(lambda i, r: chunk_features(i, r, config, phase_sensitive))

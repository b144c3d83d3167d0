"""Training input: decoded pairs cached once, seeded random chunks across tracks, fixed validation chunks.

Audio is decoded once per run (mono, at the model rate) into .npy files under the run folder and
memory-mapped afterwards, never decoded again per epoch. Training chunks are drawn across all
tracks (source by the manifest's weights, then track by length), with a random gain per source and,
sometimes, the instrument of one track over the rest of another; the mix is made on the fly as
instrument + rest. Everything is seeded by (seed, epoch, worker), so an epoch can be replayed.
Validation chunks are evenly spaced over each validation track and never change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from model.config import ModelConfig
from model.spectral import magnitude, stft, to_network_rows
from services.common.audio import read_audio
from services.common.errors import FailedPreconditionError
from services.common.manifest import Manifest
from services.common.paths import atomic_path


class DataError(FailedPreconditionError, ValueError):
    """The dataset cannot feed a training run (no pairs, wrong rate, no validation split...)."""


class LoadingStopped(Exception):
    """`should_stop` turned true while the dataset was being decoded."""


@dataclass(frozen=True)
class TrackAudio:
    """One decoded pair: instrument and rest, mono, float32 (samples,), same length."""

    track: str
    source: str
    instrument: np.ndarray
    rest: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.instrument.shape[0])


@dataclass(frozen=True)
class Augmentation:
    """Random changes to training chunks (never to validation chunks)."""

    gain_db: float = 6.0  # each source's gain drawn uniformly from [-gain_db, +gain_db]
    remix_probability: float = 0.25  # chance the rest comes from another track than the instrument
    # Random equaliser per source (see `random_eq_db`); 0 turns it off. A model trained on a few
    # soundfonts learns their exact spectral envelopes; a song played with other samples (or
    # recorded, mixed and mastered differently) has other ones, and duller ones where samples are
    # low-rate. Bending the envelope of each source independently makes the mask rely on what the
    # instrument plays, not on how bright its samples happen to be.
    eq_db: float = 0.0


def random_eq_db(rng: np.random.Generator, frequencies_hz: np.ndarray, eq_db: float) -> np.ndarray:
    """A smooth random gain curve in dB over `frequencies_hz`, for one source of one chunk.

    A tilt of up to +-eq_db/3 dB per octave around 1 kHz, two bell filters of up to +-eq_db dB
    (centres 100 Hz-8 kHz, 0.3-2 octaves wide) and, one time in three, a low-pass roll-off of
    12-48 dB per octave above 2-10 kHz. Boosts are capped at +eq_db dB, cuts at -60 dB.
    """
    octaves = np.log2(np.maximum(frequencies_hz, 20.0) / 1000.0)  # 0 at 1 kHz
    curve = rng.uniform(-eq_db / 3.0, eq_db / 3.0) * octaves
    for _ in range(2):
        centre = rng.uniform(np.log2(0.1), np.log2(8.0))
        width = rng.uniform(0.3, 2.0)
        curve = curve + rng.uniform(-eq_db, eq_db) * np.exp(-0.5 * ((octaves - centre) / (width / 2.0)) ** 2)
    if rng.random() < 1.0 / 3.0:
        cutoff = rng.uniform(np.log2(2.0), np.log2(10.0))
        curve = curve - rng.uniform(12.0, 48.0) * np.maximum(octaves - cutoff, 0.0)
    return np.clip(curve, -60.0, eq_db)


def equalise(audio: np.ndarray, curve_db: np.ndarray) -> np.ndarray:
    """`audio` (samples,) filtered by a zero-phase gain curve given per rfft bin of its length.

    The curve is smooth, so its impulse response is short and wrapping around the chunk's ends
    (the FFT filter is circular) touches only a few milliseconds.
    """
    spectrum = np.fft.rfft(audio) * (10.0 ** (curve_db / 20.0))
    return np.fft.irfft(spectrum, n=audio.shape[0]).astype(np.float32)


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


def _segment(audio: np.ndarray, start: int, length: int) -> np.ndarray:
    """audio[start:start+length], zero-padded when the track is shorter."""
    piece = np.asarray(audio[start : start + length], dtype=np.float32)
    if piece.shape[0] < length:
        piece = np.pad(piece, (0, length - piece.shape[0]))
    return piece


class ChunkSampler:
    """Draws random training segments (instrument, rest) across tracks; pure numpy, seeded."""

    def __init__(self, tracks: list[TrackAudio], source_weights: dict[str, float], segment_samples: int,
                 rate_hz: int, augmentation: Augmentation = Augmentation()):
        if not tracks:
            raise DataError("no training tracks to draw from")
        self.tracks = tracks
        self.segment_samples = segment_samples
        self.augmentation = augmentation
        self.frequencies_hz = np.fft.rfftfreq(segment_samples, 1.0 / rate_hz)
        self.track_probability = self._track_probabilities(tracks, source_weights)

    def release(self) -> None:
        """Drop the tracks, and with them their memory maps of DATA/cache/decoded.

        TensorFlow keeps the generator of every `training_dataset` (and so this sampler) alive for
        the life of the process; without this a training service would hold every finished run's
        decoded audio mapped, and a deleted cache's disk space would never come back.
        """
        self.tracks = []

    @staticmethod
    def _track_probabilities(tracks: list[TrackAudio], source_weights: dict[str, float]) -> np.ndarray:
        """P(track) = P(source) x share of the source's samples; sources without a weight get none,
        unless the manifest gives no weights at all (then every sample counts alike)."""
        lengths = np.array([max(t.samples, 1) for t in tracks], dtype=np.float64)
        if not source_weights:
            return lengths / lengths.sum()
        sources = [t.source for t in tracks]
        present = {s: float(source_weights.get(s, 0.0)) for s in set(sources)}
        total_weight = sum(present.values())
        if total_weight <= 0:
            raise DataError(f"no training pairs from a source with positive weight {dict(source_weights)}")
        per_source_length = {s: lengths[[i for i, x in enumerate(sources) if x == s]].sum() for s in present}
        p = np.array([present[s] / total_weight * lengths[i] / per_source_length[s] for i, s in enumerate(sources)])
        return p / p.sum()

    def draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` segments: instrument, rest, each (count, segment_samples) float32."""
        seg = self.segment_samples
        aug = self.augmentation
        n = len(self.tracks)
        instrument = np.empty((count, seg), np.float32)
        rest = np.empty((count, seg), np.float32)
        for i in range(count):
            a = int(rng.choice(n, p=self.track_probability))
            b = a
            if n > 1 and rng.random() < aug.remix_probability:
                b = int(rng.choice(n, p=self.track_probability))
            for out, index, attr in ((instrument, a, "instrument"), (rest, b, "rest")):
                audio = getattr(self.tracks[index], attr)
                start = int(rng.integers(0, max(audio.shape[0] - seg, 0) + 1))
                gain = 10.0 ** (rng.uniform(-aug.gain_db, aug.gain_db) / 20.0) if aug.gain_db > 0 else 1.0
                piece = _segment(audio, start, seg) * gain
                if aug.eq_db > 0:
                    piece = equalise(piece, random_eq_db(rng, self.frequencies_hz, aug.eq_db))
                out[i] = piece
        return instrument, rest


def epoch_rng(seed: int, epoch: int, worker: int = 0) -> np.random.Generator:
    """The generator for one epoch of one input pipeline: replaying (seed, epoch, worker) replays it."""
    return np.random.default_rng([seed, epoch, worker])


def training_segments(sampler: ChunkSampler, seed: int, epoch: int, steps: int, batch: int,
                      worker: int = 0, skip_steps: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches (instrument, rest) (batch, segment_samples) for steps skip_steps..steps-1 of `epoch`."""
    rng = epoch_rng(seed, epoch, worker)
    for step in range(steps):
        if not sampler.tracks:  # released: the run has ended (a prefetch may still be asking)
            return
        segments = sampler.draw(rng, batch)
        if step >= skip_steps:
            yield segments


def validation_segments(tracks: list[TrackAudio], segment_samples: int, per_track: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation segments: up to `per_track` evenly spaced per track, no augmentation.

    Returns instrument, rest, each (chunks, segment_samples) float32; the same every call.
    """
    instrument, rest = [], []
    for track in tracks:
        room = max(track.samples - segment_samples, 0)
        count = max(1, min(per_track, track.samples // segment_samples))
        for start in np.linspace(0, room, count).astype(int):
            instrument.append(_segment(track.instrument, int(start), segment_samples))
            rest.append(_segment(track.rest, int(start), segment_samples))
    if not instrument:
        raise DataError("no validation segments")
    return np.stack(instrument), np.stack(rest)


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

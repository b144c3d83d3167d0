"""Training chunks in numpy alone: decoded pairs, random augmented segments, fixed validation segments.

Kept free of TensorFlow so that a trainer on another Keras backend (research/thesis_gpu, on a GPU
machine without TensorFlow) draws exactly the chunks the training service draws. Training chunks
are drawn across all tracks (source by the manifest's weights, then track by length), with a random
gain per source, optionally a speed change and an equaliser, and, sometimes, the instrument of one
track over the rest of another; the mix is made later as instrument + rest. Everything is seeded
by (seed, epoch, worker), so an epoch can be replayed. Validation segments are evenly spaced over
each validation track and never change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from services.common.errors import FailedPreconditionError


class DataError(FailedPreconditionError, ValueError):
    """The dataset cannot feed a training run (no pairs, wrong rate, no validation split...)."""


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
    # Speed change per chunk (pitch, tempo and formants together, as a tape played faster or
    # slower), by a factor drawn uniformly within +-pitch_semitones; 0 turns it off. One factor moves
    # both sources of a chunk, so a song's parts stay in tune with each other. A soundfont's
    # instrument is a few recordings stretched over the keyboard; moving its formants by a semitone
    # or two gives timbres between those of the fonts that training has.
    pitch_semitones: float = 0.0


# One source's equaliser as numbers: tilt (dB per octave), two bells (gain dB, centre and width in
# octaves from 1 kHz), the low-pass corner (octaves from 1 kHz) and slope (dB per octave; 0: none).
EQ_PARAMETERS = 9


def draw_eq(rng: np.random.Generator, eq_db: float) -> np.ndarray:
    """The random numbers of one `random_eq_db` curve, (EQ_PARAMETERS,) float64, drawn in its order."""
    params = np.zeros(EQ_PARAMETERS)
    params[0] = rng.uniform(-eq_db / 3.0, eq_db / 3.0)
    for bell in range(2):
        centre = rng.uniform(np.log2(0.1), np.log2(8.0))
        width = rng.uniform(0.3, 2.0)
        params[1 + 3 * bell : 4 + 3 * bell] = rng.uniform(-eq_db, eq_db), centre, width
    if rng.random() < 1.0 / 3.0:
        params[7] = rng.uniform(np.log2(2.0), np.log2(10.0))
        params[8] = rng.uniform(12.0, 48.0)
    return params


def eq_curve_db(params: np.ndarray, frequencies_hz: np.ndarray, eq_db: float) -> np.ndarray:
    """The gain curve in dB over `frequencies_hz` of `draw_eq`'s numbers."""
    octaves = np.log2(np.maximum(frequencies_hz, 20.0) / 1000.0)  # 0 at 1 kHz
    curve = params[0] * octaves
    for gain, centre, width in (params[1:4], params[4:7]):
        curve = curve + gain * np.exp(-0.5 * ((octaves - centre) / (width / 2.0)) ** 2)
    curve = curve - params[8] * np.maximum(octaves - params[7], 0.0)
    return np.clip(curve, -60.0, eq_db)


def random_eq_db(rng: np.random.Generator, frequencies_hz: np.ndarray, eq_db: float) -> np.ndarray:
    """A smooth random gain curve in dB over `frequencies_hz`, for one source of one chunk.

    A tilt of up to +-eq_db/3 dB per octave around 1 kHz, two bell filters of up to +-eq_db dB
    (centres 100 Hz-8 kHz, 0.3-2 octaves wide) and, one time in three, a low-pass roll-off of
    12-48 dB per octave above 2-10 kHz. Boosts are capped at +eq_db dB, cuts at -60 dB.
    """
    return eq_curve_db(draw_eq(rng, eq_db), frequencies_hz, eq_db)


def equalise(audio: np.ndarray, curve_db: np.ndarray) -> np.ndarray:
    """`audio` (samples,) filtered by a zero-phase gain curve given per rfft bin of its length.

    The curve is smooth, so its impulse response is short and wrapping around the chunk's ends
    (the FFT filter is circular) touches only a few milliseconds.
    """
    spectrum = np.fft.rfft(audio) * (10.0 ** (curve_db / 20.0))
    return np.fft.irfft(spectrum, n=audio.shape[0]).astype(np.float32)


# Samples read on each side of a sped-up segment (46 ms at 22.05 kHz) and dropped after the FFT
# resampling, whose periodic wrap-around rings at the ends: the ringing stays in the margins.
# (An FFT, not services.common.audio.resample: soxr is not among the GPU machine's packages, and
# this module must run there; see research/thesis_gpu/README.md.)
SPEED_MARGIN = 1024


@functools.cache
def _fft_friendly(n: int, up: bool = False) -> int:
    """The integer nearest n (at or above it when `up`) with no prime factor above 11: numpy's FFT
    is several times slower on lengths with a large prime factor, and read lengths are random."""
    def smooth(m: int) -> bool:
        for p in (2, 3, 5, 7, 11):
            while m % p == 0:
                m //= p
        return m == 1
    for d in range(n):
        if smooth(n + d):
            return n + d
        if not up and smooth(n - d):
            return n - d
    return n


def speed_sizes(length: int, ratio: float) -> tuple[int, int]:
    """(samples to read, samples they become) for `length` samples played about `ratio` times
    faster, margins included; the exact ratio is their quotient (within 1 % of `ratio`)."""
    n_out = _speed_out_length(length)
    return _fft_friendly(int(round(n_out * ratio))), n_out


def _speed_out_length(length: int) -> int:
    """What a sped-up segment of `length` samples becomes before its margins are dropped."""
    return _fft_friendly(length + 2 * SPEED_MARGIN, up=True)


def change_speed(piece: np.ndarray, length: int) -> np.ndarray:
    """`piece` (speed_sizes' samples to read) band-limited-resampled to the samples they become,
    margins dropped: (length,) float32. Faster (fewer output samples than input) drops what would
    alias above the new Nyquist frequency."""
    n_out = _speed_out_length(length)
    spectrum = np.fft.rfft(piece)
    bins = n_out // 2 + 1
    spectrum = spectrum[:bins] if spectrum.shape[0] >= bins else np.pad(spectrum, (0, bins - spectrum.shape[0]))
    out = np.fft.irfft(spectrum, n=n_out) * (n_out / piece.shape[0])
    margin = (n_out - length) // 2
    return out[margin : margin + length].astype(np.float32)


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
        instrument, rest, eq = self.draw_unequalised(rng, count)
        if self.augmentation.eq_db > 0:
            for i in range(count):
                for out, source in ((instrument, 0), (rest, 1)):
                    out[i] = equalise(out[i], eq_curve_db(eq[i, source], self.frequencies_hz, self.augmentation.eq_db))
        return instrument, rest

    def draw_unequalised(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What `draw` draws with the same `rng`, before its equaliser: instrument, rest, and each
        source's `draw_eq` numbers (count, 2, EQ_PARAMETERS), zero when the equaliser is off — so a
        trainer can apply the equaliser elsewhere (on a GPU: research/thesis_gpu/features.equalise)."""
        seg = self.segment_samples
        aug = self.augmentation
        n = len(self.tracks)
        instrument = np.empty((count, seg), np.float32)
        rest = np.empty((count, seg), np.float32)
        eq = np.zeros((count, 2, EQ_PARAMETERS))
        for i in range(count):
            a = int(rng.choice(n, p=self.track_probability))
            b = a
            if n > 1 and rng.random() < aug.remix_probability:
                b = int(rng.choice(n, p=self.track_probability))
            # Drawn only when on, so that runs without it replay the draws they always made.
            ratio = 2.0 ** (rng.uniform(-aug.pitch_semitones, aug.pitch_semitones) / 12.0) if aug.pitch_semitones > 0 else 1.0
            read = seg if ratio == 1.0 else speed_sizes(seg, ratio)[0]
            for source, (out, index, attr) in enumerate(((instrument, a, "instrument"), (rest, b, "rest"))):
                audio = getattr(self.tracks[index], attr)
                start = int(rng.integers(0, max(audio.shape[0] - read, 0) + 1))
                gain = 10.0 ** (rng.uniform(-aug.gain_db, aug.gain_db) / 20.0) if aug.gain_db > 0 else 1.0
                piece = _segment(audio, start, read)
                out[i] = (piece if ratio == 1.0 else change_speed(piece, seg)) * gain
                if aug.eq_db > 0:
                    eq[i, source] = draw_eq(rng, aug.eq_db)
        return instrument, rest, eq


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

"""Silence in instrument tracks: detection, statistics and cutting (thesis section 4.3.3, appendix A).

Pure functions on arrays of shape (channels, samples); reading and writing files is done by
`services.processing.silence_sets`. Silence is a stretch longer than `min_silence_seconds`
whose level stays below `threshold_dbfs`, measured on short frames of `hop_seconds`, so its
boundaries are exact to one frame (10 ms by default) — the thesis' code added the first loud
second after every silence to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from services.common.errors import InvalidArgumentError

LEVELS = ("rms", "peak")
CROSSFADE_SHAPES = ("equal_power", "linear")
# Bands of the thesis' appendix A: tracks per 10 % of silence, the last band holding 90-100 %.
HISTOGRAM_BANDS = 10


@dataclass(frozen=True)
class SilenceParams:
    """What counts as silence."""

    threshold_dbfs: float = -50.0
    min_silence_seconds: float = 1.0
    hop_seconds: float = 0.01
    level: str = "rms"  # per frame: "rms" (like dBFS of a segment) or "peak" (strictest)

    def __post_init__(self) -> None:
        if not -200.0 <= self.threshold_dbfs <= 0.0:
            raise InvalidArgumentError(f"threshold_dbfs must be in -200..0, got {self.threshold_dbfs}")
        if not 0.0 <= self.min_silence_seconds <= 3600.0:
            raise InvalidArgumentError(f"min_silence_seconds must be in 0..3600, got {self.min_silence_seconds}")
        if not 0.0005 <= self.hop_seconds <= 0.5:
            raise InvalidArgumentError(f"hop_seconds must be in 0.0005..0.5, got {self.hop_seconds}")
        if self.level not in LEVELS:
            raise InvalidArgumentError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AdjustParams:
    """How far to cut silences: aim at `target` audible share, discard tracks under `cutoff`."""

    target: float = 0.7
    cutoff: float = 0.5
    margin_seconds: float = 0.1  # silence kept next to audio at each cut
    crossfade_seconds: float = 0.02
    crossfade_shape: str = "equal_power"

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise InvalidArgumentError(f"target must be in (0, 1], got {self.target}")
        if not 0.0 <= self.cutoff <= self.target:
            raise InvalidArgumentError(f"cutoff must be in [0, target={self.target}], got {self.cutoff}")
        if not 0.0 <= self.crossfade_seconds <= 1.0:
            raise InvalidArgumentError(f"crossfade_seconds must be in 0..1, got {self.crossfade_seconds}")
        # Each crossfade reaches half its length into the kept silence on both sides of a cut.
        if self.margin_seconds < self.crossfade_seconds / 2 or self.margin_seconds > 10.0:
            raise InvalidArgumentError(
                f"margin_seconds must be in [crossfade_seconds/2, 10], got {self.margin_seconds}")
        if self.crossfade_shape not in CROSSFADE_SHAPES:
            raise InvalidArgumentError(
                f"crossfade_shape must be one of {', '.join(CROSSFADE_SHAPES)}, got {self.crossfade_shape!r}")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SILENCE = SilenceParams()
DEFAULT_ADJUST = AdjustParams()


@dataclass(frozen=True)
class Cut:
    """Samples [start, end) removed from a track; `kind` is leading, middle or trailing."""

    start: int
    end: int
    kind: str

    @property
    def samples(self) -> int:
        return self.end - self.start


def hop_length_for(rate_hz: int, hop_seconds: float) -> int:
    return max(1, int(round(rate_hz * hop_seconds)))


def frame_levels_dbfs(audio: np.ndarray, hop_length: int, level: str = "rms") -> np.ndarray:
    """Level of each non-overlapping frame of `hop_length` samples, in dBFS.

    audio: (channels, samples). Returns (frames,), frames = ceil(samples / hop_length); the last
    frame may be shorter. The loudest channel decides, so a hard-panned part counts as audible.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    channels, samples = audio.shape
    frames = -(-samples // hop_length)
    if frames == 0:
        return np.zeros(0, np.float64)
    full = samples // hop_length
    levels = np.empty((channels, frames), np.float64)
    body = audio[:, : full * hop_length].reshape(channels, full, hop_length)
    tail = audio[:, full * hop_length:]
    if level == "rms":
        levels[:, :full] = np.sqrt(np.mean(np.square(body, dtype=np.float64), axis=2))
        if tail.shape[1]:
            levels[:, full] = np.sqrt(np.mean(np.square(tail, dtype=np.float64), axis=1))
    elif level == "peak":
        levels[:, :full] = np.max(np.abs(body), axis=2)
        if tail.shape[1]:
            levels[:, full] = np.max(np.abs(tail), axis=1)
    else:
        raise InvalidArgumentError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    loudest = levels.max(axis=0)
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(loudest)


def find_silences(audio: np.ndarray, rate_hz: int, params: SilenceParams = DEFAULT_SILENCE) -> list[tuple[int, int]]:
    """Silent stretches as sample intervals [start, end), in order.

    audio: (channels, samples). A stretch is silent when every frame in it is below
    `params.threshold_dbfs` and it lasts longer than `params.min_silence_seconds`.
    """
    samples = np.shape(audio)[-1]
    hop = hop_length_for(rate_hz, params.hop_seconds)
    silent = frame_levels_dbfs(audio, hop, params.level) < params.threshold_dbfs
    if not silent.any():
        return []
    edges = np.diff(np.concatenate(([0], silent.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    min_samples = params.min_silence_seconds * rate_hz
    found = []
    for first, stop in zip(starts, ends, strict=True):
        start, end = int(first) * hop, min(int(stop) * hop, samples)
        if end - start > min_samples:
            found.append((start, end))
    return found


def audible_share(silences: Sequence[tuple[int, int]], samples: int) -> float:
    """Share of the track (0..1) that is not silence; an empty track has none."""
    if samples <= 0:
        return 0.0
    return 1.0 - sum(end - start for start, end in silences) / samples


def silence_histogram(audible_shares: Sequence[float]) -> list[dict]:
    """Tracks per 10 % band of silence (the thesis' appendix A).

    Returns HISTOGRAM_BANDS entries {"band": "0-10%", "silence_from": 0.0, "silence_to": 0.1,
    "tracks": n}; a share of silence s lands in band floor(10 s), 100 % silence in the last.
    """
    counts = [0] * HISTOGRAM_BANDS
    for share in audible_shares:
        silence = min(max(1.0 - share, 0.0), 1.0)
        # Round first so 1 - 0.7 lands in the 30 % band, not in 20 % by a hair.
        counts[min(int(math.floor(round(silence * HISTOGRAM_BANDS, 9))), HISTOGRAM_BANDS - 1)] += 1
    width = 100 // HISTOGRAM_BANDS
    return [{"band": f"{i * width}-{(i + 1) * width}%", "silence_from": i / HISTOGRAM_BANDS,
             "silence_to": (i + 1) / HISTOGRAM_BANDS, "tracks": n} for i, n in enumerate(counts)]


def plan_cuts(silences: Sequence[tuple[int, int]], samples: int, rate_hz: int,
              params: AdjustParams) -> list[Cut]:
    """Which silence to cut, longest first, until the audible share reaches `params.target`.

    Leading, trailing and middle silences are all candidates. `margin_seconds` of silence is
    kept next to audio (on both sides of a middle cut, on the audio side of a leading or
    trailing one); the last silence cut loses only as much as is needed. Kept silence is counted
    as silent, so the share measured afterwards is at least what the plan promises.
    Returns the cuts sorted by position (sample intervals of the original).
    """
    audible = samples - sum(end - start for start, end in silences)
    if samples <= 0 or audible <= 0 or audible / samples >= params.target:
        return []
    needed = math.ceil(samples - audible / params.target)
    margin = int(round(params.margin_seconds * rate_hz))
    cuts = []
    for start, end in sorted(silences, key=lambda s: (-(s[1] - s[0]), s[0])):
        if needed <= 0:
            break
        kind = "leading" if start == 0 else "trailing" if end == samples else "middle"
        cuttable = (end - start) - margin * (2 if kind == "middle" else 1)
        take = min(cuttable, needed)
        if take <= 0:
            continue
        if kind == "leading":
            cuts.append(Cut(start, start + take, kind))
        elif kind == "trailing":
            cuts.append(Cut(end - take, end, kind))
        else:
            first = start + ((end - start) - take) // 2
            cuts.append(Cut(first, first + take, kind))
        needed -= take
    return sorted(cuts, key=lambda c: c.start)


def _fades(length: int, shape: str) -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in) gains of `length` samples."""
    t = (np.arange(length, dtype=np.float64) + 0.5) / length
    if shape == "equal_power":
        return np.cos(0.5 * np.pi * t).astype(np.float32), np.sin(0.5 * np.pi * t).astype(np.float32)
    if shape == "linear":
        return (1.0 - t).astype(np.float32), t.astype(np.float32)
    raise InvalidArgumentError(f"crossfade_shape must be one of {', '.join(CROSSFADE_SHAPES)}, got {shape!r}")


def apply_cuts(audio: np.ndarray, cuts: Sequence[Cut], crossfade_samples: int,
               shape: str = "equal_power") -> np.ndarray:
    """Remove `cuts` from audio (channels, samples), joining the pieces without clicks.

    A middle cut [a, b) is replaced by a crossfade of `crossfade_samples` centred on it (the
    audio before a fades out while the audio after b fades in), so exactly b - a samples go.
    A leading cut makes the track fade in, a trailing one fade out. The gains are the same
    functions of time for every input, so cutting instrument and rest alike keeps
    instrument + rest equal to the cut mixture. Returns (channels, samples - removed), float32.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    samples = audio.shape[1]
    h = max(0, int(crossfade_samples))
    h -= h % 2  # even, so the crossfade reaches exactly h/2 into the kept silence on each side
    half = h // 2
    pieces: list[np.ndarray] = []
    pos = 0
    fade_in_start = fade_out_end = False
    fade_out, fade_in = _fades(h, shape) if h else (None, None)
    for cut in sorted(cuts, key=lambda c: c.start):
        if not 0 <= cut.start < cut.end <= samples or cut.start < pos:
            raise InvalidArgumentError(f"cut [{cut.start}, {cut.end}) overlaps another or leaves the track")
        if cut.start == 0:
            fade_in_start = True
            pos = cut.end
            continue
        if cut.end == samples:
            fade_out_end = True
            pieces.append(audio[:, pos:cut.start])
            pos = samples
            continue
        if h == 0:
            pieces.append(audio[:, pos:cut.start])
            pos = cut.end
            continue
        a, b = cut.start - half, cut.end - half
        if a < pos or b + h > samples:
            raise InvalidArgumentError(
                f"cut [{cut.start}, {cut.end}) is too close to another cut or the track edge "
                f"for a {h}-sample crossfade")
        pieces.append(audio[:, pos:a])
        pieces.append(audio[:, a:a + h] * fade_out + audio[:, b:b + h] * fade_in)
        pos = b + h
    pieces.append(audio[:, pos:])
    out = np.concatenate(pieces, axis=1) if pieces else np.zeros((audio.shape[0], 0), np.float32)
    edge = min(h, out.shape[1])
    if edge and fade_in_start:
        out[:, :edge] *= _fades(edge, "linear")[1]
    if edge and fade_out_end:
        out[:, out.shape[1] - edge:] *= _fades(edge, "linear")[0]
    return out.astype(np.float32, copy=False)


def cuts_in_seconds(cuts: Sequence[Cut], rate_hz: int) -> list[dict]:
    """The report form of cuts: where they were in the original track, in seconds."""
    return [{"kind": c.kind, "start_seconds": round(c.start / rate_hz, 4),
             "end_seconds": round(c.end / rate_hz, 4), "seconds": round(c.samples / rate_hz, 4)}
            for c in cuts]

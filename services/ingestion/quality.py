"""Automatic quality checks that SUGGEST marks (with the numbers behind them), never set them.

Each stem is read once and reduced to a few numbers and a level envelope (`stem_features`,
pure); `check_track` (pure) compares the stems of a track and returns suggestions; the runner
(`check_library`) stores them in track.suggestions, replacing earlier automatic ones. A person
decides whether to turn a suggestion into a mark.

The checks and their rules (thresholds in `Thresholds`):

- missing: the stem's peak is below -60 dBFS (nothing audible was recorded).
- inaudible: over the frames where the stem plays (within 40 dB of its loudest frame), its
  RMS is more than 30 dB below the RMS of all other non-mix stems summed over those frames.
- clipping: a run of >= 3 consecutive samples at |x| >= 0.999 (a clean full-scale waveform
  touches the rail for at most a sample or two; a clipped one sits on it).
- dc_offset: |mean| of a channel above 0.1 (-20 dBFS). The network drops the DC bin, so only an
  offset that eats real headroom matters; FluidSynth's sweep pads carry up to ~0.06 of honest
  DC, which is not a fault worth a person's time.
- format: a stem shorter than the longest by more than 1 s (a stem cut short, or from another
  take). A shorter tail is common in real exports and harmless (mixing pads it with silence), as
  is a stem at another sample rate (mixing resamples it exactly): neither is suggested.
- bleed: the stem's quiet-but-not-silent frames (between -90 dBFS and 25 dB under its median
  active level, at least 2 s of them) follow another stem's envelope *at a fixed gain*: over
  those frames the two dB envelopes correlate (Pearson r > 0.7), the stem's level moves dB for
  dB with the other's (regression slope 0.5-2), their difference is steady (std < 6 dB), and
  the other stem is at least 20 dB louder. A leaking microphone hears the other source through
  a fixed path, so its residue is that source minus a constant; a decaying note tail or a
  section where everyone plays softer correlates too, but with a slope around 0.2-0.3 and a
  difference wandering by 15-30 dB (measured on generated songs). Digital silence (what a
  clean or synthetic stem has between notes) never counts as quiet.
- mislabeled: a stem of a pitched class (guitar, bass, piano, vocals) whose median spectral
  flatness over its active frames (within 30 dB of its loudest) exceeds 0.05: a noise-like,
  drum-like spectrum. Rendered drum kits measure about 0.09-0.11, white-noise bursts 0.5;
  pitched instruments (rendered or the clean stems of tests) stay below 0.01.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from services.common.audio import AudioError, read_audio
from services.common.errors import NotFoundError
from services.common.library import Library, Track

CHECKS = ("missing", "inaudible", "clipping", "dc_offset", "format", "bleed", "mislabeled")
PITCHED_CLASSES = ("guitar", "bass", "piano", "vocals")
_FLOOR_DB = -120.0


@dataclass(frozen=True)
class Thresholds:
    missing_peak_dbfs: float = -60.0
    inaudible_below_rest_db: float = 30.0
    active_within_db: float = 40.0
    clip_level: float = 0.999
    clip_run_samples: int = 3
    dc_offset: float = 0.1
    length_tolerance_seconds: float = 1.0
    bleed_floor_dbfs: float = -90.0
    bleed_quiet_below_db: float = 25.0
    bleed_min_quiet_seconds: float = 2.0
    bleed_correlation: float = 0.7
    bleed_louder_db: float = 20.0
    bleed_slope_range: tuple[float, float] = (0.5, 2.0)
    bleed_max_difference_std_db: float = 6.0
    flatness_max: float = 0.05
    hop_seconds: float = 0.05


@dataclass
class StemFeatures:
    """What the checks need from one stem; levels_db is one value per hop_seconds frame."""
    file: str
    cls: str | None
    rate: int
    channels: int
    samples: int
    peak_dbfs: float
    dc_offset: float
    clip_run: int
    clip_runs: int
    flatness: float | None
    levels_db: np.ndarray = field(repr=False)

    @property
    def seconds(self) -> float:
        return self.samples / self.rate


def _db(power: np.ndarray | float) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(power, 10 ** (_FLOOR_DB / 10)))


def frame_power(audio: np.ndarray, frame: int) -> np.ndarray:
    """Mean power per non-overlapping frame over all channels: (channels, samples) -> (frames,)."""
    n = audio.shape[1] // frame
    if n == 0:
        return np.zeros(0)
    x = audio[:, : n * frame].astype(np.float64)
    return (x * x).reshape(audio.shape[0], n, frame).mean(axis=(0, 2))


def longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(longest run of True, number of runs of >= 1) along the last axis of a 1-D bool array."""
    if not mask.any():
        return 0, 0
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    return int(lengths.max()), int(len(lengths))


def spectral_flatness(mono: np.ndarray, frames: np.ndarray, frame: int) -> float | None:
    """Median spectral flatness (geometric / arithmetic mean of the power spectrum) over the
    given frame indices of a mono signal (samples,); None without frames."""
    if len(frames) == 0:
        return None
    # At most 400 frames, evenly spread: enough for a median, bounded cost on long stems.
    frames = frames[np.linspace(0, len(frames) - 1, min(len(frames), 400)).astype(int)]
    segs = np.stack([mono[i * frame:(i + 1) * frame] for i in frames]).astype(np.float64)
    spec = np.abs(np.fft.rfft(segs * np.hanning(frame), axis=1)[:, 1:]) ** 2 + 1e-12
    flat = np.exp(np.log(spec).mean(axis=1)) / spec.mean(axis=1)
    return float(np.median(flat))


def stem_features(audio: np.ndarray, rate: int, file: str, cls: str | None,
                  th: Thresholds = Thresholds()) -> StemFeatures:
    """Reduce a stem (channels, samples) to the numbers the checks use."""
    audio = np.asarray(audio, dtype=np.float32)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    clip = np.abs(audio) >= th.clip_level
    run, runs = 0, 0
    for ch in clip:
        r, n = longest_run(ch)
        run, runs = max(run, r), runs + (n if r >= th.clip_run_samples else 0)
    hop = max(1, int(round(rate * th.hop_seconds)))
    levels = _db(frame_power(audio, hop))
    flat = None
    if cls in PITCHED_CLASSES and audio.size:
        mono = audio.mean(axis=0)
        flat_frame = 2048 if rate >= 16000 else 1024
        flat_levels = _db(frame_power(mono[np.newaxis], flat_frame))
        if len(flat_levels):
            active = np.flatnonzero(flat_levels > max(flat_levels.max() - 30.0, th.missing_peak_dbfs))
            flat = spectral_flatness(mono, active, flat_frame)
    return StemFeatures(
        file=file, cls=cls, rate=rate, channels=audio.shape[0], samples=audio.shape[1],
        peak_dbfs=float(_db(peak * peak)), dc_offset=float(np.abs(audio.mean(axis=1)).max()) if audio.size else 0.0,
        clip_run=run, clip_runs=runs, flatness=flat, levels_db=levels)


def _suggest(check: str, mark: str, stem: StemFeatures, **evidence) -> dict:
    clean = {k: (round(float(v), 3) if isinstance(v, (float, np.floating)) else v) for k, v in evidence.items()}
    return {"check": check, "instrument": stem.cls, "mark": mark, "stem": stem.file, "evidence": clean}


def check_track(stems: list[StemFeatures], th: Thresholds = Thresholds()) -> list[dict]:
    """Suggestions for one track from its stems' features (see the module docstring)."""
    out: list[dict] = []
    if not stems:
        return out
    longest = max(s.seconds for s in stems)
    for s in stems:
        if s.peak_dbfs < th.missing_peak_dbfs:
            out.append(_suggest("missing", "missing", s, peak_dbfs=s.peak_dbfs))
        if s.clip_run >= th.clip_run_samples:
            out.append(_suggest("clipping", "bad_quality", s, longest_run_samples=s.clip_run,
                                clipped_runs=s.clip_runs))
        if s.dc_offset > th.dc_offset:
            out.append(_suggest("dc_offset", "bad_quality", s, dc_offset=s.dc_offset))
        if longest - s.seconds > th.length_tolerance_seconds:
            out.append(_suggest("format", "bad_quality", s, seconds=s.seconds, longest_seconds=longest))
        if s.flatness is not None and s.flatness > th.flatness_max:
            out.append(_suggest("mislabeled", "mislabeled", s, spectral_flatness=s.flatness,
                                limit=th.flatness_max))
    parts = [s for s in stems if s.cls not in ("mix", "excluded") and s.peak_dbfs >= th.missing_peak_dbfs]
    for s in parts:
        others = [o for o in parts if o is not s]
        if not others:
            continue
        out.extend(_inaudible(s, others, th))
        out.extend(_bleed(s, others, th))
    return out


def _aligned(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(a), len(b))
    return a[:n], b[:n]


def _inaudible(s: StemFeatures, others: list[StemFeatures], th: Thresholds) -> list[dict]:
    n = min(len(s.levels_db), *(len(o.levels_db) for o in others))
    if n == 0:
        return []
    lv = s.levels_db[:n]
    active = lv > lv.max() - th.active_within_db
    rest_power = sum(10 ** (o.levels_db[:n] / 10) for o in others)
    stem_db = float(_db(np.mean(10 ** (lv[active] / 10))))
    rest_db = float(_db(np.mean(rest_power[active])))
    if stem_db < rest_db - th.inaudible_below_rest_db:
        return [_suggest("inaudible", "inaudible", s, stem_active_dbfs=stem_db, rest_dbfs=rest_db,
                         below_rest_db=rest_db - stem_db)]
    return []


def _bleed(s: StemFeatures, others: list[StemFeatures], th: Thresholds) -> list[dict]:
    lv = s.levels_db
    active = lv > lv.max() - th.active_within_db
    if not active.any():
        return []
    quiet_limit = float(np.median(lv[active])) - th.bleed_quiet_below_db
    best = None
    for o in others:
        a, b = _aligned(lv, o.levels_db)
        quiet = (a > th.bleed_floor_dbfs) & (a < quiet_limit)
        quiet_seconds = quiet.sum() * th.hop_seconds
        if quiet_seconds < th.bleed_min_quiet_seconds:
            continue
        qa, qb = a[quiet], b[quiet]
        if qa.std() < 1e-6 or qb.std() < 1e-6:
            continue
        r = float(np.corrcoef(qa, qb)[0, 1])
        slope = float(np.cov(qa, qb)[0, 1] / qb.var())
        steady = float((qb - qa).std())
        louder = float(np.median(qb - qa))
        if (r > th.bleed_correlation and louder > th.bleed_louder_db
                and th.bleed_slope_range[0] <= slope <= th.bleed_slope_range[1]
                and steady < th.bleed_max_difference_std_db and (best is None or r > best[1])):
            best = (o, r, slope, steady, louder, quiet_seconds)
    if best is None:
        return []
    o, r, slope, steady, louder, quiet_seconds = best
    return [_suggest("bleed", "bleed", s, from_stem=o.file, correlation=r, slope=slope,
                     difference_std_db=steady, other_louder_db=louder, quiet_seconds=quiet_seconds)]


# --- the runner over the library ----------------------------------------------------------------

def check_stored_track(library: Library, track: Track, th: Thresholds = Thresholds()) -> tuple[list[dict], list[dict]]:
    """(suggestions, errors) for a library track; reads one stem at a time."""
    features, errors = [], []
    for stem in track.stems:
        try:
            audio, rate = read_audio(library.stem_path(track, stem))
        except AudioError as e:
            errors.append({"track": track.id, "stem": stem.file, "reason": e.reason})
            continue
        features.append(stem_features(audio, rate, stem.file, stem.cls, th))
        del audio
    return check_track(features, th), errors


def check_library(library: Library, track_id: str = "", th: Thresholds = Thresholds(),
                  progress: Callable[[float, float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict:
    """Run the checks over one track or the whole library; store the suggestions.

    Earlier automatic suggestions of these checks are replaced; others (e.g. from metadata)
    are kept. Returns counts per check, the tracks with suggestions, and unreadable stems.
    """
    if track_id:
        if not library.exists(track_id):
            raise NotFoundError(f"no track {track_id!r} in the library")
        ids = [track_id]
    else:
        ids = library.ids()
    by_check: Counter = Counter()
    flagged: dict[str, int] = {}
    errors: list[dict] = []
    stopped, checked = False, 0
    for tid in ids:
        if should_stop is not None and should_stop():
            stopped = True
            break
        suggestions, errs = check_stored_track(library, library.load(tid), th)
        errors.extend(errs)
        # Reload under the lock: reading the audio takes a while, and marks set meanwhile must not be lost.
        with library.edit(tid) as track:
            track.suggestions = [s for s in track.suggestions if s.get("check") not in CHECKS] + suggestions
        for s in suggestions:
            by_check[s["check"]] += 1
        if suggestions:
            flagged[tid] = len(suggestions)
        checked += 1
        if progress is not None:
            progress(checked, len(ids), f"checked {tid}")
    return {"tracks_checked": checked,
            "suggestions": sum(by_check.values()), "by_check": dict(by_check), "flagged": flagged,
            "errors": errors, "stopped": stopped, "thresholds": asdict(th)}

"""Instrument/rest mixing: every usable library track becomes a pair of float WAV files per rate.

Instrument stems (the class asked for, plus classes given with --also) and rest stems (every
other class but mix and excluded) are each summed with unit gain, padded to a common length and
resampled with a band-limited resampler. Files are float WAV, so nothing clips and
instrument + rest equals the sum of all used stems to float precision. A track with no rest
stems (a solo piece) gets an all-zero rest. Re-mixing a track whose stems did not change is
skipped: stats.yaml records a fingerprint (files, classes, sizes, mtimes, parameters).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.audio import read_audio, resample, resampled_length, to_mono, to_stereo, write_audio
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.library import Library, Track, now_iso
from services.common.paths import DataRoot, atomic_write_text
from services.processing import silence
from services.processing.mixsets import (
    INSTRUMENT_FILE,
    NEVER_MIXED,
    REST_FILE,
    STATS_FILE,
    MixSet,
    dump_yaml,
    read_yaml,
    validate_instrument,
    validate_rate,
)
from services.processing.pool import count_statuses, run_tracks

# Bump when the mixing arithmetic changes: every pair is then redone.
MIXING_VERSION = 1
MIN_DBFS = -200.0


# -- pure arithmetic -----------------------------------------------------------------------------

def stem_roles(track: Track, instrument_classes: frozenset[str]) -> list[tuple[str, str, str]]:
    """(file, class, role) of every stem that is mixed; role is "instrument" or "rest".

    Stems of class mix or excluded are left out. A stem without a class cannot be placed, so
    the track is refused until it is mapped (it might be the instrument).
    """
    roles = []
    for stem in track.stems:
        if stem.cls is None:
            raise InvalidArgumentError(
                f"track {track.id}: stem {stem.file} ({stem.raw_instrument or 'no name'}) has no class yet; "
                "map it before mixing")
        if stem.cls in NEVER_MIXED:
            continue
        roles.append((stem.file, stem.cls, "instrument" if stem.cls in instrument_classes else "rest"))
    return sorted(roles)


def add_into(total: np.ndarray | None, audio: np.ndarray) -> np.ndarray:
    """total + audio, both (channels, samples); the shorter one is padded with zeros at the end."""
    if total is None:
        return np.array(audio, dtype=np.float32, copy=True)
    if audio.shape[1] > total.shape[1]:
        total = np.pad(total, ((0, 0), (0, audio.shape[1] - total.shape[1])))
    total[:, : audio.shape[1]] += audio
    return total


def fit_channels(audio: np.ndarray, stereo: bool) -> np.ndarray:
    """(channels, samples) -> (2, samples) when stereo, else the mean of the channels (1, samples)."""
    if stereo:
        return to_stereo(audio)
    if audio.shape[0] == 1:
        return audio
    if audio.shape[0] == 2:  # the common case, without to_mono's float64 pass
        mono = audio[0] + audio[1]
        mono *= 0.5
        return mono[np.newaxis]
    return to_mono(audio)


def render(sums_by_rate: dict[int, np.ndarray], rate_hz: int, length: int, channels: int) -> np.ndarray:
    """One group (instrument or rest) at `rate_hz`: the per-native-rate sums resampled and added.

    sums_by_rate: native rate -> (channels, samples). Summing before resampling is exact
    (resampling is linear) and much cheaper than resampling every stem. Returns
    (channels, length) float32; an empty group gives zeros.
    """
    out = np.zeros((channels, length), np.float32)
    for native_hz, audio in sorted(sums_by_rate.items()):
        converted = resample(audio, native_hz, rate_hz)
        n = min(length, converted.shape[1])
        out[:, :n] += converted[:, :n]
    return out


def level_dbfs(audio: np.ndarray) -> dict:
    """Peak and RMS of audio (channels, samples) in dBFS (floored at -200)."""
    if audio.size == 0:
        return {"peak_dbfs": MIN_DBFS, "rms_dbfs": MIN_DBFS}
    peak = max(float(audio.max()), -float(audio.min()))
    flat = np.ascontiguousarray(audio, dtype=np.float32).ravel()
    rms = math.sqrt(max(float(np.dot(flat, flat)), 0.0) / flat.size)
    return {"peak_dbfs": round(_dbfs(peak), 3), "rms_dbfs": round(_dbfs(rms), 3)}


def _dbfs(amplitude: float) -> float:
    return max(MIN_DBFS, 20.0 * math.log10(amplitude)) if amplitude > 0 else MIN_DBFS


# -- one track (runs in a worker process) -------------------------------------------------------

def stems_fingerprint(library: Library, track: Track, roles: list[tuple[str, str, str]], mixset: MixSet) -> dict:
    """What a pair was made from: stem files, classes, roles, sizes, mtimes and the parameters."""
    stems = []
    for file, cls, role in roles:
        st = library.stem_path(track, next(s for s in track.stems if s.file == file)).stat()
        stems.append({"file": file, "class": cls, "role": role, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"mixing_version": MIXING_VERSION, "mix_set": mixset.to_dict(), "stems": stems}


def _up_to_date(folder: Path, fingerprint: dict) -> bool:
    if not ((folder / INSTRUMENT_FILE).is_file() and (folder / REST_FILE).is_file()):
        return False
    return read_yaml(folder / STATS_FILE).get("fingerprint") == fingerprint


def mix_track(data_root: str, track_id: str, mixsets: Sequence[dict], force: bool = False,
              silence_params: dict | None = None) -> dict:
    """Mix one library track into every mix set given (same grouping and channels, any rate).

    mixsets: MixSet.to_dict() of each rate (plain dicts, so the call pickles). Returns a JSON-able
    row: {"track", "status": "mixed"|"skipped", "rates": {rate: status}, "seconds", ...}.
    """
    data = DataRoot(data_root)
    library = Library(data)
    track = library.load(track_id)
    sets = [MixSet(m["instrument"], int(m["rate_hz"]), bool(m["stereo"]), tuple(m["also"])) for m in mixsets]
    if not sets:
        raise InvalidArgumentError("no rate to mix at")
    roles = stem_roles(track, sets[0].classes())
    if not any(role == "instrument" for _, _, role in roles):
        raise FailedPreconditionError(f"track {track.id} has no {sets[0].group_name} stem")
    params = silence.SilenceParams(**(silence_params or {}))
    todo = []
    statuses = {}
    for mixset in sets:
        folder = mixset.track_dir(data, track.id)
        fingerprint = stems_fingerprint(library, track, roles, mixset)
        if not force and _up_to_date(folder, fingerprint):
            statuses[str(mixset.rate_hz)] = "skipped"
        else:
            todo.append((mixset, folder, fingerprint))
    row = {"track": track.id, "source": track.source, "rates": statuses}
    if not todo:
        stats = read_yaml(sets[0].track_dir(data, track.id) / STATS_FILE)
        return {**row, "status": "skipped", "seconds": stats.get("seconds"),
                "audible_share": stats.get("audible_share"),
                "length_mismatch_seconds": stats.get("length_mismatch_seconds")}

    stereo = sets[0].stereo
    channels = 2 if stereo else 1
    # Stems are read one at a time and added into per-(role, native rate) sums, so memory holds
    # two sums, not every stem.
    sums: dict[str, dict[int, np.ndarray]] = {"instrument": {}, "rest": {}}
    stem_rows = []
    for file, cls, role in roles:
        path = library.stem_path(track, next(s for s in track.stems if s.file == file))
        audio, native_hz = read_audio(path)
        stem_rows.append({"file": file, "class": cls, "role": role, "rate_hz": native_hz,
                          "channels": int(audio.shape[0]), "seconds": round(audio.shape[1] / native_hz, 6),
                          **level_dbfs(audio)})
        audio = fit_channels(audio, stereo)
        sums[role][native_hz] = add_into(sums[role].get(native_hz), audio)
        del audio
    seconds_each = [r["seconds"] for r in stem_rows]
    mismatch = round(max(seconds_each) - min(seconds_each), 6)
    longest = max(seconds_each)

    for mixset, folder, fingerprint in todo:
        rate = mixset.rate_hz
        length = max(resampled_length(a.shape[1], hz, rate) for group in sums.values() for hz, a in group.items())
        instrument = render(sums["instrument"], rate, length, channels)
        rest = render(sums["rest"], rate, length, channels)
        silences = silence.find_silences(instrument, rate, params)
        share = silence.audible_share(silences, length)
        stats = {
            "track": track.id, "source": track.source, "title": track.title,
            "mix_set": mixset.to_dict(), "rate_hz": rate, "channels": channels,
            "samples": length, "seconds": round(length / rate, 6),
            "stems": stem_rows,
            "length_mismatch_seconds": mismatch,
            "padded_stems": [r["file"] for r in stem_rows if longest - r["seconds"] > 1.0 / rate],
            "no_rest_stems": not sums["rest"],
            "instrument": level_dbfs(instrument), "rest": level_dbfs(rest),
            "mixture": level_dbfs(instrument + rest),
            "audible_share": round(share, 6),
            "silence": {**params.to_dict(), "silences": len(silences)},
            "mixed_at": now_iso(),
            "fingerprint": fingerprint,
        }
        folder.mkdir(parents=True, exist_ok=True)
        write_audio(folder / INSTRUMENT_FILE, instrument, rate, subtype="FLOAT")
        write_audio(folder / REST_FILE, rest, rate, subtype="FLOAT")
        # Written last: a pair counts as done (and up to date) only once its stats are there.
        atomic_write_text(folder / STATS_FILE, dump_yaml(stats))
        statuses[str(rate)] = "mixed"
        row.setdefault("seconds", stats["seconds"])
        row.setdefault("audible_share", stats["audible_share"])
    row["length_mismatch_seconds"] = mismatch
    return {**row, "status": "mixed"}


# -- the whole library --------------------------------------------------------------------------

def select_tracks(library: Library, instrument: str, include_unchecked: bool = False, ignore_marks: bool = False,
                  only: Sequence[str] = ()) -> tuple[list[Track], list[dict]]:
    """Tracks usable for `instrument` (the thesis' rule, Track.usable_for) and why others are not.

    Returns (selected tracks sorted by id, [{"track", "reason"}] for tracks that have the
    instrument, or are checked for it, but are left out). `only` limits the choice to these ids
    (all must exist).
    """
    ids = library.ids()
    if only:
        missing = sorted(set(only) - set(ids))
        if missing:
            raise InvalidArgumentError(f"no such tracks in the library: {', '.join(missing)}")
        ids = sorted(set(only))
    selected, left_out = [], []
    for track_id in ids:
        try:
            track = library.load(track_id)
        except ValueError as e:
            left_out.append({"track": track_id, "reason": f"unreadable track.yaml: {e}"})
            continue
        if instrument not in track.classes():
            if track.has_mark(instrument, "checked"):
                # A person meant it for this instrument: say why it is not mixed.
                unmapped = [Path(st.file).name for st in track.stems if st.cls is None]
                left_out.append({"track": track_id, "reason": f"checked for {instrument}, but no stem is classed "
                                 f"{instrument}" + (f" (unmapped: {', '.join(unmapped)}; stemlab dataset set-class)"
                                                    if unmapped else "")})
            continue
        if track.usable_for(instrument, include_unchecked=include_unchecked, ignore_marks=ignore_marks):
            selected.append(track)
            continue
        marks = [m for m in ("missing", "inaudible", "bad_quality", "bleed", "mislabeled")
                 if track.has_mark(instrument, m)]
        reason = f"marked {', '.join(marks)}" if marks and not ignore_marks else "not checked"
        left_out.append({"track": track_id, "reason": reason})
    return selected, left_out


def require_usable(library: Library, instrument: str, include_unchecked: bool = False, ignore_marks: bool = False,
                   only: Sequence[str] = ()) -> None:
    """Refuse a mix that would mix nothing, saying why no track is usable."""
    selected, left_out = select_tracks(library, instrument, include_unchecked, ignore_marks, only)
    if selected:
        return
    if not left_out:
        raise FailedPreconditionError(f"no track in the library has a stem classed {instrument}")
    reasons = Counter(row["reason"].split(" (")[0] for row in left_out)
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    raise FailedPreconditionError(
        f"no track can be mixed for {instrument}: {why} (confirm a track with `stemlab dataset mark TRACK "
        f"--instrument {instrument} --mark checked`, or pass --include-unchecked for generated songs)")


def mix(data_root: str | Path, instrument: str, rates_hz: Sequence[int] = (22050,), stereo: bool = False,
        also: Sequence[str] = (), include_unchecked: bool = False, ignore_marks: bool = False,
        tracks: Sequence[str] = (), force: bool = False, workers: int | None = None,
        progress: Callable[[float, float, str], None] | None = None,
        should_stop: Callable[[], bool] | None = None, share: Any = None) -> dict:
    """Mix every usable track for `instrument` at each rate. One failing track does not stop the rest.

    `share`: the job's shared items (jobs.JobContext.items), so replicas mix tracks side by side.

    Returns {"mix_sets": [paths], "tracks": [rows], "left_out": [...], "counts": {...}, "stopped"}.
    """
    data = DataRoot(data_root)
    instrument, also_classes = validate_instrument(instrument, tuple(also))
    rates = sorted({validate_rate(int(r)) for r in rates_hz})
    if not rates:
        raise InvalidArgumentError("give at least one rate")
    mixsets = [MixSet(instrument, r, bool(stereo), also_classes) for r in rates]
    library = Library(data)
    selected, left_out = select_tracks(library, instrument, include_unchecked, ignore_marks, tracks)
    tasks = [(t.id, {"data_root": str(data.root), "track_id": t.id, "mixsets": [m.to_dict() for m in mixsets],
                     "force": bool(force)}) for t in selected]
    rows, stopped = run_tracks(mix_track, tasks, workers=workers, progress=progress, should_stop=should_stop,
                               share=share)
    return {
        "mix_sets": [data.relative(m.root(data)) for m in mixsets],
        "tracks": rows,
        "left_out": left_out,
        "counts": count_statuses(rows),
        "seconds_mixed": round(sum(r.get("seconds") or 0.0 for r in rows if r.get("status") == "mixed"), 3),
        "stopped": stopped,
    }

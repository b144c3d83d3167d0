"""Silence statistics and silence-adjusted sets: the file side of services.processing.silence.

`silence_stats` measures the audible share of every instrument file of a mix set and the
thesis' appendix-A histogram. `adjust_silence` derives a new set

    mixes/<group>/<rate>[-stereo]-silence-<target>-<cutoff>/<track>/{instrument,rest}.wav, silence.yaml

where tracks under `target` audible share lose silences (longest first, the same cuts in the
rest file), tracks already at target are linked unchanged, and tracks still under `cutoff` are
discarded (only their silence.yaml stays, saying why). silence.yaml lists every cut in seconds
of the original track.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.audio import read_audio, write_audio
from services.common.errors import FailedPreconditionError
from services.common.library import now_iso
from services.common.paths import DataRoot, atomic_write_text
from services.processing import silence
from services.processing.mixsets import (
    INSTRUMENT_FILE,
    REST_FILE,
    SILENCE_FILE,
    STATS_FILE,
    MixSet,
    dump_yaml,
    read_yaml,
)
from services.processing.pool import count_statuses, run_tracks

# Bump when detection or cutting changes: every adjusted track is then redone.
SILENCE_VERSION = 1


def _mixset(d: dict) -> MixSet:
    silence_ = d.get("silence")
    return MixSet(d["instrument"], int(d["rate_hz"]), bool(d["stereo"]), tuple(d.get("also") or ()),
                  None if not silence_ else (float(silence_["target"]), float(silence_["cutoff"])))


def _intervals_seconds(silences: Sequence[tuple[int, int]], rate_hz: int) -> list[list[float]]:
    return [[round(start / rate_hz, 3), round(end / rate_hz, 3)] for start, end in silences]


def _read_pair_file(path: Path, rate_hz: int) -> np.ndarray:
    audio, rate = read_audio(path)
    if rate != rate_hz:
        raise FailedPreconditionError(f"{path} is at {rate} Hz, expected {rate_hz} Hz; mix it again")
    return audio


# -- statistics ---------------------------------------------------------------------------------

def track_silence_stats(data_root: str, mixset: dict, track_id: str, params: dict) -> dict:
    """Audible share and silent stretches of one track's instrument file (runs in a worker)."""
    data = DataRoot(data_root)
    ms = _mixset(mixset)
    folder = ms.track_dir(data, track_id)
    instrument = _read_pair_file(folder / INSTRUMENT_FILE, ms.rate_hz)
    p = silence.SilenceParams(**params)
    silences = silence.find_silences(instrument, ms.rate_hz, p)
    samples = instrument.shape[1]
    return {"track": track_id, "status": "measured", "seconds": round(samples / ms.rate_hz, 3),
            "audible_share": round(silence.audible_share(silences, samples), 6),
            "silent_seconds": round(sum(e - s for s, e in silences) / ms.rate_hz, 3),
            "silences": _intervals_seconds(silences, ms.rate_hz)}


def silence_stats(data_root: str | Path, instrument: str, rate_hz: int, stereo: bool = False,
                  also: Sequence[str] = (), params: silence.SilenceParams = silence.DEFAULT_SILENCE,
                  adjusted: tuple[float, float] | None = None, workers: int | None = None,
                  progress: Callable[[float, float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, share: Any = None) -> dict:
    """Per-track audible share and the histogram of tracks per 10 % band of silence.

    `share`: the job's shared items (jobs.JobContext.items), so replicas measure tracks side by side.

    `adjusted` = (target, cutoff) measures a silence-adjusted set instead of the plain one.
    """
    data = DataRoot(data_root)
    ms = MixSet(instrument, int(rate_hz), bool(stereo), tuple(also), adjusted)
    ms.require(data)
    ids = ms.track_ids(data)
    if adjusted is not None:  # discarded tracks have a report but no audio
        ids = [i for i in ids if not read_yaml(ms.track_dir(data, i) / SILENCE_FILE).get("discarded")]
    tasks = [(i, {"data_root": str(data.root), "mixset": ms.to_dict(), "track_id": i, "params": params.to_dict()})
             for i in ids]
    rows, stopped = run_tracks(track_silence_stats, tasks, workers=workers, progress=progress,
                               should_stop=should_stop, share=share)
    shares = [r["audible_share"] for r in rows if r.get("status") == "measured"]
    return {"mix_set": data.relative(ms.root(data)), "params": params.to_dict(), "tracks": rows,
            "histogram": silence.silence_histogram(shares),
            "mean_audible_share": round(float(np.mean(shares)), 6) if shares else None,
            "counts": count_statuses(rows), "stopped": stopped}


# -- adjustment ---------------------------------------------------------------------------------

def _file_fingerprint(folder: Path) -> list[dict]:
    out = []
    for name in (INSTRUMENT_FILE, REST_FILE, STATS_FILE):
        st = (folder / name).stat()
        out.append({"file": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s content at `target` atomically; a hard link when the file system allows.

    A link is safe: mixes are replaced by rename, never rewritten in place, so the linked
    content cannot change under the adjusted set.
    """
    tmp = target.parent / f".{target.name}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def adjust_track(data_root: str, base: dict, derived: dict, track_id: str, silence_params: dict,
                 adjust_params: dict, force: bool = False) -> dict:
    """Cut one track's silences into the derived set (runs in a worker). Returns its report row."""
    data = DataRoot(data_root)
    base_set, derived_set = _mixset(base), _mixset(derived)
    source = base_set.track_dir(data, track_id)
    target_dir = derived_set.track_dir(data, track_id)
    sp = silence.SilenceParams(**silence_params)
    ap = silence.AdjustParams(**adjust_params)
    rate = base_set.rate_hz
    fingerprint = {"silence_version": SILENCE_VERSION, "silence": sp.to_dict(), "adjust": ap.to_dict(),
                   "source": _file_fingerprint(source)}
    old = read_yaml(target_dir / SILENCE_FILE)
    if (not force and old.get("fingerprint") == fingerprint
            and (old.get("discarded") or ((target_dir / INSTRUMENT_FILE).is_file()
                                          and (target_dir / REST_FILE).is_file()))):
        return {**old.get("summary", {}), "track": track_id, "status": "skipped"}  # keeps its "outcome"

    instrument = _read_pair_file(source / INSTRUMENT_FILE, rate)
    rest = _read_pair_file(source / REST_FILE, rate)
    if instrument.shape != rest.shape:
        raise FailedPreconditionError(f"{source}: instrument {instrument.shape} and rest {rest.shape} differ; "
                                      "mix it again")
    samples = instrument.shape[1]
    silences = silence.find_silences(instrument, rate, sp)
    share_before = silence.audible_share(silences, samples)
    cuts = silence.plan_cuts(silences, samples, rate, ap)
    if cuts:
        crossfade = int(round(ap.crossfade_seconds * rate))
        instrument = silence.apply_cuts(instrument, cuts, crossfade, ap.crossfade_shape)
        rest = silence.apply_cuts(rest, cuts, crossfade, ap.crossfade_shape)
        silences_after = silence.find_silences(instrument, rate, sp)
        share_after = silence.audible_share(silences_after, instrument.shape[1])
    else:
        silences_after, share_after = silences, share_before
    discarded = share_after < ap.cutoff
    status = "discarded" if discarded else "adjusted" if cuts else "unchanged"
    summary = {
        "track": track_id, "status": status, "outcome": status,
        "audible_share_before": round(share_before, 6), "audible_share_after": round(share_after, 6),
        "reached_target": share_after >= ap.target,
        "seconds_before": round(samples / rate, 6), "seconds_after": round(instrument.shape[1] / rate, 6),
        "cut_seconds": round(sum(c.samples for c in cuts) / rate, 6),
        "cuts": silence.cuts_in_seconds(cuts, rate),
    }
    report = {"track": track_id, "mix_set": derived_set.to_dict(), "discarded": discarded,
              "reason": (f"audible share {share_after:.3f} stays under the cutoff {ap.cutoff:g}" if discarded else ""),
              "summary": summary,
              "silences_before": _intervals_seconds(silences, rate),
              "silences_after": _intervals_seconds(silences_after, rate),
              "adjusted_at": now_iso(), "fingerprint": fingerprint}
    target_dir.mkdir(parents=True, exist_ok=True)
    # The report goes first as "not ready" so a crash mid-way never leaves old files looking current.
    (target_dir / SILENCE_FILE).unlink(missing_ok=True)
    if discarded:
        for name in (INSTRUMENT_FILE, REST_FILE):
            (target_dir / name).unlink(missing_ok=True)
    elif cuts:
        write_audio(target_dir / INSTRUMENT_FILE, instrument, rate, subtype="FLOAT")
        write_audio(target_dir / REST_FILE, rest, rate, subtype="FLOAT")
    else:
        _link_or_copy(source / INSTRUMENT_FILE, target_dir / INSTRUMENT_FILE)
        _link_or_copy(source / REST_FILE, target_dir / REST_FILE)
    atomic_write_text(target_dir / SILENCE_FILE, dump_yaml(report))
    return summary


def adjust_silence(data_root: str | Path, instrument: str, rate_hz: int, stereo: bool = False,
                   also: Sequence[str] = (), silence_params: silence.SilenceParams = silence.DEFAULT_SILENCE,
                   adjust_params: silence.AdjustParams = silence.DEFAULT_ADJUST, force: bool = False,
                   workers: int | None = None, progress: Callable[[float, float, str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, share: Any = None) -> dict:
    """Build the silence-adjusted set of a mix set. Returns the per-track rows and histograms.

    `share`: the job's shared items (jobs.JobContext.items), so replicas adjust tracks side by side.
    """
    data = DataRoot(data_root)
    base = MixSet(instrument, int(rate_hz), bool(stereo), tuple(also))
    base.require(data)
    derived = base.adjusted(adjust_params.target, adjust_params.cutoff)
    tasks = [(i, {"data_root": str(data.root), "base": base.to_dict(), "derived": derived.to_dict(), "track_id": i,
                  "silence_params": silence_params.to_dict(), "adjust_params": adjust_params.to_dict(),
                  "force": bool(force)})
             for i in base.track_ids(data)]
    rows, stopped = run_tracks(adjust_track, tasks, workers=workers, progress=progress, should_stop=should_stop,
                               share=share)
    done = [r for r in rows if "audible_share_after" in r]
    kept = [r for r in done if r.get("outcome") in ("adjusted", "unchanged")]
    return {
        "mix_set": data.relative(derived.root(data)), "source_mix_set": data.relative(base.root(data)),
        "silence": silence_params.to_dict(), "adjust": adjust_params.to_dict(), "tracks": rows,
        "histogram_before": silence.silence_histogram([r["audible_share_before"] for r in done]),
        "histogram_after": silence.silence_histogram([r["audible_share_after"] for r in kept]),
        "counts": count_statuses(rows), "kept": len(kept), "stopped": stopped,
    }

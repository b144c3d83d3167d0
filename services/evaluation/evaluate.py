"""Evaluating a model on a dataset split: separate each track, score it in a process pool, write the report.

The model runs in this process (TensorFlow or the serving client), one track at a time, while
worker processes score the tracks already separated (bss_eval is slow and single-threaded).
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import os
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import numpy as np

from services.common.audio import AudioError, read_audio
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.manifest import ManifestError, Pair, find_manifest, load_manifest, verify_files
from services.common.paths import DataRoot, atomic_dir
from services.evaluation import baselines as bl
from services.evaluation import metrics, report
from services.evaluation.scoring import TrackTask, score_track
from services.evaluation.sources import MissingEstimateError, ModelSource, UnusableEstimateError

SPLITS = ("validation", "train", "all")
_REPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class EvaluationCancelled(Exception):
    """The caller asked the evaluation to stop; nothing was published."""


@dataclass
class EvaluationSettings:
    split: str = "validation"
    baselines: tuple[str, ...] = bl.DEFAULT_BASELINES
    framewise: bool = False
    window_seconds: float = 1.0
    silent_rms_dbfs: float = metrics.DEFAULT_SILENT_RMS_DBFS
    max_tracks: int = 0  # 0: all tracks of the split
    workers: int = 0  # 0: one per CPU core
    plot_tracks: int = 3  # spectrogram images for the first N scored tracks
    notes: dict = field(default_factory=dict)

    def validated(self) -> EvaluationSettings:
        if self.split not in SPLITS:
            raise InvalidArgumentError(f"unknown split {self.split!r}; choose one of {list(SPLITS)}")
        try:
            baselines = bl.validate_baselines(self.baselines)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from e
        if not 0.1 <= self.window_seconds <= 60:
            raise InvalidArgumentError(f"window_seconds must be within 0.1..60, got {self.window_seconds}")
        if self.max_tracks < 0 or self.workers < 0 or self.plot_tracks < 0:
            raise InvalidArgumentError("max_tracks, workers and plot_tracks must not be negative")
        return EvaluationSettings(**{**asdict(self), "baselines": baselines})


# Skipped tracks named with their reason in a job's summary (report.json lists every one).
SHOWN_SKIPS = 10

def new_report_id(label: str = "") -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-._")[:40]
    return f"{stamp}-{clean + '-' if clean else ''}{secrets.token_hex(3)}"


def validate_report_id(report_id: str) -> str:
    if not isinstance(report_id, str) or not _REPORT_ID.match(report_id):
        raise InvalidArgumentError(f"invalid report id {report_id!r}")
    return report_id


def select_pairs(pairs: list[Pair], split: str, max_tracks: int = 0) -> list[Pair]:
    """The split's pairs sorted by track name (file-system order never matters); with max_tracks,
    that many spread evenly over the sorted list.

    Not the first N: datasets are built from blocks named in order (songs of one soundfont, one
    import), and the first 24 validation songs of a four-soundfont set were all from one font.
    """
    chosen = sorted((p for p in pairs if split == "all" or p.split == split), key=lambda p: p.track)
    if not max_tracks or max_tracks >= len(chosen):
        return chosen
    step = len(chosen) / max_tracks
    return [chosen[int(i * step)] for i in range(max_tracks)]


def load_references(data: DataRoot, pair: Pair, rate_hz: int) -> np.ndarray:
    """(2, samples) float32 = [instrument, rest], mono at rate_hz, trimmed to the shorter of the two."""
    from services.common.manifest import Manifest

    instrument = read_audio(Manifest.path_of(pair.instrument, data.root), rate=rate_hz, mono=True)[0][0]
    rest = read_audio(Manifest.path_of(pair.rest, data.root), rate=rate_hz, mono=True)[0][0]
    samples = min(len(instrument), len(rest))
    return np.stack([instrument[:samples], rest[:samples]])


def evaluate_dataset(
    data: DataRoot,
    source: ModelSource | None,
    dataset: str,
    version: int | None = None,
    settings: EvaluationSettings | None = None,
    report_id: str | None = None,
    progress: Callable[[float, float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    code_version: str = "",
) -> dict:
    """Evaluate `source` (None: baselines only) on a dataset split; publish DATA/evaluations/<id>/.

    Returns a summary: {"report_id", "report_dir", "tracks", "scored", "skipped", "skipped_tracks"
    ([{track, reason}], the first SHOWN_SKIPS), "absent", "medians", "leakage"}. Tracks without
    the instrument (silent instrument reference) are "absent": scored by
    the leakage of what the model returns, not by bss_eval.
    Raises EvaluationCancelled when should_stop() turns true (no report is published then).
    """
    settings = (settings or EvaluationSettings()).validated()
    try:
        manifest_path = find_manifest(data, dataset, version)
        manifest = load_manifest(manifest_path)
    except ManifestError as e:
        raise NotFoundError(str(e)) from e
    pairs = select_pairs(manifest.pairs, settings.split, settings.max_tracks)
    if not pairs:
        raise FailedPreconditionError(
            f"dataset {manifest.name} v{manifest.version} has no tracks in split {settings.split!r}")
    verify_files(manifest, data.root, pairs)  # scores of a version are on the files it recorded
    report_id = validate_report_id(report_id or new_report_id(f"{manifest.name}"))
    target = data.evaluations / report_id
    if target.exists():
        raise FailedPreconditionError(f"evaluation {report_id} exists already")
    stft = bl.model_stft_settings(source.model_config() if source else None)
    progress = progress or (lambda done, total, message="": None)
    should_stop = should_stop or (lambda: False)
    workers = settings.workers or max(1, min(os.cpu_count() or 1, len(pairs)))
    started = time.time()

    results: dict[str, dict] = {}
    with atomic_dir(target) as tmp:
        (tmp / "spectrograms").mkdir()
        # spawn, not fork: this process may hold TensorFlow and gRPC threads, which do not survive fork.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending: dict[Future, str] = {}
            plotted = 0
            total = len(pairs)
            progress(0, total, f"evaluating {total} tracks")
            for pair in pairs:
                if should_stop():
                    _cancel(pool, pending)
                    raise EvaluationCancelled("evaluation cancelled")
                # Keep only a few separated tracks waiting, so memory stays bounded on long datasets.
                while len(pending) > workers:
                    _collect(wait(pending, return_when=FIRST_COMPLETED).done, pending, results, progress, total)
                task = _prepare(data, pair, manifest.rate, source, settings, stft, results)
                if task is None:
                    progress(len(results), total, f"skipped {pair.track}")
                    continue
                if source is not None and plotted < settings.plot_tracks and not task.absent:
                    task.plot_path = str(tmp / "spectrograms" / f"{pair.track}.png")
                    plotted += 1
                pending[pool.submit(score_track, task)] = pair.track
            while pending:
                if should_stop():
                    _cancel(pool, pending)
                    raise EvaluationCancelled("evaluation cancelled")
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _collect(done, pending, results, progress, total)

        ordered = [results[p.track] for p in pairs]
        for r in ordered:
            png = tmp / "spectrograms" / f"{r['track']}.png"
            r["spectrogram"] = f"spectrograms/{png.name}" if png.is_file() else None
        doc = report.build_report(
            report_id=report_id,
            tracks=ordered,
            provenance={
                "model": source.provenance() if source else None,
                "dataset": {"name": manifest.name, "version": manifest.version, "checksum": manifest.checksum,
                            "instrument": manifest.instrument, "rate_hz": manifest.rate,
                            "manifest": data.relative(manifest_path)},
                "code_version": code_version,
                "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
                "elapsed_seconds": round(time.time() - started, 3),
            },
            settings={**asdict(settings), "baselines": list(settings.baselines), "stft": stft.as_dict(),
                      "workers": workers, "channels": "mono downmix",
                      "metric": "mir_eval.separation.bss_eval_sources, compute_permutation=False",
                      "framewise_method": "museval v4: whole-track time-invariant filter, 1 window = "
                                          f"{settings.window_seconds:g} s, median over audible windows"},
        )
        report.write_report(tmp, doc)
    return {"report_id": report_id, "report_dir": str(target), "tracks": len(pairs),
            "scored": doc["counts"]["scored"], "skipped": doc["counts"]["skipped"], "absent": doc["counts"]["absent"],
            # Why, for the first few (all of them are in report.json).
            "skipped_tracks": doc["skipped"][:SHOWN_SKIPS],
            "medians": report.json_safe(doc["medians"]), "leakage": report.json_safe(doc["leakage"])}


def _prepare(data, pair, rate_hz, source, settings, stft, results) -> TrackTask | None:
    """Read and separate one track; record a skip (and return None) when it cannot be scored."""
    try:
        references = load_references(data, pair, rate_hz)
    except (AudioError, ManifestError) as e:
        results[pair.track] = _skipped(pair.track, f"cannot read the track: {e}")
        return None
    absent = metrics.is_absent(references, settings.silent_rms_dbfs)
    reason = None if absent else metrics.silent_reason(references, settings.silent_rms_dbfs)
    if reason is not None:
        # Skip before separating: a silent reference cannot be scored whatever the model does.
        results[pair.track] = _skipped(pair.track, reason, references.shape[1] / rate_hz)
        return None
    estimate = None
    if source is not None:
        mix = references[0] + references[1]
        try:
            instrument, rest = source.separate(mix, rate_hz, pair.track)
        except (MissingEstimateError, UnusableEstimateError) as e:
            results[pair.track] = _skipped(pair.track, str(e), references.shape[1] / rate_hz)
            return None
        estimate = np.stack([instrument, rest]).astype(np.float32)
    return TrackTask(track=pair.track, rate_hz=rate_hz, references=references, model_estimate=estimate,
                     baselines=settings.baselines, stft=stft, framewise=settings.framewise,
                     window_seconds=settings.window_seconds, silent_rms_dbfs=settings.silent_rms_dbfs,
                     absent=absent)


def _skipped(track: str, reason: str, seconds: float = 0.0) -> dict:
    return {"track": track, "seconds": seconds, "status": "skipped", "reason": reason, "methods": {}}


def _collect(done, pending, results, progress, total) -> None:
    for future in done:
        track = pending.pop(future)
        results[track] = future.result()
        progress(len(results), total, f"scored {track}")


def _cancel(pool: ProcessPoolExecutor, pending: dict) -> None:
    for future in pending:
        future.cancel()
    pool.shutdown(wait=True, cancel_futures=True)

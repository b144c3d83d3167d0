"""The evaluation job and the request checks done before it is queued. No gRPC here.

Requests travel as plain dicts (the job's params), so a job can be re-read from the job store.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.manifest import ManifestError, find_manifest, load_manifest
from services.common.paths import DataRoot
from services.evaluation import baselines as bl
from services.evaluation.evaluate import (
    EvaluationCancelled,
    EvaluationSettings,
    evaluate_dataset,
    new_report_id,
    select_pairs,
)
from services.evaluation.sources import open_source

JOB_KIND = "evaluation.evaluate"
SOURCE_KEYS = ("model", "run", "estimates_dir", "saved_model_dir")


def check_request(data: DataRoot, params: dict) -> dict:
    """Validate a request before queueing it; return the job's params with defaults filled in.

    Raises InvalidArgumentError / NotFoundError / FailedPreconditionError with a message a person can act on.
    """
    params = dict(params)
    if not params.get("dataset"):
        raise InvalidArgumentError("name a dataset (--dataset NAME[:VERSION])")
    version = int(params.get("dataset_version") or 0) or None
    settings = settings_from(params).validated()
    try:
        manifest = load_manifest(find_manifest(data, params["dataset"], version))
    except ManifestError as e:
        raise NotFoundError(str(e)) from e
    if not select_pairs(manifest.pairs, settings.split, settings.max_tracks):
        raise FailedPreconditionError(
            f"dataset {manifest.name} v{manifest.version} has no tracks in split {settings.split!r}")
    # Opening a source checks that it exists (files, folder, client) without loading a model.
    source = _source(data, params)
    if source is not None:
        try:
            source.verify()
        finally:
            source.close()
    params["dataset_version"] = manifest.version
    params["split"] = settings.split
    params["baselines"] = list(settings.baselines)
    params.setdefault("report_id", new_report_id(manifest.name))
    return params


def settings_from(params: dict) -> EvaluationSettings:
    return EvaluationSettings(
        split=params.get("split") or "validation",
        baselines=tuple(params.get("baselines") or bl.DEFAULT_BASELINES),
        framewise=bool(params.get("framewise", False)),
        window_seconds=float(params.get("window_seconds") or 1.0),
        max_tracks=int(params.get("max_tracks") or 0),
        workers=int(params.get("workers") or 0),
    )


def run_evaluation(data: DataRoot, params: dict, progress=None, should_stop=None) -> dict:
    """The job body: evaluate what `params` names and return the summary (report id, medians)."""
    source = _source(data, params)
    try:
        return evaluate_dataset(data, source, params["dataset"], int(params.get("dataset_version") or 0) or None,
                                settings=settings_from(params), report_id=params.get("report_id"),
                                progress=progress, should_stop=should_stop, code_version=code_version())
    finally:
        if source is not None:
            source.close()


def _source(data: DataRoot, params: dict):
    """The estimate source params name; None for a baselines-only evaluation."""
    named = {k: params.get(k) or "" for k in SOURCE_KEYS}
    if params.get("baselines_only"):
        if any(named.values()):
            raise InvalidArgumentError("baselines_only cannot be combined with a model source")
        return None
    return open_source(data, **named, serving_address=params.get("serving_address") or "localhost:8500",
                       overrides=params.get("overrides"))


def evaluation_job(ctx, params: dict) -> dict:
    """Job adapter: ctx.progress / ctx.cancelled in, JobCancelled out when asked to stop."""
    try:
        return run_evaluation(ctx.data, params, progress=lambda d, t, m="": ctx.progress(d, t, m),
                              should_stop=lambda: ctx.cancelled)
    except EvaluationCancelled:
        ctx.check_cancelled()
        raise


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (with +dirty) when running from a checkout."""
    try:
        from importlib.metadata import version

        base = version("stemlab")
    except Exception:
        base = "0.1.0"
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{base}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return base

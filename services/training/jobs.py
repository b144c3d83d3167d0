"""The training job kinds: job parameters (plain JSON) -> the trainer's domain functions.

Parameters are checked by `validate_*` when a request arrives (bad requests are refused at once)
and again by the job functions, since queued jobs survive restarts. Runs live in DATA/runs/<run_id>/.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.config import ConfigError, ModelConfig, config_from_dict, with_inference_overrides
from model.export import ExportError, check_ensemble, versions
from services.common import models_config
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.jobs import INTERRUPTED, QUEUED, RUNNING, JobStore
from services.common.manifest import ManifestError, find_manifest, load_manifest
from services.common.paths import DataRoot, PathError, parse_model_ref, safe_join, split_member
from services.training import export, trainer

log = logging.getLogger(__name__)

TRAIN = "training.train"
RESUME = "training.resume"
EXPORT = "training.export"
TRAINING_KINDS = (TRAIN, RESUME)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEFAULTS = {"preset": "thesis", "epochs": 36, "patience": 10, "seed": 0, "batch_size": 4, "steps_per_epoch": 1000}


def validate_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgumentError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def run_dir(data: DataRoot, run_id: str) -> Path:
    try:
        return safe_join(data.runs, validate_name(run_id, "run id"))
    except PathError as e:
        raise InvalidArgumentError(str(e)) from e


def existing_run(data: DataRoot, run_id: str) -> Path:
    path = run_dir(data, run_id)
    if not (path / trainer.RUN_FILE).is_file():
        raise NotFoundError(f"no training run {run_id!r}")
    return path


def exported_version(data: DataRoot, ref: str) -> tuple[str, Path]:
    """"guitar" or "guitar:6" -> ("guitar:6", DATA/models/guitar/6): the newest version when none is named."""
    try:
        name, version = parse_model_ref(ref)
        folder = safe_join(data.models, name)
    except (ValueError, PathError) as e:
        raise InvalidArgumentError(str(e)) from e
    found = versions(folder)
    if not found:
        raise NotFoundError(f"no exported model {name!r} in {data.models}")
    if version is None:
        version = found[-1]
    elif version not in found:
        raise NotFoundError(f"model {name!r} has no version {version} (it has {', '.join(map(str, found))})")
    return f"{name}:{version}", folder / str(version)


def exported_member(data: DataRoot, ref: str) -> tuple[str, Path, int | None]:
    """"guitar:10#2" -> ("guitar:10#2", DATA/models/guitar/10, 2): one network of an ensemble export;
    without "#MEMBER" the whole export (member None), the newest version when none is named."""
    try:
        model_ref, member = split_member(ref)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e
    resolved, path = exported_version(data, model_ref)
    return (f"{resolved}#{member}" if member else resolved), path, member


def init_source(data: DataRoot, params: dict) -> tuple[Path | None, int | None]:
    """The folder whose weights start a new run — a run (init_from) or an exported model
    (init_from_model, "NAME[:VERSION][#MEMBER]") — and the ensemble member to take (None: the first)."""
    if params.get("init_from") and params.get("init_from_model"):
        raise InvalidArgumentError("start from a run (init_from) or an exported model (init_from_model), not both")
    if params.get("init_from"):
        return existing_run(data, params["init_from"]), None
    if params.get("init_from_model"):
        _, path, member = exported_member(data, params["init_from_model"])
        return path, member
    return None, None


def new_run_id(dataset: str, preset: str) -> str:
    """<dataset>-<preset>-<UTC time>-<4 hex>: readable, sorted by time, unique within a second."""
    return f"{dataset}-{preset}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _manifest(data: DataRoot, params: dict) -> Path:
    try:
        return find_manifest(data, params["dataset"], params.get("dataset_version") or None)
    except ManifestError as e:
        raise NotFoundError(str(e)) from e


def validate_train(data: DataRoot, params: dict) -> dict:
    """Complete `params` with defaults and check them; returns the parameters a job will use."""
    params = {k: v for k, v in params.items() if v not in (None, "", 0) or k == "seed"}
    if params.get("init_from_model"):  # the version is fixed now: a job that restarts starts from the same
        params["init_from_model"] = exported_member(data, params["init_from_model"])[0]
    source, member = init_source(data, params)
    if source and not params.get("preset"):  # fine-tuning keeps the source's network unless told otherwise
        params["preset"] = trainer.source_preset(source, member) or DEFAULTS["preset"]
        params["overrides"] = {**trainer.source_network(source, params["preset"], member),
                               **(params.get("overrides") or {})}
    params = {**DEFAULTS, **params}
    validate_name(params.get("dataset", ""), "dataset name")
    params.setdefault("run_id", new_run_id(params["dataset"], params["preset"]))
    if (run_dir(data, params["run_id"]) / trainer.RUN_FILE).exists():
        raise FailedPreconditionError(f"run {params['run_id']} exists already; resume it or pick another id")
    for key in ("epochs", "patience", "batch_size", "steps_per_epoch"):
        if int(params[key]) < 1:
            raise InvalidArgumentError(f"{key} must be positive, got {params[key]}")
    if not 0 <= int(params["seed"]) < 2**32:
        raise InvalidArgumentError(f"seed must be between 0 and 2**32 - 1, got {params['seed']}")
    config, _ = trainer.split_overrides(params["preset"], params.get("overrides"))
    if source:
        trainer.check_init_from(source, config, member)
    manifest = _manifest(data, params)
    # Found only after the job had started and the run folder existed, which then kept the id.
    rate = int(load_manifest(manifest).rate)
    if rate != config.rate_hz:
        raise InvalidArgumentError(f"dataset {params['dataset']} is at {rate} Hz but the model runs at {config.rate_hz}"
                                   f" Hz: build the dataset at {config.rate_hz} Hz or pass --set rate_hz={rate}")
    return params


def validate_resume(data: DataRoot, params: dict) -> dict:
    path = existing_run(data, params.get("run_id", ""))
    for key in ("epochs", "patience"):
        if int(params.get(key) or 0) < 0:
            raise InvalidArgumentError(f"{key} must not be negative")
    done = int(trainer.read_run(path).get("epochs_completed") or 0)
    if 0 < int(params.get("epochs") or 0) <= done:
        # --epochs counts every epoch of the run: this one used to "succeed" doing nothing and
        # rewrite the run's target below what it had done.
        raise InvalidArgumentError(f"run {params['run_id']} has done {done} epochs already; --epochs counts them all, "
                                   f"so give more than {done}")
    if params.get("overrides"):
        info = trainer.read_run(path)
        trainer.apply_changes(config_from_dict(info["config"]), trainer.TrainingOptions(**info.get("options", {})),
                              params["overrides"])
    return params


def require_idle_run(store: JobStore, run_id: str) -> None:
    """Refuse a resume of a run that a queued or running job already trains (it used to queue a
    second job that then did nothing)."""
    active, _ = store.list(states=(QUEUED, RUNNING), page_size=1000)
    busy = [j.id for j in active if j.kind in TRAINING_KINDS and j.params.get("run_id") == run_id]
    if busy:
        raise FailedPreconditionError(f"run {run_id} is being trained by {busy[0]}; cancel it first "
                                      f"(stemlab jobs cancel {busy[0]}) to resume with other settings")


def validate_export(data: DataRoot, params: dict) -> dict:
    # No run: the exported models' networks alone, exported again (export.export_run).
    run_ids = [r for r in [params.get("run_id", ""), *(params.get("with_runs") or [])] if r]
    if not run_ids and not params.get("with_models"):
        raise InvalidArgumentError("nothing to export: name a run (run_id) or an exported model (with_models)")
    if len(set(run_ids)) != len(run_ids):
        raise InvalidArgumentError(f"an ensemble names each run once (got {run_ids})")
    paths = [existing_run(data, run_id) for run_id in run_ids]
    validate_name(params.get("model_name", ""), "model name")
    for run_id, path in zip(run_ids, paths, strict=True):
        if not (path / trainer.BEST_WEIGHTS).is_file():
            raise FailedPreconditionError(f"run {run_id} has no finished epoch to export yet")
    infos = [trainer.read_run(path) for path in paths]
    # export_run checks this too; here it fails the request instead of a queued job.
    instruments = {i for i in map(export.run_instrument, infos) if i}
    refs = [exported_member(data, ref) for ref in params.get("with_models") or []]
    params["with_models"] = [ref for ref, _, _ in refs]  # versions fixed now, as for init_from_model
    members = [m for _, path, member in refs for m in export.model_members(path, member)]
    taken = [tuple(m["from_model"].values()) for m in members]
    if len(set(taken)) != len(taken):
        raise InvalidArgumentError(f"an ensemble names each network once (got {params['with_models']})")
    infos += members
    instruments |= {m["instrument"] for m in members if m.get("instrument")}
    if len(instruments) > 1:
        raise InvalidArgumentError(f"an ensemble separates one instrument; these runs learnt {sorted(instruments)}")
    try:
        configs = [config_from_dict(info["config"]) for info in infos]
        with_inference_overrides(configs[0], params.get("overrides"))
        check_ensemble(configs)
    except ConfigError as e:
        raise InvalidArgumentError(str(e)) from e
    except ExportError as e:
        raise FailedPreconditionError(str(e)) from e
    validate_without_model(data, params, instruments, configs[0])
    return params


def validate_without_model(data: DataRoot, params: dict, instruments: set[str], config: ModelConfig) -> None:
    """params["without_model"] ("NAME[:VERSION]", the version fixed now): a whole exported model of
    another instrument, cutting the export's spectrogram and chunks."""
    if not params.get("without_model"):
        return
    resolved, path, member = exported_member(data, params["without_model"])
    if member:
        raise InvalidArgumentError(f"leave out a whole model, not one network ({params['without_model']})")
    params["without_model"] = resolved
    export.check_excluded(path, instruments, config)  # export_run checks again; here it fails the request


def resumable_runs(store: JobStore, data: DataRoot, max_attempts: int = 3) -> list[str]:
    """Runs whose latest training job was interrupted (service died or shut down) and are unfinished.

    Scans every training job, newest first; a run whose newest job is still queued needs nothing.
    A run whose last `max_attempts` jobs were all interrupted is left alone (logged): a run that
    takes the service down each time (out of memory) would otherwise do so at every start, and
    keep every other training off the service. `stemlab resume RUN` still tries it again.
    """
    recent: dict[str, list[Any]] = {}
    cursor = None
    while True:
        page, cursor = store.list(page_size=500, before_seq=cursor)
        for job in page:
            run_id = job.params.get("run_id") if job.kind in TRAINING_KINDS else None
            if run_id and len(recent.setdefault(run_id, [])) < max_attempts:
                recent[run_id].append(job)
        if cursor is None:
            break
    runs = []
    for run_id, jobs in recent.items():
        job = jobs[0]
        if job.state in (QUEUED, RUNNING) or not job.error.startswith(INTERRUPTED):
            continue
        if len(jobs) >= max_attempts and all(j.error.startswith(INTERRUPTED) for j in jobs):
            log.warning("run %s was interrupted %d times in a row: not resumed again (stemlab resume %s to try)",
                        run_id, max_attempts, run_id)
            continue
        try:
            state = trainer.read_run(run_dir(data, run_id)).get("state")
        except (NotFoundError, InvalidArgumentError):
            continue
        if state in ("running", "cancelled", "created"):
            runs.append(run_id)
    return sorted(runs)


class TrainingJobs:
    def __init__(self, data: DataRoot):
        self.data = data

    @staticmethod
    def _callbacks(ctx: Any) -> dict:
        return {"progress": ctx.progress, "should_stop": lambda: ctx.cancelled}

    def train(self, ctx: Any, params: dict) -> dict:
        params = validate_train(self.data, params)
        source, member = init_source(self.data, params)
        result = trainer.train_run(
            run_dir(self.data, params["run_id"]), _manifest(self.data, params), self.data.root,
            preset=params["preset"], overrides=params.get("overrides"), epochs=int(params["epochs"]),
            patience=int(params["patience"]), seed=int(params["seed"]), steps_per_epoch=int(params["steps_per_epoch"]),
            batch_size=int(params["batch_size"]),
            init_from=source, init_member=member,
            **self._callbacks(ctx))
        return {k: v for k, v in result.items() if k != "history"}

    def resume(self, ctx: Any, params: dict) -> dict:
        validate_resume(self.data, params)
        result = trainer.resume_run(existing_run(self.data, params["run_id"]), epochs=params.get("epochs") or None,
                                    patience=params.get("patience") or None, changes=params.get("overrides") or None,
                                    **self._callbacks(ctx))
        return {k: v for k, v in result.items() if k != "history"}

    def export(self, ctx: Any, params: dict) -> dict:
        validate_export(self.data, params)
        source = params.get("run_id") or ", ".join(params.get("with_models") or [])
        ctx.progress(0, 1, f"exporting {source} as {params['model_name']}")
        run = existing_run(self.data, params["run_id"]) if params.get("run_id") else None
        version = export.export_run(run, self.data.models, params["model_name"],
                                     params.get("overrides"),
                                     [existing_run(self.data, r) for r in params.get("with_runs") or []],
                                     [exported_member(self.data, r)[1:] for r in params.get("with_models") or []],
                                     exported_member(self.data, params["without_model"])[1]
                                     if params.get("without_model") else None)
        name = params["model_name"]
        served = self._serve(name)
        ctx.progress(1, 1, f"published {name} version {version}" + (f"; {served}" if served else ""))
        return {"model": name, "version": version, "path": str(self.data.models / name / str(version)),
                **({"serving": served} if served else {})}

    def _serve(self, name: str) -> str:
        """List a model exported under a new name in this data root's serving config, which the
        server re-reads; says what happened, or "" when there was nothing to do. The version is
        published either way, so a config that cannot be added to is reported, not failed on."""
        path = models_config.config_path(self.data.root)
        try:
            added = models_config.add_model(path, name, self.data.models / name)
        except (OSError, models_config.ModelsConfigError) as error:
            return f"not added to the serving config: {error}"
        return f"{name} added to the serving config {path}" if added else ""

    def kinds(self) -> dict:
        return {TRAIN: self.train, RESUME: self.resume, EXPORT: self.export}

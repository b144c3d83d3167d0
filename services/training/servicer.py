"""stemlab.v1.TrainingService: turn requests into job parameters, check them, start jobs, read runs."""

from __future__ import annotations

from services.common.server import Service, handle_errors, parse_overrides, to_struct
from services.training import jobs, trainer
from stemlab.v1 import training_pb2, training_pb2_grpc


def _summary(run_id: str, info: dict) -> training_pb2.RunSummary:
    manifest = info.get("manifest") or {}
    best = info.get("best_val_loss")
    return training_pb2.RunSummary(
        run_id=run_id, state=str(info.get("state", "")), preset=str(info.get("preset", "")),
        dataset=str(manifest.get("name", "")), dataset_version=int(manifest.get("version") or 0),
        epochs=int(info.get("epochs") or 0), epochs_completed=int(info.get("epochs_completed") or 0),
        best_epoch=int(info.get("best_epoch") or 0), best_val_loss=float(best) if best is not None else -1.0,
        created=str(info.get("created", "")), updated=str(info.get("updated", "")))


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, svc: Service):
        self.svc = svc

    @handle_errors
    def StartTraining(self, request, context):
        params = {
            "dataset": request.dataset, "dataset_version": request.dataset_version,
            "preset": request.preset, "overrides": parse_overrides(dict(request.overrides)),
            "epochs": request.epochs or jobs.DEFAULTS["epochs"], "patience": request.patience or jobs.DEFAULTS["patience"],
            "seed": request.seed, "batch_size": request.batch_size or jobs.DEFAULTS["batch_size"],
            "steps_per_epoch": request.steps_per_epoch or jobs.DEFAULTS["steps_per_epoch"],
        }
        if request.run_id:
            params["run_id"] = request.run_id
        if request.init_from:
            params["init_from"] = request.init_from
        if request.init_from_model:
            params["init_from_model"] = request.init_from_model
        params = jobs.validate_train(self.svc.data, params)
        return self.svc.submit(jobs.TRAIN, params)

    @handle_errors
    def ResumeTraining(self, request, context):
        params = {"run_id": request.run_id, "epochs": request.epochs, "patience": request.patience,
                  "overrides": parse_overrides(dict(request.overrides))}
        jobs.validate_resume(self.svc.data, params)
        jobs.require_idle_run(self.svc.store, params["run_id"])
        return self.svc.submit(jobs.RESUME, params)

    @handle_errors
    def ListRuns(self, request, context):
        runs = []
        if self.svc.data.runs.is_dir():
            for path in sorted(self.svc.data.runs.iterdir()):
                if (path / trainer.RUN_FILE).is_file():
                    runs.append(_summary(path.name, trainer.read_run(path)))
        return training_pb2.ListRunsResponse(runs=runs)

    @handle_errors
    def GetRun(self, request, context):
        path = jobs.existing_run(self.svc.data, request.run_id)
        info = trainer.read_run(path)
        history = [training_pb2.EpochRecord(**row) for row in trainer.read_history(path)]
        return training_pb2.Run(
            summary=_summary(request.run_id, info), history=history, config=to_struct(info.get("config") or {}),
            options=to_struct(info.get("options") or {}), patience=int(info.get("patience") or 0),
            seed=int(info.get("seed") or 0), batch_size=int(info.get("batch_size") or 0),
            steps_per_epoch=int(info.get("steps_per_epoch") or 0), code_version=str(info.get("code_version", "")),
            dataset_checksum=str((info.get("manifest") or {}).get("checksum", "")))

    @handle_errors
    def ExportModel(self, request, context):
        params = {"run_id": request.run_id, "model_name": request.model_name,
                  "overrides": parse_overrides(dict(request.overrides)), "with_runs": list(request.with_runs),
                  "with_models": list(request.with_models), "without_model": request.without_model}
        jobs.validate_export(self.svc.data, params)
        return self.svc.submit(jobs.EXPORT, params)

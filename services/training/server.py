"""Entry point of the training service: `python -m services.training.server`.

On start, every run whose training job was interrupted (the process died, or was shut down
mid-epoch) gets a resume job, so training continues from its last checkpoint by itself.
"""

from __future__ import annotations

import logging

from services.common.server import Service, run_service
from services.training import jobs
from services.training.servicer import TrainingServicer
from stemlab.v1 import training_pb2_grpc

log = logging.getLogger(__name__)


def build() -> Service:
    svc = Service("training")
    for kind, fn in jobs.TrainingJobs(svc.data).kinds().items():
        # An export takes seconds: it must not wait behind a training run that takes hours.
        svc.register_job(kind, fn, lane="export" if kind == jobs.EXPORT else "")
    svc.add_servicer(training_pb2_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(svc),
                     "stemlab.v1.TrainingService")
    for run_id in jobs.resumable_runs(svc.store, svc.data, svc.runner.settings.max_attempts):
        job = svc.runner.submit(jobs.RESUME, {"run_id": run_id, "epochs": 0, "patience": 0})
        log.info("run %s was interrupted: resuming it as job %s", run_id, job.id)
    return svc


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()

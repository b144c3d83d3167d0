"""Entry point of the processing service: `python -m services.processing.server`.

Settings (config file, services.processing.options): pool_workers — processes per job for the
per-track work (default: every core).
"""

from __future__ import annotations

from services.common.errors import InvalidArgumentError
from services.common.server import Service, run_service
from services.processing.jobs import ProcessingJobs
from services.processing.servicer import ProcessingServicer
from stemlab.v1 import processing_pb2_grpc


def build() -> Service:
    svc = Service("processing")
    pool_workers = svc.settings.options.get("pool_workers")
    if pool_workers is not None and (not isinstance(pool_workers, int) or not 1 <= pool_workers <= 256):
        raise InvalidArgumentError(f"services.processing.options.pool_workers must be 1..256, got {pool_workers!r}")
    for kind, fn in ProcessingJobs(svc.data, pool_workers).kinds().items():
        svc.register_job(kind, fn)
    svc.add_servicer(processing_pb2_grpc.add_ProcessingServiceServicer_to_server, ProcessingServicer(svc),
                     "stemlab.v1.ProcessingService")
    return svc


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()

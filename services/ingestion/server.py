"""Entry point of the ingestion service: `python -m services.ingestion.server`.

Settings (config file, services.ingestion.options): import_roots — a list of folders that
imports may read from (default: any folder the request names).
"""

from __future__ import annotations

from services.common.errors import InvalidArgumentError
from services.common.server import Service, run_service
from services.ingestion.jobs import IngestionJobs
from services.ingestion.servicer import DatasetServicer
from stemlab.v1 import ingestion_pb2_grpc


def build() -> Service:
    svc = Service("ingestion")
    roots = svc.settings.options.get("import_roots")
    if roots is not None and not (isinstance(roots, list) and all(isinstance(r, str) for r in roots)):
        raise InvalidArgumentError("services.ingestion.options.import_roots must be a list of folders")
    for kind, fn in IngestionJobs(svc.data, roots).kinds().items():
        svc.register_job(kind, fn)
    svc.add_servicer(ingestion_pb2_grpc.add_DatasetServiceServicer_to_server, DatasetServicer(svc, roots),
                     "stemlab.v1.DatasetService")
    return svc


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()

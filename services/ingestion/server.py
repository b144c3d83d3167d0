"""Entry point of the ingestion service: `python -m services.ingestion.server`.

Requests may read files in the data root and the import roots: the common `import_roots`
(STEMLAB_IMPORT_ROOTS) and services.ingestion.options.import_roots; nothing else.
Solo imports of links go through the web's egress guard: public addresses on ports 80 and 443,
unless services.ingestion.options.allow_hosts (STEMLAB_INGESTION_ALLOW_HOSTS, comma-separated
IPs or networks) or allow_ports say otherwise.
"""

from __future__ import annotations

import ipaddress
import os

from services.common.egress import DEFAULT_PORTS
from services.common.errors import InvalidArgumentError
from services.common.server import Service, run_service
from services.ingestion.jobs import IngestionJobs
from services.ingestion.servicer import DatasetServicer
from stemlab.v1 import ingestion_pb2_grpc


def egress_policy(options: dict) -> tuple[list[str], tuple[int, ...]]:
    """(allowed internal hosts, allowed ports) for links, from the options and the environment."""
    hosts = options.get("allow_hosts") or []
    if os.environ.get("STEMLAB_INGESTION_ALLOW_HOSTS"):
        hosts = [h.strip() for h in os.environ["STEMLAB_INGESTION_ALLOW_HOSTS"].split(",") if h.strip()]
    ports = options.get("allow_ports") or list(DEFAULT_PORTS)
    try:
        for host in hosts:
            ipaddress.ip_network(host, strict=False)
        ports = tuple(int(p) for p in ports)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"services.ingestion allow_hosts / allow_ports: {e}") from e
    return list(hosts), ports


def build() -> Service:
    svc = Service("ingestion")
    roots = svc.settings.options.get("import_roots")
    if roots is not None and not (isinstance(roots, list) and all(isinstance(r, str) for r in roots)):
        raise InvalidArgumentError("services.ingestion.options.import_roots must be a list of folders")
    roots = [*map(str, svc.config.import_roots), *(roots or [])]
    hosts, ports = egress_policy(svc.settings.options)
    for kind, fn in IngestionJobs(svc.data, roots, hosts, ports).kinds().items():
        svc.register_job(kind, fn)
    svc.add_servicer(ingestion_pb2_grpc.add_DatasetServiceServicer_to_server,
                     DatasetServicer(svc, roots, hosts, ports), "stemlab.v1.DatasetService")
    return svc


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()

"""Health probe for containers and scripts: exit 0 when the target answers healthy.

    python -m services.common.healthcheck grpc localhost:50051 [--service NAME]
    python -m services.common.healthcheck http http://localhost:8080/healthz
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def grpc_healthy(address: str, service: str = "", timeout: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.auth import open_channel
    from services.common.config import load_config

    try:  # health needs no token; TLS where the stack is configured for it
        with open_channel(address, ca_file=load_config().tls_client_ca) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=timeout)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["grpc", "http"])
    parser.add_argument("target", help="host:port for grpc, a URL for http")
    parser.add_argument("--service", default="", help="gRPC service name to check (default: overall)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    ok = (grpc_healthy(args.target, args.service, args.timeout) if args.kind == "grpc"
          else http_healthy(args.target, args.timeout))
    print("healthy" if ok else "not healthy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

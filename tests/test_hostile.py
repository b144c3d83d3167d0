"""Hostile inputs: what an attacker on the same network (or a careless upload) sends, each refused
with a clear error while the service stays up and nothing is lost. See docs/security.md.

Every case calls `tried(...)`; the count is printed in the pytest summary (tests/conftest.py).
"""

from __future__ import annotations

import os
import stat
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth
from stemlab.v1 import ingestion_pb2, ingestion_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.servicetools import ServiceProcess

TRIED: list[str] = []


def tried(what: str) -> None:
    """Count one hostile input (the summary prints how many were tried, all of them refused)."""
    TRIED.append(what)


def refused(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, (error.value.code(), error.value.details())
    for word in words:
        assert word in error.value.details(), error.value.details()
    return error.value.details()


# -- 1. authentication ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_token_service(tmp_path_factory):
    """An ingestion service whose token is the one it creates in its data root (no override)."""
    data = tmp_path_factory.mktemp("auth") / "data"
    with ServiceProcess("ingestion", data, env={"STEMLAB_TOKEN": ""}) as svc:
        yield svc, data


def test_a_service_creates_a_private_token_and_never_overwrites_it(own_token_service, monkeypatch):
    svc, data = own_token_service
    path = auth.token_path(data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = path.read_text()
    monkeypatch.delenv("STEMLAB_TOKEN")
    assert auth.ensure_token(data) == first.strip()  # a second start reads it, never replaces it
    assert path.read_text() == first


def test_concurrent_token_creation_agrees(tmp_path, monkeypatch):
    monkeypatch.delenv("STEMLAB_TOKEN")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(auth.ensure_token(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert [p.name for p in auth.token_path(tmp_path).parent.iterdir()] == ["token"]  # no temporary left


def test_unauthenticated_grpc_calls_are_refused(own_token_service):
    svc, data = own_token_service
    anonymous = grpc.insecure_channel(svc.address)
    wrong = auth.open_channel(svc.address, token="not-the-token-of-this-stack")
    dataset = ingestion_pb2_grpc.DatasetServiceStub(anonymous)
    jobs = jobs_pb2_grpc.JobsStub(anonymous)
    tried("ListTracks without a token")
    refused(lambda: dataset.ListTracks(ingestion_pb2.ListTracksRequest(), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED, "needs the stack's token", "no token")
    tried("ListTracks with a wrong token")
    refused(lambda: ingestion_pb2_grpc.DatasetServiceStub(wrong).ListTracks(ingestion_pb2.ListTracksRequest(), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED, "wrong token")
    tried("StartImport of a server path without a token")
    refused(lambda: dataset.StartImport(ingestion_pb2.ImportRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED)
    tried("CancelJob without a token")
    refused(lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(id="ingestion-x"), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED)
    tried("WatchJob (a stream) without a token")
    refused(lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(id="ingestion-x"), timeout=10)),
            grpc.StatusCode.UNAUTHENTICATED)
    tried("server reflection without a token")
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    refused(lambda: list(reflection_pb2_grpc.ServerReflectionStub(anonymous).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)),
            grpc.StatusCode.UNAUTHENTICATED)
    # Probes need no secret; the token of the data root opens everything else.
    status = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    owner = auth.open_channel(svc.address, token=auth.token_path(data).read_text().strip())
    assert ingestion_pb2_grpc.DatasetServiceStub(owner).ListTracks(ingestion_pb2.ListTracksRequest(), timeout=10).total == 0
    assert svc.proc.poll() is None

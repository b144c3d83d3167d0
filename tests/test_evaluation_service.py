"""The evaluation service as a real process, through gRPC and through `stemlab evaluate`."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from services.common.server import from_struct
from stemlab.v1 import evaluation_pb2, evaluation_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.evaluation_data import make_dataset, track_signals, write_estimates
from tests.servicetools import ServiceProcess, run_cli, wait_job


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tracks = {f"Song{i:02d}": track_signals(i, seconds=1.5) for i in range(2)}
    tracks["Quiet"] = (np.zeros_like(tracks["Song00"][0]), tracks["Song00"][1])
    make_dataset(root, tracks=tracks)
    # A so-so model: the true instrument plus a fifth of the rest.
    estimates = write_estimates(root / "estimates", {n: (i + 0.2 * r, None) for n, (i, r) in tracks.items()})
    with ServiceProcess("evaluation", root) as svc:
        yield svc, root, estimates


def test_an_evaluation_job_runs_in_the_service_and_publishes_a_report(service):
    svc, root, estimates = service
    stub = evaluation_pb2_grpc.EvaluationServiceStub(svc.channel())
    job = stub.StartEvaluation(evaluation_pb2.StartEvaluationRequest(
        estimates_dir=str(estimates), dataset="evalset", baselines=["mixture", "oracle", "hpss"]), timeout=30)
    assert job.id.startswith("evaluation-") and job.kind == "evaluation.evaluate"
    final = wait_job(svc.channel(), job.id, timeout=120)
    assert final.state == jobs_pb2.SUCCEEDED, final.error + svc.log()[-3000:]
    assert (final.progress.done, final.progress.total) == (3, 3)
    result = from_struct(final.result)
    assert (result["scored"], result["skipped"], result["absent"]) == (2, 0, 1)
    med = result["medians"]
    assert med["model"]["whole"]["instrument"]["sdr"] > med["mixture"]["whole"]["instrument"]["sdr"] + 5
    # The harmonic/percussive floor is scored beside the model on the same tracks.
    assert med["hpss"]["whole"]["tracks"] == 2 and np.isfinite(med["hpss"]["whole"]["instrument"]["sdr"])
    # Quiet has no instrument: the model returned a fifth of the rest, 20·log10(0.2) = -13.98 dB of
    # the mix's energy; HPSS returns the harmonic part of a harmonic signal, far more.
    leak = result["leakage"]
    assert leak["model"] == {"tracks": 1, "median_db": pytest.approx(20 * np.log10(0.2), abs=0.01),
                             "max_db": pytest.approx(20 * np.log10(0.2), abs=0.01)}
    assert leak["hpss"]["tracks"] == 1 and leak["hpss"]["median_db"] > leak["model"]["median_db"]
    share = med["model"]["whole"]["instrument"]["share"]
    assert 0 < share and med["mixture"]["whole"]["instrument"]["share"] == 0
    got = stub.GetReport(evaluation_pb2.GetReportRequest(id=result["report_id"]), timeout=10)
    doc = from_struct(got.report)
    quiet = next(t for t in doc["tracks"] if t["track"] == "Quiet")
    assert quiet["status"] == "absent" and set(quiet["methods"]) == {"model", "hpss"}
    assert "Median leakage (dB)" in got.markdown and "Share of the way" in got.markdown
    assert "| Track | Instrument SDR |" in got.markdown
    assert (root / "evaluations" / result["report_id"] / "report.html").is_file()
    listed = stub.ListReports(evaluation_pb2.ListReportsRequest(), timeout=10)
    assert result["report_id"] in [r.id for r in listed.reports]


@pytest.mark.parametrize("request_fields, code, words", [
    ({"estimates_dir": "/tmp/nonexistent-stemlab", "dataset": "evalset"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ({"model": "guitar:x", "dataset": "evalset"}, grpc.StatusCode.INVALID_ARGUMENT, "NAME:VERSION"),
    ({"run": "r1", "dataset": "nope"}, grpc.StatusCode.NOT_FOUND, "no dataset named 'nope'"),
    ({"dataset": "evalset"}, grpc.StatusCode.INVALID_ARGUMENT, "name what to evaluate"),
    ({"baselines_only": True, "dataset": "evalset", "baselines": ["wiener"]},
     grpc.StatusCode.INVALID_ARGUMENT, "unknown baselines"),
    ({"baselines_only": True, "dataset": "evalset", "split": "train"},
     grpc.StatusCode.FAILED_PRECONDITION, "no tracks in split 'train'"),
    ({"estimates_dir": "/tmp", "dataset": "evalset", "overrides": {"mask_exponent": "0.5"}},
     grpc.StatusCode.INVALID_ARGUMENT, "apply to a training run or a SavedModel folder only"),
    ({"estimates_dir": "/tmp", "dataset": "evalset", "overrides": {"mask_exponent": "[1"}},
     grpc.StatusCode.INVALID_ARGUMENT, "override mask_exponent: cannot read"),
])
def test_bad_requests_get_a_status_and_the_service_stays_up(service, request_fields, code, words):
    svc, _, _ = service
    stub = evaluation_pb2_grpc.EvaluationServiceStub(svc.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.StartEvaluation(evaluation_pb2.StartEvaluationRequest(**request_fields), timeout=30)
    assert err.value.code() == code and words in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetReport(evaluation_pb2.GetReportRequest(id="../etc"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_evaluates_and_compares(service, tmp_path):
    svc, root, estimates = service
    first = run_cli("evaluate", "--estimates", str(estimates), "--dataset", "evalset:1", "--baselines", "mixture",
                    "--framewise", "--json", "--address", svc.address)
    assert first.returncode == 0, first.stderr
    job = json.loads(first.stdout)
    assert job["state"] == "SUCCEEDED"
    first_id = job["result"]["report_id"]
    assert job["result"]["medians"]["model"]["framewise"]["tracks"] == 2

    # Without --json: progress lines on stderr, then the medians table and the report's path.
    second = run_cli("evaluate", "--baselines-only", "--dataset", "evalset", "--baselines", "mixture,oracle",
                     "--max-tracks", "2", "--address", svc.address)
    assert second.returncode == 0, second.stderr
    assert "SUCCEEDED" in second.stderr
    assert "| oracle ratio mask |" in second.stdout and "| model" not in second.stdout
    path_line = next(line for line in second.stdout.splitlines() if line.startswith("report: "))
    second_id = path_line.split()[1].split("/")[-2]
    assert (root / "evaluations" / second_id / "report.md").is_file()

    # A by id (the service reads it), B by folder path (the CLI reads it and sends its content).
    compared = run_cli("evaluate", "--compare", first_id, str(root / "evaluations" / second_id),
                       "--address", svc.address)
    assert compared.returncode == 0, compared.stderr
    assert f"A = {first_id}, B = {second_id}" in compared.stdout
    assert "| mixture | whole | instrument | SDR |" in compared.stdout

    as_json = run_cli("evaluate", "--compare", first_id, second_id, "--json", "--address", svc.address)
    rows = json.loads(as_json.stdout)["comparison"]["rows"]
    mixture_sdr = next(r for r in rows if (r["method"], r["kind"], r["source"], r["metric"])
                       == ("mixture", "whole", "instrument", "sdr"))
    assert mixture_sdr["a"] is not None and mixture_sdr["b"] is not None

    missing = run_cli("evaluate", "--compare", first_id, "no-such-report", "--address", svc.address)
    assert missing.returncode == 2 and "no evaluation report 'no-such-report'" in missing.stderr
    no_source = run_cli("evaluate", "--dataset", "evalset", "--address", svc.address)
    assert no_source.returncode == 2 and "say what to evaluate" in no_source.stderr


def test_a_cancelled_evaluation_publishes_no_report(service):
    svc, root, estimates = service
    stub = evaluation_pb2_grpc.EvaluationServiceStub(svc.channel())
    job = stub.StartEvaluation(evaluation_pb2.StartEvaluationRequest(
        estimates_dir=str(estimates), dataset="evalset", framewise=True, baselines=["oracle", "hpss"]), timeout=30)
    report_id = from_struct(job.params)["report_id"]
    jobs_pb2_grpc.JobsStub(svc.channel()).CancelJob(jobs_pb2.CancelJobRequest(id=job.id), timeout=10)
    final = wait_job(svc.channel(), job.id, timeout=120)
    assert final.state == jobs_pb2.CANCELLED, final.error
    assert not (root / "evaluations" / report_id).exists()
    assert not [p for p in (root / "evaluations").iterdir() if p.name.startswith(".tmp-")]

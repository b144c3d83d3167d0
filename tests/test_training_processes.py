"""Training in processes of its own: the foreground runner killed with -9 and resumed, two workers
with TF_CONFIG training one step together, and the gRPC service crashing mid-run and resuming."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.checkpoint import read_run
from services.training.trainer import read_history, train_run
from tests.polling import wait_until
from tests.training_data import FAST, make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, make_dataset(root)


# ---- processes: kill -9 and multi-worker ------------------------------------------------------

_CHILD = """
import json, sys
from services.training.trainer import train_run
args = json.loads(sys.argv[1])
result = train_run(**args)
print("RESULT " + json.dumps({k: result[k] for k in ("state", "epochs_completed", "global_step", "history")}))
"""


def _child_env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **extra}


@pytest.mark.slow
def test_kill_9_mid_training_then_restart_resumes_from_the_checkpoint(dataset, tmp_path):
    root, manifest = dataset
    run_dir = root / "runs" / "killed"
    # The foreground runner (what the Kubernetes job runs), killed without warning.
    command = [sys.executable, "-m", "services.training.run", "--data", str(root), "--dataset", "synth",
               "--run", "killed", "--epochs", "40", "--preset", FAST["preset"],
               "--steps-per-epoch", str(FAST["steps_per_epoch"]), "--batch-size", str(FAST["batch_size"]),
               "--seed", str(FAST["seed"]), "--patience", str(FAST["patience"])]
    child = subprocess.Popen(command, cwd=ROOT, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def two_epochs() -> bool:
            assert child.poll() is None, "training process ended early"
            return len(read_history(run_dir)) >= 2

        wait_until(two_epochs, 90, 0.2, "no epoch finished in time")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = read_history(run_dir)
    assert read_run(run_dir)["state"] == "running"  # it died without a word
    target = len(before) + 2
    result = train_run(run_dir, manifest, root, epochs=target, **{k: v for k, v in FAST.items()})
    epochs = [row["epoch"] for row in result["history"]]
    assert epochs == list(range(1, target + 1))  # continued, not restarted from zero
    assert result["history"][: len(before)] == before[: len(before)]
    assert result["global_step"] == target * FAST["steps_per_epoch"]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_with_tf_config_train_one_step_together(dataset, tmp_path):
    root, manifest = dataset
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    children = []
    for index in range(2):
        args = {"run_dir": str(tmp_path / "run"), "manifest_path": str(manifest), "data_root": str(root),
                "epochs": 1, "preset": "tiny", "steps_per_epoch": 1, "batch_size": 2, "seed": 1}
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        children.append(subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)],
                                         env=_child_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    outputs = []
    for child in children:
        try:
            out, err = child.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            pytest.fail("multi-worker training did not finish")
        assert child.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.split("RESULT ", 1)[1]))
    assert all(o["state"] == "completed" and o["global_step"] == 1 for o in outputs)
    # One step of one model: both workers report the same all-reduced training loss.
    assert outputs[0]["history"][0]["loss"] == pytest.approx(outputs[1]["history"][0]["loss"], rel=1e-5)
    # Gradients are all-reduced, so weights agree; batch-norm moving statistics are each worker's own
    # (its local batch), so the inference-mode validation loss agrees only closely.
    assert outputs[0]["history"][0]["val_loss"] == pytest.approx(outputs[1]["history"][0]["val_loss"], rel=2e-2)
    assert read_history(tmp_path / "run")[0]["epoch"] == 1  # only the chief wrote the run folder
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["state"] == "completed"


# ---- the gRPC service ---------------------------------------------------------------------------


@pytest.mark.slow
def test_service_trains_resumes_after_a_crash_and_exports(tmp_path):
    import grpc

    from services.common import models_config
    from stemlab.v1 import jobs_pb2, jobs_pb2_grpc, training_pb2, training_pb2_grpc
    from tests.servicetools import ServiceProcess, wait_job

    make_dataset(tmp_path)
    served = models_config.config_path(tmp_path)  # as `make up` writes it: the shipped names
    served.parent.mkdir()
    served.write_text(models_config.render({n: tmp_path / "models" / n for n in ("guitar", "piano")}))
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    service = ServiceProcess("training", tmp_path, env=env).start()
    try:
        with service.channel() as channel:
            training, job_stub = training_pb2_grpc.TrainingServiceStub(channel), jobs_pb2_grpc.JobsStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                training.StartTraining(training_pb2.StartTrainingRequest(dataset="nope", preset="tiny"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                training.StartTraining(training_pb2.StartTrainingRequest(dataset="synth", preset="tiny",
                                                                         overrides={"filterz": "3"}))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "filterz" in e.value.details()
            job = training.StartTraining(training_pb2.StartTrainingRequest(
                dataset="synth", preset="tiny", run_id="r1", epochs=400, patience=400, steps_per_epoch=8, batch_size=8,
                seed=1, overrides={"hourglass_filters": "6"}))
            assert job.kind == "training.train"
            run_dir = tmp_path / "runs" / "r1"
            wait_until(lambda: len(read_history(run_dir)) >= 2, 120, 0.2, lambda: service.log()[-3000:])
        service.kill()  # kill -9: the job stays RUNNING in the store, the run mid-epoch
        service.proc.wait()
        before = read_history(run_dir)

        service = ServiceProcess("training", tmp_path, port=service.port, env=env).start()
        with service.channel() as channel:
            training, job_stub = training_pb2_grpc.TrainingServiceStub(channel), jobs_pb2_grpc.JobsStub(channel)
            assert job_stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).error == "interrupted"
            resumes = job_stub.ListJobs(jobs_pb2.ListJobsRequest(kind="training.resume")).jobs
            assert len(resumes) == 1 and resumes[0].params["run_id"] == "r1"
            wait_until(lambda: len(read_history(run_dir)) >= len(before) + 1, 120, 0.2,
                       lambda: service.log()[-3000:])
            # The one worker is busy training; an export has a lane of its own and does not wait for it.
            export = training.ExportModel(training_pb2.ExportModelRequest(run_id="r1", model_name="guitar"))
            done = wait_job(job_stub, export.id, states=(jobs_pb2.SUCCEEDED, jobs_pb2.FAILED))
            assert done.state == jobs_pb2.SUCCEEDED, done.error
            assert done.result["version"] == 1 and (tmp_path / "models" / "guitar" / "1" / "saved_model.pb").is_file()
            assert "serving" not in done.result  # already served
            assert job_stub.GetJob(jobs_pb2.GetJobRequest(id=resumes[0].id)).state == jobs_pb2.RUNNING
            job_stub.CancelJob(jobs_pb2.CancelJobRequest(id=resumes[0].id))
            wait_job(job_stub, resumes[0].id, states=(jobs_pb2.CANCELLED,))

            run = training.GetRun(training_pb2.GetRunRequest(run_id="r1"))
            epochs = [h.epoch for h in run.history]
            assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > len(before)
            assert run.history[0].loss == pytest.approx(before[0]["loss"])  # continued, not restarted
            assert run.summary.state == "cancelled" and run.config["hourglass_filters"] == 6
            assert [r.run_id for r in training.ListRuns(training_pb2.ListRunsRequest()).runs] == ["r1"]

            with pytest.raises(grpc.RpcError) as e:  # refused before a job starts: it would not fit the weights
                training.ExportModel(training_pb2.ExportModelRequest(
                    run_id="r1", model_name="guitar", overrides={"hourglass_filters": "4"}))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot change after training" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:  # resuming may change how it steps, not the network
                training.ResumeTraining(training_pb2.ResumeTrainingRequest(
                    run_id="r1", overrides={"hourglass_filters": "4"}))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot change when resuming" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                training.GetRun(training_pb2.GetRunRequest(run_id="../r1"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # Fine-tuning the exported model: its network by default (its preset and settings, here
            # 6 hourglass filters where the preset has 8); asking for another is refused.
            with pytest.raises(grpc.RpcError) as e:
                training.StartTraining(training_pb2.StartTrainingRequest(dataset="synth", init_from_model="guitar:5"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "has no version 5" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                training.StartTraining(training_pb2.StartTrainingRequest(
                    dataset="synth", init_from_model="guitar", overrides={"hourglass_filters": "4"}))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "model guitar version 1 has another network" in e.value.details() and "hourglass_filters" in e.value.details()
            tune = training.StartTraining(training_pb2.StartTrainingRequest(
                dataset="synth", run_id="r2", init_from_model="guitar", epochs=1, steps_per_epoch=2, batch_size=8))
            done = wait_job(job_stub, tune.id, states=(jobs_pb2.SUCCEEDED, jobs_pb2.FAILED))
            assert done.state == jobs_pb2.SUCCEEDED, done.error
            assert done.params["init_from_model"] == "guitar:1" and done.params["preset"] == "tiny"
            assert read_run(tmp_path / "runs" / "r2")["init_from"]["model"] == "guitar"
            assert read_run(tmp_path / "runs" / "r2")["config"]["hourglass_filters"] == 6
            export = training.ExportModel(training_pb2.ExportModelRequest(run_id="r2", model_name="tuned"))
            done = wait_job(job_stub, export.id, states=(jobs_pb2.SUCCEEDED, jobs_pb2.FAILED))
            assert done.state == jobs_pb2.SUCCEEDED and "tuned added to the serving config" in done.result["serving"]
            assert 'name: "tuned"' in served.read_text() and 'name: "guitar"' in served.read_text()
            provenance = json.loads((tmp_path / "models" / "tuned" / "1" / "assets.extra" / "stemlab.json").read_text())
            assert (provenance["init_from"]["model"], provenance["init_from"]["version"]) == ("guitar", 1)
            # The fine-tune beside the network it started from, in one model; the version is fixed in the job.
            export = training.ExportModel(training_pb2.ExportModelRequest(
                run_id="r2", model_name="tuned", with_models=["guitar#1"]))
            done = wait_job(job_stub, export.id, states=(jobs_pb2.SUCCEEDED, jobs_pb2.FAILED))
            assert done.state == jobs_pb2.SUCCEEDED and list(done.params["with_models"]) == ["guitar:1#1"], done.error
            provenance = json.loads((tmp_path / "models" / "tuned" / "2" / "assets.extra" / "stemlab.json").read_text())
            assert [m["source_run"] for m in provenance["members"]] == ["r2", "r1"]
            assert served.read_text().count('name: "tuned"') == 1
            with pytest.raises(grpc.RpcError) as e:  # leaving a model out: another instrument's only
                training.ExportModel(training_pb2.ExportModelRequest(run_id="r2", model_name="tuned",
                                                                     without_model="guitar"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "separates guitar too" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                training.StartTraining(training_pb2.StartTrainingRequest(dataset="synth", init_from_model="tuned:2#3"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no member 3" in e.value.details()
    finally:
        service.kill()

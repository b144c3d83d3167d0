"""The service runtime every stemlab service stands on: health, jobs, restarts, shutdown."""

import sqlite3
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from stemlab.v1 import jobs_pb2, jobs_pb2_grpc
from tests.fixtures.demo_service import submit
from tests.polling import wait_until
from tests.servicetools import REPO, ServiceProcess, health_status, run_cli, wait_job

DEMO = "tests.fixtures.demo_service"


@pytest.fixture
def service(tmp_path):
    with ServiceProcess("ingestion", tmp_path / "data", module=DEMO,
                        env={"STEMLAB_GRACE_SECONDS": "5"}) as svc:
        yield svc


def test_service_is_healthy_and_runs_a_job_while_a_watcher_sees_progress(service):
    assert health_status(service.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(service.address, "stemlab.v1.Jobs") == health_pb2.HealthCheckResponse.SERVING
    ch = service.channel()
    job_id = submit(ch, "demo.count", steps=20, seconds_per_step=0.05)
    assert job_id.startswith("ingestion-")
    stub = jobs_pb2_grpc.JobsStub(ch)
    seen = list(stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=30))
    assert seen[-1].state == jobs_pb2.SUCCEEDED
    assert seen[-1].result["counted"] == 20
    fractions = [j.progress.fraction for j in seen if j.state == jobs_pb2.RUNNING]
    assert len(fractions) >= 10, "the watcher should see (nearly) every progress update"
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]
    assert seen[-1].started.seconds > 0 and seen[-1].finished.seconds > 0


def test_several_watchers_at_once_all_see_the_end(service):
    ch = service.channel()
    job_id = submit(ch, "demo.count", steps=10, seconds_per_step=0.05)
    stub = jobs_pb2_grpc.JobsStub(ch)
    finals = []

    def watch():
        finals.append(list(stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=30))[-1].state)

    threads = [threading.Thread(target=watch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert finals == [jobs_pb2.SUCCEEDED] * 4


def test_cancel_reaches_a_running_job_within_two_seconds(service):
    ch = service.channel()
    job_id = submit(ch, "demo.count", steps=1000, seconds_per_step=0.1)
    stub = jobs_pb2_grpc.JobsStub(ch)
    wait_job(stub, job_id, timeout=10, states=(jobs_pb2.RUNNING,))
    t0 = time.time()
    stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id))
    job = wait_job(ch, job_id, timeout=5)
    assert job.state == jobs_pb2.CANCELLED
    assert time.time() - t0 < 2.0


def test_a_failing_job_is_recorded_and_the_service_keeps_serving(service):
    ch = service.channel()
    job = wait_job(ch, submit(ch, "demo.fail"))
    assert job.state == jobs_pb2.FAILED and "always fails" in job.error
    assert wait_job(ch, submit(ch, "demo.count", steps=2)).state == jobs_pb2.SUCCEEDED


def test_bad_requests_get_clear_status_codes_and_the_service_keeps_serving(service):
    stub = jobs_pb2_grpc.JobsStub(service.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.GetJob(jobs_pb2.GetJobRequest(id="ingestion-doesnotexist"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "doesnotexist" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=-1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ListJobs(jobs_pb2.ListJobsRequest(states=[42]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "state" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.WatchJob(jobs_pb2.WatchJobRequest(id="nope")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.CancelJob(jobs_pb2.CancelJobRequest(id=""))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_status(service.address) == health_pb2.HealthCheckResponse.SERVING


def test_list_jobs_filters_and_pages(service):
    ch = service.channel()
    ids = [submit(ch, "demo.count", steps=1, seconds_per_step=0.0) for _ in range(5)]
    failed = submit(ch, "demo.fail")
    for i in [*ids, failed]:
        wait_job(ch, i)
    stub = jobs_pb2_grpc.JobsStub(ch)
    got, token = [], ""
    while True:
        page = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2, page_token=token, kind="demo.count"))
        assert len(page.jobs) <= 2
        got.extend(j.id for j in page.jobs)
        token = page.next_page_token
        if not token:
            break
    assert got == list(reversed(ids)), "newest first, every job exactly once"
    failed_only = stub.ListJobs(jobs_pb2.ListJobsRequest(states=[jobs_pb2.FAILED])).jobs
    assert [j.id for j in failed_only] == [failed]


def test_kill_9_mid_job_then_restart_marks_it_interrupted_and_keeps_every_other_job(tmp_path):
    data = tmp_path / "data"
    svc = ServiceProcess("ingestion", data, module=DEMO).start()
    ch = svc.channel()
    done = [submit(ch, "demo.count", steps=2, seconds_per_step=0.0) for _ in range(3)]
    for i in done:
        wait_job(ch, i)
    failed = submit(ch, "demo.fail")
    wait_job(ch, failed)
    running = submit(ch, "demo.count", steps=10000, seconds_per_step=0.1)
    stub = jobs_pb2_grpc.JobsStub(ch)
    # Mid-job: running, with some progress recorded.
    wait_until(lambda: wait_job(stub, running, states=(jobs_pb2.RUNNING,)).progress.done >= 2, timeout=10)
    svc.kill()
    ch.close()

    with ServiceProcess("ingestion", data, module=DEMO) as again:
        stub = jobs_pb2_grpc.JobsStub(again.channel())
        job = stub.GetJob(jobs_pb2.GetJobRequest(id=running))
        assert job.state == jobs_pb2.FAILED and job.error == "interrupted"
        states = {j.id: j.state for j in stub.ListJobs(jobs_pb2.ListJobsRequest()).jobs}
        assert {i: states[i] for i in done} == {i: jobs_pb2.SUCCEEDED for i in done}
        assert states[failed] == jobs_pb2.FAILED
        assert len(states) == 5
    rows = sqlite3.connect(data / "jobs" / "ingestion.sqlite").execute("SELECT count(*) FROM jobs").fetchone()
    assert rows[0] == 5


def test_sigterm_turns_health_not_serving_and_exits_cleanly(tmp_path):
    svc = ServiceProcess("ingestion", tmp_path / "data", module=DEMO,
                         env={"STEMLAB_GRACE_SECONDS": "3"}).start()
    ch = svc.channel()
    job_id = submit(ch, "demo.count", steps=10000, seconds_per_step=0.1)
    wait_job(ch, job_id, timeout=10, states=(jobs_pb2.RUNNING,))
    from grpc_health.v1 import health_pb2_grpc

    health = health_pb2_grpc.HealthStub(ch)
    statuses = []

    def watch_health():
        try:
            for r in health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10):
                statuses.append(r.status)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=watch_health)
    t.start()
    wait_until(lambda: statuses, timeout=10)  # the watch has begun: its first status arrived
    t0 = time.time()
    svc.terminate()
    rc = svc.proc.wait(10)
    t.join(5)
    assert rc == 0
    assert time.time() - t0 < 3 + 3
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    with ServiceProcess("ingestion", tmp_path / "data", module=DEMO) as again:
        job = jobs_pb2_grpc.JobsStub(again.channel()).GetJob(jobs_pb2.GetJobRequest(id=job_id))
        assert job.state == jobs_pb2.FAILED and job.error.startswith("interrupted")


def test_a_second_copy_on_the_same_data_root_or_port_refuses_to_start_and_the_first_keeps_its_job(tmp_path):
    with ServiceProcess("ingestion", tmp_path / "data", module=DEMO) as first:
        ch = first.channel()
        job_id = submit(ch, "demo.count", steps=150, seconds_per_step=0.1)
        jobs = jobs_pb2_grpc.JobsStub(ch)
        wait_job(jobs, job_id, timeout=10, states=(jobs_pb2.RUNNING,))
        # Same data root, another port: it must not take the running job for a dead one.
        same_root = ServiceProcess("ingestion", tmp_path / "data", module=DEMO)
        assert same_root.run_to_exit() == 1
        assert f"run by another process (pid {first.proc.pid})" in same_root.log()
        # Another data root, the same port: it must not share the port (gRPC would, by default).
        same_port = ServiceProcess("ingestion", tmp_path / "other", port=first.port, module=DEMO)
        assert same_port.run_to_exit() == 1
        assert f"cannot listen on port {first.port}" in same_port.log()
        assert jobs.GetJob(jobs_pb2.GetJobRequest(id=job_id)).state == jobs_pb2.RUNNING
        done = wait_job(ch, job_id)
        assert done.state == jobs_pb2.SUCCEEDED, done.error
        assert health_status(first.address) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("wind_down", [0.5, 5.0])
def test_a_job_cancelled_just_before_a_shutdown_stays_cancelled(tmp_path, wind_down):
    """Within the grace period or past it, a job the user cancelled is CANCELLED, never
    "interrupted" (which the training service resumes at its next start)."""
    svc = ServiceProcess("ingestion", tmp_path / "data", module=DEMO, env={"STEMLAB_GRACE_SECONDS": "2"}).start()
    ch = svc.channel()
    job_id = submit(ch, "demo.slow_stop", wind_down=wind_down)
    stub = jobs_pb2_grpc.JobsStub(ch)
    wait_job(stub, job_id, timeout=10, states=(jobs_pb2.RUNNING,))
    stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id))
    svc.terminate()
    assert svc.proc.wait(10) == 0
    with ServiceProcess("ingestion", tmp_path / "data", module=DEMO) as again:
        job = jobs_pb2_grpc.JobsStub(again.channel()).GetJob(jobs_pb2.GetJobRequest(id=job_id))
        assert job.state == jobs_pb2.CANCELLED and job.error == "", (job.state, job.error)


def test_cli_lists_gets_and_reports_errors_as_one_line(service):
    ch = service.channel()
    job_id = submit(ch, "demo.count", steps=2, seconds_per_step=0.0)
    wait_job(ch, job_id)
    env = {"STEMLAB_INGESTION_ADDRESS": service.address}
    r = run_cli("jobs", "get", job_id, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert '"SUCCEEDED"' in r.stdout
    r = run_cli("jobs", "watch", job_id, env=env)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout
    r = run_cli("jobs", "list", "--service", "ingestion", env=env)
    assert r.returncode == 0 and job_id in r.stdout
    r = run_cli("jobs", "get", "ingestion-unknown", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not_found" in r.stderr
    r = run_cli("jobs", "get", "ingestion-x", env={"STEMLAB_INGESTION_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 2 and "unreachable" in r.stderr and r.stderr.count("\n") == 1
    # A second stack started on other ports (STEMLAB_<SERVICE>_PORT, as `make up` reads them) is
    # the one the CLI reaches with the same variables — not the default ports' stack.
    port = service.address.rsplit(":", 1)[1]
    r = run_cli("jobs", "get", job_id, env={"STEMLAB_INGESTION_ADDRESS": "", "STEMLAB_INGESTION_PORT": port})
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stderr


def test_a_job_result_prints_whole_numbers_as_integers():
    """A script reading `stemlab export --json` builds models/<name>/<version>: 2, never 2.0."""
    from services.common.cliutil import message_to_dict
    from stemlab.v1 import jobs_pb2

    job = jobs_pb2.Job(id="training-1")
    job.result.update({"version": 2, "best_val_loss": 0.25, "members": [{"epoch": 3.0}], "path": "models/x/2"})
    assert message_to_dict(job)["result"] == {"version": 2, "best_val_loss": 0.25, "members": [{"epoch": 3}],
                                              "path": "models/x/2"}
    assert isinstance(message_to_dict(job)["result"]["version"], int)


def test_clients_default_to_the_configured_ports(monkeypatch):
    from services.common.cliutil import CliError, default_address
    from services.serving import client

    for name in ("TRAINING", "SERVING", "SERVING_REST"):
        monkeypatch.delenv(f"STEMLAB_{name}_ADDRESS", raising=False)
    monkeypatch.delenv("STEMLAB_CONFIG", raising=False)
    monkeypatch.setenv("STEMLAB_TRAINING_PORT", "51253")
    monkeypatch.setenv("STEMLAB_SERVING_PORT", "51260")
    monkeypatch.setenv("STEMLAB_SERVING_REST_PORT", "51261")
    assert default_address("training") == "localhost:51253"
    assert (client.default_address("grpc"), client.default_address("rest")) == ("localhost:51260", "localhost:51261")
    monkeypatch.setenv("STEMLAB_TRAINING_ADDRESS", "elsewhere:1")  # an address, where given, wins
    assert default_address("training") == "elsewhere:1"
    monkeypatch.delenv("STEMLAB_TRAINING_PORT")
    monkeypatch.delenv("STEMLAB_TRAINING_ADDRESS")
    assert default_address("training") == "localhost:50053"
    # A port that is no port is an error with its name, never a silent fall back to the defaults.
    monkeypatch.setenv("STEMLAB_TRAINING_PORT", "5125x")
    with pytest.raises(CliError, match="STEMLAB_TRAINING_PORT='5125x' is not a whole number"):
        default_address("training")
    with pytest.raises(ValueError, match="STEMLAB_TRAINING_PORT"):
        client.default_address("grpc")
    r = run_cli("jobs", "list", "--service", "training", env={"STEMLAB_TRAINING_PORT": "5125x"})
    assert r.returncode == 2 and "invalid configuration" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_once_the_store_records_a_jobs_end_the_runner_never_shows_it_running(tmp_path):
    """get() reads the live record, then the store: a live record outliving the store's "ended"
    showed a finished job running again to GetJob/ListJobs for a moment."""
    from services.common.jobs import SUCCEEDED, JobRunner, JobStore

    runner = JobRunner(JobStore(tmp_path / "jobs.sqlite"), "demo", workers=1)
    runner.register("demo.quick", lambda ctx, params: {"done": True})
    seen_after_end = []
    finish = runner.store.finish

    def finish_then_read(job_id, worker, **fields):
        ended = finish(job_id, worker, **fields)
        seen_after_end.append(runner.get(job_id).state)  # what a reader sees right after the write
        return ended

    runner.store.finish = finish_then_read
    runner.start()
    try:
        job = runner.submit("demo.quick")
        wait_until(lambda: runner.get(job.id).state == SUCCEEDED, timeout=10, interval=0.02)
        assert seen_after_end == [SUCCEEDED]
    finally:
        runner.shutdown(5)


def test_a_kind_in_its_own_lane_does_not_wait_behind_long_jobs(tmp_path):
    """An export takes seconds; with one worker busy for hours on a training run it must still run."""
    from services.common.jobs import QUEUED, RUNNING, SUCCEEDED, JobRunner, JobStore

    runner = JobRunner(JobStore(tmp_path / "jobs.sqlite"), "demo", workers=1)
    release = threading.Event()
    runner.register("demo.long", lambda ctx, params: {"released": release.wait(30)})
    runner.register("demo.quick", lambda ctx, params: {"done": True}, lane="quick")
    runner.start()
    try:
        running, waiting = runner.submit("demo.long"), runner.submit("demo.long")
        wait_until(lambda: runner.get(running.id).state == RUNNING, timeout=10, interval=0.02)
        quick = runner.submit("demo.quick")
        wait_until(lambda: runner.get(quick.id).state == SUCCEEDED, timeout=10, interval=0.02)
        assert runner.get(quick.id).state == SUCCEEDED and runner.get(quick.id).result == {"done": True}
        assert runner.get(running.id).state == RUNNING and runner.get(waiting.id).state == QUEUED
        with pytest.raises(RuntimeError, match="before start"):
            runner.register("demo.late", lambda ctx, params: {}, lane="late")
        release.set()  # then the default lane goes on with the job that waited
        wait_until(lambda: runner.get(waiting.id).state == SUCCEEDED, timeout=10, interval=0.02)
        assert runner.get(running.id).state == runner.get(waiting.id).state == SUCCEEDED
    finally:
        release.set()
        runner.shutdown(5)


def test_an_invalid_decode_cap_stops_a_service_at_start(monkeypatch):
    # It used to mean the default 512 MiB without a word.
    from services.common.config import ConfigError, load_config

    for bad, said in (("abc", "is not a whole number"), ("0", "must be at least 1")):
        monkeypatch.setenv("STEMLAB_MAX_DECODED_MB", bad)
        with pytest.raises(ConfigError, match=said):
            load_config()
    monkeypatch.setenv("STEMLAB_MAX_DECODED_MB", "64")
    load_config()


def test_the_cli_prints_a_job_whose_result_holds_nan(tmp_path):
    # A diverged run's metrics: MessageToDict refused them, and `stemlab jobs list --json` failed for every job.
    from services.common.cliutil import message_to_dict
    from stemlab.v1 import jobs_pb2

    job = jobs_pb2.Job(id="training-0123456789ab")
    job.result.update({"loss": float("nan"), "history": [{"val_loss": float("inf")}, {"val_loss": 0.5}], "epochs": 2.0})
    assert message_to_dict(job)["result"] == {"loss": "nan", "history": [{"val_loss": "inf"}, {"val_loss": 0.5}],
                                              "epochs": 2}


def test_a_listing_cut_short_by_head_ends_without_a_traceback():
    import subprocess
    import sys

    # What `stemlab jobs list | head` does: the reader goes away while the command still writes.
    script = ("import stemlab.cli as cli\n"
              "def many(args):\n"
              "    for _ in range(200000):\n"
              "        print('web-0123456789ab  web.separate  SUCCEEDED')\n"
              "cli.cmd_jobs_list = many\n"
              "raise SystemExit(cli.main(['jobs', 'list']))\n")
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    head = subprocess.Popen(["head", "-n", "1"], stdin=writer.stdout, stdout=subprocess.PIPE, text=True)
    writer.stdout.close()  # head alone holds the pipe: when it exits, the writer's next write breaks
    first, _ = head.communicate(timeout=120)
    errors = writer.stderr.read()
    writer.wait(timeout=120)
    assert first.strip() == "web-0123456789ab  web.separate  SUCCEEDED"
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors

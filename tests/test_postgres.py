"""Replicas on one real PostgreSQL server: the job store, web replicas with separation workers,
and two processing replicas sharing a mixing job.

Each test gets a fresh database on a server started in a temporary folder (tests/pgserver.py);
skipped, with the reason, only where PostgreSQL is not installed.
"""

from __future__ import annotations

import http.server
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest
import requests

from services.common import jobs
from services.common.jobstore.base import MIGRATIONS
from services.common.jobstore.postgres import PostgresJobStore
from tests.pgserver import PostgresServer, missing_reason

pytestmark = pytest.mark.skipif(bool(missing_reason()), reason=missing_reason() or "")

_databases = itertools.count()


@pytest.fixture(scope="module")
def server():
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def database_url(server):
    name = f"t{next(_databases)}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- the store --------------------------------------------------------------------------------


def test_replicas_migrate_the_schema_once_and_keep_services_apart(database_url):
    with ThreadPoolExecutor(4) as pool:  # four replicas starting at once
        stores = list(pool.map(lambda _: PostgresJobStore(database_url, "demo"), range(4)))
    versions = stores[0]._execute("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in versions] == [v for v, _ in MIGRATIONS]
    other = PostgresJobStore(database_url, "other")
    stores[0].create("demo-1", "k", {})
    with pytest.raises(jobs.JobNotFoundError):
        other.get("demo-1")
    assert other.list()[0] == [] and [j.id for j in stores[3].list()[0]] == ["demo-1"]


def test_concurrent_claims_take_every_job_exactly_once(database_url):
    store = PostgresJobStore(database_url, "demo")
    for i in range(120):
        store.create(f"demo-{i}", "k", {"i": i})
    replicas = [PostgresJobStore(database_url, "demo") for _ in range(2)]

    # Every claimer takes its first job, then waits for the others before draining the queue: so
    # they really run side by side even on a loaded machine, where one thread could otherwise
    # empty the queue before the next is scheduled.
    all_started = threading.Barrier(6, timeout=60)

    def claim_all(worker: str) -> list[str]:
        replica = replicas[int(worker[1]) % 2]
        taken = []
        if (job := replica.claim_next(worker, 30)) is not None:
            taken.append(job.id)
        all_started.wait()
        while (job := replica.claim_next(worker, 30)) is not None:
            taken.append(job.id)
        return taken

    with ThreadPoolExecutor(6) as pool:
        taken = list(pool.map(claim_all, [f"w{i}" for i in range(6)]))
    every = [job_id for ids in taken for job_id in ids]
    assert len(every) == 120 and set(every) == {f"demo-{i}" for i in range(120)}
    assert all(taken)  # each of the six claimers got jobs, none twice


def test_a_lost_lease_requeues_the_job_then_fails_it_after_max_attempts(database_url):
    store = PostgresJobStore(database_url, "demo")
    store.create("demo-1", "k", {})
    for attempt in (1, 2):
        job = store.claim_next(f"dead-{attempt}", lease_seconds=0.2)
        assert job.attempts == attempt
        time.sleep(0.3)
        assert store.requeue_expired(max_attempts=2) == ((["demo-1"], []) if attempt == 1 else ([], ["demo-1"]))
    job = store.get("demo-1")
    assert job.state == jobs.FAILED and "lost 2 times" in job.error
    # The dead worker's late end is refused: the job was not its to finish any more.
    assert not store.finish("demo-1", "dead-2", state=jobs.SUCCEEDED)


def test_cancel_and_progress_cross_replicas(database_url):
    """A job queued through a replica that runs nothing is run by another; its progress is read
    and its cancellation asked for through the first."""
    front = jobs.JobRunner(PostgresJobStore(database_url, "demo"), "demo", run=False)
    back = jobs.JobRunner(PostgresJobStore(database_url, "demo"), "demo",
                          settings=jobs.StoreSettings(lease_seconds=1.5))

    def long_job(ctx, params):
        for step in range(600):
            ctx.progress(step, 600, "stepping")
            ctx.check_cancelled()
            time.sleep(0.05)
        return {}

    for runner in (front, back):
        runner.register("demo.long", long_job)
    back.start()
    try:
        job = front.submit("demo.long")
        wait_for(lambda: front.get(job.id).progress.done >= 5, what="progress seen through the other replica")
        assert front.get(job.id).state == jobs.RUNNING and front.get(job.id).worker == back.worker_id
        front.cancel(job.id)
        ended = wait_for(lambda: (j := front.get(job.id)).ended and j, timeout=10, what="cancellation")
        assert ended.state == jobs.CANCELLED
        queued = front.submit("demo.long")
        back.shutdown(0)
        time.sleep(0.2)
        # (queued may have started on `back` before the shutdown: given back, it waits again.)
        assert front.get(queued.id).state == jobs.QUEUED
    finally:
        back.shutdown(0)


# -- web replicas and separation workers --------------------------------------------------------


class GatedSongServer:
    """Serves song.wav; the first request waits until `release` is set (a worker stuck mid-job)."""

    def __init__(self, data: bytes):
        self.release = threading.Event()
        self.requests = 0
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - the http.server API
                gate.requests += 1
                if gate.requests == 1:
                    gate.release.wait(60)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_HEAD = do_GET  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/song.wav"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    from tests.frontendtools import ServingProcess, build_models

    root = tmp_path_factory.mktemp("serving")
    with ServingProcess(build_models(root), root / "serving.log") as process:
        yield process


@pytest.mark.slow
def test_two_web_replicas_and_two_workers_share_jobs_and_survive_a_killed_worker(database_url, serving, tmp_path):
    from tests.frontendtools import GAIN, song
    from tests.webstack import WebProcess, WorkerProcess, stack_env, upload, wait_done, wav_bytes

    env = stack_env(tmp_path / "data", serving, database_url, STEMLAB_WEB_START_WORKERS="false",
                    STEMLAB_JOB_LEASE_SECONDS="2", STEMLAB_GRACE_SECONDS="2")
    store = PostgresJobStore(database_url, "web")
    webs = [WebProcess(env, tmp_path / f"web{i}.log") for i in range(2)]
    workers = [WorkerProcess(env, tmp_path / f"worker{i}.log") for i in range(2)]
    gate = None
    try:
        for process in (*webs, *workers):
            process.start()
        a, b = (w.url for w in webs)

        # Submitted through one web process, followed and downloaded through the other.
        audio = song(2.0, rate=22050)
        reply = upload(a, wav_bytes(audio, 22050))
        assert reply.status_code == 202, reply.text
        job = wait_done(b, reply.json()["id"])
        assert job["state"] == "succeeded", job
        got = requests.get(b + job["links"]["instrument"]["wav"], timeout=30)
        assert got.status_code == 200
        import io

        import soundfile as sf

        instrument, rate = sf.read(io.BytesIO(got.content), dtype="float32", always_2d=True)
        assert rate == 22050 and np.allclose(instrument.T, GAIN * audio, atol=1e-4)
        assert requests.get(a + job["links"]["rest"]["flac"], timeout=30).status_code == 200

        # kill -9 of the worker running a separation: the other worker completes it, once.
        gate = GatedSongServer(wav_bytes(song(1.0, rate=22050), 22050))
        reply = requests.post(f"{b}/api/separations", json={"url": gate.url, "model": "guitar"}, timeout=30)
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["id"]
        wait_for(lambda: gate.requests >= 1 and store.get(job_id).state == jobs.RUNNING, what="the job to start")
        holder = store.get(job_id).worker
        pids = {w.pid: w for w in workers}
        victim = pids[int(holder.split(":")[1])]
        survivor = next(w for w in workers if w is not victim)
        victim.kill()
        gate.release.set()
        job = wait_done(a, job_id, timeout=60)
        assert job["state"] == "succeeded", (job, survivor.log()[-2000:])
        record = store.get(job_id)
        assert record.attempts == 2 and record.worker != holder
        # The worker logs the end just after recording it, so the line may trail the state by a moment.
        wait_for(lambda: f"job {job_id} ended SUCCEEDED" in survivor.log(), what="the survivor's log of the end")
        assert survivor.log().count(f"job {job_id} ended SUCCEEDED") == 1
        assert f"job {job_id} ended" not in victim.log()
        assert requests.get(b + job["links"]["instrument"]["wav"], timeout=30).status_code == 200
    finally:
        if gate is not None:
            gate.close()
        for process in (*workers, *webs):
            process.stop(10)
        store.close()


# -- processing replicas ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processing_replicas_share_a_mixing_job_without_doing_a_track_twice(database_url, tmp_path):
    from stemlab.v1 import jobs_pb2, processing_pb2, processing_pb2_grpc
    from tests.servicetools import ServiceProcess, wait_job
    from tests.test_processing_support import make_track

    data = tmp_path / "data"
    rate = 22050
    tracks = 16
    rng = np.random.default_rng(0)
    for i in range(tracks):
        noise = lambda: (0.2 * rng.standard_normal(8 * rate)).astype(np.float32)  # noqa: E731
        make_track(data, f"Song{i:02d}", {"g.wav": ("guitar", noise()), "d.wav": ("drums", noise())},
                   marks={"guitar": ["checked"]})
    config = tmp_path / "stemlab.yaml"
    config.write_text("services:\n  processing:\n    options:\n      pool_workers: 1\n")
    env = {"STEMLAB_DATABASE_URL": database_url, "STEMLAB_CONFIG": str(config), "STEMLAB_JOB_LEASE_SECONDS": "5"}
    with ServiceProcess("processing", data, env=env) as first, ServiceProcess("processing", data, env=env) as second:
        stub = processing_pb2_grpc.ProcessingServiceStub(first.channel())
        job = stub.StartMix(processing_pb2.MixRequest(instrument="guitar", rates_hz=[rate, 16000]), timeout=10)
        final = wait_job(second.channel(), job.id, timeout=240)  # followed through the other replica
        assert final.state == jobs_pb2.SUCCEEDED, final.error
        rows = final.result["tracks"]
        assert len(rows) == tracks and all(r["status"] == "mixed" for r in rows), rows
        store = PostgresJobStore(database_url, "processing")
        done_by = store.item_workers(job.id)
        assert len(done_by) == 2 and sum(done_by.values()) == tracks, done_by
        assert all((data / "mixes" / "guitar" / str(rate) / f"Song{i:02d}" / "instrument.wav").is_file()
                   for i in range(tracks))
        # Silence statistics share their tracks the same way, submitted through the other replica.
        stats = processing_pb2_grpc.ProcessingServiceStub(second.channel()).StartSilenceStats(
            processing_pb2.SilenceStatsRequest(mix_set=processing_pb2.MixSetRef(instrument="guitar", rate_hz=rate)),
            timeout=10)
        final = wait_job(first.channel(), stats.id, timeout=240)
        assert final.state == jobs_pb2.SUCCEEDED, final.error
        assert [r["status"] for r in final.result["tracks"]] == ["measured"] * tracks
        assert sum(store.item_workers(stats.id).values()) == tracks

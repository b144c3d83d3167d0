"""The SQLite job store and the runner over it: migrations of old files, a process that only
queues beside the one that runs, retention, and the web's results quota."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from services.common import jobs
from services.common.jobstore.base import MIGRATIONS

OLD_SCHEMA = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
    state TEXT NOT NULL, params TEXT NOT NULL, result TEXT NOT NULL DEFAULT '{}', error TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, started REAL, finished REAL);
INSERT INTO jobs (id, kind, state, params, result, created, finished)
    VALUES ('demo-000000000001', 'demo.k', 'SUCCEEDED', '{"a": 1}', '{"b": 2}', 1.0, 2.0);
"""


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_file_of_the_old_schema_is_migrated_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    store = jobs.JobStore(path)
    job = store.get("demo-000000000001")
    assert (job.state, job.params, job.result, job.attempts) == ("SUCCEEDED", {"a": 1}, {"b": 2}, 0)
    versions = [r["version"] for r in store._execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [v for v, _ in MIGRATIONS]
    store.close()
    again = jobs.JobStore(path)  # opening again applies nothing twice
    assert len(again._execute("SELECT * FROM schema_migrations")) == len(MIGRATIONS)
    assert again.list()[0][0].id == "demo-000000000001"
    again.close()


def test_a_job_queued_by_another_process_is_run_and_cancelled_from_there(tmp_path):
    """The web beside a separate worker on SQLite: one connection queues and cancels, the other runs."""
    path = tmp_path / "jobs.sqlite"
    runs = jobs.JobRunner(jobs.JobStore(path), "demo", settings=jobs.StoreSettings(lease_seconds=1.5))
    queues = jobs.JobRunner(jobs.JobStore(path), "demo", run=False)
    started = threading.Event()

    def slow(ctx, params):
        started.set()
        while not ctx.cancelled:
            ctx.progress(1, 2, "half")
            time.sleep(0.02)
        return {}

    for runner in (runs, queues):
        runner.register("demo.slow", slow)
        runner.register("demo.quick", lambda ctx, params: {"echo": params["x"]})
    with pytest.raises(RuntimeError, match="only queues"):
        queues.start()
    runs.start()
    try:
        quick = queues.submit("demo.quick", {"x": 7})  # picked up by polling, not by a wake-up
        done = wait_for(lambda: (j := queues.get(quick.id)).ended and j)
        assert done.state == jobs.SUCCEEDED and done.result == {"echo": 7} and done.attempts == 1
        slow_job = queues.submit("demo.slow")
        assert started.wait(10)
        assert wait_for(lambda: queues.get(slow_job.id).progress.message == "half")
        queues.cancel(slow_job.id)
        assert wait_for(lambda: (j := queues.get(slow_job.id)).ended and j).state == jobs.CANCELLED
    finally:
        runs.shutdown(2)


def test_a_second_runner_on_one_sqlite_file_is_refused(tmp_path):
    first = jobs.JobRunner(jobs.JobStore(tmp_path / "jobs.sqlite"), "demo")
    with pytest.raises(jobs.StoreInUseError, match="run by another process"):
        jobs.JobRunner(jobs.JobStore(tmp_path / "jobs.sqlite"), "demo")
    first.store.close()


def test_ended_jobs_are_pruned_after_the_retention_period(tmp_path):
    store = jobs.JobStore(tmp_path / "jobs.sqlite")
    now = time.time()
    for i, (state, finished) in enumerate([(jobs.SUCCEEDED, now - 40 * 86400), (jobs.FAILED, now - 31 * 86400),
                                           (jobs.SUCCEEDED, now - 86400), (jobs.QUEUED, None)]):
        store.create(f"demo-{i}", "k", {})
        store.update(f"demo-{i}", state=state, finished=finished)
    assert store.prune(now - 30 * 86400) == 2
    assert sorted(j.id for j in store.list()[0]) == ["demo-2", "demo-3"]


def test_results_quota_deletes_the_oldest_results_first_then_refuses_new_work(tmp_path):
    from services.frontend.separations import SeparationQueue, StorageFull
    from services.frontend.settings import load_settings

    mb = 1024 * 1024
    settings = load_settings({"data_root": str(tmp_path / "data"), "start_workers": False, "results_quota_mb": 3})
    queue = SeparationQueue(settings)
    now = time.time()

    def result(name: str, state: str, finished: float | None, size: int) -> None:
        (queue.root / name).mkdir()
        (queue.root / name / "instrument.wav").write_bytes(b"\0" * size)
        queue.store.create(f"web-{name[:12]}", "web.separate", {"folder": name, "model": "guitar"})
        queue.store.update(f"web-{name[:12]}", state=state, finished=finished)

    result("a" * 32, jobs.SUCCEEDED, now - 300, mb)  # the oldest result
    result("b" * 32, jobs.SUCCEEDED, now - 200, mb)
    result("c" * 32, jobs.RUNNING, None, mb)
    queue.admit()  # 3 MB of 3: full, so the oldest goes (down to under 90 %)
    assert sorted(p.name[0] for p in queue.root.iterdir()) == ["b", "c"]
    result("d" * 32, jobs.RUNNING, None, 2 * mb)
    with pytest.raises(StorageFull, match="space for results is full"):
        queue.admit()  # running separations are never deleted
    assert sorted(p.name[0] for p in queue.root.iterdir()) == ["c", "d"]
    queue.stop(0)

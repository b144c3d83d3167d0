"""Jobs: the persistent store (SQLite) and the bounded runner every service uses.

A job function has the signature `fn(ctx: JobContext, params: dict) -> dict`. It reports
progress with `ctx.progress(done, total, message, **metrics)` and stops cooperatively when
`ctx.cancelled` turns true (or calls `ctx.check_cancelled()`, which raises `JobCancelled`).

Every state change is written to SQLite at once; progress is written at most every
`PROGRESS_WRITE_SECONDS` (watchers in this process still see every update), so a busy job
does not hammer the disk. A job found RUNNING when the store is opened belonged to a process
that died: it is marked FAILED with the error "interrupted". A runner claims its store first
(`JobStore.claim`, an exclusive lock the kernel drops when the process dies), so a second copy
of it cannot take the first one's running jobs for a dead process's.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.paths import ExclusiveLock, LockHeldError

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PROGRESS_WRITE_SECONDS = 0.5
INTERRUPTED = "interrupted"


class StoreInUseError(RuntimeError):
    """Another process runs the jobs of this store (a second copy of a service on one data root)."""


class JobCancelled(Exception):
    """Raised inside a job function to stop it after a cancel request."""


class JobNotFoundError(NotFoundError):
    pass


@dataclass(frozen=True)
class Progress:
    fraction: float = 0.0
    done: float = 0.0
    total: float = 0.0
    message: str = ""
    eta_seconds: float = -1.0
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    state: str
    params: dict
    created: float
    seq: int = 0
    started: float | None = None
    finished: float | None = None
    error: str = ""
    result: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind);
"""


class JobStore:
    """Jobs of one service in one SQLite file. Thread-safe; every write commits at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._claim: ExclusiveLock | None = None
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.release_claim()

    def release_claim(self) -> None:
        """Let another process run this store's jobs (after this one stopped running them)."""
        with self._lock:
            if self._claim is not None:
                self._claim.release()
                self._claim = None

    def claim(self) -> None:
        """Become the one process that runs this store's jobs, or raise StoreInUseError.

        A second copy of a service on the same data root would otherwise take the first one's
        running jobs for those of a dead process, mark them interrupted, and (training) resume
        the same run twice.
        """
        if self._claim is not None:
            return
        try:
            claim = ExclusiveLock(self.path.with_name(self.path.name + ".lock"))
        except LockHeldError as e:
            raise StoreInUseError(f"the jobs in {self.path} are run by another process (pid {e.owner}); "
                                  "is this service already running on this data root?") from None
        with self._lock:
            self._claim = claim

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"], kind=row["kind"], state=row["state"], params=json.loads(row["params"]),
            created=row["created"], seq=row["seq"], started=row["started"], finished=row["finished"],
            error=row["error"], result=json.loads(row["result"]),
            progress=Progress(**json.loads(row["progress"])),
        )

    def create(self, job_id: str, kind: str, params: dict) -> JobRecord:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, params, created) VALUES (?, ?, ?, ?, ?)",
                (job_id, kind, QUEUED, json.dumps(params), time.time()),
            )
            return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return self._record(row)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        cols, values = [], []
        for key, value in fields.items():
            if key in ("params", "result"):
                value = json.dumps(value)
            elif key == "progress":
                value = json.dumps(value.__dict__)
            cols.append(f"{key} = ?")
            values.append(value)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*values, job_id))
            return self.get(job_id)

    def list(self, states: tuple[str, ...] = (), kind: str = "", page_size: int = 50,
             before_seq: int | None = None) -> tuple[list[JobRecord], int | None]:
        """Newest first. Returns the page and the cursor of the next page (None at the end)."""
        where, args = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, page_size + 1)).fetchall()
        records = [self._record(r) for r in rows[:page_size]]
        next_seq = records[-1].seq if len(rows) > page_size else None
        return records, next_seq

    def mark_interrupted(self) -> list[JobRecord]:
        """Jobs left RUNNING by a process that died become FAILED "interrupted"."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            now = time.time()
            return [self.update(r["id"], state=FAILED, error=INTERRUPTED, finished=now) for r in rows]


class JobContext:
    """What a running job function sees: progress reporting and the cancel flag."""

    def __init__(self, runner: JobRunner, job_id: str, started: float, data: Any = None):
        self._runner = runner
        self.job_id = job_id
        self._started = started
        self._cancel = threading.Event()
        self.cancel_reason = ""
        self.data = data

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(self.cancel_reason or "cancelled")

    def progress(self, done: float, total: float, message: str = "", **metrics: Any) -> None:
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        elapsed = time.time() - self._started
        eta = elapsed * (1 - fraction) / fraction if 0 < fraction else -1.0
        self._runner._report(self.job_id, Progress(
            fraction=fraction, done=float(done), total=float(total), message=message,
            eta_seconds=eta, metrics={k: v for k, v in metrics.items() if _jsonable(v)}))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


JobFunction = Callable[[JobContext, dict], dict]


class JobRunner:
    """Bounded pools of worker threads running the registered job kinds of one service.

    Kinds run in the default lane (`workers` threads) unless registered in a lane of their own, so
    short jobs (an export) never wait hours behind long ones (a training run) in the same queue.
    """

    def __init__(self, store: JobStore, service: str, workers: int = 1, data: Any = None):
        self.store = store
        self.service = service
        self.data = data
        self._kinds: dict[str, JobFunction] = {}
        self._lane_of: dict[str, str] = {}
        self._queues: dict[str, queue.Queue[str | None]] = {"": queue.Queue()}
        self._contexts: dict[str, JobContext] = {}
        self._changed = threading.Condition()
        self._versions: dict[str, int] = {}
        self._live: dict[str, JobRecord] = {}
        self._last_write: dict[str, float] = {}
        self._accepting = True
        self._enqueued: set[str] = set()
        # Claim the store before marking "running" jobs interrupted: they may be another process's
        # (a second copy of a service, a second web server on one data root), which would also
        # run queued jobs twice. That copy is refused with StoreInUseError instead.
        store.claim()
        self.interrupted = store.mark_interrupted()
        for job in self.interrupted:
            log.warning("job %s (%s) was running when the service stopped: marked failed", job.id, job.kind)
        self._threads: list[tuple[threading.Thread, queue.Queue[str | None]]] = []
        self._add_workers("", workers)

    def register(self, kind: str, fn: JobFunction, lane: str = "") -> None:
        """Run `kind` with `fn`; in `lane`, a one-worker queue of its own, if named."""
        if any(t.is_alive() for t, _ in self._threads):
            raise RuntimeError("register job kinds before start()")
        self._kinds[kind] = fn
        self._lane_of[kind] = lane
        if lane not in self._queues:
            self._queues[lane] = queue.Queue()
            self._add_workers(lane, 1)

    def _add_workers(self, lane: str, count: int) -> None:
        jobs = self._queues[lane]
        self._threads += [(threading.Thread(target=self._work, args=(jobs,), daemon=True,
                                            name=f"job-{lane or 'worker'}-{i}"), jobs) for i in range(count)]

    def start(self) -> None:
        # Jobs queued before a restart never started: run them now, oldest first.
        queued, cursor = [], None
        while True:
            page, cursor = self.store.list(states=(QUEUED,), page_size=500, before_seq=cursor)
            queued.extend(page)
            if cursor is None:
                break
        for job in reversed(queued):
            self._enqueue(job.id, job.kind)
        for t, _ in self._threads:
            t.start()

    # -- requests ------------------------------------------------------------------------
    def submit(self, kind: str, params: dict | None = None) -> JobRecord:
        if kind not in self._kinds:
            raise InvalidArgumentError(f"unknown job kind {kind!r}")
        if not self._accepting:
            raise FailedPreconditionError(f"{self.service} is shutting down; try again later")
        params = params or {}
        if not _jsonable(params):
            raise InvalidArgumentError("job parameters must be JSON data")
        job = self.store.create(f"{self.service}-{uuid.uuid4().hex[:12]}", kind, params)
        self._enqueue(job.id, kind)
        self._notify(job)
        return job

    def get(self, job_id: str) -> JobRecord:
        with self._changed:
            live = self._live.get(job_id)
        return live or self.store.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job.ended:
            return job
        ctx = self._contexts.get(job_id)
        if ctx is not None:
            ctx.cancel_reason = "cancelled"
            ctx._cancel.set()
            return self.get(job_id)
        if job.state == QUEUED:
            job = self.store.update(job_id, state=CANCELLED, finished=time.time())
            self._notify(job)
        return job

    def watch(self, job_id: str, alive: Callable[[], bool] = lambda: True,
              poll_seconds: float = 0.5) -> Iterator[JobRecord]:
        """Yield the job now and after every change, until it has ended (or `alive` is false)."""
        job = self.get(job_id)
        version = -1
        while True:
            with self._changed:
                current = self._versions.get(job_id, 0)
            if current != version:
                version = current
                job = self.get(job_id)
                yield job
                if job.ended:
                    return
            with self._changed:
                if self._versions.get(job_id, 0) == version:
                    self._changed.wait(timeout=poll_seconds)
            if not alive():
                return

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self, grace_seconds: float) -> None:
        """Stop taking jobs, ask running ones to stop, wait up to the grace period, mark the rest."""
        self._accepting = False
        for ctx in list(self._contexts.values()):
            # A job a user cancelled stays cancelled while it winds down (a training run saves its
            # checkpoint): called "interrupted", it would be resumed at the next start.
            if not ctx.cancelled:
                ctx.cancel_reason = "shutdown"
            ctx._cancel.set()
        for _, jobs in self._threads:
            jobs.put(None)
        deadline = time.time() + grace_seconds
        for t, _ in self._threads:
            t.join(timeout=max(0.0, deadline - time.time()))
        for job_id in list(self._contexts):
            job = self.store.get(job_id)
            if job.ended:
                continue
            if self._contexts[job_id].cancel_reason == "cancelled":
                self.store.update(job_id, state=CANCELLED, finished=time.time())
            else:
                self.store.update(job_id, state=FAILED, error=f"{INTERRUPTED} (service shut down)",
                                  finished=time.time())

    # -- internals -----------------------------------------------------------------------
    def _enqueue(self, job_id: str, kind: str) -> None:
        # A job submitted before start() (e.g. a resume after a crash) is also QUEUED in the
        # store; start() must not queue it a second time.
        with self._changed:
            if job_id in self._enqueued:
                return
            self._enqueued.add(job_id)
        # A kind no longer registered still goes through the default lane, which fails it clearly.
        self._queues[self._lane_of.get(kind, "")].put(job_id)

    def _notify(self, job: JobRecord) -> None:
        with self._changed:
            self._versions[job.id] = self._versions.get(job.id, 0) + 1
            if job.ended:
                self._live.pop(job.id, None)
            else:
                self._live[job.id] = job
            self._changed.notify_all()

    def _report(self, job_id: str, progress: Progress) -> None:
        with self._changed:
            live = self._live.get(job_id)
        if live is None or live.ended:
            return
        job = replace(live, progress=progress)
        now = time.time()
        if now - self._last_write.get(job_id, 0.0) >= PROGRESS_WRITE_SECONDS:
            self._last_write[job_id] = now
            self.store.update(job_id, progress=progress)
        self._notify(job)

    def _work(self, jobs: queue.Queue[str | None]) -> None:
        while True:
            job_id = jobs.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:  # the worker must survive anything a job does
                log.exception("job %s: runner error", job_id)

    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.state != QUEUED:
            return
        if not self._accepting:
            return
        started = time.time()
        ctx = JobContext(self, job_id, started, self.data)
        self._contexts[job_id] = ctx
        job = self.store.update(job_id, state=RUNNING, started=started)
        self._notify(job)
        log.info("job %s (%s) started", job_id, job.kind)
        try:
            result = self._kinds[job.kind](ctx, dict(job.params)) or {}
            if not _jsonable(result):
                raise TypeError("job result is not JSON data")
            if ctx.cancelled and ctx.cancel_reason == "shutdown":
                state, error = FAILED, f"{INTERRUPTED} (service shut down)"
            elif ctx.cancelled:
                state, error = CANCELLED, ""
            else:
                state, error = SUCCEEDED, ""
            final = {"state": state, "error": error, "result": result}
        except JobCancelled:
            if ctx.cancel_reason == "shutdown":
                final = {"state": FAILED, "error": f"{INTERRUPTED} (service shut down)"}
            else:
                final = {"state": CANCELLED}
        except Exception as e:  # a job's failure is recorded, never raised into the service
            log.exception("job %s failed", job_id)
            final = {"state": FAILED, "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__}
        live = self._live.get(job_id)
        progress = live.progress if live else job.progress
        if final["state"] == SUCCEEDED:
            progress = replace(progress, fraction=1.0, eta_seconds=0.0)
        job = self.store.update(job_id, finished=time.time(), progress=progress, **final)
        self._contexts.pop(job_id, None)
        self._notify(job)
        log.info("job %s ended %s", job_id, job.state)

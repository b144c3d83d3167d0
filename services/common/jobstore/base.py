"""Job records and the SQL job store both backends share (SQLite and PostgreSQL).

The store is the only shared state between replicas: a job is claimed by one worker with a row
lock that other claimers skip, held by a lease its worker renews (heartbeats), and finished only
by the worker that still holds it. Cancellation is a flag on the row, progress a column, so any
replica sees both. Long jobs may split their work into items (`job_items`) that idle workers of
other replicas claim the same way, so two replicas share one job without doing an item twice.

SQL is written once with `?` placeholders; a backend translates them and supplies its own
connection, claim clause and migrations (see sqlite.py and postgres.py).
"""

from __future__ import annotations

import abc
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import NotFoundError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
INTERRUPTED = "interrupted"
ITEM_DONE = "DONE"


class StoreInUseError(RuntimeError):
    """Another process runs the jobs of this store (a second copy of a service on one data root)."""


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
    attempts: int = 0
    worker: str = ""

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Item:
    """One piece of a shared job, claimed by one worker at a time."""

    job_id: str
    idx: int
    key: str
    fn: str
    kwargs: dict


class SqlJobStore(abc.ABC):
    """Jobs of one service. Thread-safe; every write commits at once.

    `shared` is true where several processes (replicas) run the same store's jobs at once; a
    store that is not shared is run by one process, which claims it (`claim`).
    """

    shared = False
    # Appended to the claim's inner SELECT (PostgreSQL: FOR UPDATE SKIP LOCKED).
    lock_clause = ""

    def __init__(self, service: str = ""):
        self.service = service
        self._lock = threading.RLock()

    # -- backend hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def _execute(self, sql: str, args: tuple = ()) -> list[dict]:
        """Run one statement in its own transaction; returns the rows (dicts), [] for none."""

    @abc.abstractmethod
    def _rowcount(self, sql: str, args: tuple = ()) -> int:
        """Run one statement in its own transaction; returns how many rows it changed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection(s)."""

    def claim(self) -> None:  # noqa: B027 - a hook whose default (shared stores) is to do nothing
        """Become the one process that runs this store's jobs (SQLite); nothing where shared."""

    def release_claim(self) -> None:  # noqa: B027 - likewise
        """Let another process run this store's jobs (after this one stopped running them)."""

    # -- records --------------------------------------------------------------------------
    @staticmethod
    def _record(row: dict) -> JobRecord:
        return JobRecord(
            id=row["id"], kind=row["kind"], state=row["state"], params=json.loads(row["params"]),
            created=row["created"], seq=row["seq"], started=row["started"], finished=row["finished"],
            error=row["error"], result=json.loads(row["result"]),
            progress=Progress(**json.loads(row["progress"])), attempts=row["attempts"] or 0,
            worker=row["worker"] or "",
        )

    def create(self, job_id: str, kind: str, params: dict) -> JobRecord:
        self._execute("INSERT INTO jobs (id, service, kind, state, params, created) VALUES (?, ?, ?, ?, ?, ?)",
                      (job_id, self.service, kind, QUEUED, json.dumps(params), time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        rows = self._execute("SELECT * FROM jobs WHERE id = ? AND service = ?", (job_id, self.service))
        if not rows:
            raise JobNotFoundError(f"no job {job_id!r}")
        return self._record(rows[0])

    @staticmethod
    def _columns(fields: dict[str, Any]) -> tuple[list[str], list[Any]]:
        cols, values = [], []
        for key, value in fields.items():
            if key in ("params", "result"):
                value = json.dumps(value)
            elif key == "progress":
                value = json.dumps(value.__dict__)
            cols.append(f"{key} = ?")
            values.append(value)
        return cols, values

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        cols, values = self._columns(fields)
        self._execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ? AND service = ?",
                      (*values, job_id, self.service))
        return self.get(job_id)

    def list(self, states: tuple[str, ...] = (), kind: str = "", page_size: int = 50,
             before_seq: int | None = None) -> tuple[list[JobRecord], int | None]:
        """Newest first. Returns the page and the cursor of the next page (None at the end)."""
        where, args = ["service = ?"], [self.service]
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        rows = self._execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                             (*args, page_size + 1))
        records = [self._record(r) for r in rows[:page_size]]
        next_seq = records[-1].seq if len(rows) > page_size else None
        return records, next_seq

    def count(self, states: tuple[str, ...]) -> int:
        rows = self._execute(f"SELECT COUNT(*) AS n FROM jobs WHERE service = ? AND state IN "
                             f"({','.join('?' * len(states))})", (self.service, *states))
        return int(rows[0]["n"])

    def mark_interrupted(self) -> list[JobRecord]:
        """Jobs left RUNNING by a process that died become FAILED "interrupted" (unshared stores)."""
        with self._lock:
            rows = self._execute("SELECT id FROM jobs WHERE state = ? AND service = ?", (RUNNING, self.service))
            now = time.time()
            return [self.update(r["id"], state=FAILED, error=INTERRUPTED, finished=now) for r in rows]

    def requeue_interrupted(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Jobs left RUNNING by a process that died go back to the queue (unshared stores, for job
        kinds that simply run again), or fail "interrupted" after `max_attempts` claims: a job
        that takes its process down each time must not do so forever. Returns (requeued, failed)."""
        return self._requeue_running("", (), max_attempts, f"its process stopped {max_attempts} times")

    def _requeue_running(self, where: str, args: tuple, max_attempts: int, why: str) -> tuple[list[str], list[str]]:
        """RUNNING jobs (and `where`) back to the queue, those claimed `max_attempts` times failed
        "interrupted (`why`)". Returns (requeued ids, failed ids)."""
        now = time.time()
        with self._lock:
            failed = self._execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ?, worker = '' WHERE service = ? AND state = ? "
                f"{where} AND attempts >= ? RETURNING id",
                (FAILED, f"{INTERRUPTED} ({why})", now, self.service, RUNNING, *args, max_attempts))
            requeued = self._execute(f"UPDATE jobs SET state = ?, worker = '' WHERE service = ? AND state = ? {where} "
                                     "RETURNING id", (QUEUED, self.service, RUNNING, *args))
        return [r["id"] for r in requeued], [r["id"] for r in failed]

    # -- claims and leases ------------------------------------------------------------------
    @staticmethod
    def _kind_filter(kinds: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[str, list[str]]:
        if kinds:
            return f" AND kind IN ({','.join('?' * len(kinds))})", list(kinds)
        if exclude:
            return f" AND kind NOT IN ({','.join('?' * len(exclude))})", list(exclude)
        return "", []

    def claim_next(self, worker: str, lease_seconds: float, kinds: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = ()) -> JobRecord | None:
        """The oldest queued job (of `kinds`, or not of `exclude`), now RUNNING under `worker`'s lease."""
        kind_sql, kind_args = self._kind_filter(kinds, exclude)
        now = time.time()
        with self._lock:
            rows = self._execute(
                "UPDATE jobs SET state = ?, started = ?, worker = ?, lease_until = ?, attempts = attempts + 1, "
                "cancel_requested = 0 WHERE seq = (SELECT seq FROM jobs WHERE service = ? AND state = ?"
                f"{kind_sql} ORDER BY seq LIMIT 1{self.lock_clause}) RETURNING *",
                (RUNNING, now, worker, now + lease_seconds, self.service, QUEUED, *kind_args))
        return self._record(rows[0]) if rows else None

    def heartbeat(self, worker: str, job_ids: list[str], lease_seconds: float) -> tuple[set[str], set[str]]:
        """Renew `worker`'s leases on `job_ids`; returns (ids asked to cancel, ids no longer held)."""
        if not job_ids:
            return set(), set()
        marks = ",".join("?" * len(job_ids))
        rows = self._execute(
            f"UPDATE jobs SET lease_until = ? WHERE service = ? AND worker = ? AND state = ? AND id IN ({marks}) "
            "RETURNING id, cancel_requested", (time.time() + lease_seconds, self.service, worker, RUNNING, *job_ids))
        held = {r["id"] for r in rows}
        return {r["id"] for r in rows if r["cancel_requested"]}, set(job_ids) - held

    def requeue_expired(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running jobs whose lease ran out (their worker died) go back to the queue, or fail after
        `max_attempts` claims. Returns (requeued ids, failed ids)."""
        return self._requeue_running("AND lease_until < ?", (time.time(),), max_attempts,
                                     f"its worker was lost {max_attempts} times")

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (its worker shuts down); False if not held."""
        return self._rowcount("UPDATE jobs SET state = ?, worker = '', attempts = attempts - 1 "
                              "WHERE id = ? AND service = ? AND worker = ? AND state = ?",
                              (QUEUED, job_id, self.service, worker, RUNNING)) == 1

    def write_progress(self, job_id: str, worker: str, progress: Progress) -> None:
        self._execute("UPDATE jobs SET progress = ? WHERE id = ? AND service = ? AND worker = ? AND state = ?",
                      (json.dumps(progress.__dict__), job_id, self.service, worker, RUNNING))

    def finish(self, job_id: str, worker: str, **fields: Any) -> bool:
        """End a job `worker` holds; False (and nothing written) if another worker took it over."""
        cols, values = self._columns(fields)
        return self._rowcount(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ? AND service = ? AND worker = ? "
                              "AND state = ?", (*values, job_id, self.service, worker, RUNNING)) == 1

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now; ask a running one's worker to stop (it sees the flag at its
        next heartbeat). Ended jobs stay as they are."""
        with self._lock:
            if not self._rowcount("UPDATE jobs SET state = ?, finished = ? WHERE id = ? AND service = ? AND state = ?",
                                  (CANCELLED, time.time(), job_id, self.service, QUEUED)):
                self._execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND service = ? AND state = ?",
                              (job_id, self.service, RUNNING))
        return self.get(job_id)

    def prune(self, older_than: float) -> int:
        """Delete ended jobs that finished before `older_than` (a timestamp), and their items;
        returns how many jobs."""
        with self._lock:
            pruned = self._rowcount("DELETE FROM jobs WHERE service = ? AND state IN (?, ?, ?) AND finished < ?",
                                    (self.service, *TERMINAL, older_than))
            self._execute("DELETE FROM job_items WHERE service = ? AND job_id NOT IN (SELECT id FROM jobs)",
                          (self.service,))
        return pruned

    # -- items of shared jobs -----------------------------------------------------------------
    def add_items(self, job_id: str, fn: str, tasks: list[tuple[str, dict]]) -> None:
        """Record a job's items; items already recorded (a job taken over) keep their state."""
        with self._lock:
            for idx, (key, kwargs) in enumerate(tasks):
                self._execute("INSERT INTO job_items (job_id, idx, service, key, fn, kwargs, state) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                              (job_id, idx, self.service, key, fn, json.dumps(kwargs), QUEUED))

    def claim_item(self, worker: str, lease_seconds: float, job_id: str | None = None) -> Item | None:
        """A queued item (or one whose worker's lease ran out) of a running job, now held by `worker`.

        Items stay after their job ended (what was done where) until the job is pruned."""
        now = time.time()
        scope, args = ("job_id = ?", [job_id]) if job_id else ("service = ?", [self.service])
        with self._lock:
            rows = self._execute(
                "UPDATE job_items SET state = ?, worker = ?, lease_until = ? WHERE (job_id, idx) = "
                f"(SELECT job_id, idx FROM job_items WHERE {scope} AND (state = ? OR (state = ? AND lease_until < ?)) "
                "AND job_id IN (SELECT id FROM jobs WHERE state = ?) "
                f"ORDER BY job_id, idx LIMIT 1{self.lock_clause}) RETURNING job_id, idx, key, fn, kwargs",
                (RUNNING, worker, now + lease_seconds, *args, QUEUED, RUNNING, now, RUNNING))
        if not rows:
            return None
        r = rows[0]
        return Item(r["job_id"], r["idx"], r["key"], r["fn"], json.loads(r["kwargs"]))

    def heartbeat_items(self, worker: str, items: list[tuple[str, int]], lease_seconds: float) -> None:
        until = time.time() + lease_seconds
        for job_id, idx in items:
            self._execute("UPDATE job_items SET lease_until = ? WHERE job_id = ? AND idx = ? AND worker = ? "
                          "AND state = ?", (until, job_id, idx, worker, RUNNING))

    def finish_item(self, item: Item, worker: str, result: dict) -> bool:
        return self._rowcount("UPDATE job_items SET state = ?, result = ? WHERE job_id = ? AND idx = ? "
                              "AND worker = ? AND state = ?",
                              (ITEM_DONE, json.dumps(result), item.job_id, item.idx, worker, RUNNING)) == 1

    def item_results(self, job_id: str) -> dict[int, dict]:
        """{idx: result} of the finished items of a job."""
        rows = self._execute("SELECT idx, result FROM job_items WHERE job_id = ? AND state = ?", (job_id, ITEM_DONE))
        return {r["idx"]: json.loads(r["result"]) for r in rows}

    def item_workers(self, job_id: str) -> dict[str, int]:
        """How many finished items of a job each worker did (what the tests look at)."""
        rows = self._execute("SELECT worker, COUNT(*) AS n FROM job_items WHERE job_id = ? AND state = ? "
                             "GROUP BY worker", (job_id, ITEM_DONE))
        return {r["worker"]: int(r["n"]) for r in rows}


# Versioned migrations: (version, statements). Both backends apply the same list, each with its
# own column types (see `types` in the backends); a version is applied once and recorded in
# schema_migrations, inside the transaction that applies it.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE IF NOT EXISTS jobs (seq {serial}, id TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, "
        "state TEXT NOT NULL, params TEXT NOT NULL, result TEXT NOT NULL DEFAULT '{{}}', "
        "error TEXT NOT NULL DEFAULT '', progress TEXT NOT NULL DEFAULT '{{}}', created {real} NOT NULL, "
        "started {real}, finished {real})",
        "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
        "CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind)",
    ]),
    (2, [
        # Replicas: which service a row belongs to (one PostgreSQL database serves them all), who
        # holds it and until when, how often it was claimed, and a cancel request any replica sets.
        "ALTER TABLE jobs ADD COLUMN service TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN worker TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN lease_until {real}",
        "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS jobs_claim ON jobs(service, state, seq)",
        "CREATE TABLE IF NOT EXISTS job_items (job_id TEXT NOT NULL, idx INTEGER NOT NULL, service TEXT NOT NULL, "
        "key TEXT NOT NULL, fn TEXT NOT NULL, kwargs TEXT NOT NULL, state TEXT NOT NULL, "
        "worker TEXT NOT NULL DEFAULT '', lease_until {real}, result TEXT NOT NULL DEFAULT '{{}}', "
        "PRIMARY KEY (job_id, idx))",
        "CREATE INDEX IF NOT EXISTS job_items_claim ON job_items(service, state)",
    ]),
]

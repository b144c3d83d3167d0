"""The PostgreSQL job store: one database shared by every replica of every service.

Selected by STEMLAB_DATABASE_URL=postgresql://user:password@host:port/db. Rows carry their
service's name, so one database holds all services' jobs. Claims lock the row they take and
skip rows other claimers hold (`FOR UPDATE SKIP LOCKED`); a claimed job is held by a lease its
worker renews; a job whose worker died is requeued by any replica once the lease runs out.
The schema is created and migrated by whichever replica starts first (an advisory lock keeps
two from migrating at once).
"""

from __future__ import annotations

import logging
import re
import threading
import time

import psycopg
from psycopg.rows import dict_row

from services.common.jobstore.base import MIGRATIONS, SqlJobStore

log = logging.getLogger(__name__)

_TYPES = {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"}
_MIGRATION_LOCK = 7_140_040  # any constant: the advisory lock the migrating replica holds
_PLACEHOLDER = re.compile(r"\?")


def _redacted(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


class PostgresJobStore(SqlJobStore):
    shared = True
    lock_clause = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, service: str, connect_timeout: float = 30.0):
        super().__init__(service)
        self.url = url
        # One connection per store, its statements one at a time: each is a single short statement
        # in its own transaction (claims included), and replicas x threads would otherwise exceed
        # the server's connection limit. Listening for new jobs has a connection of its own.
        self._conn: psycopg.Connection | None = None
        deadline = time.time() + connect_timeout
        while True:  # a database that starts beside the services (compose) takes a few seconds
            try:
                conn = self._connection()
                break
            except psycopg.OperationalError as e:
                if time.time() > deadline:
                    raise RuntimeError(f"cannot reach the job database {_redacted(url)}: {e}") from None
                time.sleep(1.0)
        self._migrate(conn)

    def _connection(self) -> psycopg.Connection:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
            return self._conn

    def _migrate(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied "
                         "DOUBLE PRECISION)")
            done = {r["version"] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    conn.execute(statement.format(**_TYPES).replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS"))
                conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, time.time()))
                log.info("job database: schema migrated to version %d", version)

    def _run(self, sql: str, args: tuple) -> tuple[list[dict], int]:
        sql = _PLACEHOLDER.sub("%s", sql)
        with self._lock:
            try:
                cursor = self._connection().execute(sql, args)
            except psycopg.OperationalError:
                # The connection broke (database restarted): one fresh try, then the error stands.
                if self._conn is not None:
                    self._conn.close()
                cursor = self._connection().execute(sql, args)
            return (cursor.fetchall() if cursor.description else []), cursor.rowcount

    def _execute(self, sql: str, args: tuple = ()) -> list[dict]:
        return self._run(sql, args)[0]

    def _rowcount(self, sql: str, args: tuple = ()) -> int:
        return self._run(sql, args)[1]

    # -- wake-ups: a queued job wakes idle workers of every replica at once ----------------------
    @property
    def _channel(self) -> str:
        return "stemlab_jobs_" + re.sub(r"[^a-z0-9_]", "_", self.service.lower())

    def create(self, job_id: str, kind: str, params: dict):
        job = super().create(job_id, kind, params)
        self._execute("SELECT pg_notify(?, '')", (self._channel,))
        return job

    def release(self, job_id: str, worker: str) -> bool:
        released = super().release(job_id, worker)
        if released:
            self._execute("SELECT pg_notify(?, '')", (self._channel,))
        return released

    def add_items(self, job_id: str, fn: str, tasks: list) -> None:
        super().add_items(job_id, fn, tasks)
        self._execute("SELECT pg_notify(?, '')", (self._channel,))  # idle replicas come and help

    def listen(self, wake, stopping: threading.Event) -> None:
        """Call `wake()` whenever a job of this service is queued, until `stopping` is set (a thread)."""
        while not stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    while not stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            wake()
            except psycopg.Error as e:  # the database restarted: the workers' polling covers the gap
                log.warning("job database: listening for new jobs failed (%s); retrying", e)
                stopping.wait(2.0)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def reset(self) -> None:
        """Drop every job of this service (tests)."""
        self._execute("DELETE FROM job_items WHERE service = ?", (self.service,))
        self._execute("DELETE FROM jobs WHERE service = ?", (self.service,))

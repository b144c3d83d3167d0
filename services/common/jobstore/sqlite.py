"""The SQLite job store: one file per service under the data root, run by one process.

The default, and all `make up` needs. One process runs a store's jobs (`claim`, an exclusive
lock the kernel drops when the process dies); other processes (a web server beside its worker)
may read it and queue jobs in it. A job found RUNNING when the runner starts belonged to a
process that died: it is marked FAILED with the error "interrupted".
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.common.jobstore.base import MIGRATIONS, SqlJobStore, StoreInUseError
from services.common.paths import ExclusiveLock, LockHeldError

_TYPES = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"}


class SqliteJobStore(SqlJobStore):
    def __init__(self, path: str | Path, service: str = ""):
        # One file is one service's: its rows keep the service "" (files older than the column).
        super().__init__("")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim: ExclusiveLock | None = None
        # timeout: a second process (web beside its worker) waits for a write lock, not fails.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()

    def _migrate(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied REAL)")
        for version, statements in MIGRATIONS:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self._db.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone():
                    for statement in statements:
                        try:
                            self._db.execute(statement.format(**_TYPES))
                        except sqlite3.OperationalError as e:
                            if "duplicate column" not in str(e):
                                raise
                    self._db.execute("INSERT INTO schema_migrations VALUES (?, strftime('%s','now'))", (version,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _execute(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _rowcount(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.release_claim()

    def release_claim(self) -> None:
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

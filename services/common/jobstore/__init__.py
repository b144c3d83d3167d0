"""The job store: one interface (base.SqlJobStore), two backends.

SQLite (the default): one file per service under the data root, one process runs its jobs.
PostgreSQL (STEMLAB_DATABASE_URL=postgresql://…): one database for every replica of every
service; replicas share the queue, leases hand a dead worker's job to another.

Settings read from the environment (every service and worker reads the same):
STEMLAB_DATABASE_URL, STEMLAB_JOB_LEASE_SECONDS (default 30: a dead worker's job is taken up
after at most this long), STEMLAB_JOB_MAX_ATTEMPTS (default 3: claims of one job before it
fails), STEMLAB_JOB_RETENTION_DAYS (default 30: ended jobs older than this are deleted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError
from services.common.jobstore.base import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    Item,
    JobNotFoundError,
    JobRecord,
    Progress,
    SqlJobStore,
    StoreInUseError,
)
from services.common.jobstore.sqlite import SqliteJobStore

__all__ = ["CANCELLED", "FAILED", "INTERRUPTED", "QUEUED", "RUNNING", "STATES", "SUCCEEDED", "TERMINAL", "Item",
           "JobNotFoundError", "JobRecord", "Progress", "SqlJobStore", "SqliteJobStore", "StoreInUseError",
           "StoreSettings", "database_url", "open_store", "store_settings"]


@dataclass(frozen=True)
class StoreSettings:
    lease_seconds: float = 30.0
    max_attempts: int = 3
    retention_days: float = 30.0


def _number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g} (got {raw})")
    return value


def store_settings() -> StoreSettings:
    return StoreSettings(lease_seconds=_number("STEMLAB_JOB_LEASE_SECONDS", 30.0, 1.0),
                         max_attempts=int(_number("STEMLAB_JOB_MAX_ATTEMPTS", 3, 1)),
                         retention_days=_number("STEMLAB_JOB_RETENTION_DAYS", 30.0, 0.001))


def database_url() -> str:
    url = os.environ.get("STEMLAB_DATABASE_URL", "").strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("STEMLAB_DATABASE_URL must be a postgresql:// URL (unset: SQLite files under the data root)")
    return url


def open_store(service: str, sqlite_path: str | Path) -> SqlJobStore:
    """The PostgreSQL store of `service` when STEMLAB_DATABASE_URL is set, else its SQLite file."""
    url = database_url()
    if url:
        from services.common.jobstore.postgres import PostgresJobStore  # psycopg only where used

        return PostgresJobStore(url, service)
    return SqliteJobStore(sqlite_path, service)

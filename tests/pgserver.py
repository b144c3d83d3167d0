"""A throwaway PostgreSQL server for tests and benchmarks: a cluster in a temporary folder.

Uses Debian's `postgresql` package (/usr/lib/postgresql/<version>/bin). PostgreSQL refuses to
run as root, so as root (CI) the cluster belongs to `nobody` and its programs run through
`runuser`. It listens on a free localhost port and on a unix socket in its folder, trusts local
connections (nothing but this machine can reach it) and is removed on exit.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servicetools import free_port


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def missing_reason() -> str:
    """Why no server can be started here ('' when one can)."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; `make install` does it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started as root"
    return ""


class PostgresServer:
    """`with PostgresServer() as pg: pg.url` — a fresh database, gone after the block."""

    def __init__(self, database: str = "stemlab"):
        self.database = database
        self.port = free_port()
        self.folder: Path | None = None
        self.bin = postgres_bin()

    @property
    def url(self) -> str:
        return f"postgresql://stemlab@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120, **kwargs)

    def __enter__(self) -> PostgresServer:
        if self.bin is None:
            raise RuntimeError(missing_reason())
        # /tmp, not pytest's tmp_path: the cluster's owner (nobody, under root) must reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="stemlab-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, "nobody")
        data = self.folder / "data"
        try:
            self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "stemlab", "-A", "trust", "-E", "UTF8",
                      "--no-sync")
            self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-w",
                      "-t", "60", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                      "-c fsync=off -c max_connections=200", "start")
            self._run(str(self.bin / "createdb"), "-h", str(self.folder), "-p", str(self.port), "-U", "stemlab",
                      self.database)
        except BaseException:
            self.__exit__()
            raise
        return self

    def log(self) -> str:
        path = self.folder / "server.log" if self.folder else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.folder is None:
            return
        if (self.folder / "data" / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
            except subprocess.SubprocessError:
                time.sleep(1)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

"""The data-root layout and safe, atomic file writing.

Every service finds its files through `DataRoot`, and every write goes to a temporary name in
the same folder and is renamed into place, so a crash never leaves half a file where a reader
looks. `safe_join` keeps names that come from metadata or requests inside the data root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; published files get the usual modes.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


class PathError(ValueError):
    """A path from metadata or a request would leave the folder it must stay in."""


# Names of an exported model: "guitar" or "guitar:3".
_MODEL_REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})(?::(\d+))?$")


def parse_model_ref(text: str) -> tuple[str, int | None]:
    """"guitar" -> ("guitar", None); "guitar:3" -> ("guitar", 3). Raises ValueError otherwise."""
    match = _MODEL_REF.match(text or "")
    if not match:
        raise ValueError(f"invalid model {text!r}: use NAME or NAME:VERSION (e.g. guitar:3)")
    return match.group(1), int(match.group(2)) if match.group(2) else None


def split_member(text: str) -> tuple[str, int | None]:
    """"guitar:10#2" -> ("guitar:10", 2): one network of an exported ensemble (1 is the first);
    "guitar:10" -> ("guitar:10", None). Raises ValueError for a member that is not a positive number."""
    ref, sep, member = (text or "").partition("#")
    if not sep:
        return ref, None
    if not member.isdigit() or int(member) < 1:
        raise ValueError(f"invalid model member {text!r}: use NAME[:VERSION]#MEMBER, members counted from 1 (e.g. guitar:10#2)")
    return ref, int(member)


def safe_join(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """Join `parts` under `root`, refusing absolute parts, `..` and symlinks that lead out."""
    base = Path(root).resolve()
    candidate = base
    for part in parts:
        text = os.fspath(part)
        if not text or "\x00" in text:
            raise PathError(f"empty or invalid path component {text!r}")
        piece = Path(text)
        if piece.is_absolute() or piece.drive:
            raise PathError(f"absolute path {text!r} is not allowed here")
        if any(p == ".." for p in piece.parts):
            raise PathError(f"path {text!r} may not contain '..'")
        candidate = candidate / piece
    resolved = candidate.resolve()
    if resolved != base and base not in resolved.parents:
        raise PathError(f"path {candidate} leads outside {base}")
    return candidate


def resolve_allowed(text: str | os.PathLike, root: str | os.PathLike,
                    allowed: list[str | os.PathLike] = (), what: str = "path") -> Path:
    """A path a request names: absolute, or relative to `root` (the data root); resolved with its
    symlinks, it must lie inside `root` or one of the `allowed` folders (the configured import roots).

    Checked before anything else, so a refused path also says nothing about whether it exists.
    Raises InvalidArgumentError for an empty or malformed path, PermissionDeniedError otherwise.
    """
    from services.common.errors import InvalidArgumentError, PermissionDeniedError

    text = os.fspath(text or "")
    if not text or "\x00" in text:
        raise InvalidArgumentError(f"a {what} is required" if not text else f"invalid {what} {text!r}")
    base = Path(root).resolve()
    path = Path(text).expanduser()
    if not path.is_absolute() and ".." in path.parts:
        raise InvalidArgumentError(f"{what} {text!r} may not contain '..': relative paths stay in the data root")
    path = (path if path.is_absolute() else base / path).resolve()
    folders = [base, *(Path(r).expanduser().resolve() for r in allowed)]
    if not any(path == folder or folder in path.parents for folder in folders):
        raise PermissionDeniedError(
            f"{what} {text} is outside the folders this service may read: the data root and the import "
            f"roots ({', '.join(map(str, folders))}); add a folder with STEMLAB_IMPORT_ROOTS")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    The temporary name keeps the file's suffix (writers pick the format from it) and starts
    with a dot so folder scans skip it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix if suffix is not None else target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path` that is renamed to `path` when the block succeeds.

    The temporary name starts with ".tmp-", which TensorFlow Serving and our scans ignore.
    `path` must not exist yet: published folders are immutable.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class LockHeldError(RuntimeError):
    """Another process (or another open in this one) holds the lock; `owner` is its pid as written."""

    def __init__(self, path: Path, owner: str):
        super().__init__(f"{path} is locked by pid {owner}")
        self.owner = owner


class ExclusiveLock:
    """An exclusive lock on `path`, held until `release()`; raises LockHeldError if taken.

    flock: the kernel drops it when the holder dies, even by kill -9, so a crash never leaves a
    stale lock. The file holds the holder's pid, for the message of whoever is refused.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeldError(path, owner) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


class DataRoot:
    """The folders under STEMLAB_DATA, as described in docs/architecture.md."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def mixes(self) -> Path:
        return self.root / "mixes"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    def ensure(self) -> DataRoot:
        for p in (self.library, self.mixes, self.datasets, self.runs, self.models, self.evaluations,
                  self.jobs, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def join(self, *parts: str | os.PathLike) -> Path:
        return safe_join(self.root, *parts)

    def relative(self, path: str | os.PathLike) -> str:
        """The path as stored in manifests and track files: relative to the root, with '/'."""
        return Path(path).resolve().relative_to(self.root).as_posix()

"""Dataset manifests: DATA/datasets/<name>/v<N>/manifest.yaml, immutable once written.

This module is the one reader and writer of manifests (processing builds them, training and
evaluation read them). Schema (version 1):

    schema: 1
    name: guitar22k
    version: 1
    instrument: guitar
    rate: 22050
    channels: 1
    created: "2026-11-25T12:00:00Z"
    code_version: "0.1.0+g1234abc"
    params: {...}                 # everything that defined this version (mixing, silence, split)
    sources: {synthetic: 3, solo: 1}   # relative weights when drawing training chunks
    pairs:
      - track: Synth_Song001
        source: synthetic
        split: train | validation
        instrument: mixes/guitar/22050/Synth_Song001/instrument.wav  # relative to the data root
        rest: mixes/guitar/22050/Synth_Song001/rest.wav
        seconds: 30.0
        sha256: {instrument: "...", rest: "..."}
    checksum: "..."               # sha256 over everything above, the manifest's identity

Versions are immutable: publication is exclusive (a lock per dataset, and the version folder is
created with mkdir, which fails if another build took the number), new builds point at
content-named hard links of the mix files (instrument.<sha256[:16]>.wav) that a re-mix never
rewrites, and `verify_files` compares the recorded checksums with the files whenever a version
is read for training or evaluation, refusing a changed file with DatasetChangedError.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.paths import DataRoot, PathError, atomic_write_text, safe_join

SCHEMA_VERSION = 1
SPLITS = ("train", "validation")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ManifestError(InvalidArgumentError):
    """A manifest is invalid or would overwrite an existing version."""


class DatasetNotFoundError(NotFoundError):
    """No dataset (or no such version of it)."""


class DatasetChangedError(FailedPreconditionError):
    """A file of a published version no longer has the content the version recorded."""


_HASH_CHUNK_BYTES = 4 << 20
_verified: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256, so a process hashes a file once
_verified_lock = threading.Lock()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _current_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if key in _verified:
            return _verified[key]
    digest = sha256_file(path)
    with _verified_lock:
        _verified[key] = digest
    return digest


def verify_files(manifest: Manifest, data_root: str | Path, pairs: list[Pair] | None = None) -> None:
    """Check every file of `pairs` (default: all) against the checksums the version recorded.

    Raises DatasetChangedError naming the first file that changed or vanished: a published
    version is what its numbers were measured on, and must not drift under them.
    """
    for pair in manifest.pairs if pairs is None else pairs:
        for role in ("instrument", "rest"):
            expected = pair.sha256.get(role)
            if not expected:
                continue
            rel = getattr(pair, role)
            path = Manifest.path_of(rel, data_root)
            try:
                found = _current_sha256(path)
            except FileNotFoundError:
                raise DatasetChangedError(f"dataset {manifest.name} v{manifest.version}: {rel} is gone; "
                                          "versions are immutable, build the dataset again for a new one") from None
            if found != expected:
                raise DatasetChangedError(
                    f"dataset {manifest.name} v{manifest.version}: {rel} changed since the version was "
                    f"published (sha256 {found[:12]}…, recorded {expected[:12]}…); versions are immutable: "
                    "build the dataset again to publish a new version")


def freeze_file(path: Path) -> tuple[Path, str]:
    """A content-named hard link of `path` (`<stem>.<sha256[:16]><suffix>` beside it) and the sha256.

    Writers replace mix files by renaming a new file over the name, so the link keeps the content
    it was hashed with: a manifest that points at it never sees a re-mix. The link is hashed, not
    the name, so a rename meanwhile cannot give the link another content than its name says.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    try:
        digest = sha256_file(tmp)
        frozen = path.with_name(f"{path.stem}.{digest[:16]}{path.suffix}")
        os.replace(tmp, frozen)
    finally:
        tmp.unlink(missing_ok=True)
    return frozen, digest


def validate_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


@dataclass(frozen=True)
class Pair:
    track: str
    source: str
    split: str
    instrument: str
    rest: str
    seconds: float
    sha256: dict = field(default_factory=dict)


@dataclass
class Manifest:
    name: str
    version: int
    instrument: str
    rate: int
    channels: int
    created: str
    code_version: str
    params: dict
    sources: dict[str, float]
    pairs: list[Pair]
    checksum: str = ""

    def split(self, split: str) -> list[Pair]:
        return [p for p in self.pairs if p.split == split]

    @staticmethod
    def path_of(rel: str, data_root: str | Path) -> Path:
        """Absolute path of a manifest entry; entries never leave the data root."""
        try:
            return safe_join(data_root, rel)
        except PathError as e:
            raise ManifestError(str(e)) from e

    def body(self) -> dict:
        d = asdict(self)
        d.pop("checksum")
        return {"schema": SCHEMA_VERSION, **d}

    def compute_checksum(self) -> str:
        canonical = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump({**self.body(), "checksum": self.checksum}, sort_keys=False)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"no manifest at {path}")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
        pairs = []
        for p in d.get("pairs") or []:
            if p["split"] not in SPLITS:
                raise ManifestError(f"{path}: pair {p.get('track')}: unknown split {p['split']!r}")
            pairs.append(Pair(track=str(p["track"]), source=str(p["source"]), split=p["split"],
                              instrument=str(p["instrument"]), rest=str(p["rest"]),
                              seconds=float(p["seconds"]), sha256=dict(p.get("sha256") or {})))
        m = Manifest(name=validate_dataset_name(d["name"]), version=int(d["version"]),
                     instrument=str(d["instrument"]), rate=int(d["rate"]),
                     channels=int(d.get("channels", 1)), created=str(d.get("created", "")),
                     code_version=str(d.get("code_version", "")), params=dict(d.get("params") or {}),
                     sources={str(k): float(v) for k, v in (d.get("sources") or {}).items()},
                     pairs=pairs, checksum=str(d.get("checksum", "")))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"{path}: invalid manifest: {e}") from e
    if m.checksum and m.checksum != m.compute_checksum():
        raise ManifestError(f"{path}: checksum does not match its content (edited by hand?)")
    return m


def dataset_dir(data_root: str | Path | DataRoot, name: str) -> Path:
    root = data_root if isinstance(data_root, DataRoot) else DataRoot(data_root)
    return safe_join(root.datasets, validate_dataset_name(name))


def versions(data_root: str | Path | DataRoot, name: str) -> list[int]:
    d = dataset_dir(data_root, name)
    if not d.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in d.iterdir()
                  if re.fullmatch(r"v\d+", p.name) and (p / "manifest.yaml").is_file())


def find_manifest(data_root: str | Path | DataRoot, name: str, version: int | None = None) -> Path:
    """Path of a dataset's manifest: the given version, or the latest."""
    found = versions(data_root, name)
    if not found:
        raise DatasetNotFoundError(f"no dataset named {name!r}")
    v = found[-1] if version is None else version
    if v not in found:
        raise DatasetNotFoundError(f"dataset {name!r} has no version {v} (has {found})")
    return dataset_dir(data_root, name) / f"v{v}" / "manifest.yaml"


@contextlib.contextmanager
def _publication_lock(data_root: str | Path | DataRoot, name: str):
    """One publication of a dataset at a time, across threads and processes."""
    folder = dataset_dir(data_root, name)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish_manifest(data_root: str | Path | DataRoot, manifest: Manifest) -> tuple[Path, bool]:
    """Write `manifest` as a new version, or return the existing version with the same content.

    Returns (path, created). Versions are never overwritten: the same parameters and files give
    the same checksum and so the same version; anything else makes version N+1. Two builds
    publishing at once take turns (a lock), and the version folder is made with mkdir, so even a
    writer that bypasses the lock cannot take a number that exists.
    """
    with _publication_lock(data_root, manifest.name):
        manifest.version = 0
        manifest.created = ""
        content_sum = manifest.compute_checksum()
        for v in versions(data_root, manifest.name):
            path = find_manifest(data_root, manifest.name, v)
            old = load_manifest(path)
            old.version, old.created = 0, ""
            if old.compute_checksum() == content_sum:
                return path, False
        existing = versions(data_root, manifest.name)
        manifest.version = (existing[-1] + 1) if existing else 1
        from services.common.library import now_iso

        manifest.created = now_iso()
        manifest.checksum = manifest.compute_checksum()
        path = dataset_dir(data_root, manifest.name) / f"v{manifest.version}" / "manifest.yaml"
        try:
            path.parent.mkdir()
        except FileExistsError:
            raise ManifestError(f"{path.parent} exists already; versions are immutable") from None
        atomic_write_text(path, manifest.to_yaml())
        return path, True

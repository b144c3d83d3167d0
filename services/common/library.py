"""The track library: DATA/library/<track_id>/ holds a track's stem files and its track.yaml.

This module is the one reader and writer of track.yaml (ingestion writes tracks, processing
and the web review page read them). Schema (version 1):

    schema: 1
    id: Synth_Song001            # folder name; [A-Za-z0-9._-], no leading dot
    title: Synth Song 001
    artist: stemlab
    source: medleydb | slakh | stems | solo | synthetic
    origin: /where/it/was/imported/from      # for idempotent re-import
    genre: Rock                  # or null
    rate: 44100
    channels: 2
    duration_seconds: 30.0
    stems:
      - file: stems/S01.wav      # relative to the track folder
        raw_instrument: clean electric guitar
        class: guitar            # one of CLASSES, or null while unmapped
        suggested: false         # true while the class is a guess from the file name
    marks:                       # per instrument class: mark -> when it was set (UTC ISO 8601)
      guitar: {checked: "2026-11-25T12:00:00Z"}
    suggestions:                 # from automatic quality checks, never applied silently
      - {instrument: guitar, mark: missing, stem: stems/S01.wav, evidence: {peak_dbfs: -72.1}}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from anyascii import anyascii

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.paths import DataRoot, PathError, atomic_write_text, safe_join

CLASSES = ("guitar", "bass", "drums", "percussion", "piano", "vocals", "other", "mix", "excluded")
MARKS = ("missing", "bleed", "bad_quality", "inaudible", "mislabeled", "detailed", "checked")
# A track is used for an instrument only if checked and none of these is set (the thesis' rule).
DISQUALIFYING_MARKS = ("missing", "inaudible", "bad_quality", "bleed", "mislabeled")
SOURCES = ("medleydb", "slakh", "stems", "solo", "synthetic")
SCHEMA_VERSION = 1
# The C loader is several times faster; both are safe loaders (no arbitrary objects).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TRACK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LibraryError(InvalidArgumentError):
    """A track, a class or a mark is invalid."""


class TrackNotFoundError(NotFoundError):
    """No track with that id in the library."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make_track_id(text: str) -> str:
    """A folder-safe id from a title or folder name ("My Song (live)" -> "My_Song_live").

    Other scripts are transliterated (anyascii: "Canción" -> "Cancion", "Гитара" -> "Gitara",
    "ギター" -> "gita"), so a user's names stay readable; a name with nothing left to spell
    gets "id-" and a hash of the name, so it still has an id of its own, the same every time.
    Only an empty name is refused.
    """
    if not text.strip():
        raise LibraryError(f"cannot make a track id from {text!r}")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", anyascii(text)).strip("._-")
    cleaned = re.sub(r"_+", "_", cleaned)[:128]
    if not re.search(r"[A-Za-z0-9]", cleaned):
        cleaned = "id-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    return cleaned


def validate_track_id(track_id: str) -> str:
    if not isinstance(track_id, str) or not _TRACK_ID.match(track_id):
        raise LibraryError(f"invalid track id {track_id!r}: use letters, digits, '.', '_' and '-'")
    return track_id


@dataclass
class Stem:
    file: str
    raw_instrument: str = ""
    cls: str | None = None
    suggested: bool = False

    def to_dict(self) -> dict:
        return {"file": self.file, "raw_instrument": self.raw_instrument, "class": self.cls,
                "suggested": self.suggested}

    @classmethod
    def from_dict(cls, d: dict) -> Stem:
        klass = d.get("class")
        if klass is not None and klass not in CLASSES:
            raise LibraryError(f"stem {d.get('file')!r}: unknown class {klass!r}")
        file = str(d["file"])
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise LibraryError(f"stem file {file!r} must be relative to the track folder")
        return cls(file=file, raw_instrument=str(d.get("raw_instrument") or ""), cls=klass,
                   suggested=bool(d.get("suggested", False)))


@dataclass
class Track:
    id: str
    source: str
    title: str = ""
    artist: str = ""
    origin: str = ""
    genre: str | None = None
    rate: int = 0
    channels: int = 0
    duration_seconds: float = 0.0
    stems: list[Stem] = field(default_factory=list)
    marks: dict[str, dict[str, str]] = field(default_factory=dict)
    suggestions: list[dict] = field(default_factory=list)

    # -- classes and marks -------------------------------------------------------------
    def classes(self) -> set[str]:
        return {s.cls for s in self.stems if s.cls}

    def stems_of(self, *classes: str) -> list[Stem]:
        return [s for s in self.stems if s.cls in classes]

    def has_mark(self, instrument: str, mark: str) -> bool:
        return mark in self.marks.get(instrument, {})

    def set_mark(self, instrument: str, mark: str, when: str | None = None) -> None:
        if mark not in MARKS:
            raise LibraryError(f"unknown mark {mark!r}; marks are {', '.join(MARKS)}")
        if instrument not in CLASSES:
            raise LibraryError(f"unknown instrument class {instrument!r}")
        self.marks.setdefault(instrument, {})[mark] = when or now_iso()

    def clear_mark(self, instrument: str, mark: str) -> None:
        if mark not in MARKS:
            raise LibraryError(f"unknown mark {mark!r}; marks are {', '.join(MARKS)}")
        self.marks.get(instrument, {}).pop(mark, None)
        if instrument in self.marks and not self.marks[instrument]:
            del self.marks[instrument]

    def usable_for(self, instrument: str, include_unchecked: bool = False,
                   ignore_marks: bool = False) -> bool:
        """Whether this track may be mixed for `instrument` (the thesis' selection rule)."""
        if instrument not in self.classes():
            return False
        if not ignore_marks and any(self.has_mark(instrument, m) for m in DISQUALIFYING_MARKS):
            return False
        return include_unchecked or self.has_mark(instrument, "checked")

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["stems"] = [s.to_dict() for s in self.stems]
        return {"schema": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Track:
        if not isinstance(d, dict):
            raise LibraryError("track.yaml must hold a mapping")
        try:
            track = cls(
                id=validate_track_id(str(d["id"])),
                source=str(d["source"]),
                title=str(d.get("title") or ""),
                artist=str(d.get("artist") or ""),
                origin=str(d.get("origin") or ""),
                genre=d.get("genre"),
                rate=int(d.get("rate") or 0),
                channels=int(d.get("channels") or 0),
                duration_seconds=float(d.get("duration_seconds") or 0.0),
                stems=[Stem.from_dict(s) for s in d.get("stems") or []],
                marks={str(k): {str(m): str(t) for m, t in (v or {}).items()}
                       for k, v in (d.get("marks") or {}).items()},
                suggestions=list(d.get("suggestions") or []),
            )
        except KeyError as e:
            raise LibraryError(f"track.yaml lacks the key {e}") from e
        if track.source not in SOURCES:
            raise LibraryError(f"track {track.id}: unknown source {track.source!r}")
        for inst, marks in track.marks.items():
            unknown = set(marks) - set(MARKS)
            if unknown:
                raise LibraryError(f"track {track.id}: unknown marks {sorted(unknown)} for {inst}")
        return track


class Library:
    """Tracks under DATA/library. Reads validate; writes are atomic."""

    def __init__(self, data_root: str | DataRoot):
        self.data = data_root if isinstance(data_root, DataRoot) else DataRoot(data_root)
        self.root = self.data.library

    def track_dir(self, track_id: str) -> Path:
        try:
            return safe_join(self.root, validate_track_id(track_id))
        except PathError as e:
            raise LibraryError(str(e)) from e

    def stem_path(self, track: Track, stem: Stem) -> Path:
        try:
            return safe_join(self.track_dir(track.id), stem.file)
        except PathError as e:
            raise LibraryError(str(e)) from e

    def exists(self, track_id: str) -> bool:
        return (self.track_dir(track_id) / "track.yaml").is_file()

    def ids(self) -> list[str]:
        """Track ids, sorted so every listing is deterministic."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / "track.yaml").is_file())

    def load(self, track_id: str) -> Track:
        path = self.track_dir(track_id) / "track.yaml"
        if not path.is_file():
            raise TrackNotFoundError(f"no track {track_id!r} in the library")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)
        except yaml.YAMLError as e:
            raise LibraryError(f"{path}: not valid YAML: {e}") from e
        return Track.from_dict(data)

    def tracks(self) -> list[Track]:
        return [self.load(i) for i in self.ids()]

    @contextlib.contextmanager
    def locked(self, track_id: str) -> Iterator[None]:
        """Hold the track's lock: every load-modify-save of one track takes it, in every thread and
        process, so two edits at once never lose one another's change. The lock file lives outside
        the track folder (DATA/.locks/library), which a re-import replaces by a rename."""
        path = self.data.root / ".locks" / "library" / f"{validate_track_id(track_id)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it if the holder dies
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def edit(self, track_id: str) -> Iterator[Track]:
        """The track as it is on disk now, saved when the block ends without an error; under its lock."""
        with self.locked(track_id):
            track = self.load(track_id)
            yield track
            self.save(track)

    def save(self, track: Track) -> Path:
        path = self.track_dir(track.id) / "track.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(track.to_dict(), sort_keys=False, allow_unicode=True))
        return path

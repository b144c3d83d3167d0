"""Quality marks and track lists in the thesis' published file formats, plus CSV.

Marks, one file per instrument (marks_guitar.yaml):
    {track name: {audible, bad_quality, bleed, checked, detailed, inaudible, mislabeled, missing: bool}}
("audible" was an extra "heard and fine" key of the thesis' tool: written on export as
checked-and-nothing-wrong, ignored on import.) CSV: one row per track and instrument with a
0/1 column per mark.

Track lists (tracks-<source>.yaml): [{name, instruments: [classes], stems: {<file name>:
{instrument: <class>, path: <absolute path on their server>}}}]; stem paths are re-rooted to
where the user keeps the audio (OLD=NEW prefixes, or a search by file name under a folder).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import yaml

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.library import (
    CLASSES,
    DISQUALIFYING_MARKS,
    MARKS,
    SOURCES,
    Library,
    Track,
    make_track_id,
)
from services.common.paths import PathError, safe_join
from services.ingestion.importers import StemSource, TrackSource, stem_file_name
from services.ingestion.mapping import Mapping

THESIS_KEYS = ("audible", "bad_quality", "bleed", "checked", "detailed", "inaudible", "mislabeled", "missing")
FORMATS = ("yaml", "csv")
# Keys a marks file may hold that are not marks: the thesis' "audible", and a person's notes.
NOT_MARKS = ("audible", "notes", "note", "comment", "comments")
_TRUE = {"1", "true", "yes", "y", "x"}
_FALSE = {"0", "false", "no", "n", ""}


class MarksError(InvalidArgumentError):
    """A marks file or track list is malformed."""


def _check_instrument(instrument: str) -> str:
    if instrument not in CLASSES:
        raise MarksError(f"unknown instrument class {instrument!r}; classes are {', '.join(CLASSES)}")
    return instrument


def _thesis_row(track: Track, instrument: str) -> dict[str, bool]:
    row = {m: track.has_mark(instrument, m) for m in MARKS}
    row["audible"] = row["checked"] and not any(row[m] for m in DISQUALIFYING_MARKS)
    return {k: row[k] for k in THESIS_KEYS}


def _marked_tracks(library: Library, instrument: str) -> list[Track]:
    return [t for t in library.tracks() if instrument in t.classes() or instrument in t.marks]


def export_marks(library: Library, instrument: str, fmt: str = "yaml") -> str:
    """Marks of every track that has `instrument` (or marks for it), sorted by track id."""
    _check_instrument(instrument)
    tracks = _marked_tracks(library, instrument)
    if fmt == "yaml":
        return yaml.safe_dump({t.id: _thesis_row(t, instrument) for t in tracks}, sort_keys=True)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["track", "instrument", *MARKS])
        for t in tracks:
            writer.writerow([t.id, instrument, *(int(t.has_mark(instrument, m)) for m in MARKS)])
        return out.getvalue()
    raise MarksError(f"unknown format {fmt!r}; use yaml or csv")


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise MarksError(f"{where}: {value!r} is not a yes/no value")


def _parse(text: str, fmt: str, instrument: str) -> Iterator[tuple[str, str, dict[str, bool]]]:
    """(track name, instrument, {mark: bool}) per entry of a marks file.

    A key that is neither a mark nor in NOT_MARKS is refused: a misspelt mark ("chekced") must not
    be dropped without a word. CSV headers are read as a spreadsheet writes them (a UTF-8 byte
    order mark, any case, spaces around)."""
    if fmt == "yaml":
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise MarksError(f"not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise MarksError("a marks file maps track names to their marks")
        for name, marks in data.items():
            if not isinstance(marks, dict):
                raise MarksError(f"track {name!r}: marks must be a mapping of mark -> true/false")
            keys = {str(k): v for k, v in marks.items()}
            _check_keys(keys, f"track {name!r}")
            yield str(name), instrument, {k: _as_bool(v, f"{name}.{k}") for k, v in keys.items() if k in MARKS}
    elif fmt == "csv":
        reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
        header = [h.strip().lower() for h in next(reader, [])]
        if "track" not in header:
            raise MarksError("a marks CSV needs a 'track' column")
        _check_keys({h: None for h in header if h and h not in ("track", "instrument")}, "the header")
        for n, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue  # a blank line
            row = dict(zip(header, values, strict=False))
            inst = (row.get("instrument") or instrument).strip()
            yield row["track"].strip(), inst, {k: _as_bool(v, f"line {n} {k}") for k, v in row.items() if k in MARKS}
    else:
        raise MarksError(f"unknown format {fmt!r}; use yaml or csv")


def _check_keys(keys: dict, where: str) -> None:
    unknown = sorted(k for k in keys if k not in MARKS and k not in NOT_MARKS)
    if unknown:
        raise MarksError(f"{where}: {', '.join(repr(k) for k in unknown)} is not a mark; marks are "
                         f"{', '.join(MARKS)} ({', '.join(NOT_MARKS)} are read and left alone); nothing was changed")


class _Tracks:
    """Track lookup by id, else by title or the id a title would get (the thesis used folder
    names). An id always wins; a title that several tracks share is refused, never guessed."""

    def __init__(self, tracks: list[Track]):
        self.by_id = {t.id: t for t in tracks}
        self.by_title: dict[str, dict[str, Track]] = {}
        for t in tracks:
            for key in {t.title, make_track_id(t.title) if t.title.strip() else ""} - {""}:
                self.by_title.setdefault(key, {})[t.id] = t

    def find(self, name: str) -> Track | None:
        if name in self.by_id:
            return self.by_id[name]
        found: dict[str, Track] = {}
        for key in {name, make_track_id(name) if name.strip() else ""} - {""}:
            found.update(self.by_title.get(key, {}))
        if len(found) > 1:
            raise MarksError(f"{name!r} is the title of several tracks ({', '.join(sorted(found))}): name it by its "
                             "track id; nothing was changed")
        return next(iter(found.values()), None)


def import_marks(library: Library, text: str, instrument: str, fmt: str = "yaml") -> dict:
    """Apply a marks file: true sets a mark (keeping an older timestamp), false clears it.

    Marks not named in the file are left alone. A file with a key that is not a mark, or a title
    several tracks share, changes nothing (MarksError). Returns {updated, unchanged, unmatched,
    ignored, changes} (changes: "TRACK INSTRUMENT +mark" or "-mark", each set or cleared).
    """
    if fmt != "csv" or instrument:
        _check_instrument(instrument)  # CSV rows may name their own instrument instead
    tracks = _Tracks(library.tracks())
    changed: dict[str, Track] = {}
    edits: dict[str, list] = {}
    matched: set[str] = set()
    unmatched, ignored = [], set()
    entries = list(_parse(text, fmt, instrument))  # parse everything before changing anything
    for name, inst, marks in entries:
        _check_instrument(inst)
        track = tracks.find(name)
        if track is None:
            unmatched.append(name)
            continue
        matched.add(track.id)
        edits.setdefault(track.id, []).append((inst, marks))
    ignored.update(_not_marks(text, fmt))
    done: list[str] = []
    for track_id, changes in edits.items():
        # Applied to the track as it is now, under its lock: marks set meanwhile are kept.
        with library.locked(track_id):
            track = library.load(track_id)
            before = {k: dict(v) for k, v in track.marks.items()}
            for inst, marks in changes:
                for mark, value in marks.items():
                    if value and not track.has_mark(inst, mark):
                        track.set_mark(inst, mark)
                        done.append(f"{track.id} {inst} +{mark}")
                    elif not value and track.has_mark(inst, mark):
                        track.clear_mark(inst, mark)
                        done.append(f"{track.id} {inst} -{mark}")
            if track.marks != before:
                library.save(track)
                changed[track.id] = track
    return {"updated": sorted(changed), "unchanged": sorted(matched - set(changed)),
            "unmatched": sorted(set(unmatched)), "ignored": sorted(ignored), "changes": done}


def _not_marks(text: str, fmt: str) -> set[str]:
    """The keys of a marks file that are read and left alone (NOT_MARKS) — said in the reply."""
    if fmt == "csv":
        header = next(csv.reader(io.StringIO(text.lstrip("\ufeff"))), [])
        return {h.strip().lower() for h in header} & set(NOT_MARKS)
    data = yaml.safe_load(text) or {}
    return {str(k) for marks in data.values() if isinstance(marks, dict) for k in marks} & set(NOT_MARKS)


# --- track lists ------------------------------------------------------------------------------

def parse_root_map(items: list[str]) -> list[tuple[str, Path]]:
    """"OLD=NEW" pairs, longest OLD first so the most specific prefix wins."""
    pairs = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise MarksError(f"root map {item!r} must look like OLD=NEW")
        pairs.append((old.rstrip("/"), Path(new).expanduser().resolve()))
    return sorted(pairs, key=lambda p: -len(p[0]))


class _Resolver:
    """Finds where a stem of a published track list lives on this machine.

    Only paths under the NEW roots or the search folder are ever returned: a list cannot make
    the importer read files the user did not point at.
    """

    def __init__(self, root_map: list[tuple[str, Path]], search_root: Path | None):
        self.root_map = root_map
        self.by_name: dict[str, list[Path]] = {}
        self.search_root = search_root
        if search_root is not None:
            for p in sorted(search_root.rglob("*")):
                if p.is_file():
                    self.by_name.setdefault(p.name, []).append(p)

    def resolve(self, file_name: str, original: str) -> Path:
        orig = PurePosixPath(original.replace("\\", "/")) if original else PurePosixPath(file_name)
        for old, new in self.root_map:
            if str(orig) == old or str(orig).startswith(old + "/"):
                rel = str(orig)[len(old):].lstrip("/")
                try:
                    p = safe_join(new, rel)
                except PathError as e:
                    raise MarksError(str(e)) from e
                if p.is_file():
                    return p
        candidates = self.by_name.get(orig.name) or self.by_name.get(file_name) or []
        if candidates:
            # Several files of that name: the one sharing the longest tail of folders wins.
            def shared_tail(p: Path) -> int:
                n = 0
                for a, b in zip(reversed(p.parts), reversed(orig.parts), strict=False):
                    if a != b:
                        break
                    n += 1
                return n
            best = max(candidates, key=lambda p: (shared_tail(p), -len(str(p))))
            try:
                return safe_join(self.search_root, best.relative_to(self.search_root))
            except PathError as e:
                raise MarksError(str(e)) from e
        raise NotFoundError(f"{file_name}: not found (from {original or 'no path'})")


def read_track_list(path: str | os.PathLike, mapping: Mapping, root_map: list[str] | None = None,
                    search_root: str | os.PathLike | None = None, source: str = "") -> Iterator[TrackSource | dict]:
    """Tracks of a thesis track list with their stems found on this machine."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"track list {path} does not exist")
    if not source:
        stem = path.stem
        source = stem.split("-", 1)[1] if stem.startswith("tracks-") else ""
    if source not in SOURCES:
        raise MarksError(f"source {source!r} unknown (name the file tracks-<source>.yaml or pass a "
                         f"source: {', '.join(SOURCES)})")
    if not root_map and search_root is None:
        raise MarksError("give --root-map OLD=NEW or a folder to search for the stem files")
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError) as e:
        raise MarksError(f"cannot read track list {path}: {e}") from e
    if not isinstance(entries, list):
        raise MarksError(f"{path}: a track list is a YAML list of tracks")
    search = Path(search_root).expanduser().resolve() if search_root is not None else None
    if search is not None and not search.is_dir():
        raise NotFoundError(f"{search} is not a folder")
    resolver = _Resolver(parse_root_map(root_map or []), search)
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name"):
            yield {"track": f"entry {n}", "stem": "", "reason": "not a {name, stems} mapping"}
            continue
        name = str(entry["name"])
        track = TrackSource(name=name, source=source, origin=f"tracklist:{source}:{name}", title=name)
        stems = entry.get("stems") or {}
        if not isinstance(stems, dict):
            yield {"track": name, "stem": "", "reason": "stems must be a mapping"}
            continue
        for file_name in sorted(stems, key=str):
            info = stems[file_name] or {}
            raw = str(info.get("instrument") or "")
            klass = raw if raw in CLASSES else mapping.lookup(raw) if raw else None
            try:
                found = resolver.resolve(str(file_name), str(info.get("path") or ""))
            except (MarksError, NotFoundError) as e:
                yield {"track": name, "stem": str(file_name), "reason": str(e)}
                continue
            track.stems.append(StemSource(path=found, name=stem_file_name(str(file_name)),
                                          raw_instrument=raw, cls=klass))
        if track.stems:
            yield track

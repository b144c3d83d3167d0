"""Labelling: listing tracks, confirming stem classes, quality marks, re-applying the mapping."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.library import CLASSES, MARKS, SOURCES, Library, LibraryError, Track
from services.ingestion.mapping import Mapping, split_instruments

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True)
class TrackFilter:
    has_class: str = ""        # tracks with a stem of this class
    instrument: str = ""       # with `mark`: the instrument the mark is for
    mark: str = ""             # tracks that have this mark (for `instrument`, or any)
    without_mark: bool = False  # invert the mark filter: tracks that lack it
    source: str = ""
    unmapped: bool = False     # tracks with an unmapped or suggested stem class

    def validate(self) -> TrackFilter:
        if self.has_class and self.has_class not in CLASSES:
            raise InvalidArgumentError(f"unknown class {self.has_class!r}")
        if self.instrument and self.instrument not in CLASSES:
            raise InvalidArgumentError(f"unknown instrument class {self.instrument!r}")
        if self.mark and self.mark not in MARKS:
            raise InvalidArgumentError(f"unknown mark {self.mark!r}; marks are {', '.join(MARKS)}")
        if self.source and self.source not in SOURCES:
            raise InvalidArgumentError(f"unknown source {self.source!r}; sources are {', '.join(SOURCES)}")
        return self

    def matches(self, t: Track) -> bool:
        if self.has_class and self.has_class not in t.classes():
            return False
        if self.source and t.source != self.source:
            return False
        if self.unmapped and not any(s.cls is None or s.suggested for s in t.stems):
            return False
        if self.mark:
            instruments = [self.instrument] if self.instrument else list(t.marks)
            has = any(t.has_mark(i, self.mark) for i in instruments)
            if has == self.without_mark:
                return False
        return True


def list_tracks(library: Library, flt: TrackFilter = TrackFilter(), page_size: int = 0,
                page_token: str = "") -> tuple[list[Track], str, int]:
    """(tracks of this page, next page token ("" on the last), number of matching tracks).

    The page token is the last track id of the previous page: stable while tracks are added.
    """
    flt.validate()
    size = page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgumentError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    matching = [t for t in library.tracks() if flt.matches(t)]
    after = [t for t in matching if not page_token or t.id > page_token]
    page = after[:size]
    next_token = page[-1].id if len(after) > size else ""
    return page, next_token, len(matching)


def get_track(library: Library, track_id: str) -> Track:
    try:
        if not library.exists(track_id):
            raise NotFoundError(f"no track {track_id!r} in the library")
        return library.load(track_id)
    except LibraryError as e:
        raise InvalidArgumentError(str(e)) from e


def set_stem_class(library: Library, track_id: str, stem_file: str, cls: str | None) -> Track:
    """Confirm or change a stem's class (None: back to unmapped). Clears `suggested`."""
    if cls is not None and cls not in CLASSES:
        raise InvalidArgumentError(f"unknown class {cls!r}; classes are {', '.join(CLASSES)}")
    get_track(library, track_id)  # NOT_FOUND / INVALID_ARGUMENT before taking the lock
    with library.edit(track_id) as track:
        matches = [s for s in track.stems if s.file == stem_file or s.file == f"stems/{stem_file}"]
        if not matches:
            raise NotFoundError(f"track {track_id} has no stem {stem_file!r}; stems are "
                                f"{', '.join(s.file for s in track.stems)}")
        matches[0].cls, matches[0].suggested = cls, False
    return track


def set_mark(library: Library, track_id: str, instrument: str, mark: str, on: bool = True) -> Track:
    """Set or clear one mark: load, change and save under the track's lock (concurrent marks all land)."""
    found = get_track(library, track_id)  # NOT_FOUND / INVALID_ARGUMENT before taking the lock
    if on and instrument not in found.classes():
        # A mark for an instrument the track has no stem of would be used by nothing (mix skips
        # the track); most often the stem is there under no class or another one.
        stems = ", ".join(f"{Path(st.file).name} ({st.cls or 'unmapped'})" for st in found.stems)
        raise FailedPreconditionError(f"track {track_id} has no {instrument} stem ({stems}): give a stem that class "
                                      f"first (stemlab dataset set-class, or the review page)")
    try:
        with library.edit(track_id) as track:
            if on:
                if not track.has_mark(instrument, mark):
                    track.set_mark(instrument, mark)
            else:
                track.clear_mark(instrument, mark)
    except LibraryError as e:
        raise InvalidArgumentError(str(e)) from e
    return track


def unmapped_names(library: Library) -> dict[str, int]:
    """Raw instrument names of stems still without a class, with how many stems carry them."""
    counts: Counter = Counter()
    for t in library.tracks():
        for s in t.stems:
            if s.cls is None:
                counts[s.raw_instrument or s.file] += 1
    return dict(sorted(counts.items()))


def apply_mapping(library: Library, mapping: Mapping, include_suggested: bool = True,
                  progress: Callable[[float, float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict:
    """Re-classify stems that have no confirmed class: unmapped ones, and (optionally) ones whose
    class is only a file-name suggestion. Classes a person set are never touched.

    Metadata names (MedleyDB/Slakh/solo) are looked up exactly; stem-folder files again by
    their file-name words.
    """
    ids = library.ids()
    changed, still = [], Counter()
    for n, tid in enumerate(ids):
        if should_stop is not None and should_stop():
            break
        with library.locked(tid):
            dirty = _map_track(library, library.load(tid), mapping, include_suggested, still)
        if dirty:
            changed.append(tid)
        if progress is not None:
            progress(n + 1, len(ids), f"mapped {tid}")
    return {"tracks_changed": changed, "still_unmapped": dict(sorted(still.items()))}


def _map_track(library: Library, track, mapping: Mapping, include_suggested: bool, still: Counter) -> bool:
    """Map one track's stems (under its lock); saves it and returns True if a class changed."""
    dirty = False
    for s in track.stems:
        if s.cls is not None and not (include_suggested and s.suggested):
            continue
        if track.source == "stems":
            # raw_instrument keeps the original file name (without suffix) of such stems.
            name = s.raw_instrument + "." + s.file.rsplit(".", 1)[-1] if s.raw_instrument else s.file
            match = mapping.suggest_from_filename(name.rsplit("/", 1)[-1])
            new, suggested = match.cls, match.cls is not None
        else:
            match = mapping.classify_instruments(split_instruments(s.raw_instrument))
            new, suggested = match.cls, False
        if (new, suggested) != (s.cls, s.suggested):
            s.cls, s.suggested, dirty = new, suggested, True
        if new is None:
            still[s.raw_instrument or s.file] += 1
    if dirty:
        library.save(track)
    return dirty

"""Importers: MedleyDB, Slakh2100 and plain stem folders into the track library.

Each reader turns a dataset folder into `TrackSource`s (what a track would be: its stems,
their instrument names and classes); `import_tracks` then writes them into DATA/library with
stems hard-linked (or copied across file systems). Readers list folders sorted, so the order
never depends on the file system, and resolve every file name from metadata with `safe_join`,
so nothing outside the folder the user pointed at is read.

Where metadata and files disagree the files win, and the disagreement is reported, never
silent: a stem file that exists is imported whatever its metadata says (a Slakh
`audio_rendered: false`, or a file the metadata does not list at all); a stem the metadata lists
whose file is missing is skipped. Each case is a `TrackSource.disagreements` entry that
`import_tracks` copies into the job's report.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.common.audio import AudioError, audio_info
from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.library import Library, Stem, Track, make_track_id
from services.common.paths import PathError, atomic_dir, safe_join
from services.ingestion.mapping import INSTRUMENT_SEPARATOR, Mapping

# What a stem folder's audio may be (everything is decoded by libsndfile or ffmpeg); a file with
# another suffix is listed as ignored in the import's report.
AUDIO_SUFFIXES = (".wav", ".wave", ".bwf", ".rf64", ".w64", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".mp2",
                  ".aif", ".aiff", ".aifc", ".caf", ".m4a", ".aac", ".alac", ".wv", ".ape", ".wma", ".mka",
                  ".ac3", ".au", ".snd")
# Content fingerprint: size plus the first and last bytes (cheap on 100 GB datasets, and a
# re-rendered or edited stem changes its size or its header/tail).
_FINGERPRINT_BYTES = 1 << 16

Progress = Callable[[float, float, str], None]
ShouldStop = Callable[[], bool]


class DatasetImportError(InvalidArgumentError):
    """A dataset folder or its metadata cannot be imported."""


@dataclass
class StemSource:
    path: Path                   # the file to import
    name: str                    # file name inside the track's stems/ folder
    raw_instrument: str = ""
    cls: str | None = None
    suggested: bool = False


@dataclass
class TrackSource:
    name: str                    # becomes the track id (made folder-safe)
    source: str                  # medleydb | slakh | stems | solo | synthetic
    origin: str                  # where it came from; recognises a re-import
    title: str = ""
    artist: str = ""
    genre: str | None = None
    stems: list[StemSource] = field(default_factory=list)
    suggestions: list[dict] = field(default_factory=list)
    # Where metadata and files disagree: {stem, file, action (imported | skipped), reason,
    # instrument, class}; see the module docstring.
    disagreements: list[dict] = field(default_factory=list)
    # Files beside the stems that are not audio by their suffix (listed in the report).
    ignored: list[str] = field(default_factory=list)


@dataclass
class SkippedTrack:
    """A track a reader leaves out on purpose; reported with its reason."""
    name: str
    reason: str


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)      # {track, stem, reason}
    unmapped: dict[str, int] = field(default_factory=dict)  # raw name -> number of stems
    disagreements: list[dict] = field(default_factory=list)  # {track, stem, file, action, reason, ...}
    skipped: list[dict] = field(default_factory=list)     # {track, reason}
    ignored: list[dict] = field(default_factory=list)     # {track, file}: not audio by its suffix
    duplicates: list[dict] = field(default_factory=list)  # {track, same_as, origin}: see _import_stems
    stopped: bool = False

    def to_dict(self) -> dict:
        return {"added": self.added, "updated": self.updated, "unchanged": self.unchanged,
                "errors": self.errors, "unmapped": self.unmapped, "disagreements": self.disagreements,
                "skipped": self.skipped, "ignored": self.ignored, "duplicates": self.duplicates,
                "stopped": self.stopped,
                "counts": {"added": len(self.added), "updated": len(self.updated),
                           "unchanged": len(self.unchanged), "errors": len(self.errors),
                           "disagreements": len(self.disagreements), "skipped": len(self.skipped),
                           "ignored": len(self.ignored), "duplicates": len(self.duplicates)}}


def sorted_dir(path: Path) -> list[Path]:
    """Entries of a folder in name order, without hidden files."""
    return sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def is_audio(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES


def has_audio(root: Path) -> bool:
    """Whether any file under `root` (hidden folders aside) is audio; stops at the first."""
    return any(is_audio(p) for p in root.rglob("*")
               if not any(part.startswith(".") for part in p.relative_to(root).parts))


def stem_file_name(original: str) -> str:
    """A folder-safe file name that keeps the suffix ("Bass Guitar.WAV" -> "Bass_Guitar.wav")."""
    p = Path(original)
    return make_track_id(p.stem) + p.suffix.lower()


def _require_dir(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NotFoundError(f"{root} is not a folder")
    return root.resolve()


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetImportError(f"{path}: cannot read metadata: {e}") from e
    if not isinstance(data, dict):
        raise DatasetImportError(f"{path}: metadata must be a mapping")
    return data


# --- MedleyDB -------------------------------------------------------------------------------

def read_medleydb(root: str | os.PathLike, mapping: Mapping) -> Iterator[TrackSource | dict]:
    """Tracks of a MedleyDB v1/v2 folder, sorted by song name.

    A song is a folder <Song>/ holding <Song>_STEMS/ (and usually <Song>_MIX.wav); its
    metadata <Song>_METADATA.yaml lies in the song folder or anywhere under `root` (the
    separate "Metadata" folder of the official download). Yields an error dict
    {track, stem, reason} instead of a track when a song cannot be read.
    """
    root = _require_dir(root)
    metadata_files = {p.name: p for p in sorted(root.rglob("*_METADATA.yaml"))}
    stems_dirs = sorted((p for p in root.rglob("*_STEMS") if p.is_dir()), key=lambda p: (p.name, str(p)))
    for stems_dir in stems_dirs:
        song = stems_dir.name[: -len("_STEMS")]
        meta_path = metadata_files.get(f"{song}_METADATA.yaml")
        if meta_path is None:
            yield {"track": song, "stem": "", "reason": "no _METADATA.yaml found"}
            continue
        try:
            yield _medleydb_track(stems_dir.parent, song, meta_path, mapping)
        except (DatasetImportError, PathError) as e:
            yield {"track": song, "stem": "", "reason": str(e)}


def _medleydb_track(song_dir: Path, song: str, meta_path: Path,
                    mapping: Mapping) -> TrackSource:
    meta = _load_yaml(meta_path)
    stem_dir = str(meta.get("stem_dir") or f"{song}_STEMS")
    track = TrackSource(
        name=song, source="medleydb", origin=str(song_dir / stem_dir),
        title=str(meta.get("title") or song), artist=str(meta.get("artist") or ""),
        genre=meta.get("genre"))
    stems_meta = meta.get("stems") or {}
    if not isinstance(stems_meta, dict):
        raise DatasetImportError(f"{meta_path}: 'stems' must be a mapping")
    listed: set[str] = set()
    for key in sorted(stems_meta, key=str):
        entry = stems_meta[key] or {}
        file_name = str(entry.get("filename") or f"{song}_STEM_{str(key)[1:]}.wav")
        instruments = entry.get("instrument") or []
        if isinstance(instruments, str):
            instruments = [instruments]
        instruments = [str(i) for i in instruments]
        raw = INSTRUMENT_SEPARATOR.join(instruments)
        match = mapping.classify_instruments(instruments)
        path = safe_join(song_dir, stem_dir, file_name)
        listed.add(path.name)
        if not path.is_file():
            track.disagreements.append(_disagreement(
                str(key), f"{stem_dir}/{file_name}", "skipped",
                f"listed in {meta_path.name} but the file is missing", raw, match.cls))
            continue
        track.stems.append(StemSource(path=path, name=stem_file_name(file_name),
                                      raw_instrument=raw, cls=match.cls))
    _add_unlisted(track, song_dir, stem_dir, lambda f: f.name in listed, meta_path.name, mapping,
                  name_prefix=f"{song}_")
    mix_name = str(meta.get("mix_filename") or f"{song}_MIX.wav")
    mix_path = safe_join(song_dir, mix_name)
    if mix_path.is_file():
        track.stems.append(StemSource(path=mix_path, name=stem_file_name(mix_name),
                                      raw_instrument="mix", cls="mix"))
    elif meta.get("mix_filename"):
        track.disagreements.append(_disagreement(
            "mix", mix_name, "skipped", f"named in {meta_path.name} but the file is missing", "mix", "mix"))
    if str(meta.get("has_bleed", "")).lower() in ("yes", "true"):
        # MedleyDB says so itself; a person confirms per instrument.
        for klass in sorted({s.cls for s in track.stems if s.cls not in (None, "mix")}):
            track.suggestions.append({"check": "metadata", "instrument": klass, "mark": "bleed",
                                      "stem": "", "evidence": {"has_bleed": True}})
    return track


def _disagreement(stem: str, file: str, action: str, reason: str, instrument: str = "",
                  cls: str | None = None) -> dict:
    """One place where metadata and files disagree; `action` is what the import did about it."""
    return {"stem": stem, "file": file, "action": action, "reason": reason, "instrument": instrument,
            "class": cls or ""}


def _add_unlisted(track: TrackSource, track_dir: Path, stem_dir: str, is_listed: Callable[[Path], bool],
                  meta_name: str, mapping: Mapping, name_prefix: str = "") -> None:
    """Audio files in the stems folder that the metadata does not list: imported, reported.

    Their class can only come from the file name (a suggestion), less `name_prefix` (the song's
    name, whose words say nothing about the stem: "Song" would suggest mix); without one the
    stem stays unmapped, and the track is not mixed until a person gives it a class.
    """
    folder = safe_join(track_dir, stem_dir)
    if not folder.is_dir():
        return
    for f in sorted_dir(folder):
        if not is_audio(f) or is_listed(f):
            continue
        path = safe_join(track_dir, stem_dir, f.name)  # refuses a symlink leading out
        match = mapping.suggest_from_filename(f.name.removeprefix(name_prefix))
        track.stems.append(StemSource(path=path, name=stem_file_name(f.name), raw_instrument=f.stem,
                                      cls=match.cls, suggested=match.cls is not None))
        how = (f"with the class {match.cls} suggested by its name" if match.cls
               else "without a class (give it one before the track can be mixed)")
        track.disagreements.append(_disagreement(
            f.stem, f"{stem_dir}/{f.name}", "imported", f"not listed in {meta_name}: imported {how}",
            f.stem, match.cls))


# --- Slakh2100 ------------------------------------------------------------------------------

# Slakh2100-redux moves tracks whose MIDI duplicates another track's into this folder.
SLAKH_OMITTED = "omitted"
# Stem audio as published: FLAC (slakh2100_flac_redux), WAV (BabySlakh, or converted with slakh-utils).
_SLAKH_SUFFIXES = (".flac", ".wav")


def read_slakh(root: str | os.PathLike, mapping: Mapping,
               limit: int = 0) -> Iterator[TrackSource | SkippedTrack | dict]:
    """Tracks of a Slakh2100 folder, sorted by track folder name.

    Both published layouts: slakh2100_flac_redux (train/, validation/, test/ and omitted/
    folders of TrackNNNNN/ with stems/SNN.flac, mix.flac, MIDI/, all_src.mid) and BabySlakh
    (TrackNNNNN/ directly, 16 kHz stems/SNN.wav and mix.wav). Each track's metadata.yaml lists
    its stems SNN (program_num, midi_program_name, inst_class, is_drum, audio_rendered, ...).

    The files decide which stems there are (see the module docstring): BabySlakh says
    `audio_rendered: false` for stems whose files it ships. Tracks under omitted/ are skipped
    and reported: redux left them out as MIDI duplicates of tracks it kept (point `root` at
    omitted/ itself to import them). Drum stems are drums whatever their program; otherwise
    the program name decides, then the instrument class. `limit` > 0 stops after that many
    tracks.
    """
    root = _require_dir(root)
    count = 0
    for meta_path in _slakh_metadata_files(root):
        if limit and count >= limit:
            return
        track_dir = meta_path.parent
        if SLAKH_OMITTED in track_dir.relative_to(root).parts[:-1]:
            yield SkippedTrack(track_dir.name, f"in {SLAKH_OMITTED}/: Slakh2100-redux left it out as a "
                                               "MIDI duplicate of another track")
            continue
        try:
            yield _slakh_track(track_dir, meta_path, mapping)
        except (DatasetImportError, PathError) as e:
            yield {"track": track_dir.name, "stem": "", "reason": str(e)}
        count += 1


def _slakh_metadata_files(root: Path) -> list[Path]:
    return sorted(root.rglob("metadata.yaml"), key=lambda p: (p.parent.name, str(p)))


def _slakh_track(track_dir: Path, meta_path: Path, mapping: Mapping) -> TrackSource:
    meta = _load_yaml(meta_path)
    audio_dir = str(meta.get("audio_dir") or "stems")
    track = TrackSource(name=track_dir.name, source="slakh", origin=str(track_dir), title=track_dir.name)
    stems_meta = meta.get("stems") or {}
    if not isinstance(stems_meta, dict):
        raise DatasetImportError(f"{meta_path}: 'stems' must be a mapping")
    for key in sorted(stems_meta, key=str):
        entry = stems_meta[key] or {}
        if not isinstance(entry, dict):
            raise DatasetImportError(f"{meta_path}: stem {key} must be a mapping")
        klass, raw = _slakh_class(entry, mapping)
        described = _slakh_description(entry)
        rendered = str(entry.get("audio_rendered", True)).lower() != "false"
        path = _first_existing(track_dir, audio_dir, str(key))
        if path is None:
            if rendered:
                tried = " or ".join(f"{audio_dir}/{key}{suffix}" for suffix in _SLAKH_SUFFIXES)
                track.disagreements.append(_disagreement(
                    str(key), f"{audio_dir}/{key}", "skipped",
                    f"listed in {meta_path.name} as rendered, but there is no {tried}", described, klass))
            continue  # not rendered and not there: metadata and files agree
        if not rendered:
            track.disagreements.append(_disagreement(
                str(key), f"{audio_dir}/{path.name}", "imported",
                f"{meta_path.name} says audio_rendered: false, but the file exists", described, klass))
        track.stems.append(StemSource(path=path, name=stem_file_name(path.name), raw_instrument=raw,
                                      cls=klass))
    listed = {str(k) for k in stems_meta}
    _add_unlisted(track, track_dir, audio_dir, lambda f: f.stem in listed, meta_path.name, mapping)
    for mix_name in ("mix.flac", "mix.wav"):
        mix_path = safe_join(track_dir, mix_name)
        if mix_path.is_file():
            track.stems.append(StemSource(path=mix_path, name=mix_name, raw_instrument="mix", cls="mix"))
            break
    return track


def _slakh_class(entry: dict, mapping: Mapping) -> tuple[str | None, str]:
    """(class, raw instrument name) of a Slakh stem's metadata."""
    program_name = str(entry.get("midi_program_name") or "")
    inst_class = str(entry.get("inst_class") or "")
    if entry.get("is_drum"):
        return "drums", program_name or inst_class or "drums"
    klass = mapping.lookup(program_name) if program_name else None
    if klass is None and inst_class:
        klass = mapping.lookup(inst_class)
    return klass, program_name or inst_class


def _slakh_description(entry: dict) -> str:
    """"Distortion Guitar, program 30": what the metadata says the stem plays."""
    name = str(entry.get("midi_program_name") or entry.get("inst_class") or "unnamed")
    parts = [name]
    if entry.get("program_num") is not None:
        parts.append(f"program {entry['program_num']}")
    if entry.get("is_drum"):
        parts.append("drum track")
    return ", ".join(parts)


def _first_existing(track_dir: Path, audio_dir: str, key: str) -> Path | None:
    for suffix in _SLAKH_SUFFIXES:
        p = safe_join(track_dir, audio_dir, key + suffix)
        if p.is_file():
            return p
    return None


# --- stem folders without metadata ------------------------------------------------------------

# A rhythm game's song folder (Frets on Fire, Clone Hero, YARG: a song.ini beside the audio) holds
# the charted parts and song.ogg, the rest of the band — not the whole song, which the folder does
# not have — and preview.ogg, a clip of the whole song. Elsewhere a file named "song" is a mix.
RHYTHM_GAME_CLASSES = {"song": "other", "preview": "excluded"}


def read_stem_folders(root: str | os.PathLike, mapping: Mapping) -> Iterator[TrackSource | dict]:
    """Every folder under `root` that directly holds audio files is one track (a song), with two
    exceptions where a person's layout puts one song's stems in subfolders (`song_folders`).

    Classes are suggested from the file names (whole words, longest match; see
    Mapping.suggest_from_filename; a stem in a subfolder also by the subfolder's name, so
    "Guitars/DI.wav" is guitar), in a rhythm game's song folder by RHYTHM_GAME_CLASSES first,
    and stay `suggested` until a person confirms them. Files that are not audio by their suffix
    are listed in the track's `ignored`, never dropped silently.
    Files that are symlinks leading out of `root` are refused.
    """
    root = _require_dir(root)
    for folder, files in song_folders(root, mapping):
        name = "_".join(folder.relative_to(root).parts) if folder != root else root.name
        track = TrackSource(name=name, source="stems", origin=str(folder), title=folder.name)
        game = (folder / "song.ini").is_file()
        try:
            for f in files:
                path = safe_join(root, f.relative_to(root))
                inner = f.relative_to(folder)
                raw = " ".join([*inner.parent.parts, f.stem])
                cls = (RHYTHM_GAME_CLASSES.get(f.stem.lower()) if game else None) or \
                    mapping.suggest_from_filename(raw + f.suffix).cls
                track.stems.append(StemSource(path=path, name=stem_file_name("_".join(inner.parts)),
                                              raw_instrument=raw, cls=cls, suggested=cls is not None))
        except PathError as e:
            yield {"track": name, "stem": "", "reason": str(e)}
            continue
        track.ignored = [f.relative_to(folder).as_posix() for d in {f.parent for f in files} | {folder}
                         for f in sorted_dir(d) if f.is_file() and not is_audio(f)]
        track.ignored.sort()
        yield track


def _audio_folders(root: Path) -> dict[Path, list[Path]]:
    """Every folder under `root` (itself included, hidden ones not) -> its audio files, for the
    folders that directly hold any; in path order."""
    folders = [root] + sorted((p for p in root.rglob("*") if p.is_dir()
                               and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                              key=lambda p: p.relative_to(root).as_posix())
    found = {}
    for folder in folders:
        files = [p for p in sorted_dir(folder) if is_audio(p)]
        if files:
            found[folder] = files
    return found


def song_folders(root: Path, mapping: Mapping) -> Iterator[tuple[Path, list[Path]]]:
    """(song folder, its stem files) for every song under `root`.

    A folder that holds audio is a song, except that one song's stems often sit in subfolders,
    and a person would call these one song:
    - a folder whose own audio is only the mix, beside one folder of stems ("Song/Song (final
      mix).mp3" and "Song/Stems/", itself perhaps in subfolders) or folders named for instruments:
      the audio of every folder below it is its stems;
    - a folder with no audio of its own whose audio subfolders (two or more, directly below it)
      are each named for an instrument ("Song/Guitars/", "Song/Drums/"): their audio is its stems.
    Anywhere else a folder inside another is a song of its own ("Album/Song1/"), and a folder of
    songs that have their own mix is never merged.
    """
    audio = _audio_folders(root)
    merged: list[Path] = []
    candidates = sorted({root, *audio, *(p for f in audio for p in f.parents if root in p.parents)},
                        key=lambda p: p.relative_to(root).as_posix())
    for folder in candidates:
        if any(m in folder.parents for m in merged):
            continue
        below = [f for f in audio if folder in f.parents]
        below_files = [f for sub in below for f in audio[sub]]
        own = audio.get(folder, [])
        if below and not any(_is_mix(f, mapping) for f in below_files) and (
                (own and all(_is_mix(f, mapping) for f in own)
                 and (_one_child(folder, below) or _instrument_subfolders(folder, below, mapping)))
                or (not own and _instrument_subfolders(folder, below, mapping))):
            merged.append(folder)
            yield folder, own + below_files
        elif own:
            yield folder, own


def _is_mix(path: Path, mapping: Mapping) -> bool:
    return mapping.suggest_from_filename(path.name).cls == "mix"


def _one_child(folder: Path, below: list[Path]) -> bool:
    """Whether every folder in `below` lies in one child of `folder`."""
    return len({sub.relative_to(folder).parts[0] for sub in below}) == 1


def _instrument_subfolders(folder: Path, below: list[Path], mapping: Mapping) -> bool:
    """Two or more audio folders, directly in `folder`, each named for an instrument (the whole
    name: "Guitars", "Bass Guitar"; not "Guitar Song")."""
    if len(below) < 2 or any(sub.parent != folder for sub in below):
        return False
    return all(mapping.instrument_named(sub.name) not in (None, "mix", "excluded") for sub in below)


# --- writing into the library -----------------------------------------------------------------

def fingerprint(path: Path) -> str:
    """Size plus hashes of the first and last 64 KiB: recognises the same file cheaply."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()


def _same_content(src: Path, dst: Path) -> bool:
    try:
        a, b = src.stat(), dst.stat()
    except OSError:
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_size == b.st_size and fingerprint(src) == fingerprint(dst)


def link_or_copy(src: Path, dst: Path, link: bool = True) -> None:
    """Hard-link `src` to `dst` (same file system) or copy it; `dst` must not exist."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copyfile(src, dst)


def _unique_names(stems: list[StemSource]) -> None:
    seen: set[str] = set()
    for s in stems:
        name, n = s.name, 2
        while name.lower() in seen:
            p = Path(s.name)
            name = f"{p.stem}_{n}{p.suffix}"
            n += 1
        s.name = name
        seen.add(name.lower())


def import_tracks(library: Library, sources: Iterable[TrackSource | SkippedTrack | dict], link: bool = True,
                  progress: Progress | None = None, should_stop: ShouldStop | None = None,
                  total: int = 0) -> ImportReport:
    """Write tracks into the library; returns what was added, updated, unchanged or refused.

    A track whose origin is already in the library is compared stem by stem (same names, same
    content); if nothing changed it is left alone, otherwise its stems are replaced and its
    marks kept. A stem whose audio cannot be read is reported and left out; a track left
    without stems is reported and not written. Every source's disagreements between metadata
    and files, and every track a reader skipped, are reported too.
    """
    report = ImportReport()
    by_origin = {t.origin: t for t in library.tracks() if t.origin}
    contents = ContentIndex(library)
    done = 0
    for item in sources:
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        if isinstance(item, dict):
            report.errors.append(item)
        elif isinstance(item, SkippedTrack):
            report.skipped.append({"track": item.name, "reason": item.reason})
        else:
            _import_one(library, item, by_origin, link, report, contents)
        done += 1
        if progress is not None:
            progress(done, max(total, done), f"{done} tracks read")
    return report


def _import_one(library: Library, src: TrackSource, by_origin: dict[str, Track], link: bool,
                report: ImportReport, contents: ContentIndex) -> None:
    track_id = _import_stems(library, src, by_origin, link, report, contents)
    # Named by the library's track id where there is one (it differs from the dataset's name
    # when another track already holds that name).
    report.disagreements.extend({"track": track_id or src.name, **d} for d in src.disagreements)
    report.ignored.extend({"track": track_id or src.name, "file": f} for f in src.ignored)


class ContentIndex:
    """Recognises stems that are, one for one, the content of a track already in the library: the
    same song imported from a second place. Tracks are keyed by their stems' sizes (read once
    per import), so only tracks with files of the same sizes are fingerprinted."""

    def __init__(self, library: Library):
        self.library = library
        self._by_sizes: dict[tuple[int, ...], list[Track]] | None = None

    @staticmethod
    def _sizes(paths: list[Path]) -> tuple[int, ...] | None:
        try:
            return tuple(sorted(p.stat().st_size for p in paths))
        except OSError:
            return None

    def _paths(self, track: Track) -> list[Path]:
        return [self.library.stem_path(track, st) for st in track.stems]

    def _index(self) -> dict[tuple[int, ...], list[Track]]:
        if self._by_sizes is None:
            self._by_sizes = {}
            for track in self.library.tracks():
                self.add(track)
        return self._by_sizes

    def add(self, track: Track) -> None:
        self._index().setdefault(self._sizes(self._paths(track)), []).append(track)

    def same_as(self, paths: list[Path]) -> Track | None:
        """A track whose stems have the content of these files, if there is one."""
        key = self._sizes(paths)
        candidates = self._index().get(key, []) if key is not None else []
        if not candidates:
            return None
        mine = sorted(fingerprint(p) for p in paths)
        return next((t for t in candidates if sorted(fingerprint(p) for p in self._paths(t)) == mine), None)


def _import_stems(library: Library, src: TrackSource, by_origin: dict[str, Track], link: bool,
                  report: ImportReport, contents: ContentIndex) -> str | None:
    """Write (or recognise) one track; its id, or None when none of its stems could be read.

    A new origin whose stems are the content of a track already there (a folder moved or copied
    and imported again, or a set that files one recording under two names on purpose) is added
    and reported under `duplicates`: two copies marked checked would feed one dataset twice, and
    could land one in training and one in validation, so a person decides."""
    good: list[tuple[StemSource, tuple[int, int, int]]] = []
    for stem in src.stems:
        try:
            good.append((stem, audio_info(stem.path)))
        except AudioError as e:
            report.errors.append({"track": src.name, "stem": stem.path.name, "reason": e.reason})
    if not good:
        report.errors.append({"track": src.name, "stem": "", "reason": "no readable stems"})
        return None
    stems = [s for s, _ in good]
    _unique_names(stems)
    for s in stems:
        if s.cls is None:
            key = s.raw_instrument or s.name
            report.unmapped[key] = report.unmapped.get(key, 0) + 1

    existing = by_origin.get(src.origin)
    if existing is not None:
        # Fresh from disk and under the track's lock until the new folder is in place: marks set
        # while a long import ran, or while this one is written, must survive an update.
        with library.locked(existing.id):
            return _update_track(library, src, stems, good, report, by_origin, link)
    same = contents.same_as([s.path for s in stems])
    track_id = _free_id(library, make_track_id(src.name))
    track_id = _store_track(library, src, stems, good, report, by_origin, link, track_id, None)
    if same is not None:
        report.duplicates.append({"track": track_id, "same_as": same.id, "origin": same.origin})
    contents.add(library.load(track_id))
    return track_id


def _update_track(library, src, stems, good, report, by_origin, link) -> str:
    """A source imported before: unchanged, or written again keeping its marks (call under the
    lock); its track id."""
    existing = library.load(by_origin[src.origin].id)
    old_dir = library.track_dir(existing.id)
    if (sorted(st.file for st in existing.stems) == sorted(f"stems/{s.name}" for s in stems)
            and all(_same_content(s.path, old_dir / "stems" / s.name) for s in stems)):
        report.unchanged.append(existing.id)
        return existing.id
    return _store_track(library, src, stems, good, report, by_origin, link, existing.id, existing)


def _store_track(library, src, stems, good, report, by_origin, link, track_id, existing) -> str:
    """Write the track (new, or replacing `existing` whose marks and confirmed classes it keeps);
    its track id."""
    infos = [i for _, i in good if i[0] > 0]
    rate, channels, _ = infos[0]
    track = Track(
        id=track_id, source=src.source, title=src.title or src.name, artist=src.artist,
        origin=src.origin, genre=src.genre, rate=rate, channels=max(i[1] for i in infos),
        duration_seconds=round(max(i[2] / i[0] for i in infos), 3),
        stems=[Stem(file=f"stems/{s.name}", raw_instrument=s.raw_instrument, cls=s.cls,
                    suggested=s.suggested) for s in stems],
        marks=dict(existing.marks) if existing else {},
        suggestions=list(src.suggestions))
    if existing is not None:
        # Keep the classes a person confirmed for stems that are still there.
        confirmed = {st.file: st for st in existing.stems if not st.suggested and st.cls}
        for st in track.stems:
            if st.file in confirmed and st.cls != confirmed[st.file].cls and st.suggested:
                st.cls, st.suggested = confirmed[st.file].cls, False
    _write_track(library, track, stems, link, replace=existing is not None)
    by_origin[src.origin] = track
    (report.updated if existing else report.added).append(track_id)
    return track_id


def _free_id(library: Library, base: str) -> str:
    candidate, n = base, 2
    while library.track_dir(candidate).exists():
        candidate = f"{base}_{n}"
        n += 1
    return candidate


def _write_track(library: Library, track: Track, stems: list[StemSource], link: bool,
                 replace: bool) -> None:
    """Build the track folder beside its final place and rename it in (never half-written)."""
    final = library.track_dir(track.id)
    staging = final.with_name(f".new-{track.id}") if replace else final
    if replace and staging.exists():
        shutil.rmtree(staging)
    with atomic_dir(staging) as tmp:
        (tmp / "stems").mkdir()
        for s in stems:
            link_or_copy(s.path, tmp / "stems" / s.name, link)
        text = yaml.safe_dump(track.to_dict(), sort_keys=False, allow_unicode=True)
        (tmp / "track.yaml").write_text(text, encoding="utf-8")
    if replace:
        old = final.with_name(f".old-{track.id}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)


def count_candidates(kind: str, root: str | os.PathLike, limit: int = 0) -> int:
    """Rough number of tracks a reader will yield (for progress totals)."""
    root = Path(root)
    if kind == "medleydb":
        n = sum(1 for p in root.rglob("*_STEMS") if p.is_dir())
    elif kind == "slakh":
        n = sum(1 for p in _slakh_metadata_files(root)
                if SLAKH_OMITTED not in p.parent.relative_to(root).parts[:-1])
    else:
        n = sum(1 for p in [root, *root.rglob("*")] if p.is_dir() and any(is_audio(f) for f in p.iterdir()))
    return min(n, limit) if limit else n


"""Real recorded performances as the instrument of generated songs (issue 36, experiment 34).

Every guitar the networks have heard in training is a General MIDI font or single recorded notes
played by MIDI; the real takes the project holds are all in `realset/`'s halves. This tool takes a
folder of generated songs in the MedleyDB layout, before they are imported, and replaces the
instrument's parts of each song that has one with a real solo take: the song's stems of that class
are dropped, one take (a random stretch of it, repeated with gaps if it is shorter than the song)
becomes the song's only stem of the class, at the level of the parts it replaces (their RMS, moved
by a random ±3 dB). The MIX file is the old mix less the dropped stems plus the take, so the song
still sums to its stems. Stem files, METADATA.yaml (the take under `real_instrument`) and MIX are
each written atomically; the dropped stems' files are removed after METADATA no longer names them.
A song already given a take is left alone.

The takes are files in a folder with a `takes.tsv` beside them (columns file, repo, commit, path,
licence, what; a header row). A take is refused if it is a recording of the real-recordings set,
a performance of a composition one of the set's GuitarSet takes or the take an independent check
reserves plays (GuitarSet's six players play the same 30 compositions on one guitar), or that take;
and, by its sound, if any stretch of it matches a stem of the set (the same recording copied into
another repository, at another level, rate or encoding).

With `--absent` instead of a takes folder, every song's parts of the instrument are replaced by
silence (a song without them is given a silent stem): songs where the instrument is absent and the
right output is silence, the case the real set's absent tracks measure (leakage).

    .venv/bin/python -m research.real_instrument SONGS_FOLDER TAKES_FOLDER --instrument guitar [--seed 0]
    .venv/bin/python -m research.real_instrument SONGS_FOLDER --absent --instrument guitar
    .venv/bin/python -m research.real_instrument --guitarset-tsv TAKES_FOLDER   # GuitarSet's audio_mono-mic files
    # then: stemlab dataset import medleydb SONGS_FOLDER
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from realset.build import ALL, RATE, rms
from research.real_rest import place, songs_in
from services.common.audio import resample, write_audio
from services.common.paths import atomic_write_text
from services.ingestion.mapping import Mapping

LEVEL_SPREAD_DB = 3.0  # the take's RMS against the parts it replaces, uniform in ±this
# The composition of the GuitarSet take an independent check reserves (issue 36), as the SHA-256 of
# its name, so the project never names it: that take and every other player's take of it are refused.
RESERVED_COMPOSITIONS = frozenset({"88682d98943f3e7606e3301acc6709a18b9b1a735ba85ae809c8466521243399"})
# The MedleyDB instrument name the take's stem is given, per class (its class through the mapping).
STEM_INSTRUMENT = {"guitar": "acoustic guitar", "piano": "piano"}


@dataclass(frozen=True)
class Take:
    file: Path
    repo: str
    commit: str
    path: str
    licence: str
    what: str


def composition(name: str) -> str | None:
    """`00_Jazz2-110-Bb_comp_mic.wav` -> `Jazz2-110-Bb`: a GuitarSet take's composition, else None."""
    m = re.match(r"^\d\d_([A-Za-z]+\d-\d+-[A-G][#b]?)(_|$)", Path(name).name)
    return m.group(1) if m else None


def reserved(name: str) -> bool:
    c = composition(name)
    return c is not None and hashlib.sha256(c.encode()).hexdigest() in RESERVED_COMPOSITIONS


def refused(take: Take) -> str | None:
    """Why a take may not be used for training, or None."""
    if any(r.repo == take.repo and r.path == take.path for r in ALL):
        return "a recording of the real-recordings set"
    if reserved(take.file.name) or reserved(Path(take.path).name):
        return "a composition an independent check reserves"
    held = {composition(r.path) for r in ALL} - {None}
    for c in {composition(take.file.name), composition(Path(take.path).name)} & held:
        return f"composition {c} is played in the real-recordings set"
    return None


STEMS = Path(__file__).resolve().parents[1] / "realset" / "stems"
MATCH_BANDS = 32
MATCH_HOP = 512
# Normalised cross-correlation of the band-change features at which a take counts as a copy of a
# stem. Measured (experiments 38, 39): copies of two set recordings, resampled and re-encoded as
# MP3, scored 0.82 and 0.93; the 25 takes those entries considered, none a copy, 0.49 at most.
COPY_SIMILARITY = 0.7


def band_changes(audio: np.ndarray) -> np.ndarray:
    """How each mel band's log level changes from frame to frame, standardised per band: the same
    for a copy at any gain, rate or lossy encoding, and unlike for another performance."""
    import librosa

    mel = librosa.feature.melspectrogram(y=audio.astype(np.float32), sr=RATE, n_fft=2048,
                                         hop_length=MATCH_HOP, n_mels=MATCH_BANDS)
    change = np.diff(np.log(mel + 1e-6), axis=1)
    change -= change.mean(axis=1, keepdims=True)
    return change / (change.std(axis=1, keepdims=True) + 1e-6)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The best normalised cross-correlation of the shorter feature matrix over every offset in
    the longer one (offsets where the longer one is near silence do not count)."""
    piece, whole = (a, b) if a.shape[1] <= b.shape[1] else (b, a)
    width, length = piece.shape[1], whole.shape[1]
    if width == 0:
        return 0.0
    n = 1 << int(np.ceil(np.log2(length + width)))
    corr = np.fft.irfft(np.fft.rfft(whole, n, axis=1) * np.conj(np.fft.rfft(piece, n, axis=1)), n, axis=1)
    corr = corr.sum(axis=0)[:length - width + 1]
    energy = np.concatenate([[0.0], np.cumsum((whole ** 2).sum(axis=0))])
    window = energy[width:] - energy[:length - width + 1]
    live = window > 0.25 * piece.size  # a standardised window holds about piece.size
    if not live.any():
        return 0.0
    return float((corr[live] / (np.linalg.norm(piece) * np.sqrt(window[live]))).max())


@functools.lru_cache(maxsize=2)
def set_features(stems: Path) -> dict[str, np.ndarray]:
    """Band changes of every stem of the real-recordings set that is not silence."""
    features = {}
    for f in sorted(stems.glob("*/*.flac")):
        audio = sf.read(f, dtype="float64")[0]
        if np.abs(audio).max() > 0:
            features[f"{f.parent.name}/{f.name}"] = band_changes(audio)
    return features


def copy_of_the_set(audio: np.ndarray, stems: Path = STEMS) -> str | None:
    """Why a take's audio may not be used (it matches a stem of the set), or None."""
    mine = band_changes(audio)
    score, stem = max(((similarity(mine, theirs), name) for name, theirs in set_features(stems).items()),
                      default=(0.0, ""))
    if score >= COPY_SIMILARITY:
        return f"its sound matches the real-recordings set's {stem} (similarity {score:.2f})"
    return None


GUITARSET_SOURCE = "GuitarSet (Zenodo record 3371780)"
GUITARSET_LICENCE = "CC BY 4.0 (GuitarSet, Xi et al., ISMIR 2018)"


def write_guitarset_tsv(folder: Path) -> int:
    """takes.tsv for the GuitarSet files in `folder` (as unzipped from its Zenodo record); returns rows."""
    rows = ["file\trepo\tcommit\tpath\tlicence\twhat"]
    for f in sorted(folder.glob("*.wav")):
        if composition(f.name) is not None:
            rows.append("\t".join([f.name, GUITARSET_SOURCE, "", f.name, GUITARSET_LICENCE,
                                    f"acoustic guitar, GuitarSet take {f.stem}"]))
    atomic_write_text(folder / "takes.tsv", "\n".join(rows) + "\n")
    return len(rows) - 1


def read_takes(folder: Path) -> tuple[list[Take], dict[str, str]]:
    """The usable takes listed in folder/takes.tsv, and the refused ones with why."""
    with (folder / "takes.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [c for c in ("file", "repo", "commit", "path", "licence", "what") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{folder / 'takes.tsv'}: no column {', '.join(missing)} (a tab-separated header row)")
    usable, skipped = [], {}
    for row in rows:
        take = Take(folder / row["file"], row["repo"], row["commit"], row["path"], row["licence"], row["what"])
        why = refused(take)
        if why:
            skipped[row["file"]] = why
        elif take.file.is_file():
            usable.append(take)
        else:
            skipped[row["file"]] = "file missing"
    return usable, skipped


def read_takes_audio(takes: list[Take]) -> dict[Path, np.ndarray]:
    """Every take's audio, read before any song changes, so an unreadable file changes nothing."""
    audio = {}
    for take in takes:
        try:
            audio[take.file] = read_take(take)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise SystemExit(f"real_instrument: cannot read {take.file}: {e}") from e
    return audio


def read_take(take: Take) -> np.ndarray:
    audio, rate = sf.read(take.file, always_2d=True, dtype="float64")
    return resample(audio.mean(axis=1)[None, :], rate, RATE)[0].astype(np.float64)


def replace_in_song(song: Path, instrument: str, take: Take | None, audio: np.ndarray | None, level_db: float,
                    rng: np.random.Generator, mapping: Mapping) -> dict | None:
    """Give one song `take` (or silence, if None) in place of its stems of class `instrument`; None if it
    was given one before, or has no such stems and a take is given."""
    meta_path = song / f"{song.name}_METADATA.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    if meta.get("real_instrument") is not None:
        return None
    drop = [k for k, s in meta["stems"].items() if mapping.lookup(s["instrument"]) == instrument]
    if not drop and take is not None:
        return None
    mix_path = song / meta["mix_filename"]
    mix, rate = sf.read(mix_path, always_2d=True, dtype="float64")
    if rate != RATE:
        raise ValueError(f"{song.name}: {rate} Hz; takes are read at {RATE} Hz (synth --rate {RATE})")
    stems_dir = song / meta["stem_dir"]
    old = np.zeros_like(mix)
    for k in drop:
        old += sf.read(stems_dir / meta["stems"][k]["filename"], always_2d=True, dtype="float64")[0]
    part = np.zeros(len(mix))
    if take is not None:
        part = place(audio, len(mix), False, rng)
        part *= 10 ** (level_db / 20) * rms(old.mean(axis=1)) / max(rms(part), 1e-9)
    stereo = np.repeat(part[:, None], mix.shape[1], axis=1)
    key = "S80"
    name = f"{song.name}_STEM_80.wav"
    write_audio(stems_dir / name, stereo.T, RATE, subtype="FLOAT")
    write_audio(mix_path, (mix - old + stereo).T, RATE, subtype="FLOAT")
    dropped = {k: meta["stems"].pop(k)["filename"] for k in drop}
    meta["stems"][key] = {"component": "", "filename": name, "instrument": STEM_INSTRUMENT[instrument], "raw": {}}
    added = {"stem": key, "absent": True, "replaced": sorted(dropped)}
    if take is not None:
        added = {"stem": key, "take": take.file.name, "repository": take.repo, "path": take.path,
                 "commit": take.commit, "licence": take.licence, "level_db": round(level_db, 2),
                 "replaced": sorted(dropped)}
    meta["real_instrument"] = added
    atomic_write_text(meta_path, yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    for f in dropped.values():
        (stems_dir / f).unlink(missing_ok=True)
    return added


def make_absent(folder: Path, instrument: str) -> int:
    """Every song of the folder without the instrument: its parts replaced by a silent stem."""
    mapping = Mapping.defaults()
    songs = songs_in(folder)
    given = sum(replace_in_song(song, instrument, None, None, 0.0, np.random.default_rng(0), mapping) is not None
                for song in songs)
    print(json.dumps({"songs": len(songs), "absent": given}, sort_keys=True))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("songs", type=Path, nargs="?", help="a folder of generated songs (MedleyDB layout)")
    ap.add_argument("takes", type=Path, nargs="?", help="a folder of takes with takes.tsv")
    ap.add_argument("--guitarset-tsv", type=Path, metavar="FOLDER",
                    help="only write FOLDER/takes.tsv for the GuitarSet files in it")
    ap.add_argument("--absent", action="store_true", help="silence instead of takes")
    ap.add_argument("--instrument", choices=sorted(STEM_INSTRUMENT), default="guitar")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.guitarset_tsv is not None:
        print(json.dumps({"takes": write_guitarset_tsv(args.guitarset_tsv)}))
        return 0
    if args.songs is None or not args.songs.is_dir():
        raise SystemExit(f"real_instrument: {args.songs} is not a folder of generated songs")
    if args.absent:
        return make_absent(args.songs, args.instrument)
    if args.takes is None or not (args.takes / "takes.tsv").is_file():
        raise SystemExit("real_instrument: give a folder with takes.tsv, or --absent")
    try:
        takes, skipped = read_takes(args.takes)
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"real_instrument: {e}") from e
    audio = read_takes_audio(takes)
    for take in list(takes):
        why = copy_of_the_set(audio[take.file])
        if why:
            skipped[take.file.name] = why
            takes.remove(take)
    if not takes:
        raise SystemExit(f"real_instrument: no usable take in {args.takes}: {skipped}")
    mapping = Mapping.defaults()
    counts: dict[str, int] = {}
    songs = songs_in(args.songs)
    for song in songs:
        # One stream per song (its name), so adding songs to the folder does not change earlier draws.
        rng = np.random.default_rng([args.seed, int.from_bytes(song.name.encode()[-8:], "big")])
        take = takes[int(rng.integers(len(takes)))]
        level = float(rng.uniform(-LEVEL_SPREAD_DB, LEVEL_SPREAD_DB))
        if replace_in_song(song, args.instrument, take, audio[take.file], level, rng, mapping):
            counts[take.file.name] = counts.get(take.file.name, 0) + 1
    print(json.dumps({"songs": len(songs), "given": sum(counts.values()), "takes": counts,
                      "refused": skipped}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

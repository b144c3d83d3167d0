"""Dataset builds: a named, versioned manifest of instrument/rest pairs from one mix set.

Tracks come from a mix set (plain or silence-adjusted), are checked again against the library
(a track marked bleed since it was mixed is left out; a pair whose stems changed is stale),
combined across sources with ratios and an optional cap, and split into train/validation by
the md5 of the track id (the thesis' rule) or an explicit validation list. Every choice is
deterministic, so building twice from the same files gives the same manifest and version;
services.common.manifest.publish_manifest makes a new version when anything changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Callable, Sequence
from pathlib import Path

from services.common.audio import audio_info
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.library import SOURCES, Library, LibraryError, TrackNotFoundError
from services.common.manifest import Manifest, Pair, freeze_file, publish_manifest, validate_dataset_name
from services.common.paths import DataRoot
from services.processing.mixing import MIXING_VERSION, stem_roles, stems_fingerprint
from services.processing.mixsets import (
    INSTRUMENT_FILE,
    REST_FILE,
    SILENCE_FILE,
    STATS_FILE,
    MixSet,
    read_yaml,
)
from services.processing.pool import run_tracks
from services.processing.silence_sets import SILENCE_VERSION

DEFAULT_VALIDATION_RATIO = 0.2
_HASH_CHUNK_BYTES = 1 << 20


def code_version() -> str:
    """Package version plus the versions of the mixing and silence arithmetic."""
    try:
        package = importlib.metadata.version("stemlab")
    except importlib.metadata.PackageNotFoundError:
        package = "0+unknown"
    return f"{package}+mix{MIXING_VERSION}.silence{SILENCE_VERSION}"


def track_hash_fraction(track_id: str) -> float:
    """A stable number in [0, 1) from the md5 of the track id (the thesis' split rule)."""
    return int(hashlib.md5(track_id.encode("utf-8")).hexdigest(), 16) / 16**32


def split_of(track_id: str, validation_ratio: float, validation_tracks: frozenset[str] | None) -> str:
    if validation_tracks is not None:
        return "validation" if track_id in validation_tracks else "train"
    return "validation" if track_hash_fraction(track_id) < validation_ratio else "train"


def allocate(available: dict[str, int], ratios: dict[str, float], max_tracks: int | None) -> dict[str, int]:
    """How many tracks to take from each source.

    Without a cap, all of them. With one, max_tracks is shared in proportion to the ratios
    (largest remainder); a source with fewer tracks than its share gives what it has, and the
    shortfall is not made up from the others, so the ratio holds as far as the data allows.
    """
    if max_tracks is None:
        return dict(available)
    total_weight = sum(ratios.values())
    exact = {s: max_tracks * w / total_weight for s, w in ratios.items()}
    counts = {s: int(v) for s, v in exact.items()}
    # Ties go to the heavier source, then by name, so the result never depends on dict order.
    order = sorted(exact, key=lambda s: (-(exact[s] - counts[s]), -ratios[s], s))
    for s in order[: max_tracks - sum(counts.values())]:
        counts[s] += 1
    return {s: min(counts[s], available.get(s, 0)) for s in ratios}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def pair_files(data_root: str, folder: str, track_id: str) -> dict:
    """Length and checksums of one pair (runs in a worker). The version points at content-named
    links of the files (`freeze_file`), so a later re-mix writes new files and never these."""
    data = DataRoot(data_root)
    root = data.join(folder)
    instrument, instrument_sum = freeze_file(root / INSTRUMENT_FILE)
    rest, rest_sum = freeze_file(root / REST_FILE)
    rate, _, frames = audio_info(instrument)
    rest_rate, _, rest_frames = audio_info(rest)
    if (rate, frames) != (rest_rate, rest_frames):
        raise FailedPreconditionError(f"{folder}: instrument and rest differ in rate or length; mix it again")
    return {"track": track_id, "status": "hashed", "seconds": round(frames / rate, 6),
            "files": {"instrument": instrument.name, "rest": rest.name},
            "sha256": {"instrument": instrument_sum, "rest": rest_sum}}


def _parse_ratios(sources: dict[str, float] | None) -> dict[str, float] | None:
    if not sources:
        return None
    ratios = {}
    for source, ratio in sources.items():
        if source not in SOURCES:
            raise InvalidArgumentError(f"unknown source {source!r}; sources are {', '.join(SOURCES)}")
        if not (isinstance(ratio, int | float) and ratio > 0):
            raise InvalidArgumentError(f"ratio of {source} must be a positive number, got {ratio!r}")
        ratios[source] = float(ratio)
    return dict(sorted(ratios.items()))


def _candidates(data: DataRoot, library: Library, mixset: MixSet, mixed: Sequence[str], instrument: str,
                only: frozenset[str] | None, ratios: dict[str, float] | None, include_unchecked: bool,
                ignore_marks: bool) -> tuple[dict[str, list[str]], dict[str, dict], list[dict]]:
    """The mixed tracks a dataset may use, per source, with their stems' provenance; and the tracks
    left out, each with the reason a person can act on."""
    base = mixset.base()
    candidates: dict[str, list[str]] = {}
    provenance: dict[str, dict] = {}
    left_out = []
    for track_id in mixed:
        if only is not None and track_id not in only:
            continue
        folder = mixset.track_dir(data, track_id)
        if mixset.silence is not None and read_yaml(folder / SILENCE_FILE).get("discarded"):
            left_out.append({"track": track_id, "reason": "discarded by silence adjustment"})
            continue
        try:
            track = library.load(track_id)
        except (LibraryError, TrackNotFoundError):  # removed (or unreadable) since it was mixed
            left_out.append({"track": track_id, "reason": "no longer in the library"})
            continue
        if not track.usable_for(instrument, include_unchecked=include_unchecked, ignore_marks=ignore_marks):
            marks = [m for m in ("missing", "inaudible", "bad_quality", "bleed", "mislabeled")
                     if track.has_mark(instrument, m)]
            left_out.append({"track": track_id, "reason": f"not usable for {instrument} now"
                             + (f" (marked {', '.join(marks)})" if marks else " (not checked)")})
            continue
        stats = read_yaml(base.track_dir(data, track_id) / STATS_FILE)
        try:
            current = stems_fingerprint(library, track, stem_roles(track, base.classes()), base)
        except (OSError, ValueError) as e:
            left_out.append({"track": track_id, "reason": f"stems unreadable: {e}"})
            continue
        if stats.get("fingerprint") != current:
            left_out.append({"track": track_id, "reason": "stems changed since mixing; run `stemlab mix` again"})
            continue
        if ratios is not None and track.source not in ratios:
            continue
        candidates.setdefault(track.source, []).append(track_id)
        provenance[track_id] = {
            "origin": track.origin,
            "stems": [{"file": s["file"], "class": s["class"], "role": s["role"], "bytes": s["bytes"]}
                      for s in current["stems"]],
        }
    return candidates, provenance, left_out


def build_dataset(data_root: str | Path, name: str, instrument: str, rate_hz: int, stereo: bool = False,
                  also: Sequence[str] = (), sources: dict[str, float] | None = None, max_tracks: int | None = None,
                  silence_adjusted: tuple[float, float] | None = None,
                  validation_ratio: float = DEFAULT_VALIDATION_RATIO, validation_tracks: Sequence[str] | None = None,
                  tracks: Sequence[str] | None = None, include_unchecked: bool = False, ignore_marks: bool = False,
                  workers: int | None = None,
                  progress: Callable[[float, float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict:
    """Publish the manifest of dataset `name` (a new version only when something changed).

    tracks: only these track ids are candidates (None: every mixed track); a listed id that has no
    pair in the mix set is reported in "unknown_tracks".
    Returns {"name", "version", "created", "path", "pairs", "train", "validation", "left_out", ...}.
    """
    data = DataRoot(data_root)
    validate_dataset_name(name)
    if not 0.0 <= validation_ratio < 1.0:
        raise InvalidArgumentError(f"validation ratio must be in [0, 1), got {validation_ratio}")
    if max_tracks is not None and max_tracks < 1:
        raise InvalidArgumentError(f"max tracks must be at least 1, got {max_tracks}")
    ratios = _parse_ratios(sources)
    only = None if tracks is None else frozenset(tracks)
    if only is not None and not only:
        raise InvalidArgumentError("the track list is empty")
    mixset = MixSet(instrument, int(rate_hz), bool(stereo), tuple(also), silence_adjusted)
    mixset.require(data)
    library = Library(data)

    # 1. Candidates: finished pairs whose track is still usable and whose mix is current.
    mixed = mixset.track_ids(data)
    candidates, provenance, left_out = _candidates(data, library, mixset, mixed, instrument, only, ratios,
                                                   include_unchecked, ignore_marks)

    # 2. Choose per source, deterministically: tracks ordered by the md5 of their id.
    available = {s: len(ids) for s, ids in sorted(candidates.items())}
    weights = ratios or {s: float(n) for s, n in available.items()}
    counts = allocate(available, weights, max_tracks)
    chosen = sorted(
        (tid, source)
        for source, ids in candidates.items()
        for tid in sorted(ids, key=lambda t: (track_hash_fraction(t), t))[: counts.get(source, 0)]
    )
    if not chosen:
        raise FailedPreconditionError(
            f"no usable pairs in {data.relative(mixset.root(data))}"
            + (f" for sources {', '.join(ratios)}" if ratios else "")
            + (" among the listed tracks" if only is not None else "")
            + (f"; left out: {', '.join(sorted({x['reason'] for x in left_out}))}" if left_out else ""))

    # 3. Split.
    val_set = None
    unknown_validation: list[str] = []
    if validation_tracks is not None:
        val_set = frozenset(validation_tracks)
        unknown_validation = sorted(val_set - {tid for tid, _ in chosen})

    # 4. Checksums (the files may be large: spread over the cores).
    tasks = [(tid, {"data_root": str(data.root), "folder": data.relative(mixset.track_dir(data, tid)),
                    "track_id": tid}) for tid, _ in chosen]
    rows, stopped = run_tracks(pair_files, tasks, workers=workers, progress=progress, should_stop=should_stop)
    if stopped:
        return {"name": name, "stopped": True, "pairs": 0}
    by_track = {r["track"]: r for r in rows}
    pairs = []
    for tid, source in chosen:
        row = by_track[tid]
        if row.get("status") != "hashed":
            left_out.append({"track": tid, "reason": row.get("error", "unreadable pair")})
            continue
        folder = data.relative(mixset.track_dir(data, tid))
        pairs.append(Pair(track=tid, source=source, split=split_of(tid, validation_ratio, val_set),
                          instrument=f"{folder}/{row['files']['instrument']}", rest=f"{folder}/{row['files']['rest']}",
                          seconds=row["seconds"], sha256=row["sha256"]))
    if not pairs:
        raise FailedPreconditionError("no pair of the chosen tracks could be read")

    params = {
        "mix_set": mixset.to_dict(),
        "mix_folder": data.relative(mixset.root(data)),
        "sources": ratios,
        "max_tracks": max_tracks,
        # Only when given, so manifests built without a list stay as they were (no new version).
        **({"tracks": sorted(only)} if only is not None else {}),
        "validation": ({"tracks": sorted(val_set)} if val_set is not None
                       else {"ratio": validation_ratio, "rule": "md5(track id) / 16**32 < ratio"}),
        "include_unchecked": include_unchecked,
        "ignore_marks": ignore_marks,
        "selection": {s: {"available": available.get(s, 0), "chosen": counts.get(s, 0)} for s in sorted(counts)},
        "left_out": sorted(left_out, key=lambda x: x["track"]),
        "source_tracks": {p.track: provenance[p.track] for p in pairs},
    }
    manifest = Manifest(name=name, version=0, instrument=instrument, rate=int(rate_hz), channels=mixset.channels,
                        created="", code_version=code_version(), params=params,
                        sources={s: float(w) for s, w in sorted(weights.items()) if counts.get(s)},
                        pairs=pairs)
    path, created = publish_manifest(data, manifest)
    train = sum(p.split == "train" for p in pairs)
    return {"name": name, "version": manifest.version if created else int(path.parent.name[1:]),
            "created": created, "path": data.relative(path), "pairs": len(pairs), "train": train,
            "validation": len(pairs) - train, "seconds": round(sum(p.seconds for p in pairs), 3),
            "sources": manifest.sources, "selection": params["selection"], "left_out": params["left_out"],
            "unknown_validation_tracks": unknown_validation,
            "unknown_tracks": sorted(only - set(mixed)) if only is not None else [], "stopped": False}

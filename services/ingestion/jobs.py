"""The ingestion service's jobs: thin adapters from job params to the domain functions."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.errors import InvalidArgumentError
from services.common.library import Library
from services.common.paths import DataRoot, PathError, resolve_allowed, safe_join
from services.ingestion import importers, labels, marks, quality, solo
from services.ingestion.mapping import Mapping

IMPORT_FORMATS = ("medleydb", "slakh", "stems", "solo", "tracklist")


def _callbacks(ctx):
    return (lambda done, total, message="": ctx.progress(done, total, message)), (lambda: ctx.cancelled)


def resolve_local_path(data: DataRoot, text: str, allowed_roots: list[str] | None = None) -> Path:
    """A path the user pointed at: absolute, or relative to the data root. It must lie inside the
    data root or one of `allowed_roots` (the configured import roots), symlinks resolved, so the
    service cannot be made to read, or say whether there is, anything else on its machine."""
    return resolve_allowed(text, data.root, allowed_roots or [])


# Solo recordings are cut into pieces this long; a last piece shorter than the minimum is left out.
DEFAULT_PIECE_SECONDS = 180.0
DEFAULT_MIN_PIECE_SECONDS = 30.0


def _piece_lengths(params: dict) -> tuple[float, float]:
    """(piece length, shortest piece kept) of a solo import: the defaults where not given."""
    piece, shortest = params.get("piece_seconds"), params.get("min_piece_seconds")
    return (float(DEFAULT_PIECE_SECONDS if piece is None else piece),
            float(DEFAULT_MIN_PIECE_SECONDS if shortest is None else shortest))


def validate_import(params: dict, allow_hosts=(), allow_ports=solo.egress.DEFAULT_PORTS) -> dict:
    """Check an import request before it becomes a job (bad requests fail at once)."""
    fmt = params.get("format", "")
    if fmt not in IMPORT_FORMATS:
        raise InvalidArgumentError(f"unknown import format {fmt!r}; use {', '.join(IMPORT_FORMATS)}")
    if fmt == "solo":
        if not params.get("instrument"):
            raise InvalidArgumentError("a solo import needs the instrument (e.g. guitar)")
        if params.get("url"):
            solo.validate_url(params["url"], allow_hosts, allow_ports)
        elif not params.get("path"):
            raise InvalidArgumentError("a solo import needs a URL or a path")
    elif not params.get("path"):
        raise InvalidArgumentError(f"a {fmt} import needs a path")
    if int(params.get("limit") or 0) < 0:
        raise InvalidArgumentError("limit must not be negative")
    if fmt == "solo":
        piece, shortest = _piece_lengths(params)
        if piece <= 0 or shortest < 0:
            raise InvalidArgumentError(f"--piece-seconds must be above 0 and --min-piece-seconds at least 0, "
                                       f"got {piece:g} and {shortest:g}")
        if shortest > piece:
            raise InvalidArgumentError(f"the shortest piece kept ({shortest:g} s, --min-piece-seconds) is longer "
                                       f"than a piece ({piece:g} s, --piece-seconds): nothing could be kept")
    return params


def _imported(report: importers.ImportReport) -> dict:
    """The import's result; a failed job when nothing came in and something failed (a solo file
    whose every piece was refused used to end "succeeded" with the reason among its errors)."""
    if report.errors and not (report.added or report.updated or report.unchanged or report.stopped):
        first = report.errors[0]
        where = first["track"] + (f" {first['stem']}" if first.get("stem") else "")
        more = f" (and {len(report.errors) - 1} more errors)" if len(report.errors) > 1 else ""
        raise importers.DatasetImportError(f"nothing was imported: {where}: {first['reason']}{more}")
    return report.to_dict()


class IngestionJobs:
    def __init__(self, data: DataRoot, import_roots: list[str] | None = None, allow_hosts=(),
                 allow_ports=solo.egress.DEFAULT_PORTS):
        self.allow_hosts, self.allow_ports = list(allow_hosts), tuple(allow_ports)
        self.data = data
        self.import_roots = import_roots

    def kinds(self) -> dict:
        return {"ingestion.import": self.run_import, "ingestion.generate": self.run_generate,
                "ingestion.apply_mapping": self.run_apply_mapping, "ingestion.quality": self.run_quality}

    def _path(self, text: str) -> Path:
        return resolve_local_path(self.data, text, self.import_roots)

    def run_import(self, ctx, params: dict) -> dict:
        params = validate_import(dict(params), self.allow_hosts, self.allow_ports)
        progress, should_stop = _callbacks(ctx)
        library = Library(self.data)
        mapping = Mapping.load(self.data)
        fmt = params["format"]
        link = not params.get("copy", False)
        if fmt == "solo":
            target = params.get("url") or str(self._path(params["path"]))
            piece, shortest = _piece_lengths(params)
            report = solo.import_solo(
                library, target, params["instrument"], piece_seconds=piece, min_piece_seconds=shortest,
                title=params.get("title", ""), progress=progress, should_stop=should_stop,
                allow_hosts=self.allow_hosts, allow_ports=self.allow_ports)
            return _imported(report)
        path = self._path(params["path"])
        limit = int(params.get("limit") or 0)
        if fmt == "tracklist":
            search = params.get("search_root")
            sources = marks.read_track_list(path, mapping, root_map=list(params.get("root_map") or []),
                                            search_root=self._path(search) if search else None,
                                            source=params.get("source", ""))
            total = 0
        else:
            reader = {"medleydb": importers.read_medleydb, "slakh": importers.read_slakh,
                      "stems": importers.read_stem_folders}[fmt]
            sources = reader(path, mapping, limit=limit) if fmt == "slakh" else reader(path, mapping)
            total = importers.count_candidates(fmt, path, limit)
        ctx.progress(0, total, f"importing {fmt} from {path}")
        report = importers.import_tracks(library, sources, link=link, progress=progress,
                                         should_stop=should_stop, total=total)
        return _imported(report)

    def run_generate(self, ctx, params: dict) -> dict:
        from services.ingestion.synth import generate_songs  # FluidSynth rendering; load on use

        progress, should_stop = _callbacks(ctx)
        out_dir = resolve_generate_dir(self.data, params.get("out_dir", ""))
        layout = params.get("layout") or "medleydb"
        summary = generate_songs(out_dir, int(params.get("songs") or 0), float(params.get("seconds") or 0),
                                 int(params.get("seed") or 0), layout=layout,
                                 soundfont=params.get("soundfont") or None,
                                 overlays=params.get("overlay_soundfonts") or (),
                                 timbre=float(params.get("timbre") or 0.0),
                                 produce=float(params.get("produce") or 0.0),
                                 rate=int(params.get("rate") or 44100), start_index=int(params.get("start_index") or 0),
                                 progress=progress,
                                 should_stop=should_stop)
        result = {"generated": summary}
        if params.get("import_after") and not summary.get("stopped"):
            mapping = Mapping.load(self.data)
            reader = importers.read_medleydb(out_dir, mapping) if layout == "medleydb" \
                else importers.read_slakh(out_dir, mapping)
            library = Library(self.data)
            report = importers.import_tracks(library, _as_synthetic(reader), should_stop=should_stop)
            result["import"] = report.to_dict()
        return result

    def run_apply_mapping(self, ctx, params: dict) -> dict:
        progress, should_stop = _callbacks(ctx)
        return labels.apply_mapping(Library(self.data), Mapping.load(self.data),
                                    include_suggested=bool(params.get("include_suggested", True)),
                                    progress=progress, should_stop=should_stop)

    def run_quality(self, ctx, params: dict) -> dict:
        progress, should_stop = _callbacks(ctx)
        result = quality.check_library(Library(self.data), track_id=params.get("track_id", ""),
                                       progress=progress, should_stop=should_stop)
        # JSON-able for the job store (tuples become lists).
        result["thresholds"] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in result["thresholds"].items()}
        return result


def resolve_generate_dir(data: DataRoot, text: str) -> Path:
    """Generated datasets go under the data root (relative paths; "synthetic/<name>")."""
    if not text:
        raise InvalidArgumentError("out_dir is required")
    try:
        if os.path.isabs(text):
            path = Path(text).resolve()
            if data.root not in path.parents:
                raise InvalidArgumentError(f"out_dir {text} must lie inside the data root {data.root}")
            return path
        return safe_join(data.root, text)
    except PathError as e:
        raise InvalidArgumentError(str(e)) from e


def _as_synthetic(sources):
    for item in sources:
        if isinstance(item, importers.TrackSource):
            item.source = "synthetic"
        yield item

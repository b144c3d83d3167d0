"""gRPC DatasetService: validates requests, calls the domain functions, converts messages."""

from __future__ import annotations

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.library import Library, Track
from services.common.paths import resolve_allowed
from services.common.server import Service, handle_errors
from services.ingestion import importers, labels, listening, marks
from services.ingestion.jobs import resolve_generate_dir, resolve_local_path, validate_import
from services.ingestion.mapping import Mapping, update_user_mapping, user_entries
from services.ingestion.synth.rendering import DEFAULT_SOUNDFONT
from stemlab.v1 import ingestion_pb2, ingestion_pb2_grpc


def track_to_pb(t: Track) -> ingestion_pb2.Track:
    msg = ingestion_pb2.Track(
        id=t.id, title=t.title, artist=t.artist, source=t.source, origin=t.origin, genre=t.genre or "",
        rate=t.rate, channels=t.channels, duration_seconds=t.duration_seconds,
        classes=sorted(t.classes()))
    for s in t.stems:
        msg.stems.add(file=s.file, raw_instrument=s.raw_instrument, class_name=s.cls or "", suggested=s.suggested)
    for inst in sorted(t.marks):
        for mark, when in sorted(t.marks[inst].items()):
            msg.marks.add(instrument=inst, mark=mark, set_at=when)
    for s in t.suggestions:
        sug = msg.suggestions.add(check=str(s.get("check", "")), instrument=str(s.get("instrument") or ""),
                                  mark=str(s.get("mark", "")), stem=str(s.get("stem", "")))
        if s.get("evidence"):
            sug.evidence.update(s["evidence"])
    return msg


class DatasetServicer(ingestion_pb2_grpc.DatasetServiceServicer):
    def __init__(self, svc: Service, import_roots: list[str] | None = None, allow_hosts=(),
                 allow_ports=(80, 443)):
        self.svc = svc
        self.allow_hosts, self.allow_ports = list(allow_hosts), tuple(allow_ports)
        self.library = Library(svc.data)
        self.import_roots = import_roots

    def _check_local(self, text: str) -> None:
        """Refuse now (not in the job) a path outside the allowed folders or not there at all."""
        path = resolve_local_path(self.svc.data, text, self.import_roots)
        if not path.exists():
            raise NotFoundError(f"{path} does not exist")

    # -- jobs -------------------------------------------------------------------------------
    @handle_errors
    def StartImport(self, request, context):
        params = {"format": request.format, "path": request.path, "url": request.url,
                  "instrument": request.instrument, "limit": request.limit,
                  # unset: the defaults; 0 is a value (--min-piece-seconds 0 keeps every piece)
                  **{key: getattr(request, key) for key in ("piece_seconds", "min_piece_seconds")
                     if request.HasField(key)},
                  "copy": request.copy, "root_map": list(request.root_map),
                  "search_root": request.search_root, "source": request.source, "title": request.title}
        validate_import(params, self.allow_hosts, self.allow_ports)
        if request.root_map:
            # refuse a malformed map now, not in the job; its NEW folders are read, so they are checked too
            for _, new in marks.parse_root_map(list(request.root_map)):
                resolve_local_path(self.svc.data, str(new), self.import_roots)
        for text in (request.path, request.search_root):
            if text:
                self._check_local(text)
        if request.format in ("medleydb", "slakh", "stems"):
            self._check_dataset_folder(request.format, request.path)
        return self.svc.submit("ingestion.import", params)

    def _check_dataset_folder(self, fmt: str, text: str) -> None:
        """A dataset import reads a folder; refuse now a file, or a stem folder without audio."""
        path = resolve_local_path(self.svc.data, text, self.import_roots)
        if not path.is_dir():
            raise InvalidArgumentError(f"{path} is a file: a {fmt} import reads the folder that holds the songs")
        if fmt == "stems" and not importers.has_audio(path):
            raise InvalidArgumentError(f"no audio files under {path} (audio is {', '.join(importers.AUDIO_SUFFIXES)})")

    @handle_errors
    def GenerateSynthetic(self, request, context):
        if request.layout and request.layout not in ("medleydb", "slakh"):
            raise InvalidArgumentError("layout must be medleydb or slakh")
        if request.start_index < 0:
            raise InvalidArgumentError(f"start_index must not be negative, got {request.start_index}")
        if not 0.0 <= request.timbre <= 1.0:  # also false for NaN
            raise InvalidArgumentError(f"timbre must be between 0 and 1, got {request.timbre}")
        if not 0.0 <= request.produce <= 1.0:
            raise InvalidArgumentError(f"production strength must be between 0 and 1, got {request.produce}")
        resolve_generate_dir(self.svc.data, request.out_dir)
        # Soundfonts are read on this machine: the data root, the import roots or the system's fonts.
        fonts = [*(self.import_roots or []), str(DEFAULT_SOUNDFONT.parent)]
        for font in (request.soundfont, *request.overlay_soundfonts):
            if font:
                resolve_allowed(font, self.svc.data.root, fonts, what="soundfont")
        params = {"out_dir": request.out_dir, "songs": request.songs, "seconds": request.seconds,
                  "seed": request.seed, "layout": request.layout or "medleydb", "soundfont": request.soundfont,
                  "rate": request.rate or 44100, "import_after": request.import_after,
                  "start_index": request.start_index, "overlay_soundfonts": list(request.overlay_soundfonts),
                  "timbre": request.timbre, "produce": request.produce}
        return self.svc.submit("ingestion.generate", params)

    @handle_errors
    def StartApplyMapping(self, request, context):
        return self.svc.submit("ingestion.apply_mapping", {"include_suggested": request.include_suggested})

    @handle_errors
    def StartQualityCheck(self, request, context):
        if request.track_id:
            labels.get_track(self.library, request.track_id)  # NOT_FOUND now rather than a failed job
        return self.svc.submit("ingestion.quality", {"track_id": request.track_id})

    # -- tracks and labels -------------------------------------------------------------------
    @handle_errors
    def ListTracks(self, request, context):
        flt = labels.TrackFilter(has_class=request.has_class, instrument=request.instrument, mark=request.mark,
                                 without_mark=request.without_mark, source=request.source,
                                 unmapped=request.unmapped)
        page, token, total = labels.list_tracks(self.library, flt, request.page_size, request.page_token)
        return ingestion_pb2.ListTracksResponse(tracks=[track_to_pb(t) for t in page], next_page_token=token,
                                                total=total)

    @handle_errors
    def GetTrack(self, request, context):
        return track_to_pb(labels.get_track(self.library, request.id))

    @handle_errors
    def SetStemClass(self, request, context):
        return track_to_pb(labels.set_stem_class(self.library, request.track_id, request.stem,
                                                 request.class_name or None))

    @handle_errors
    def SetQualityMark(self, request, context):
        return track_to_pb(labels.set_mark(self.library, request.track_id, request.instrument, request.mark))

    @handle_errors
    def ClearQualityMark(self, request, context):
        return track_to_pb(labels.set_mark(self.library, request.track_id, request.instrument, request.mark,
                                           on=False))

    @handle_errors
    def ExportMarks(self, request, context):
        fmt = request.format or "yaml"
        content = marks.export_marks(self.library, request.instrument, fmt)
        return ingestion_pb2.ExportMarksResponse(content=content, file_name=f"marks_{request.instrument}.{fmt}")

    @handle_errors
    def ImportMarks(self, request, context):
        result = marks.import_marks(self.library, request.content, request.instrument,
                                    request.format or "yaml")
        return ingestion_pb2.ImportMarksResponse(**result)

    # -- mapping --------------------------------------------------------------------------------
    def _mapping_response(self) -> ingestion_pb2.MappingResponse:
        return ingestion_pb2.MappingResponse(
            entries=Mapping.load(self.svc.data).entries, user_entries=user_entries(self.svc.data),
            unmapped=labels.unmapped_names(self.library))

    @handle_errors
    def GetMapping(self, request, context):
        return self._mapping_response()

    @handle_errors
    def SetMapping(self, request, context):
        update_user_mapping(self.svc.data, dict(request.entries), list(request.remove))
        return self._mapping_response()

    # -- listening ------------------------------------------------------------------------------
    @handle_errors
    def GetListeningParts(self, request, context):
        labels.get_track(self.library, request.track_id)
        p = listening.listening_parts(
            self.library, request.track_id, request.instrument, parts=request.parts or 5,
            part_index=request.part_index if request.include_audio else -1, rate=request.rate,
            mono=request.mono, max_bytes=request.max_bytes or listening.DEFAULT_MAX_WAV_BYTES)
        msg = ingestion_pb2.ListeningPartsResponse(
            track_id=p.track_id, instrument=p.instrument, stems=p.stems, rate=p.rate,
            duration_seconds=p.duration_seconds, start_seconds=p.start_seconds, end_seconds=p.end_seconds,
            audible=p.audible, wav=p.wav, truncated=p.truncated)
        for i, (a, b) in enumerate(p.parts):
            msg.parts.add(index=i, start_seconds=a, end_seconds=b)
        return msg

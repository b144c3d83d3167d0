"""The review page's client of the ingestion service (stemlab.v1.DatasetService over gRPC).

Answers are plain dicts ready for templates and JSON; gRPC status codes become the common
domain errors, so the web's error handler turns them into messages.
"""

from __future__ import annotations

import grpc

from services.common.auth import stack_channel
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, StemlabError
from services.frontend.backends import BackendUnavailable

# The thesis' seven marks, each with its key on the review page.
MARKS = ("missing", "bleed", "bad_quality", "inaudible", "mislabeled", "detailed", "checked")
MARK_KEYS = {"missing": "m", "bleed": "b", "bad_quality": "q", "inaudible": "i", "mislabeled": "l",
             "detailed": "d", "checked": "c"}
PARTS = 5
MAX_TRACKS = 5000  # the review list stops here; filter by instrument to see fewer
PART_MAX_BYTES = 3 << 20  # bound of one part's WAV (the service cuts longer parts short)


class ReviewConflict(FailedPreconditionError):
    """The track cannot be reviewed for this instrument (e.g. it has no stem of it)."""


def _protos():
    try:
        from stemlab.v1 import ingestion_pb2, ingestion_pb2_grpc
    except ImportError:
        raise BackendUnavailable("the ingestion service's protocol is not built (run `make protos`)") from None
    return ingestion_pb2, ingestion_pb2_grpc


def track_dict(track, instrument: str) -> dict:
    """A Track message -> what the review page shows of it for one instrument."""
    return {
        "id": track.id,
        "title": track.title or track.id,
        "artist": track.artist,
        "source": track.source,
        "duration_seconds": round(track.duration_seconds, 2),
        "stems": [s.file for s in track.stems if s.class_name == instrument],
        # Every stem with its class, so a reviewer can confirm a class guessed from a file name.
        "all_stems": [{"file": s.file, "name": s.raw_instrument, "class": s.class_name or None,
                       "suggested": s.suggested} for s in track.stems],
        "classes": list(track.classes),
        "marks": sorted(m.mark for m in track.marks if m.instrument == instrument),
        "suggestions": [
            {"check": s.check, "mark": s.mark, "stem": s.stem,
             "evidence": {k: v for k, v in s.evidence.items()} if s.evidence else {}}
            for s in track.suggestions if s.instrument in (instrument, "")
        ],
    }


class IngestionClient:
    def __init__(self, address: str, timeout_seconds: float = 15.0, data_root=None):
        self.address = address
        self.data_root = data_root  # whose token the calls carry (default: the configured data root)
        self.timeout_seconds = timeout_seconds
        self._channel = None
        self._stub = None

    def _service(self):
        if self._stub is None:
            _, pb2_grpc = _protos()
            self._channel = stack_channel(self.address, data_root=self.data_root)
            self._stub = pb2_grpc.DatasetServiceStub(self._channel)
        return self._stub

    def _call(self, method: str, request):
        try:
            return getattr(self._service(), method)(request, timeout=self.timeout_seconds)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise BackendUnavailable(f"the ingestion service is not reachable at {self.address}") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(details) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgumentError(details) from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ReviewConflict(details) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise BackendUnavailable(f"the ingestion service refused the web's token: {details}") from None
            raise StemlabError(f"the ingestion service failed ({code.name}): {details}") from None

    @staticmethod
    def _check(instrument: str, mark: str | None = None) -> None:
        if not instrument.isidentifier():
            raise InvalidArgumentError(f"invalid instrument {instrument!r}")
        if mark is not None and mark not in MARKS:
            raise InvalidArgumentError(f"unknown mark {mark!r}; marks are {', '.join(MARKS)}")

    def list_tracks(self, instrument: str, unchecked: bool = False) -> list[dict]:
        """Tracks with a stem of `instrument` (`unchecked`: only those not yet checked for it), in
        the library's (sorted) order."""
        self._check(instrument)
        pb2, _ = _protos()
        only = {"instrument": instrument, "mark": "checked", "without_mark": True} if unchecked else {}
        tracks, token = [], ""
        while len(tracks) < MAX_TRACKS:
            reply = self._call("ListTracks", pb2.ListTracksRequest(has_class=instrument, page_size=1000,
                                                                  page_token=token, **only))
            tracks.extend(track_dict(t, instrument) for t in reply.tracks)
            token = reply.next_page_token
            if not token:
                break
        return tracks[:MAX_TRACKS]

    def track_review(self, track_id: str, instrument: str) -> dict:
        """The track and its listening parts (boundaries in seconds) for `instrument`."""
        self._check(instrument)
        pb2, _ = _protos()
        track = self._call("GetTrack", pb2.GetTrackRequest(id=track_id))
        parts = self._call("GetListeningParts", pb2.ListeningPartsRequest(
            track_id=track_id, instrument=instrument, parts=PARTS))
        return {
            **track_dict(track, instrument),
            "audible": parts.audible,
            "start_seconds": parts.start_seconds,
            "end_seconds": parts.end_seconds,
            "parts": [{"index": p.index, "start_seconds": round(p.start_seconds, 3),
                       "end_seconds": round(p.end_seconds, 3)} for p in parts.parts],
        }

    def part_audio(self, track_id: str, instrument: str, part: int) -> bytes:
        """One part of the instrument's stems (summed, mono) as 16-bit WAV bytes."""
        self._check(instrument)
        if not 0 <= part < PARTS:
            raise InvalidArgumentError(f"part must be 0..{PARTS - 1}, not {part}")
        pb2, _ = _protos()
        reply = self._call("GetListeningParts", pb2.ListeningPartsRequest(
            track_id=track_id, instrument=instrument, parts=PARTS, part_index=part, include_audio=True,
            mono=True, max_bytes=PART_MAX_BYTES))
        if not reply.wav:
            raise ReviewConflict(f"track {track_id} has no audio for part {part} of {instrument}")
        return reply.wav

    def set_mark(self, track_id: str, instrument: str, mark: str) -> dict:
        self._check(instrument, mark)
        pb2, _ = _protos()
        return track_dict(self._call("SetQualityMark", pb2.QualityMarkRequest(
            track_id=track_id, instrument=instrument, mark=mark)), instrument)

    def set_class(self, track_id: str, instrument: str, stem: str, cls: str | None) -> dict:
        """Confirm or change a stem's class (None: unmapped); the track as the page shows it."""
        self._check(instrument)
        pb2, _ = _protos()
        return track_dict(self._call("SetStemClass", pb2.SetStemClassRequest(
            track_id=track_id, stem=stem, class_name=cls or "")), instrument)

    def clear_mark(self, track_id: str, instrument: str, mark: str) -> dict:
        self._check(instrument, mark)
        pb2, _ = _protos()
        return track_dict(self._call("ClearQualityMark", pb2.QualityMarkRequest(
            track_id=track_id, instrument=instrument, mark=mark)), instrument)

"""stemlab.v1.ProcessingService: turn requests into job parameters, check them, start the job."""

from __future__ import annotations

from services.common.errors import InvalidArgumentError
from services.common.server import Service, handle_errors
from services.processing import jobs
from stemlab.v1 import processing_pb2_grpc

DEFAULT_RATE_HZ = 22050


def _mix_set(ref) -> dict:
    if not ref.instrument:
        raise InvalidArgumentError("mix_set.instrument is required")
    return {"instrument": ref.instrument, "also": sorted(set(ref.also)), "rate_hz": ref.rate_hz or DEFAULT_RATE_HZ,
            "stereo": ref.stereo}


def _silence(msg) -> dict:
    out = {}
    for name in ("threshold_dbfs", "min_silence_seconds", "hop_seconds"):
        if msg.HasField(name):
            out[name] = getattr(msg, name)
    if msg.level:
        out["level"] = msg.level
    return out


def _adjusted(target: float, cutoff: float, what: str) -> dict:
    if target == 0 and cutoff == 0:
        return {}
    if target <= 0:
        raise InvalidArgumentError(f"{what}: give the target (and cutoff) of the silence-adjusted set")
    return {"target": target, "cutoff": cutoff}


class ProcessingServicer(processing_pb2_grpc.ProcessingServiceServicer):
    def __init__(self, svc: Service):
        self.svc = svc

    @handle_errors
    def StartMix(self, request, context):
        params = {"instrument": request.instrument, "also": sorted(set(request.also)),
                  "rates_hz": sorted(set(request.rates_hz)) or [DEFAULT_RATE_HZ], "stereo": request.stereo,
                  "include_unchecked": request.include_unchecked, "ignore_marks": request.ignore_marks,
                  "tracks": list(request.tracks), "force": request.force}
        jobs.validate_mix(self.svc.data, params)
        return self.svc.submit(jobs.MIX, params)

    @handle_errors
    def StartSilenceStats(self, request, context):
        params = {"mix_set": _mix_set(request.mix_set), "silence": _silence(request.silence)}
        adjusted = _adjusted(request.adjusted_target, request.adjusted_cutoff, "adjusted set")
        if adjusted:
            params.update(adjusted_target=adjusted["target"], adjusted_cutoff=adjusted["cutoff"])
        jobs.validate_silence_stats(self.svc.data, params)
        return self.svc.submit(jobs.SILENCE_STATS, params)

    @handle_errors
    def StartSilenceAdjust(self, request, context):
        adjust = {name: getattr(request, name) for name in ("target", "cutoff", "margin_seconds", "crossfade_seconds")
                  if request.HasField(name)}
        if request.crossfade_shape:
            adjust["crossfade_shape"] = request.crossfade_shape
        params = {"mix_set": _mix_set(request.mix_set), "silence": _silence(request.silence), "adjust": adjust,
                  "force": request.force}
        jobs.validate_silence_adjust(self.svc.data, params)
        return self.svc.submit(jobs.SILENCE_ADJUST, params)

    @handle_errors
    def StartDatasetBuild(self, request, context):
        if not request.name:
            raise InvalidArgumentError("a dataset name is required")
        if request.max_tracks < 0:
            raise InvalidArgumentError(f"max_tracks must not be negative, got {request.max_tracks}")
        sources = {}
        for s in request.sources:
            if s.source in sources:
                raise InvalidArgumentError(f"source {s.source} is given twice")
            sources[s.source] = s.ratio
        params = {"name": request.name, "mix_set": _mix_set(request.mix_set), "sources": sources,
                  "max_tracks": request.max_tracks or None,
                  "include_unchecked": request.include_unchecked, "ignore_marks": request.ignore_marks}
        adjusted = _adjusted(request.silence_target, request.silence_cutoff, "silence-adjusted dataset")
        if adjusted:
            params.update(silence_target=adjusted["target"], silence_cutoff=adjusted["cutoff"])
        if request.HasField("validation_ratio"):
            if not 0.0 <= request.validation_ratio < 1.0:
                raise InvalidArgumentError(f"validation ratio must be in [0, 1), got {request.validation_ratio}")
            params["validation_ratio"] = request.validation_ratio
        if request.use_validation_tracks or request.validation_tracks:
            params["validation_tracks"] = sorted(set(request.validation_tracks))
        if request.tracks:
            if any(not t.strip() for t in request.tracks):
                raise InvalidArgumentError("a listed track id is empty")
            params["tracks"] = sorted(set(request.tracks))
        jobs.validate_dataset_build(self.svc.data, params)
        return self.svc.submit(jobs.DATASET_BUILD, params)

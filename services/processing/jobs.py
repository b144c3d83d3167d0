"""The processing job kinds: job parameters (plain JSON) -> the domain functions.

Parameters are checked by `validate_*` when a request arrives, so a bad request is refused at
once (INVALID_ARGUMENT / NOT_FOUND) instead of becoming a failed job; the job functions call
them again because queued jobs survive restarts and code changes.
"""

from __future__ import annotations

from typing import Any

from services.common.jobs import item_function
from services.common.library import Library
from services.common.paths import DataRoot
from services.processing import datasets, mixing, silence, silence_sets
from services.processing.mixsets import MixSet

MIX = "processing.mix"
SILENCE_STATS = "processing.silence_stats"
SILENCE_ADJUST = "processing.silence_adjust"
DATASET_BUILD = "processing.dataset_build"

# The tracks of mixing and silence jobs may be done by any processing replica on a shared job store.
for _fn in (mixing.mix_track, silence_sets.track_silence_stats, silence_sets.adjust_track):
    item_function(_fn)


def _mixset(params: dict) -> MixSet:
    ref = params.get("mix_set") or {}
    return MixSet(str(ref.get("instrument", "")), int(ref.get("rate_hz", 0)), bool(ref.get("stereo", False)),
                  tuple(ref.get("also") or ()))


def _silence_params(params: dict) -> silence.SilenceParams:
    return silence.SilenceParams(**(params.get("silence") or {}))


def _adjust_params(params: dict) -> silence.AdjustParams:
    return silence.AdjustParams(**(params.get("adjust") or {}))


def _adjusted(params: dict, target_key: str, cutoff_key: str) -> tuple[float, float] | None:
    target, cutoff = params.get(target_key), params.get(cutoff_key)
    return None if target is None else (float(target), float(cutoff if cutoff is not None else 0.0))


def validate_mix(data: DataRoot, params: dict) -> None:
    from services.processing.mixsets import validate_instrument, validate_rate

    validate_instrument(params["instrument"], tuple(params.get("also") or ()))
    for rate in params.get("rates_hz") or []:
        validate_rate(int(rate))
    mixing.require_usable(Library(data), params["instrument"], bool(params.get("include_unchecked")),
                          bool(params.get("ignore_marks")), params.get("tracks") or ())


def validate_silence_stats(data: DataRoot, params: dict) -> None:
    ms = _mixset(params)
    _silence_params(params)
    adjusted = _adjusted(params, "adjusted_target", "adjusted_cutoff")
    (ms if adjusted is None else ms.adjusted(*adjusted)).require(data)


def validate_silence_adjust(data: DataRoot, params: dict) -> None:
    _silence_params(params)
    _adjust_params(params)
    _mixset(params).require(data)


def validate_dataset_build(data: DataRoot, params: dict) -> None:
    from services.common.manifest import validate_dataset_name

    validate_dataset_name(params["name"])
    ms = _mixset(params)
    adjusted = _adjusted(params, "silence_target", "silence_cutoff")
    (ms if adjusted is None else ms.adjusted(*adjusted)).require(data)
    datasets._parse_ratios(params.get("sources"))


class ProcessingJobs:
    """Job functions bound to a data root and a process-pool size."""

    def __init__(self, data: DataRoot, pool_workers: int | None = None):
        self.data = data
        self.pool_workers = pool_workers

    @staticmethod
    def _callbacks(ctx: Any) -> dict:
        return {"progress": lambda done, total, message="": ctx.progress(done, total, message),
                "should_stop": lambda: ctx.cancelled}

    def mix(self, ctx: Any, params: dict) -> dict:
        return mixing.mix(self.data.root, params["instrument"], rates_hz=params.get("rates_hz") or [22050],
                          stereo=bool(params.get("stereo")), also=params.get("also") or (),
                          include_unchecked=bool(params.get("include_unchecked")),
                          ignore_marks=bool(params.get("ignore_marks")), tracks=params.get("tracks") or (),
                          force=bool(params.get("force")), workers=self.pool_workers, share=ctx.items,
                          **self._callbacks(ctx))

    def silence_stats(self, ctx: Any, params: dict) -> dict:
        ms = _mixset(params)
        return silence_sets.silence_stats(
            self.data.root, ms.instrument, ms.rate_hz, stereo=ms.stereo, also=ms.also,
            params=_silence_params(params), adjusted=_adjusted(params, "adjusted_target", "adjusted_cutoff"),
            workers=self.pool_workers, share=ctx.items, **self._callbacks(ctx))

    def silence_adjust(self, ctx: Any, params: dict) -> dict:
        ms = _mixset(params)
        return silence_sets.adjust_silence(
            self.data.root, ms.instrument, ms.rate_hz, stereo=ms.stereo, also=ms.also,
            silence_params=_silence_params(params), adjust_params=_adjust_params(params),
            force=bool(params.get("force")), workers=self.pool_workers, share=ctx.items, **self._callbacks(ctx))

    def dataset_build(self, ctx: Any, params: dict) -> dict:
        ms = _mixset(params)
        validation_tracks = params.get("validation_tracks")
        return datasets.build_dataset(
            self.data.root, params["name"], ms.instrument, ms.rate_hz, stereo=ms.stereo, also=ms.also,
            sources=params.get("sources") or None, max_tracks=params.get("max_tracks") or None,
            silence_adjusted=_adjusted(params, "silence_target", "silence_cutoff"),
            validation_ratio=float(params.get("validation_ratio", datasets.DEFAULT_VALIDATION_RATIO)),
            validation_tracks=validation_tracks if validation_tracks is not None else None,
            tracks=params.get("tracks"),
            include_unchecked=bool(params.get("include_unchecked")), ignore_marks=bool(params.get("ignore_marks")),
            workers=self.pool_workers, **self._callbacks(ctx))

    def kinds(self) -> dict:
        return {MIX: self.mix, SILENCE_STATS: self.silence_stats, SILENCE_ADJUST: self.silence_adjust,
                DATASET_BUILD: self.dataset_build}

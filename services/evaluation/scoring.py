"""Scoring one track: baselines plus bss_eval for every method; runs inside a worker process.

`score_track` takes plain arrays and returns a JSON-able dict, so it can cross a process pool
(mir_eval is slow and single-threaded; tracks are scored in parallel). No TensorFlow here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from services.evaluation import baselines as bl
from services.evaluation import metrics

MODEL = "model"
MIXTURE = "mixture"


@dataclass
class TrackTask:
    """Everything a worker needs for one track.

    references: (2, samples) float32 = [true instrument, true rest] (mono, at `rate_hz`).
    model_estimate: (2, samples) float32 = [estimated instrument, estimated rest], or None when only
    baselines are scored.
    """

    track: str
    rate_hz: int
    references: np.ndarray
    model_estimate: np.ndarray | None
    baselines: tuple[str, ...]
    stft: bl.StftSettings
    framewise: bool = False
    window_seconds: float = 1.0
    silent_rms_dbfs: float = metrics.DEFAULT_SILENT_RMS_DBFS
    plot_path: str | None = None
    # The instrument reference is silent (a track without the instrument): scored by leakage only.
    absent: bool = False


def method_estimates(task: TrackTask) -> dict[str, np.ndarray]:
    """{method: (2, samples) estimate} for the model (if any) and each baseline, in report order.

    The mixture is always included: the SDR improvement (SDRi) of every method is measured against it.
    """
    instrument, rest = task.references.astype(np.float64)
    mix = instrument + rest
    out: dict[str, np.ndarray] = {}
    if task.model_estimate is not None:
        out[MODEL] = np.asarray(task.model_estimate, np.float64)
    out[MIXTURE] = np.stack(bl.mixture_estimate(mix))
    if "oracle" in task.baselines:
        out["oracle"] = np.stack(bl.oracle_ratio_mask(instrument, rest, task.stft))
    if "hpss" in task.baselines:
        out["hpss"] = np.stack(bl.hpss_estimate(mix, task.stft))
    return out


def score_track(task: TrackTask) -> dict:
    """Metrics of every method on one track.

    Returns {"track", "seconds", "status": "scored"|"skipped", "reason", "methods": {method: {...}},
    "elapsed_seconds"}. A method entry holds "whole" ({"instrument": {"sdr", "sir", "sar", "sdri"},
    "rest": {...}}), "framewise" (same plus window counts) when asked, or "skipped" with a reason.
    """
    started = time.perf_counter()
    references = np.asarray(task.references, np.float64)
    result: dict = {"track": task.track, "seconds": references.shape[1] / task.rate_hz, "status": "scored",
                    "reason": "", "methods": {}}
    if task.absent:
        result.update(score_absent(task))
        result["elapsed_seconds"] = time.perf_counter() - started
        return result
    reason = metrics.silent_reason(references, task.silent_rms_dbfs)
    if reason is not None:
        result.update(status="skipped", reason=reason)
        result["elapsed_seconds"] = time.perf_counter() - started
        return result

    estimates = method_estimates(task)
    window = max(1, int(round(task.window_seconds * task.rate_hz)))
    for method, estimate in estimates.items():
        skipped = metrics.silent_estimate_reason(estimate)
        if skipped is not None:
            result["methods"][method] = {"skipped": skipped}
            continue
        entry = {"whole": metrics.bss_eval_whole(references, estimate)}
        if task.framewise:
            frames = metrics.bss_eval_framewise(references, estimate, window, task.silent_rms_dbfs)
            entry["framewise"] = {**frames.metrics, "windows": frames.windows,
                                  "scored_windows": frames.scored_windows,
                                  "skipped_windows": frames.skipped_windows,
                                  "skipped_reasons": frames.skipped_reasons}
        result["methods"][method] = entry

    _add_sdr_improvement(result["methods"])
    _add_share_of_the_way(result["methods"])
    if task.plot_path and task.model_estimate is not None:
        plot_spectrograms(task.plot_path, references[0] + references[1], references[0],
                          np.asarray(task.model_estimate[0], np.float64), task.rate_hz, task.stft, task.track)
    result["elapsed_seconds"] = time.perf_counter() - started
    return result


def _add_sdr_improvement(methods: dict) -> None:
    """SDRi = method SDR - mixture SDR, per source, for whole-track and framewise numbers."""
    mixture = methods.get(MIXTURE, {})
    for entry in methods.values():
        for kind in ("whole", "framewise"):
            if kind not in entry or kind not in mixture:
                continue
            for source in metrics.SOURCES:
                entry[kind][source]["sdri"] = entry[kind][source]["sdr"] - mixture[kind][source]["sdr"]


def _add_share_of_the_way(methods: dict) -> None:
    """share = (SDR - mixture SDR) / (oracle SDR - mixture SDR), per source, when the oracle was scored."""
    mixture, oracle = methods.get(MIXTURE, {}), methods.get("oracle", {})
    for entry in methods.values():
        for kind in ("whole", "framewise"):
            if kind not in entry or kind not in mixture or kind not in oracle:
                continue
            for source in metrics.SOURCES:
                entry[kind][source]["share"] = metrics.share_of_the_way(
                    entry[kind][source]["sdr"], mixture[kind][source]["sdr"], oracle[kind][source]["sdr"])


def score_absent(task: TrackTask) -> dict:
    """A track without the instrument: the leakage of the model and of HPSS (bss_eval is undefined).

    Returns {"status": "absent", "reason", "methods": {method: {"leakage_db": dB}}}. The mixture
    (0 dB) and the oracle mask (silence) are left out: their leakage is fixed by definition.
    """
    instrument, rest = np.asarray(task.references, np.float64)
    mix = instrument + rest
    methods: dict = {}
    if task.model_estimate is not None:
        methods[MODEL] = {"leakage_db": metrics.leakage_db(task.model_estimate[0], mix)}
    if "hpss" in task.baselines:
        methods["hpss"] = {"leakage_db": metrics.leakage_db(bl.hpss_estimate(mix, task.stft)[0], mix)}
    return {"status": "absent", "reason": "no instrument in this track (silent reference): scored by leakage",
            "methods": methods}


def plot_spectrograms(path: str, mix: np.ndarray, instrument: np.ndarray, estimate: np.ndarray,
                      rate_hz: int, stft: bl.StftSettings, title: str) -> None:
    """PNG with three log-magnitude spectrograms (mix, true instrument, estimated instrument).

    mix, instrument, estimate: (samples,). Written to a temporary name and renamed into place.
    """
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.common.paths import atomic_path

    panels = (("mix", mix), ("true instrument", instrument), ("estimated instrument", estimate))
    specs = [librosa.amplitude_to_db(np.abs(bl._stft(x, stft)), ref=1.0, top_db=None) for _, x in panels]
    top = max(float(s.max()) for s in specs)
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True, constrained_layout=True)
    extent = (0.0, len(mix) / rate_hz, 0.0, rate_hz / 2000.0)
    for ax, (name, _), spec in zip(axes, panels, specs, strict=True):
        # One colour scale for all three panels so levels can be compared by eye.
        image = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, vmin=top - 80, vmax=top, cmap="magma")
        ax.set_title(f"{title}: {name}")
        ax.set_ylabel("kHz")
    axes[-1].set_xlabel("seconds")
    fig.colorbar(image, ax=axes, label="dB")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)

"""How long bss_eval takes per track: whole-track and framewise, against a direct mir_eval call.

    .venv/bin/python bench/bench_evaluation.py --seconds 180 --repeats 3 [--out bench/results/evaluation.json]

Times, in one process on one synthetic two-source track (instrument, rest) at 22.05 kHz with an
imperfect estimate, the median over --repeats runs of:
  mir_eval_whole       mir_eval.separation.bss_eval_sources(..., compute_permutation=False)  (the baseline)
  stemlab_whole        services.evaluation.metrics.bss_eval_whole (what reports use)
  stemlab_framewise    metrics.bss_eval_framewise: one whole-track filter, 1-second windows (museval v4)
  mir_eval_framewise   mir_eval.separation.bss_eval_sources_framewise, 1-second windows, a filter per window
  oracle_mask          computing the oracle ratio-mask estimate (model STFT settings)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.evaluation import baselines as bl  # noqa: E402
from services.evaluation import metrics  # noqa: E402

RATE_HZ = 22050


def synthetic_track(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """references, estimates: (2, samples) float64; a harmonic instrument, a noisy rest, a leaky estimate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE_HZ)) / RATE_HZ
    phase = 2 * np.pi * 220 * t + 2 * np.sin(2 * np.pi * 0.25 * t)
    instrument = sum(0.2 / k * np.sin(k * phase) for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t) ** 2)
    rest = 0.1 * rng.standard_normal(len(t)) + 0.1 * np.sin(2 * np.pi * 55 * t)
    references = np.stack([instrument, rest])
    leak = 0.15 * references[::-1] + 0.01 * rng.standard_normal(references.shape)
    return references, references + leak


def timed(fn, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median_seconds": statistics.median(runs), "runs_seconds": [round(r, 3) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0, help="track length (default 180 = 3 minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mir-eval-framewise", action="store_true",
                        help="leave out the slowest measurement")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    import mir_eval.separation

    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    references, estimates = synthetic_track(args.seconds)
    window = RATE_HZ
    cases = {
        "mir_eval_whole": lambda: mir_eval.separation.bss_eval_sources(references, estimates, compute_permutation=False),
        "stemlab_whole": lambda: metrics.bss_eval_whole(references, estimates),
        "stemlab_framewise": lambda: metrics.bss_eval_framewise(references, estimates, window),
        "mir_eval_framewise": lambda: mir_eval.separation.bss_eval_sources_framewise(
            references, estimates, window=window, hop=window, compute_permutation=False),
        "oracle_mask": lambda: bl.oracle_ratio_mask(references[0], references[1], bl.model_stft_settings()),
    }
    if args.skip_mir_eval_framewise:
        cases.pop("mir_eval_framewise")
    # Warm up imports and JIT-compiled code (librosa, scipy FFT plans) outside the timings.
    short_refs, short_est = synthetic_track(2.0)
    metrics.bss_eval_whole(short_refs, short_est)
    metrics.bss_eval_framewise(short_refs, short_est, window)
    bl.oracle_ratio_mask(short_refs[0], short_refs[1], bl.model_stft_settings())
    results = {}
    for name, fn in cases.items():
        results[name] = timed(fn, args.repeats)
        print(f"{name:20s} {results[name]['median_seconds']:8.2f} s  (runs {results[name]['runs_seconds']})",
              flush=True)

    # Agreement, so a faster path is not a different metric.
    whole = metrics.bss_eval_whole(references, estimates)
    dec = metrics.decompose(references, estimates)
    ours = metrics.ratios_db(dec.target[0], dec.interference[0], dec.artifacts[0])
    frames = metrics.bss_eval_framewise(references, estimates, window, decomposition=dec)
    agreement = {"whole_instrument_sdr_mir_eval": whole["instrument"]["sdr"],
                 "whole_instrument_sdr_decomposition": ours[0],
                 "framewise_median_instrument_sdr": frames.metrics["instrument"]["sdr"]}
    if "mir_eval_framewise" in cases:
        sdr, *_ = mir_eval.separation.bss_eval_sources_framewise(references, estimates, window=window, hop=window)
        agreement["mir_eval_framewise_median_instrument_sdr"] = float(np.nanmedian(sdr[0]))
    print(json.dumps(agreement, indent=2))
    record = {"track_seconds": args.seconds, "rate_hz": RATE_HZ, "repeats": args.repeats, "window_samples": window,
              "results": results, "agreement": agreement,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "numpy": np.__version__,
                          "mir_eval": getattr(mir_eval, "__version__", "?")},
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()

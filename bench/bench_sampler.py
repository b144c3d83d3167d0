"""Benchmark the training sampler's host-side cost: chunks per second drawn with the random
equaliser applied in numpy (ChunkSampler.draw, what the training service does) against drawn
for an equaliser on the device (ChunkSampler.draw_unequalised, what research/thesis_gpu/train_jax
does), and with the random speed change (--pitch-semitones, always in numpy), in one run, on
synthetic tracks of the preset's rate. Prints JSON; medians of --repeats.

    .venv/bin/python bench/bench_sampler.py [--preset cpu] [--batch 16] [--repeats 5] [--eq-db 9] \
        [--pitch-semitones 2]

On a GPU the step itself is quick, so the sampler bounds a run's chunks per second: the piano run
of "The thesis preset on a GPU" (docs/experiments/11-thesis-preset-on-a-gpu.md) drew 297 chunks/s against guitar's
1672 without the equaliser.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import make_config  # noqa: E402
from services.training.sampling import Augmentation, ChunkSampler, TrackAudio  # noqa: E402


def chunks_per_second(draw, batch: int, repeats: int, batches: int) -> float:
    rng = np.random.default_rng(0)
    draw(rng, batch)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            draw(rng, batch)
        rates.append(batches * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eq-db", type=float, default=9.0)
    parser.add_argument("--pitch-semitones", type=float, default=2.0)
    args = parser.parse_args(argv)
    config = make_config(args.preset)
    rng = np.random.default_rng(1)
    tracks = [TrackAudio(f"t{i}", "synthetic", rng.standard_normal(30 * config.rate_hz).astype(np.float32),
                         rng.standard_normal(30 * config.rate_hz).astype(np.float32)) for i in range(20)]

    def sampler(eq_db: float, pitch_semitones: float = 0.0) -> ChunkSampler:
        return ChunkSampler(tracks, {}, config.segment_samples, config.rate_hz,
                            Augmentation(6.0, 0.25, eq_db, pitch_semitones))

    with_eq = sampler(args.eq_db)
    result = {
        "preset": args.preset, "segment_samples": config.segment_samples, "batch": args.batch,
        "repeats": args.repeats, "eq_db": args.eq_db, "pitch_semitones": args.pitch_semitones,
        "chunks_per_second": {
            "no equaliser": round(chunks_per_second(sampler(0.0).draw, args.batch, args.repeats, args.batches), 1),
            "equaliser in numpy (draw)": round(chunks_per_second(with_eq.draw, args.batch, args.repeats, args.batches), 1),
            "equaliser left to the device (draw_unequalised)": round(
                chunks_per_second(with_eq.draw_unequalised, args.batch, args.repeats, args.batches), 1),
            "speed change, no equaliser": round(
                chunks_per_second(sampler(0.0, args.pitch_semitones).draw, args.batch, args.repeats, args.batches), 1),
        },
        "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "numpy": np.__version__},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

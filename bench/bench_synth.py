"""Benchmark of the synthetic multitrack generator: seconds of song audio made per wall second.

Each run generates a fresh set (compose, render every part with FluidSynth, mix, write the
layout) into a temporary folder; the figure is the median over the runs. Prints one JSON line.

    .venv/bin/python bench/bench_synth.py --songs 2 --seconds 30 --rate 44100 --runs 3 [--out bench/results/synth.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.paths import atomic_write_text  # noqa: E402
from services.ingestion.synth import generate_songs  # noqa: E402


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--songs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=44100)
    parser.add_argument("--layout", choices=("medleydb", "slakh"), default="medleydb")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (the figure is a median)")

    speeds, walls, cpu_speeds, stems = [], [], [], 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-synth-") as folder:
            started, cpu_started = time.perf_counter(), _cpu_seconds()
            summary = generate_songs(
                folder, args.songs, args.seconds, args.seed + run, layout=args.layout, rate=args.rate
            )
            wall = time.perf_counter() - started
            cpu = _cpu_seconds() - cpu_started
        walls.append(wall)
        speeds.append(summary["totals"]["audio_seconds"] / wall)
        cpu_speeds.append(summary["totals"]["audio_seconds"] / cpu)
        stems += summary["totals"]["stems"]
    result = {
        "bench": "synth",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "songs": args.songs,
        "seconds_per_song": args.seconds,
        "rate_hz": args.rate,
        "layout": args.layout,
        "runs": args.runs,
        "audio_seconds_per_wall_second_median": round(statistics.median(speeds), 2),
        "audio_seconds_per_wall_second_runs": [round(s, 2) for s in speeds],
        "wall_seconds_runs": [round(w, 2) for w in walls],
        # CPU time of this process and its FluidSynth children: steadier than wall time on a busy machine.
        "audio_seconds_per_cpu_second_median": round(statistics.median(cpu_speeds), 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "stems_per_song_mean": round(stems / (args.runs * args.songs), 2),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

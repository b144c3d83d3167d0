"""Throughput of mixing plus silence statistics, in audio seconds per wall second.

Builds a throw-away library of synthetic multitracks (stereo float WAV stems at 44.1 kHz, like
MedleyDB), then times `mix` (to 22050 Hz mono, forced so every run really mixes) followed by
`silence stats` on the result, through the same process pool the service uses. Prints one JSON
object: the command, the machine, every run and the median. Target: >= 200x real time.

    .venv/bin/python bench/bench_processing.py [--tracks 8] [--seconds 30] [--stems 4] [--runs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.audio import write_audio  # noqa: E402
from services.common.library import Library, Stem, Track  # noqa: E402
from services.processing.mixing import mix  # noqa: E402
from services.processing.pool import default_workers  # noqa: E402
from services.processing.silence_sets import silence_stats  # noqa: E402

CLASSES = ("guitar", "drums", "bass", "vocals", "piano", "other")
TARGET_SPEED = 200.0


def build_library(root: Path, tracks: int, seconds: float, stems: int, rate_hz: int) -> None:
    """Tracks of `stems` stereo stems: the guitar plays with gaps (so silence detection has work)."""
    rng = np.random.default_rng(0)
    library = Library(root)
    samples = int(seconds * rate_hz)
    for t in range(tracks):
        track_id = f"Bench{t:03d}"
        folder = library.track_dir(track_id) / "stems"
        folder.mkdir(parents=True, exist_ok=True)
        stem_list = []
        for s in range(stems):
            cls = CLASSES[s % len(CLASSES)]
            audio = (0.1 * rng.standard_normal((2, samples))).astype(np.float32)
            if cls == "guitar":  # 4 s on, 2 s off
                period = 6 * rate_hz
                gate = (np.arange(samples) % period) < 4 * rate_hz
                audio *= gate
            write_audio(folder / f"S{s:02d}.wav", audio, rate_hz, subtype="FLOAT")
            stem_list.append(Stem(file=f"stems/S{s:02d}.wav", raw_instrument=cls, cls=cls))
        track = Track(id=track_id, source="synthetic", title=track_id, rate=rate_hz, channels=2,
                      duration_seconds=seconds, stems=stem_list)
        track.set_mark("guitar", "checked")
        library.save(track)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--stems", type=int, default=4)
    parser.add_argument("--source-rate", type=int, default=44100)
    parser.add_argument("--rate", type=int, default=22050)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs first: the service keeps its process pool warm, so spawn time "
                             "(about a second per worker) is reported separately")
    parser.add_argument("--workers", type=int, default=None, help="process pool size (default: every core)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-processing-") as tmp:
        root = Path(tmp)
        build_library(root, args.tracks, args.seconds, args.stems, args.source_rate)
        audio_seconds = args.tracks * args.seconds
        runs = []
        warmup_seconds = []
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            mix(root, "guitar", rates_hz=[args.rate], force=True, workers=args.workers)
            silence_stats(root, "guitar", args.rate, workers=args.workers)
            warmup_seconds.append(round(time.perf_counter() - t0, 3))
        for _ in range(args.runs):
            c0 = time.process_time()
            t0 = time.perf_counter()
            mixed = mix(root, "guitar", rates_hz=[args.rate], force=True, workers=args.workers)
            t1 = time.perf_counter()
            stats = silence_stats(root, "guitar", args.rate, workers=args.workers)
            t2 = time.perf_counter()
            # CPU of this process only: everything with --workers 1, the coordination otherwise.
            cpu = time.process_time() - c0
            if mixed["counts"] != {"mixed": args.tracks} or stats["counts"] != {"measured": args.tracks}:
                raise SystemExit(f"benchmark run went wrong: {mixed['counts']} {stats['counts']}")
            runs.append({"mix_seconds": round(t1 - t0, 3), "silence_stats_seconds": round(t2 - t1, 3),
                         "total_seconds": round(t2 - t0, 3),
                         "speed_x_realtime": round(audio_seconds / (t2 - t0), 1),
                         "this_process_cpu_seconds": round(cpu, 3),
                         "mean_audible_share": stats["mean_audible_share"]})
    median_total = statistics.median(r["total_seconds"] for r in runs)
    result = {
        "benchmark": "processing: mix + silence stats",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "pool_workers": args.workers or default_workers(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "input": {"tracks": args.tracks, "seconds_per_track": args.seconds, "stems_per_track": args.stems,
                  "stem_format": f"stereo float WAV at {args.source_rate} Hz", "output": f"mono {args.rate} Hz"},
        "audio_seconds": audio_seconds,
        "warmup_seconds": warmup_seconds,
        "runs": runs,
        "median_total_seconds": median_total,
        "median_speed_x_realtime": round(audio_seconds / median_total, 1),
        "median_mix_seconds": statistics.median(r["mix_seconds"] for r in runs),
        "median_silence_stats_seconds": statistics.median(r["silence_stats_seconds"] for r in runs),
        "target_x_realtime": TARGET_SPEED,
        "meets_target": audio_seconds / median_total >= TARGET_SPEED,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

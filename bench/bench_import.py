"""Import throughput of the ingestion importers (tracks per minute), median of several runs.

Generates a synthetic MedleyDB-layout set once (FluidSynth), then imports it into a fresh
library per run — with hard links (the default) and with copies — and re-imports it once
more (the idempotent path: every track recognised, nothing written). Also times the automatic
quality checks over the imported library. Prints one JSON object.

    .venv/bin/python bench/bench_import.py --songs 8 --seconds 30 --runs 3 [--out bench/results/import.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.library import Library  # noqa: E402
from services.common.paths import DataRoot, atomic_write_text  # noqa: E402
from services.ingestion.importers import import_tracks, read_medleydb  # noqa: E402
from services.ingestion.mapping import Mapping  # noqa: E402
from services.ingestion.quality import check_library  # noqa: E402
from services.ingestion.synth import generate_songs  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _summary(seconds: list[float], tracks: int) -> dict:
    median = statistics.median(seconds)
    return {"runs_seconds": [round(s, 3) for s in seconds], "median_seconds": round(median, 3),
            "tracks_per_minute": round(60.0 * tracks / median, 1) if median > 0 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--songs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=44100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.runs < 3:
        ap.error("--runs must be at least 3 (the median of fewer is not worth reporting)")

    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        gen_seconds, _ = _timed(lambda: generate_songs(work / "mdb", args.songs, args.seconds, args.seed,
                                                       layout="medleydb", rate=args.rate))
        stems = sum(1 for _ in (work / "mdb").rglob("*_STEM_*.wav"))
        size_mb = sum(p.stat().st_size for p in (work / "mdb").rglob("*.wav")) / 1e6
        mapping = Mapping.defaults()
        results: dict[str, list[float]] = {"link": [], "copy": [], "reimport": [], "quality": []}
        for run in range(args.runs):
            for mode in ("link", "copy"):
                lib = Library(DataRoot(work / f"data-{mode}-{run}").ensure())
                seconds, report = _timed(lambda lib=lib, mode=mode: import_tracks(
                    lib, read_medleydb(work / "mdb", mapping), link=(mode == "link")))
                assert len(report.added) == args.songs and not report.errors, report.to_dict()
                results[mode].append(seconds)
            lib = Library(DataRoot(work / f"data-link-{run}"))
            seconds, report = _timed(lambda lib=lib: import_tracks(lib, read_medleydb(work / "mdb", mapping)))
            assert len(report.unchanged) == args.songs, report.to_dict()
            results["reimport"].append(seconds)
            seconds, quality = _timed(lambda lib=lib: check_library(lib))
            results["quality"].append(seconds)
            shutil.rmtree(work / f"data-copy-{run}", ignore_errors=True)
        out = {
            "benchmark": "ingestion import throughput",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "dataset": {"layout": "medleydb (synthetic)", "songs": args.songs, "seconds_per_song": args.seconds,
                        "rate_hz": args.rate, "stems": stems, "wav_megabytes": round(size_mb, 1),
                        "generate_seconds": round(gen_seconds, 2)},
            "import_hardlink": _summary(results["link"], args.songs),
            "import_copy": _summary(results["copy"], args.songs),
            "reimport_unchanged": _summary(results["reimport"], args.songs),
            "quality_checks": {**_summary(results["quality"], args.songs),
                               "suggestions_on_clean_songs": quality["suggestions"]},
        }
        text = json.dumps(out, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, text + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

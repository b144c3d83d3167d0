"""Serving benchmark: end-to-end separation speed, client peak memory, and request latency.

    .venv/bin/python bench/bench_serving.py [--presets tiny,cpu,cpu:hourglass_filters=48] [--saved-models NAME=PATH]
        [--seconds 60] [--memory-minutes 10]

Starts the compatible server on free ports with the identity reference model (and, when
model/export.py is there, untrained networks of the given presets: the same graph and cost as a
trained one), then measures and prints one JSON object:
  end_to_end: seconds of wall time per minute of stereo 44.1 kHz audio (decode -> serving -> write)
  memory: peak resident memory of a fresh client process separating a 10-minute stereo 44.1 kHz song
  latency: gRPC vs REST latency of one 10-second segment, p50/p95, with 1 and 4 concurrent clients
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RATE_HZ = 44100


def write_song(path: Path, seconds: float, seed: int = 0) -> Path:
    """A stereo 44.1 kHz float WAV of tones and noise, written in pieces to keep memory low."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    with sf.SoundFile(path, "w", RATE_HZ, 2, subtype="FLOAT") as out:
        block = RATE_HZ * 10
        for start in range(0, int(seconds * RATE_HZ), block):
            count = min(block, int(seconds * RATE_HZ) - start)
            t = (start + np.arange(count)) / RATE_HZ
            tone = 0.3 * np.sin(2 * np.pi * 220 * t)
            out.write((np.stack([tone, tone * 0.8]) + 0.05 * rng.standard_normal((2, count))).T.astype(np.float32))
    return path


def build_models(root: Path, presets: list[str], saved: dict[str, Path] | None = None) -> dict[str, str]:
    """Identity reference model, untrained presets and copies of exported versions.

    A preset may carry overrides ("cpu:hourglass_filters=48", as bench_model.py takes them).
    Returns {model name: what it is}.
    """
    from services.serving.reference_models import save_gain_model

    save_gain_model(root / "identity" / "1", gain=1.0)
    built = {"identity": "reference identity model (instrument = waveform)"}
    if presets and (ROOT / "model" / "export.py").exists():
        from bench.bench_model import parse_spec
        from model.config import make_config
        from model.export import export_saved_model
        from model.network import build_network

        for spec in presets:
            preset, overrides = parse_spec(spec)
            config = make_config(preset, overrides)
            name = "preset_" + re.sub(r"[^A-Za-z0-9._-]", "_", spec.replace("=", "-"))
            export_saved_model(build_network(config), config, root / name, {"preset": preset})
            built[name] = f"model/ preset {spec!r}, untrained weights"
    for name, path in (saved or {}).items():
        shutil.copytree(path, root / name / "1")
        built[name] = f"exported SavedModel {path}"
    return built


def parse_saved(text: str) -> dict[str, Path]:
    """"guitar4=model/pretrained/guitar/4,w48=/data/models/guitar/5" -> {name: version folder}."""
    saved = {}
    for item in filter(None, text.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not (Path(path) / "saved_model.pb").is_file():
            raise SystemExit(f"bad --saved-models entry {item!r}: use NAME=VERSION_FOLDER (holding saved_model.pb)")
        saved[name] = Path(path)
    return saved


def end_to_end(server, model: str, song: Path, seconds: float, out_dir: Path, repeats: int = 3) -> dict:
    """Median over `repeats` runs of decode -> serving -> write for one song."""
    from services.serving.client import separate_file

    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            separate_file(song, out_dir / model, model, address=server.grpc_address)
        except Exception as error:  # a preset too slow for this machine should not hide the other numbers
            return {"song_seconds": seconds, "error": str(error)}
        runs.append(time.perf_counter() - started)
    elapsed = statistics.median(runs)
    return {"song_seconds": seconds, "wall_seconds": round(elapsed, 2),
            "wall_seconds_runs": [round(r, 2) for r in runs],
            "seconds_per_minute_of_audio": round(elapsed * 60.0 / seconds, 2),
            "x_real_time": round(seconds / elapsed, 2)}


def _memory_child(address: str, song: str, out_dir: str) -> None:
    """Runs in a fresh process: import cost first, then the peak of one separation."""
    import tensorflow_serving.apis.prediction_service_pb2_grpc  # noqa: F401  (the import cost: TensorFlow)

    from services.serving.client import separate_file

    baseline_kib = _peak_rss_kib()
    separate_file(song, out_dir, "identity", address=address)
    peak_kib = _peak_rss_kib()
    print(json.dumps({"after_imports_mib": round(baseline_kib / 1024), "peak_mib": round(peak_kib / 1024)}))


def _peak_rss_kib() -> int:
    # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over a fork + exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(server, minutes: float, work: Path) -> dict:
    song = write_song(work / "long.wav", minutes * 60, seed=1)
    command = [sys.executable, __file__, "--memory-child", server.grpc_address, str(song), str(work / "long_out")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    elapsed = time.perf_counter() - started
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    song_mib = minutes * 60 * RATE_HZ * 2 * 4 / 2**20
    song.unlink()
    return {"song_minutes": minutes, "one_float32_copy_of_song_mib": round(song_mib), **measured,
            "peak_over_imports_mib": measured["peak_mib"] - measured["after_imports_mib"],
            "wall_seconds": round(elapsed, 1)}


def latency(server, model: str, requests_per_client: int) -> dict:
    """Latency of Predict for one 10-second model-rate segment (1 row), gRPC vs REST."""
    from services.serving.client import ServedModel

    results = {}
    for protocol, address in (("grpc", server.grpc_address), ("rest", server.rest_address)):
        for clients in (1, 4):
            times: list[float] = []
            lock = threading.Lock()

            def client_loop(address=address, protocol=protocol, times=times, lock=lock):
                with ServedModel(model, address, protocol) as served:
                    segment = np.random.default_rng(0).uniform(-1, 1, (1, served.sample_rate_hz * 10)).astype(np.float32)
                    served.separate(segment)  # warm the connection
                    for _ in range(requests_per_client):
                        started = time.perf_counter()
                        served.separate(segment)
                        with lock:
                            times.append(time.perf_counter() - started)

            threads = [threading.Thread(target=client_loop) for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            milliseconds = np.array(times) * 1000
            results[f"{protocol}_{clients}_clients"] = {
                "requests": len(times), "p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
                "p95_ms": round(float(np.percentile(milliseconds, 95)), 1)}
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        _memory_child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,cpu",
                        help="model/ presets to export and time ('' for none; 'thesis' needs minutes per request on CPU)")
    parser.add_argument("--saved-models", type=parse_saved, default={}, metavar="NAME=PATH,...",
                        help="exported versions to time beside the presets (e.g. a model about to ship)")
    parser.add_argument("--seconds", type=float, default=60.0, help="song length for the end-to-end timing")
    parser.add_argument("--preset-seconds", type=float, default=20.0, help="song length for preset timings")
    parser.add_argument("--memory-minutes", type=float, default=10.0)
    parser.add_argument("--latency-requests", type=int, default=20, help="requests per client")
    parser.add_argument("--parts", default="end_to_end,latency,memory", help="which measurements to run")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per model (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from services.serving.local import running_server, write_config

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as folder:
        work = Path(folder)
        presets = [preset for preset in args.presets.split(",") if preset]
        models = build_models(work / "models", presets, args.saved_models)
        config = write_config(work / "models.config", {name: work / "models" / name for name in models})
        report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "server": "services.serving compatible server (CPU)"},
                  "models": models, "end_to_end": {}}
        with running_server(config, work / "server.log", ready_model="identity", poll_seconds=5) as server:
            parts = args.parts.split(",")
            if "end_to_end" in parts:
                song = write_song(work / "song.wav", args.seconds)
                report["end_to_end"]["identity"] = end_to_end(server, "identity", song, args.seconds, work / "out",
                                                              args.repeats)
                short = write_song(work / "short.wav", args.preset_seconds, seed=2)
                for name in models:
                    if name != "identity":
                        report["end_to_end"][name] = end_to_end(server, name, short, args.preset_seconds,
                                                             work / "out", args.repeats)
                        print(json.dumps({name: report["end_to_end"][name]}), file=sys.stderr, flush=True)
            if "latency" in parts:
                report["latency_identity_10s_segment"] = latency(server, "identity", args.latency_requests)
            if "memory" in parts:
                report["memory_10_minute_song"] = peak_memory(server, args.memory_minutes, work)
    report["command"] = " ".join([".venv/bin/python", *sys.argv])
    report["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

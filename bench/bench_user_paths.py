#!/usr/bin/env python
"""The separation as users meet it: `stemlab separate` on whole songs, and an upload through the web API.

    bench/bench_user_paths.py --seconds 60,300,600 --models guitar,piano --runs 3 --web-seconds 300

What it does, on a private data root and free ports (nothing of a running stack is touched):
- makes stereo 44.1 kHz 16-bit WAV songs of the given lengths (tones and noise, numpy);
- serves the shipped models (model/pretrained/guitar and piano) and an identity model with the
  compatible server (``python -m services.serving.server``), started here;
- runs ``python -m stemlab.cli separate SONG --model M`` as a user would, ``--runs`` times per
  song and model after one warm-up: wall time from process start to files written, peak RSS of the
  CLI (its rusage) and of the serving process (VmHWM, reset before each run);
- separates a 1-second clip the same way (start-up dominates);
- splits one separation per song and model into its parts: start-up (a CLI process importing
  what `separate` needs), decoding, resampling, transfer (the same requests answered by the
  identity model: serialising, the socket, the server's own handling), model (the requests'
  time less the transfer), overlap-add, encoding and writing (soundfile, block by block). The
  parts run concurrently in the pipeline, so they add up to more than the wall time;
- uploads a song through ``POST /api/separations`` of the web app (gunicorn as deployed) and
  polls until the result is there: upload-to-result wall time;
- records medians, every run, and the load average before and after each measurement, in
  bench/results/user_paths.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.serving.client import StageTimes, separate_file  # noqa: E402
from services.serving.local import free_port, running_server, write_config  # noqa: E402

RATE = 44100


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def make_song(path: Path, seconds: float, seed: int = 0) -> Path:
    """Stereo 44.1 kHz 16-bit WAV: a few chords of tones with envelopes, and noise; written in blocks."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    block = 10 * RATE
    total = int(seconds * RATE)
    with sf.SoundFile(str(path), "w", samplerate=RATE, channels=2, subtype="PCM_16") as handle:
        for start in range(0, total, block):
            t = np.arange(start, min(total, start + block)) / RATE
            chord = [110, 165, 220, 277][int(t[0] // 2) % 4]
            tones = sum(0.12 * np.sin(2 * np.pi * chord * k * t) / k for k in (1, 2, 3))
            envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t) ** 2
            left = tones * envelope + 0.03 * rng.standard_normal(t.size)
            right = 0.8 * tones + 0.03 * rng.standard_normal(t.size)
            handle.write(np.stack([left, right], axis=1).astype(np.float32))
    return path


def reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def cli_env(tree: Path = REPO) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree))


def run_cli(song: Path, model: str, address: str, out: Path, tree: Path = REPO) -> tuple[float, float]:
    """(wall seconds from process start to exit with the files written, peak RSS MiB) of `stemlab separate`
    as the code in ``tree`` runs it."""
    # GNU time reports the CLI's peak RSS. The rusage of a child of this process would not do: Linux
    # carries the RSS the child had as a fork of this (large) process into its maximum.
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as peak:
        command = ["/usr/bin/time", "-f", "%M", "-o", peak.name, sys.executable, "-m", "stemlab.cli", "separate",
                   str(song), "--model", model, "--address", address, "--out", str(out), "--json"]
        started = time.perf_counter()
        result = subprocess.run(command, env=cli_env(tree), cwd=tree, capture_output=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"stemlab separate failed: {result.stderr.decode()[-2000:]}")
        json.loads(result.stdout)
        return wall, int(peak.read().split()[-1]) / 1024


def startup_seconds(runs: int) -> float:
    """A process importing what `stemlab separate` needs and loading the protocol, start to exit."""
    script = ("import stemlab.cli, services.serving.cli, services.serving.client, services.serving.audio_stream\n"
              "import services.serving.protocol as p; p.load(); stemlab.cli.build_parser()")
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], env=cli_env(), check=True)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def parts(song: Path, model: str, address: str, out: Path, startup: float) -> dict:
    """One separation's parts in seconds (see the module docstring)."""
    real, identity = StageTimes(), StageTimes()
    started = time.perf_counter()
    separate_file(song, out, model, address=address, times=real)
    wall = time.perf_counter() - started
    separate_file(song, out, "identity", address=address, times=identity)
    transfer = identity.seconds["request"]
    seconds = {
        "start-up": startup,
        "decoding": real.seconds["decode"] + real.seconds["open"],
        "resampling": real.seconds["resample"],
        "transfer to serving": transfer,
        "model": max(0.0, real.seconds["request"] - transfer),
        "overlap-add": real.seconds["overlap_add"],
        "encoding and writing": real.seconds["write"],
    }
    total = sum(seconds.values())
    return {
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "share": {name: round(value / total, 3) for name, value in seconds.items()},
        "client_idle_waiting_for_serving": round(real.seconds["wait"], 3),
        "in_process_wall": round(wall, 3),
    }


def median_runs(function, runs: int) -> dict:
    before = load()
    results = [function() for _ in range(runs)]
    return {"runs": results, "load_before": before, "load_after": load()}


def multipart(fields: dict[str, str], file_field: str, file_path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts_ = []
    for name, value in fields.items():
        parts_.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts_.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                  f'filename="{file_path.name}"\r\nContent-Type: audio/wav\r\n\r\n'.encode())
    parts_.append(file_path.read_bytes())
    parts_.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts_), f"multipart/form-data; boundary={boundary}"


def web_upload(url: str, song: Path, model: str) -> float:
    """Seconds from the upload's first byte to a finished result (the state 'succeeded')."""
    started = time.perf_counter()
    body, content_type = multipart({"model": model}, "file", song)
    request = urllib.request.Request(f"{url}/api/separations", data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=600) as reply:
        job = json.loads(reply.read())
    while True:
        with urllib.request.urlopen(f"{url}/api/separations/{job['id']}", timeout=60) as reply:
            state = json.loads(reply.read())
        if state["state"] == "succeeded":
            return time.perf_counter() - started
        if state["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"web separation {state['state']}: {state['error']}")
        time.sleep(0.1)


def start_web(root: Path, grpc_address: str, rest_address: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(cli_env(), STEMLAB_DATA=str(root), STEMLAB_SERVING_ADDRESS=grpc_address,
               STEMLAB_SERVING_REST_ADDRESS=rest_address, STEMLAB_WEB_MAX_UPLOAD_MB="200")
    log = open(root / "web.log", "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")), "--workers", "1", "--threads", "8", "--timeout", "600",
         "--bind", f"127.0.0.1:{port}", "services.frontend.app:create_app()"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"web did not come up: {(root / 'web.log').read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", default="60,300,600", help="song lengths for the CLI, comma-separated")
    parser.add_argument("--models", default="guitar,piano")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clip-runs", type=int, default=5, help="runs of the 1-second clip")
    parser.add_argument("--web-seconds", type=float, default=300, help="song length for the web upload (0: skip)")
    parser.add_argument("--web-runs", type=int, default=3)
    parser.add_argument("--serving-args", default="", help="extra flags for the serving process")
    parser.add_argument("--baseline-tree", default=None,
                        help="another checkout (e.g. the code before a change, protos generated) whose CLI is "
                             "timed beside this one on the same songs and server")
    parser.add_argument("--baseline-seconds", default="60,300", help="song lengths for the baseline")
    parser.add_argument("--baseline-runs", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the data root (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "user_paths.json"))
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="user-paths-", dir=args.work))
    models = root / "models"
    models.mkdir()
    for name in ("guitar", "piano"):
        (models / name).symlink_to(REPO / "model" / "pretrained" / name)
    subprocess.run([sys.executable, "-c", "import sys; from services.serving.reference_models import save_gain_model;"
                    " save_gain_model(sys.argv[1], gain=1.0)", str(models / "identity" / "1")],
                   env=dict(cli_env(), TF_CPP_MIN_LOG_LEVEL="3"), check=True, capture_output=True)
    config = write_config(root / "models.config", {name: models / name for name in ("guitar", "piano", "identity")})
    model_names = [name for name in args.models.split(",") if name]
    results: dict = {
        "command": "bench/bench_user_paths.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_at_start": load()},
        "note": "the machine was shared with other engineers' work; the load average is recorded with each result",
        "serving_args": args.serving_args,
    }
    extra = tuple(args.serving_args.split()) if args.serving_args else ()
    with running_server(config, root / "serving.log", ready_model="guitar", poll_seconds=5, extra_args=extra) as server:
        pid = server.process.pid
        address = server.grpc_address
        songs = {seconds: make_song(root / f"song-{seconds:g}s.wav", seconds)
                 for seconds in [float(s) for s in args.seconds.split(",") if s]}
        clip = make_song(root / "clip-1s.wav", 1.0)
        startup = startup_seconds(5)
        results["startup_seconds"] = round(startup, 3)

        def one_cli(song: Path, model: str, tree: Path = REPO) -> dict:
            reset_peak(pid)
            wall, cli_peak = run_cli(song, model, address, root / "out" / model / song.stem, tree)
            return {"wall_seconds": round(wall, 3), "cli_peak_mb": round(cli_peak, 1),
                    "serving_peak_mb": round(peak_mb(pid), 1)}

        def summary(record: dict, seconds: float) -> dict:
            runs = record["runs"]
            wall = statistics.median(run["wall_seconds"] for run in runs)
            return {**record, "song_seconds": seconds, "median_wall_seconds": round(wall, 3),
                    "real_time_factor": round(seconds / wall, 2),
                    "median_cli_peak_mb": round(statistics.median(run["cli_peak_mb"] for run in runs), 1),
                    "median_serving_peak_mb": round(statistics.median(run["serving_peak_mb"] for run in runs), 1)}

        results["cli"] = []
        for model in model_names:
            one_cli(clip, model)  # warm-up: the server's first request of each shape is slow
        results["clip"] = {model: summary(median_runs(lambda m=model: one_cli(clip, m), args.clip_runs), 1.0)
                           for model in model_names[:1]}
        print(json.dumps({"clip": results["clip"]}), flush=True)
        for index, (seconds, song) in enumerate(songs.items()):
            for model in model_names:
                if index == 0:
                    one_cli(song, model)  # warm-up: every song sends requests of the same shapes
                record = summary(median_runs(lambda s=song, m=model: one_cli(s, m), args.runs), seconds)
                record["model"] = model
                record["parts"] = parts(song, model, address, root / "parts", startup)
                results["cli"].append(record)
                save(results, args.out)
                print(json.dumps({k: record[k] for k in ("model", "song_seconds", "median_wall_seconds",
                                                         "real_time_factor", "median_cli_peak_mb",
                                                         "median_serving_peak_mb", "load_before")}), flush=True)
        if args.baseline_tree:
            tree = Path(args.baseline_tree).resolve()
            results["baseline"] = {"tree": str(tree), "cli": []}
            for seconds in [float(s) for s in args.baseline_seconds.split(",") if s]:
                song = make_song(root / f"song-{seconds:g}s.wav", seconds)
                model = model_names[0]
                one_cli(song, model, tree)  # warm-up
                record = summary(median_runs(lambda s=song, m=model: one_cli(s, m, tree), args.baseline_runs), seconds)
                record["model"] = model
                results["baseline"]["cli"].append(record)
                save(results, args.out)
                print(json.dumps({"baseline": {k: record[k] for k in ("model", "song_seconds", "median_wall_seconds",
                                                                      "real_time_factor", "median_cli_peak_mb")}}),
                      flush=True)
            record = summary(median_runs(lambda: one_cli(clip, model_names[0], tree), args.baseline_runs), 1.0)
            results["baseline"]["clip"] = record
            save(results, args.out)
        if args.web_seconds:
            song = make_song(root / f"web-{args.web_seconds:g}s.wav", args.web_seconds, seed=1)
            web, url = start_web(root, address, server.rest_address)
            try:
                web_upload(url, clip, model_names[0])  # warm-up
                before = load()
                walls = [web_upload(url, song, model_names[0]) for _ in range(args.web_runs)]
                wall = statistics.median(walls)
                results["web"] = {"song_seconds": args.web_seconds, "model": model_names[0],
                                  "runs_wall_seconds": [round(w, 3) for w in walls],
                                  "median_wall_seconds": round(wall, 3),
                                  "real_time_factor": round(args.web_seconds / wall, 2),
                                  "load_before": before, "load_after": load()}
                print(json.dumps({"web": results["web"]}), flush=True)
            finally:
                web.terminate()
                web.wait(timeout=30)
    results["machine"]["load_at_end"] = load()
    print(f"wrote {save(results, args.out)}")
    return 0


def save(results: dict, out: str) -> Path:
    """Written after every measurement, so an interrupted run keeps what it measured."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())

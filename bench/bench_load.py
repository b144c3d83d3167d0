"""Load benchmark of the web's separation queue: N concurrent uploads, two setups.

    nice -n 10 python -m bench.bench_load [--uploads 24] [--seconds 30] [--out bench/results/load.json]

1. sqlite-one-process: one web process (gunicorn) running separations in its own threads
   (STEMLAB_WEB_WORKERS=2), jobs in DATA/web/separations.sqlite — `make up` on one machine.
2. postgresql-two-replicas: two web processes that only queue and serve, and two separation
   worker processes (one separation at a time each), on a throwaway PostgreSQL server.

Both separate with the same served model (the compatible serving process and the fixed-gain
reference model of the tests), so what differs is the queue. Uploads are spread over the web
processes; each client polls its job through the *other* web process, then downloads the
instrument WAV. Reported: throughput, p50/p95 time to result, errors, jobs lost (submitted but
never succeeded, or results missing), and the queue's own overhead: for separations sent one at
a time, the time from queued to claimed and from finished to seen by the client, against the
separation's own run time (claimed to finished).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import requests

from services.common.jobstore import open_store
from tests.frontendtools import ServingProcess, build_models, song
from tests.pgserver import PostgresServer, missing_reason
from tests.webstack import WebProcess, WorkerProcess, stack_env, upload, wav_bytes

RATE = 44100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def one_upload(webs: list[str], i: int, data: bytes, timeout: float) -> dict:
    """Upload through web i, follow and download through the other; never raises."""
    submit_to, follow = webs[i % len(webs)], webs[(i + 1) % len(webs)]
    start = time.perf_counter()
    try:
        reply = upload(submit_to, data)
        if reply.status_code != 202:
            return {"ok": False, "error": f"upload {reply.status_code}: {reply.text[:200]}"}
        job_id = reply.json()["id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = requests.get(f"{follow}/api/separations/{job_id}", timeout=30).json()
            if job["state"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        seen = time.perf_counter()
        if job["state"] != "succeeded":
            return {"ok": False, "id": job_id, "error": f"{job['state']}: {job.get('error')}"}
        got = requests.get(follow + job["links"]["instrument"]["wav"], timeout=60)
        if got.status_code != 200 or len(got.content) < len(data) // 4:
            return {"ok": False, "id": job_id, "error": f"download {got.status_code}"}
        return {"ok": True, "id": job_id, "seconds": time.perf_counter() - start, "seen": seen}
    except requests.RequestException as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


def measure(webs: list[str], store, data: bytes, uploads: int, timeout: float) -> dict:
    # Warm every worker up (imports, the model's first call) before timing; then one at a time:
    # the queue's own overhead.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: one_upload(webs, i, data, timeout), range(2)))
    sequential = []
    for i in range(4):
        row = one_upload(webs, i, data, timeout)
        if row["ok"]:
            job = store.get(row["id"])
            run = job.finished - job.started
            sequential.append({"run": run, "claim": job.started - job.created,
                               "client_total": row["seconds"]})
    start = time.perf_counter()
    with ThreadPoolExecutor(uploads) as pool:
        rows = list(pool.map(lambda i: one_upload(webs, i, data, timeout), range(uploads)))
    wall = time.perf_counter() - start
    ok = [r for r in rows if r["ok"]]
    ids = [r["id"] for r in rows if r.get("id")]
    states = [store.get(job_id).state for job_id in ids]
    times = [r["seconds"] for r in ok]
    run = statistics.median(s["run"] for s in sequential)
    claim = statistics.median(s["claim"] for s in sequential)
    return {
        "uploads": uploads,
        "wall_seconds": round(wall, 2),
        "throughput_per_minute": round(60 * len(ok) / wall, 2),
        "time_to_result_p50_s": round(percentile(times, 50), 3) if times else None,
        "time_to_result_p95_s": round(percentile(times, 95), 3) if times else None,
        "errors": len(rows) - len(ok),
        "error_samples": [r["error"] for r in rows if not r["ok"]][:5],
        "jobs_lost": uploads - sum(1 for s in states if s == "SUCCEEDED"),
        "single_job": {
            "separation_run_s_median": round(run, 3),
            "queued_to_claimed_s_median": round(claim, 4),
            "client_time_to_result_s_median": round(statistics.median(s["client_total"] for s in sequential), 3),
            "queue_overhead_share": round(claim / run, 4),
        },
    }


def run_setup(name: str, root: Path, serving: ServingProcess, data: bytes, uploads: int, timeout: float,
              database_url: str = "") -> dict:
    print(f"== {name}", flush=True)
    load_before = os.getloadavg()[0]
    data_root = root / name
    with ExitStack() as stack:
        if database_url:
            env = stack_env(data_root, serving, database_url, STEMLAB_WEB_START_WORKERS="false",
                            STEMLAB_WEB_WORKERS="1", STEMLAB_WEB_MAX_QUEUED=str(uploads + 10))
            webs = [stack.enter_context(WebProcess(env, root / f"{name}-web{i}.log")) for i in range(2)]
            for i in range(2):
                stack.enter_context(WorkerProcess(env, root / f"{name}-worker{i}.log"))
        else:
            env = stack_env(data_root, serving, STEMLAB_WEB_WORKERS="2", STEMLAB_WEB_MAX_QUEUED=str(uploads + 10))
            webs = [stack.enter_context(WebProcess(env, root / f"{name}-web.log"))]
        store = open_store("web", data_root / "web" / "separations.sqlite") if not database_url else None
        if database_url:
            from services.common.jobstore.postgres import PostgresJobStore

            store = PostgresJobStore(database_url, "web")
        result = measure([w.url for w in webs], store, data, uploads, timeout)
        store.close()
    # The machine is shared: its load says how much of a difference between setups is the queue.
    result.update(web_processes=len(webs), separations_at_once=2,
                  load_average_1min={"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)})
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each uploaded song")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    if missing_reason():
        raise SystemExit(missing_reason())
    data = wav_bytes(song(args.seconds, rate=RATE, channels=2), RATE)
    with tempfile.TemporaryDirectory(prefix="stemlab-load-") as tmp:
        root = Path(tmp)
        with ServingProcess(build_models(root), root / "serving.log") as serving, PostgresServer() as pg:
            results = {
                "sqlite-one-process": run_setup("sqlite", root, serving, data, args.uploads, args.timeout),
                "postgresql-two-replicas": run_setup("postgresql", root, serving, data, args.uploads, args.timeout,
                                                     database_url=pg.url),
            }
    report = {"song": {"seconds": args.seconds, "rate_hz": RATE, "channels": 2, "wav_bytes": len(data)},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "command": f"nice -n 10 python -m bench.bench_load --uploads {args.uploads} --seconds {args.seconds:g}",
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

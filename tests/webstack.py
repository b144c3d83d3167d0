"""Web replicas and separation workers as real processes (the PostgreSQL tests and the load bench).

`WebProcess` is gunicorn serving `services.frontend.app:create_app()`; `WorkerProcess` is
`python -m services.frontend.worker`. Both take their settings from the environment, the way
compose and Kubernetes start them.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

from tests.servicetools import REPO, free_port, kill_process, stop_process


def stack_env(data_root: Path, serving, database_url: str = "", **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "STEMLAB_DATA": str(data_root),
           "STEMLAB_SERVING_ADDRESS": serving.grpc_address, "STEMLAB_SERVING_REST_ADDRESS": serving.rest_address,
           "STEMLAB_WEB_MODEL_STATUS_CACHE_SECONDS": "0", "STEMLAB_WEB_ALLOW_HOSTS": "127.0.0.1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("STEMLAB_DATABASE_URL", None)
    if database_url:
        env["STEMLAB_DATABASE_URL"] = database_url
    env.update(extra)
    return env


class _Process:
    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.command, self.env, self.log_path = command, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        kill_process(self.proc)

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class WebProcess(_Process):
    def __init__(self, env: dict[str, str], log_path: Path, threads: int = 8):
        self.port = free_port()
        # The deployments' gunicorn settings (services/frontend/gunicorn_conf.py).
        super().__init__([sys.executable, "-m", "gunicorn", "-c", "python:services.frontend.gunicorn_conf",
                          "-b", f"127.0.0.1:{self.port}", "services.frontend.app:create_app()"],
                         {**env, "STEMLAB_WEB_THREADS": str(threads)}, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        super().start()
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"web exited: {self.log()[-3000:]}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"web did not come up: {self.log()[-3000:]}")


class WorkerProcess(_Process):
    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__([sys.executable, "-m", "services.frontend.worker"], env, log_path)

    def start(self):
        super().start()
        deadline = time.time() + 60
        while "separation worker" not in self.log() and time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log()[-3000:]}")
            time.sleep(0.1)
        return self


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def upload(base_url: str, data: bytes, model: str = "guitar", name: str = "song.wav") -> requests.Response:
    return requests.post(f"{base_url}/api/separations", data={"model": model},
                         files={"file": (name, data, "audio/wav")}, timeout=60)


def wait_done(base_url: str, job_id: str, timeout: float = 120.0, poll: float = 0.05) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = requests.get(f"{base_url}/api/separations/{job_id}", timeout=10).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(poll)
    raise AssertionError(f"separation {job_id} did not finish: {job}")

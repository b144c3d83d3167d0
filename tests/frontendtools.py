"""Shared by the web tests: a real compatible serving process with a tiny gain model, and songs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

from tests.polling import wait_until
from tests.servicetools import REPO, free_port

MODEL_RATE_HZ = 22050
GAIN = 0.5


def write_models_config(path: Path, names: list[str], models_root: Path) -> Path:
    from services.common import models_config

    path.write_text(models_config.render({n: models_root / n for n in names}))
    return path


def build_models(root: Path) -> Path:
    """models/guitar/1: instrument = 0.5 x mix at 22050 Hz. piano is configured but has no version."""
    from services.serving.reference_models import save_gain_model

    models = root / "models"
    save_gain_model(models / "guitar" / "1", gain=GAIN, sample_rate_hz=MODEL_RATE_HZ)
    (models / "piano").mkdir(parents=True, exist_ok=True)
    return write_models_config(root / "models.config", ["guitar", "piano"], models)


class ServingProcess:
    """`python -m services.serving.server` on free gRPC and REST ports."""

    def __init__(self, config: Path, log_path: Path):
        self.config = config
        self.log_path = log_path
        self.grpc_port = free_port()
        self.rest_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_address(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    def __enter__(self) -> ServingProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.serving.server", "--port", str(self.grpc_port),
                 "--rest_api_port", str(self.rest_port), "--host", "127.0.0.1",
                 "--model_config_file", str(self.config), "--file_system_poll_wait_seconds", "1"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        def available() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serving exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.rest_address}/v1/models/guitar", timeout=2) as reply:
                    return "AVAILABLE" in [s["state"] for s in json.loads(reply.read())["model_version_status"]]
            except OSError:
                return False

        try:
            wait_until(available, 90, interval=0.1)
        except TimeoutError:
            self.__exit__()
            raise RuntimeError(f"serving did not come up: {self.log_path.read_text()[-2000:]}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def song(seconds: float, rate: int = 44100, channels: int = 2, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """A short synthetic song (channels, samples): a chord with a slow beat and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
    beat = 0.5 + 0.5 * np.cos(2 * np.pi * 2 * t) ** 2
    rows = [0.4 * chord * beat * (1 - 0.3 * c) + noise * rng.standard_normal(t.size) for c in range(channels)]
    return np.asarray(rows, np.float32)

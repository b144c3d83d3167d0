"""Start the compatible model server as a child process on free ports (tests, benchmarks, smoke checks)."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common import models_config


@dataclass
class LocalServer:
    process: subprocess.Popen
    grpc_address: str
    rest_address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, models: dict[str, Path]) -> Path:
    """A model_config_list text proto serving ``{name: base_path}``."""
    path.write_text(models_config.render(models))
    return path


def _ready(rest_address: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{rest_address}/v1/models/{model}", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_server(
    config_file: Path,
    log_path: Path,
    ready_model: str,
    poll_seconds: float = 0.5,
    extra_args: tuple[str, ...] = (),
    startup_timeout_seconds: float = 120.0,
) -> Iterator[LocalServer]:
    """Run ``python -m services.serving.server`` until the block ends; ready once ``ready_model`` answers."""
    grpc_port, rest_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "services.serving.server", "--host", "127.0.0.1",
        "--port", str(grpc_port), "--rest_api_port", str(rest_port),
        "--model_config_file", str(config_file), "--file_system_poll_wait_seconds", str(poll_seconds),
        *extra_args,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    root = Path(__file__).resolve().parents[2]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    server = LocalServer(process, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{rest_port}", log_path)
    try:
        deadline = time.monotonic() + startup_timeout_seconds
        while not _ready(server.rest_address, ready_model):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"model server did not come up:\n{server.log()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

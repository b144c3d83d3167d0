"""Start real service processes for tests, and wait for their jobs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.polling import wait_until

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str, service: str = "", timeout: float = 2.0):
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def kill_process(proc: subprocess.Popen | None) -> None:
    """SIGKILL a test's child process if it still runs, and reap it."""
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    """SIGTERM (graceful shutdown), then SIGKILL after `timeout`; returns the exit code."""
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_process(proc)
    return proc.returncode if proc else None


class ServiceProcess:
    """`python -m services.<name>.server` (or another module) as a subprocess on a free port."""

    def __init__(self, name: str, data_root: str | Path, port: int | None = None,
                 module: str | None = None, env: dict | None = None, startup_timeout: float = 60.0):
        self.name = name
        self.data_root = Path(data_root)
        self.port = port or free_port()
        self.module = module or f"services.{name}.server"
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_root / f"{name}-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "STEMLAB_DATA": str(self.data_root),
               f"STEMLAB_{self.name.upper()}_PORT": str(self.port),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **self.env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], cwd=REPO, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def run_to_exit(self, timeout: float = 30.0) -> int:
        """Start the process and wait for it to exit by itself (a start that must fail); its exit code."""
        self._spawn()
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def start(self) -> ServiceProcess:
        self._spawn()

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return health_status(self.address, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        try:
            wait_until(serving, self.startup_timeout, interval=0.1)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"{self.name} did not become healthy:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self) -> grpc.Channel:
        """A channel that sends the token of this service's data root (or $STEMLAB_TOKEN)."""
        from services.common.auth import open_channel, read_token

        return open_channel(self.address, token=read_token(self.data_root))

    def kill(self) -> None:
        kill_process(self.proc)

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        return stop_process(self.proc, timeout)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_job(channel_or_stub, job_id: str, timeout: float = 120.0, states: tuple[int, ...] = ()):
    """Poll a service's Jobs until the job reaches one of `states` (default: it has ended); the Job."""
    from stemlab.v1 import jobs_pb2, jobs_pb2_grpc

    stub = (channel_or_stub if isinstance(channel_or_stub, jobs_pb2_grpc.JobsStub)
            else jobs_pb2_grpc.JobsStub(channel_or_stub))
    states = states or (jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED)

    def reached():
        job = stub.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=10)
        return job if job.state in states else None

    return wait_until(reached, timeout, message=f"job {job_id} did not reach {states}")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run the `stemlab` command line in a subprocess (as a user would)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "stemlab.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)

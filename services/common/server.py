"""Server bootstrap shared by every gRPC service.

    svc = Service("ingestion")
    svc.register_job("ingestion.import", import_job)       # fn(ctx, params) -> dict
    svc.add_servicer(pb2_grpc.add_DatasetServiceServicer_to_server, Servicer(svc),
                     "stemlab.v1.DatasetService")
    svc.serve()                                             # blocks until SIGTERM/SIGINT

A Service brings: the validated config, the data root, the job store (DATA/jobs/<name>.sqlite)
and runner, `stemlab.v1.Jobs` for its jobs, grpc.health.v1 (overall and per service name),
reflection, message size limits, the stack's token on every call but health (services/common/auth.py;
reflection needs it too: it lists every method, which only the stack's users need), optional TLS, and a graceful stop: on SIGTERM health turns NOT_SERVING,
new requests are refused, running jobs are asked to stop and get the grace period to
checkpoint, whatever still runs is marked interrupted, then the process exits 0.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import yaml
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import auth
from services.common import jobs as jobstore
from services.common.config import Config, ConfigError, load_config
from services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from services.common.logs import setup_logging
from services.common.paths import DataRoot
from stemlab.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

_STATE_TO_PB = {
    jobstore.QUEUED: jobs_pb2.QUEUED,
    jobstore.RUNNING: jobs_pb2.RUNNING,
    jobstore.SUCCEEDED: jobs_pb2.SUCCEEDED,
    jobstore.FAILED: jobs_pb2.FAILED,
    jobstore.CANCELLED: jobs_pb2.CANCELLED,
}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}


def parse_overrides(overrides: dict[str, str]) -> dict[str, Any]:
    """map<string,string> -> typed values: each value is read as a YAML scalar or list (never eval'd)."""
    parsed = {}
    for key, text in overrides.items():
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidArgumentError(f"override {key}: cannot read {text!r}: {e}") from e
        if not isinstance(value, (int, float, str, bool, list)):
            raise InvalidArgumentError(f"override {key}: expected a number, word or list, got {text!r}")
        parsed[key] = value
    return parsed


def to_struct(data: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data or {})
    return s


def from_struct(s: struct_pb2.Struct) -> dict:
    return json_format.MessageToDict(s)


def job_to_pb(job: jobstore.JobRecord) -> jobs_pb2.Job:
    msg = jobs_pb2.Job(id=job.id, kind=job.kind, state=_STATE_TO_PB[job.state], error=job.error)
    p = job.progress
    msg.progress.CopyFrom(jobs_pb2.Progress(fraction=p.fraction, done=p.done, total=p.total,
                                            message=p.message, eta_seconds=p.eta_seconds))
    if p.metrics:
        msg.progress.metrics.update(p.metrics)
    msg.created.FromNanoseconds(int(job.created * 1e9))
    if job.started:
        msg.started.FromNanoseconds(int(job.started * 1e9))
    if job.finished:
        msg.finished.FromNanoseconds(int(job.finished * 1e9))
    if job.params:
        msg.params.update(job.params)
    if job.result:
        msg.result.update(job.result)
    return msg


def handle_errors(method: Callable) -> Callable:
    """Map domain errors of a servicer method to gRPC status codes with their message."""

    def _abort(context: grpc.ServicerContext, e: Exception):
        if isinstance(e, NotFoundError | FileNotFoundError | LookupError):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(e, FailedPreconditionError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif isinstance(e, PermissionDeniedError):
            code = grpc.StatusCode.PERMISSION_DENIED
        elif isinstance(e, InvalidArgumentError | ValueError | TypeError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            log.exception("unexpected error in %s", method.__name__)
            code = grpc.StatusCode.INTERNAL
        message = str(e).strip('"') if isinstance(e, KeyError) else str(e)
        context.abort(code, message or type(e).__name__)

    if _is_generator(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                if isinstance(e, grpc.RpcError) or _already_aborted(e):
                    raise
                _abort(context, e)
        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            if isinstance(e, grpc.RpcError) or _already_aborted(e):
                raise
            _abort(context, e)

    return wrapper


def _is_generator(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


def _already_aborted(e: Exception) -> bool:
    # context.abort() raises a bare Exception subclass that must propagate untouched.
    return type(e).__name__ == "_Aborted" or (type(e) is Exception and not e.args)


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    MAX_PAGE = 1000

    def __init__(self, runner: jobstore.JobRunner):
        self.runner = runner

    @handle_errors
    def GetJob(self, request, context):
        if not request.id:
            raise InvalidArgumentError("job id is required")
        return job_to_pb(self.runner.get(request.id))

    @handle_errors
    def ListJobs(self, request, context):
        if request.page_size < 0:
            raise InvalidArgumentError(f"page_size must not be negative (got {request.page_size})")
        if request.page_size > self.MAX_PAGE:
            raise InvalidArgumentError(f"page_size must be at most {self.MAX_PAGE}")
        states = []
        for s in request.states:
            if s not in _PB_TO_STATE:
                raise InvalidArgumentError(f"unknown job state {s}")
            states.append(_PB_TO_STATE[s])
        cursor = None
        if request.page_token:
            try:
                cursor = int(request.page_token)
            except ValueError as e:
                raise InvalidArgumentError(f"invalid page_token {request.page_token!r}") from e
        page, next_seq = self.runner.store.list(tuple(states), request.kind, request.page_size or 50, cursor)
        live = [self.runner.get(j.id) if not j.ended else j for j in page]
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in live],
                                         next_page_token="" if next_seq is None else str(next_seq))

    @handle_errors
    def WatchJob(self, request, context):
        if not request.id:
            raise InvalidArgumentError("job id is required")
        self.runner.get(request.id)  # NOT_FOUND before the stream starts
        for job in self.runner.watch(request.id, alive=context.is_active):
            yield job_to_pb(job)

    @handle_errors
    def CancelJob(self, request, context):
        if not request.id:
            raise InvalidArgumentError("job id is required")
        return job_to_pb(self.runner.cancel(request.id))


class Service:
    """One stemlab gRPC service process: config, data root, jobs, servers, graceful stop."""

    def __init__(self, name: str, config: Config | None = None):
        self.name = name
        self.config = config or load_config()
        setup_logging(self.config.log_level, name)
        self.settings = self.config.service(name)
        self.data = DataRoot(self.config.data_root).ensure()
        self.store = jobstore.open_store(name, self.data.jobs / f"{name}.sqlite")
        self.runner = jobstore.JobRunner(self.store, name, workers=self.settings.workers, data=self.data)
        self._servicers: list[tuple[Callable, Any, str]] = []
        self._stopped = threading.Event()
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)

    def register_job(self, kind: str, fn: jobstore.JobFunction, lane: str = "") -> None:
        """Run jobs of `kind` with `fn`: in the service's worker pool, or in a one-worker `lane` of their own."""
        self.runner.register(kind, fn, lane)

    def submit(self, kind: str, params: dict | None = None) -> jobs_pb2.Job:
        return job_to_pb(self.runner.submit(kind, params))

    def add_servicer(self, add_fn: Callable, servicer: Any, full_name: str) -> None:
        self._servicers.append((add_fn, servicer, full_name))

    def start(self, port: int | None = None) -> int:
        options = [
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            # gRPC shares a port between processes by default: a second copy of a service would
            # start "fine" and take half of the calls, and a job's watcher could land on the copy
            # that does not run it. One process per port, or a clear "cannot listen".
            ("grpc.so_reuseport", 0),
        ]
        # Streams (WatchJob) hold a thread each; leave room for many watchers.
        token = auth.ensure_token(self.data.root)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options,
                                  interceptors=[auth.TokenInterceptor(token)])
        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(self.runner), self.server)
        names = ["stemlab.v1.Jobs"]
        for add_fn, servicer, full_name in self._servicers:
            add_fn(servicer, self.server)
            names.append(full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        port = self.settings.port if port is None else port
        try:
            bound = auth.add_port(self.server, f"{self.config.bind_host}:{port}",
                                  self.config.tls_cert_file, self.config.tls_key_file)
        except RuntimeError:  # newer grpcio raises where older returned 0
            bound = 0
        if bound == 0:
            raise RuntimeError(f"{self.name}: cannot listen on port {port} (in use by another process?)")
        self.server.start()
        self.runner.start()
        for n in ["", *names]:
            self.health.set(n, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening on %s:%d, data root %s", self.name, self.config.bind_host, bound, self.data.root)
        return bound

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        log.info("%s stopping: health NOT_SERVING, finishing jobs (grace %.0fs)", self.name,
                 self.config.grace_seconds)
        self.health.enter_graceful_shutdown()
        self.runner.shutdown(self.config.grace_seconds)
        if self.server is not None:
            self.server.stop(grace=min(2.0, self.config.grace_seconds)).wait()
        self.store.close()
        self._stopped.set()

    def serve(self) -> None:
        """Start and block until SIGTERM or SIGINT, then stop gracefully and return."""
        stop_requested = threading.Event()

        def _on_signal(signum, frame):
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        while not stop_requested.wait(timeout=1.0):
            pass
        self.stop()
        log.info("%s stopped", self.name)


def run_service(build: Callable[[], Service]) -> None:
    """Entry point helper: build the service, serve, exit 0 (or 1 with a message on failure)."""
    try:
        svc = build()
        svc.serve()
    except ConfigError as e:  # the operator's setting: one line, as the README promises
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        logging.getLogger("stemlab").exception("service failed to start: %s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

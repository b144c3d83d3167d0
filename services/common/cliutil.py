"""Helpers for the `stemlab` command line: addresses, stubs, following jobs, output, errors.

Client modules (services/<svc>/cli.py) use only this, grpc and the generated contracts, so the
command line starts fast and never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from services.common.config import DEFAULT_PORTS, ConfigError, load_config

JOB_STATE_NAMES = {0: "UNSPECIFIED", 1: "QUEUED", 2: "RUNNING", 3: "SUCCEEDED", 4: "FAILED", 5: "CANCELLED"}
TERMINAL_STATES = {3, 4, 5}


class CliError(Exception):
    """A failure reported as one line and exit code 2."""


def key_value(text: str) -> tuple[str, str]:
    """argparse type for --set: "hourglass_filters=128" -> ("hourglass_filters", "128").

    The value stays text; the service reads it as YAML (services.common.server.parse_overrides).
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like hourglass_filters=128, got {text!r}")
    return key.strip(), value.strip()


def default_address(service: str) -> str:
    """$STEMLAB_<SERVICE>_ADDRESS, else the port the configuration gives the service (STEMLAB_CONFIG's
    file, $STEMLAB_<SERVICE>_PORT), as `make up` started it: a second stack on other ports (another
    data root) is reached by exporting the same variables, never the first stack by mistake."""
    try:
        return load_config().address(service)
    except ConfigError as e:  # not the default ports instead: they may be another stack's
        raise CliError(f"invalid configuration: {e}") from e


def add_common_args(parser: argparse.ArgumentParser, service: str | None = None) -> None:
    if service is not None:
        parser.add_argument("--address", default=None,
                            help=f"{service} service host:port (default: $STEMLAB_{service.upper()}_ADDRESS, "
                                 f"else localhost and $STEMLAB_{service.upper()}_PORT or {DEFAULT_PORTS[service]})")
        parser.set_defaults(service=service)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def address(args: argparse.Namespace, service: str) -> str:
    return getattr(args, "address", None) or default_address(service)


def channel(addr: str) -> grpc.Channel:
    """A channel that sends the stack's token (and speaks TLS where configured)."""
    from services.common.auth import TokenError, stack_channel

    mb = int(os.environ.get("STEMLAB_MAX_MESSAGE_MB", "64"))
    try:
        return stack_channel(addr, options=[("grpc.max_receive_message_length", mb << 20),
                                            ("grpc.max_send_message_length", mb << 20)])
    except (TokenError, ConfigError) as e:
        raise CliError(str(e)) from e


def stub(args: argparse.Namespace, service: str, stub_class: type) -> Any:
    return stub_class(channel(address(args, service)))


def rpc_error_message(e: grpc.RpcError, addr: str | None = None) -> str:
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {addr}" if addr else ""
        return f"service unreachable{where}: is it running? (make up)"
    detail = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name.lower() if code else 'error'}: {detail}"


def exit_on_terminate() -> None:
    """SIGTERM (kill, timeout, systemd) ends a command as Ctrl-C does: the stack unwinds, so the
    files being written are discarded instead of left half-written (exit status 143)."""
    def terminate(signum, frame):
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminate)


def message_to_dict(msg: Any) -> dict:
    # A job's params and result travel as google.protobuf.Struct, which holds every number as a
    # double: whole ones are printed as integers, so an export's version reads 2, not 2.0.
    try:
        data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    except json_format.SerializeToJsonError:
        # A Struct holding NaN or infinity (a diverged run's metrics) cannot be JSON: such numbers
        # are written as the strings "nan" / "inf", instead of every listing failing.
        copy = type(msg)()
        copy.CopyFrom(msg)
        _finite_values(copy)
        data = json_format.MessageToDict(copy, preserving_proto_field_name=True)
    return _whole_numbers(data)


def _finite_values(msg: Any) -> None:
    """Replace every non-finite number of the google.protobuf.Value fields in `msg` by its text."""
    if msg.DESCRIPTOR.full_name == "google.protobuf.Value":
        if msg.WhichOneof("kind") == "number_value" and not math.isfinite(msg.number_value):
            msg.string_value = str(msg.number_value)
            return
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = value.values()
        elif _repeated(field):
            items = value
        else:
            items = [value]
        for item in items:
            if hasattr(item, "DESCRIPTOR"):
                _finite_values(item)


def _repeated(field: Any) -> bool:
    # protobuf 6 has is_repeated; 5 only the label (3 = LABEL_REPEATED)
    return bool(getattr(field, "is_repeated", False)) or getattr(field, "label", None) == 3


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def print_result(args: argparse.Namespace, obj: Any, text: str | None = None) -> None:
    data = message_to_dict(obj) if hasattr(obj, "DESCRIPTOR") else obj
    if getattr(args, "json", False):
        print(json.dumps(data, indent=None, sort_keys=True))
    elif text is not None:
        print(text)
    else:
        print(json.dumps(data, indent=2, sort_keys=True))


def job_line(job: Any) -> str:
    state = JOB_STATE_NAMES.get(job.state, str(job.state))
    p = job.progress
    parts = [job.id, job.kind, state, f"{100 * p.fraction:5.1f}%"]
    if p.total:
        parts.append(f"{p.done:g}/{p.total:g}")
    if p.message:
        parts.append(p.message)
    if job.error:
        parts.append(f"error: {job.error}")
    return "  ".join(parts)


def _bar(job: Any, width: int) -> str:
    p = job.progress
    eta = f" eta {int(p.eta_seconds)}s" if p.eta_seconds >= 0 and job.state == 2 else ""
    text = f" {100 * p.fraction:5.1f}%{eta} {p.message}"
    bar_width = max(10, min(40, width - len(text) - 4))
    filled = int(round(p.fraction * bar_width))
    line = f"[{'#' * filled}{'.' * (bar_width - filled)}]{text}"
    return line[: width - 1]


def follow_job(jobs_stub: Any, job_id: str, json_output: bool = False, out=None) -> Any:
    """Stream a job's progress until it ends; a bar on a terminal, plain lines otherwise."""
    from stemlab.v1 import jobs_pb2

    out = out or sys.stderr
    tty = out.isatty() and not json_output
    width = shutil.get_terminal_size((80, 20)).columns
    last, last_line = None, ""
    for job in jobs_stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id)):
        last = job
        if tty:
            out.write("\r" + _bar(job, width).ljust(width - 1))
            out.flush()
        elif not json_output:
            line = job_line(job)
            if line != last_line:
                print(line, file=out, flush=True)
                last_line = line
    if tty:
        out.write("\n")
    return last


def start_and_follow(args: argparse.Namespace, service: str, job: Any, wait: bool = True,
                     summary: Callable[[str, dict], str] | None = None) -> int:
    """After a Start… call: follow the job (unless --no-wait), print it, return the exit code.

    `summary(job_id, result)`: the text a succeeded job prints instead of its result as JSON
    (--json still prints the whole job)."""
    from stemlab.v1 import jobs_pb2_grpc

    if not wait or getattr(args, "no_wait", False):
        print_result(args, job, text=job.id)
        return 0
    jobs = jobs_pb2_grpc.JobsStub(channel(address(args, service)))
    try:
        final = follow_job(jobs, job.id, json_output=getattr(args, "json", False)) or job
    except KeyboardInterrupt:
        # Ctrl-C stops the watching, not the job, which runs in the service: say so.
        print(f"\nstopped watching; the job {job.id} goes on (`stemlab jobs watch {job.id}` to follow it, "
              f"`stemlab jobs cancel {job.id}` to stop it)", file=sys.stderr)
        raise
    if final.state not in TERMINAL_STATES:  # stream ended early (service went away)
        raise CliError(f"lost the job {job.id} before it ended; see `stemlab jobs get {job.id}`")
    text = _final_text(final)
    if summary is not None and final.state == 3:
        text = summary(final.id, message_to_dict(final).get("result", {}))
    print_result(args, final, text=text)
    return 0 if final.state == 3 else 1


def _final_text(job: Any) -> str:
    state = JOB_STATE_NAMES.get(job.state, str(job.state))
    if job.state == 3:
        result = message_to_dict(job).get("result", {})
        return f"{job.id} {state}\n" + json.dumps(result, indent=2, sort_keys=True)
    return f"{job.id} {state}" + (f": {job.error}" if job.error else "")


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# Services whose jobs `stemlab jobs` can reach (job ids start with these names).
GRPC_ROUTES = ("ingestion", "processing", "training", "evaluation")


def get_group(subparsers, groups: dict, name: str, help_text: str):
    """A shared command group (e.g. `dataset`, used by ingestion and processing)."""
    if name not in groups:
        parser = subparsers.add_parser(name, help=help_text)
        groups[name] = parser.add_subparsers(dest=f"{name}_command", required=True)
    return groups[name]

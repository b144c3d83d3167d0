"""The `stemlab` command line: every subcommand is a gRPC (or REST) client of a service.

Subcommands come from the client modules of each room (services/<room>/cli.py, each with a
`register(subparsers)`), which import only grpc and the generated contracts, so the command
line starts quickly. Exit codes: 0 success, 1 a job ended without success, 2 an error
(reported as one line).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import grpc

from services.common.cliutil import (
    GRPC_ROUTES,
    CliError,
    add_common_args,
    channel,
    exit_on_terminate,
    follow_job,
    job_line,
    message_to_dict,
    print_result,
    rpc_error_message,
)

# Client modules that add subcommands, in help order. A room whose module is missing (not yet
# built) simply has no commands.
CLIENT_MODULES = (
    "services.ingestion.cli",
    "services.processing.cli",
    "services.training.cli",
    "services.evaluation.cli",
    "services.serving.cli",
)


def _job_address(args: argparse.Namespace, job_id: str | None) -> tuple[str, str]:
    from services.common.cliutil import address

    service = args.service
    if service is None and job_id:
        prefix = job_id.split("-", 1)[0]
        if prefix in GRPC_ROUTES:
            service = prefix
    if service is None:
        raise CliError("say which service with --service (or give a job id like ingestion-…)")
    return service, address(args, service)


def _jobs_stub(args: argparse.Namespace, job_id: str | None = None):
    from stemlab.v1 import jobs_pb2_grpc

    service, addr = _job_address(args, job_id)
    args._addr = addr
    return jobs_pb2_grpc.JobsStub(channel(addr))


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from stemlab.v1 import jobs_pb2

    services = [args.service] if args.service else list(GRPC_ROUTES)
    rows, failures = [], []
    for service in services:
        args_one = argparse.Namespace(**{**vars(args), "service": service})
        try:
            stub = _jobs_stub(args_one)
            req = jobs_pb2.ListJobsRequest(kind=args.kind or "", page_size=args.limit,
                                           states=[jobs_pb2.JobState.Value(s.upper()) for s in args.state])
            rows.extend(stub.ListJobs(req, timeout=10).jobs)
        except grpc.RpcError as e:
            if args.service:
                raise
            failures.append(f"{service}: {rpc_error_message(e)}")
        except ValueError as e:
            raise CliError(f"unknown state: {e}") from e
    # Each service gave its newest `limit`; the newest `limit` of them all is what was asked for.
    rows = sorted(rows, key=lambda j: j.created.ToNanoseconds(), reverse=True)[:args.limit]
    if args.json:
        print(json.dumps({"jobs": [message_to_dict(j) for j in rows], "unreachable": failures}))
    else:
        for j in rows:
            print(job_line(j))
        for f in failures:
            print(f"(skipped {f})", file=sys.stderr)
    if failures and not rows and len(failures) == len(services):
        raise CliError("no service reachable: is the stack running? (make up)")
    return 0


def cmd_jobs_get(args: argparse.Namespace) -> int:
    from stemlab.v1 import jobs_pb2

    job = _jobs_stub(args, args.job).GetJob(jobs_pb2.GetJobRequest(id=args.job), timeout=10)
    print_result(args, job, text=job_line(job))
    return 0


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    final = follow_job(_jobs_stub(args, args.job), args.job, json_output=args.json)
    print_result(args, final, text=job_line(final))
    return 0 if final.state == 3 else 1


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from stemlab.v1 import jobs_pb2

    job = _jobs_stub(args, args.job).CancelJob(jobs_pb2.CancelJobRequest(id=args.job), timeout=10)
    print_result(args, job, text=job_line(job))
    return 0


def _register_jobs(subparsers) -> None:
    jobs = subparsers.add_parser("jobs", help="list, inspect, watch and cancel jobs of any service")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)

    def common(p):
        p.add_argument("--service", choices=list(GRPC_ROUTES), default=None,
                       help="which service (default: from the job id, or all for list)")
        p.add_argument("--address", default=None, help="service host:port")
        add_common_args(p)

    p = sub.add_parser("list", help="jobs, newest first")
    common(p)
    p.add_argument("--state", action="append", default=[], help="only jobs in this state (repeatable)")
    p.add_argument("--kind", default="", help="only jobs of this kind")
    p.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default 50)")
    p.set_defaults(func=cmd_jobs_list)
    for name, func, helptext in (("get", cmd_jobs_get, "one job"),
                                 ("watch", cmd_jobs_watch, "follow a job until it ends"),
                                 ("cancel", cmd_jobs_cancel, "ask a job to stop")):
        p = sub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("job", help="job id")
        p.set_defaults(func=func)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stemlab")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemlab", description="stemlab: extract guitar or piano from a mix")
    parser.add_argument("--version", action="version", version=f"stemlab {_installed_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for module_name in CLIENT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue
            raise
        module.register(subparsers, groups)
    _register_jobs(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    exit_on_terminate()
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"stemlab: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"stemlab: {rpc_error_message(e, getattr(args, '_addr', None) or getattr(args, 'address', None))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stemlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `stemlab jobs list | head`: the reader has what it wanted. Python would report the pipe
        # again when it flushes stdout at exit, so stdout goes nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

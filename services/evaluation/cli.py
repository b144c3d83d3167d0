"""`stemlab evaluate`: the command-line client of the evaluation service (kept light: grpc and protos only)."""

from __future__ import annotations

import argparse
import os
import re

from services.common.cliutil import (
    TERMINAL_STATES,
    CliError,
    add_common_args,
    address,
    channel,
    follow_job,
    job_line,
    key_value,
    print_result,
    start_and_follow,
    stub,
)

SERVICE = "evaluation"
BASELINES = ("mixture", "oracle", "hpss")


def register(subparsers, groups=None) -> None:
    p = subparsers.add_parser(
        "evaluate", help="measure SDR/SIR/SAR of a model and baselines on a dataset, or compare two reports",
        description="Evaluate a model (served, a training run, a SavedModel folder or a folder of estimates) "
                    "on a dataset split with mir_eval bss_eval, next to the mixture and oracle baselines; "
                    "or compare two reports with --compare A B.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="served model NAME[:VERSION], e.g. guitar or guitar:3")
    source.add_argument("--run", help="training run name (DATA/runs/RUN)")
    source.add_argument("--estimates", metavar="DIR", help="folder of TRACK/instrument.wav[, rest.wav]")
    source.add_argument("--saved-model", metavar="DIR", help="exported SavedModel folder")
    source.add_argument("--baselines-only", action="store_true", help="no model: score the baselines only")
    source.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two reports (ids under DATA/evaluations, or report folders / report.json files)")
    p.add_argument("--dataset", metavar="NAME[:VERSION]", help="dataset to evaluate on")
    p.add_argument("--split", choices=("validation", "train", "all"), default="validation",
                   help="which pairs of the dataset (default validation; 'all' for a held-out test-set dataset)")
    p.add_argument("--framewise", action="store_true", help="also museval-style 1-second-window medians")
    p.add_argument("--window-seconds", type=float, default=0.0, help="framewise window (default 1 s)")
    p.add_argument("--baselines", default="mixture,oracle",
                   help=f"comma-separated, from {','.join(BASELINES)} (default mixture,oracle)")
    p.add_argument("--max-tracks", type=int, default=0, help="evaluate N tracks spread evenly over the split, sorted by name (0: all)")
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="with --run or --saved-model: apply the network differently, e.g. mask_exponent=0.7 "
                        "(mask_exponent, chunk_overlap, inference_batch; repeatable)")
    p.add_argument("--serving-address", default="", help="where the served model is (default: configured)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_evaluate)


def _dataset_ref(text: str) -> tuple[str, int]:
    match = re.fullmatch(r"([^:]+)(?::(\d+))?", text or "")
    if not match:
        raise CliError(f"invalid dataset {text!r}: use NAME or NAME:VERSION")
    return match.group(1), int(match.group(2) or 0)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stemlab.v1 import evaluation_pb2, evaluation_pb2_grpc

    service = stub(args, SERVICE, evaluation_pb2_grpc.EvaluationServiceStub)
    if args.compare:
        return _compare(args, service)
    if not args.dataset:
        raise CliError("--dataset NAME[:VERSION] is required (or use --compare A B)")
    name, version = _dataset_ref(args.dataset)
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise CliError(f"unknown baselines {unknown}; choose from {','.join(BASELINES)}")
    request = evaluation_pb2.StartEvaluationRequest(
        dataset=name, dataset_version=version, split=args.split, framewise=args.framewise, baselines=baselines,
        max_tracks=args.max_tracks, serving_address=args.serving_address, window_seconds=args.window_seconds,
        overrides=dict(args.set))
    if args.model:
        request.model = args.model
    elif args.run:
        request.run = args.run
    elif args.estimates:
        request.estimates_dir = os.path.abspath(args.estimates)
    elif args.saved_model:
        request.saved_model_dir = os.path.abspath(args.saved_model)
    elif args.baselines_only:
        request.baselines_only = True
    else:
        raise CliError("say what to evaluate: --model, --run, --estimates, --saved-model or --baselines-only")
    job = service.StartEvaluation(request)
    if args.json or args.no_wait:
        return start_and_follow(args, SERVICE, job)
    return _follow_and_summarise(args, service, job)


def _follow_and_summarise(args, service, job) -> int:
    """Progress lines while it runs, then the medians table and where the report is."""
    from stemlab.v1 import evaluation_pb2, jobs_pb2_grpc

    jobs = jobs_pb2_grpc.JobsStub(channel(address(args, SERVICE)))
    final = follow_job(jobs, job.id) or job
    if final.state not in TERMINAL_STATES:
        raise CliError(f"lost the job {job.id} before it ended; see `stemlab jobs get {job.id}`")
    if final.state != 3:
        print(job_line(final))
        return 1
    report_id = final.result.fields["report_id"].string_value
    got = service.GetReport(evaluation_pb2.GetReportRequest(id=report_id))
    # report.md up to its second section: title, counts and the whole-track medians.
    shown, sections = [], 0
    for line in got.markdown.splitlines():
        sections += line.startswith("## ")
        if sections == 2:
            break
        shown.append(line)
    print("\n".join(shown).rstrip())
    print(f"\nreport: {got.path}/report.md (and report.html, report.json)")
    return 0


def _report_ref(text: str):
    from stemlab.v1 import evaluation_pb2

    if os.path.isdir(text):
        text = os.path.join(text, "report.json")
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return evaluation_pb2.ReportRef(report_json=f.read())
    return evaluation_pb2.ReportRef(id=text)


def _compare(args, service) -> int:
    from stemlab.v1 import evaluation_pb2

    a, b = (_report_ref(x) for x in args.compare)
    reply = service.CompareReports(evaluation_pb2.CompareReportsRequest(a=a, b=b))
    print_result(args, reply, text=reply.markdown.rstrip("\n"))
    return 0

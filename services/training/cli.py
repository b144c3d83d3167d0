"""`stemlab train`, `stemlab resume`, `stemlab runs` and `stemlab export`: clients of TrainingService.

Light at import time (argparse, grpc, the generated contracts): the command line must start fast.
"""

from __future__ import annotations

from services.common.cliutil import CliError, add_common_args, key_value, print_result, start_and_follow, stub

SERVICE = "training"
PRESETS = ("tiny", "cpu", "thesis")


def _stub(args):
    from stemlab.v1 import training_pb2_grpc

    return stub(args, SERVICE, training_pb2_grpc.TrainingServiceStub)


def cmd_train(args) -> int:
    from stemlab.v1 import training_pb2

    req = training_pb2.StartTrainingRequest(
        dataset=args.dataset, dataset_version=args.dataset_version or 0, preset=args.preset or "",
        overrides=dict(args.set), epochs=args.epochs or 0, patience=args.patience or 0, seed=args.seed,
        batch_size=args.batch_size or 0, steps_per_epoch=args.steps_per_epoch or 0, run_id=args.run_id or "",
        init_from=args.init_from or "", init_from_model=args.init_from_model or "")
    return start_and_follow(args, SERVICE, _stub(args).StartTraining(req, timeout=30))


def cmd_resume(args) -> int:
    from stemlab.v1 import training_pb2

    req = training_pb2.ResumeTrainingRequest(run_id=args.run, epochs=args.epochs or 0, patience=args.patience or 0,
                                             overrides=dict(args.set))
    return start_and_follow(args, SERVICE, _stub(args).ResumeTraining(req, timeout=30))


def cmd_runs(args) -> int:
    from stemlab.v1 import training_pb2

    if args.run:
        run = _stub(args).GetRun(training_pb2.GetRunRequest(run_id=args.run), timeout=30)
        s = run.summary
        lines = [f"{s.run_id}  {s.state}  preset {s.preset}  dataset {s.dataset} v{s.dataset_version}  "
                 f"epochs {s.epochs_completed}/{s.epochs}  best epoch {s.best_epoch}"]
        lines += [f"  epoch {h.epoch:3d}  loss {h.loss:.5f}  val_loss {h.val_loss:.5f}  {h.seconds:.1f}s"
                  + (f"  lr {h.learning_rate:.3g}" if h.learning_rate else "") for h in run.history]
        print_result(args, run, text="\n".join(lines))
        return 0
    runs = _stub(args).ListRuns(training_pb2.ListRunsRequest(), timeout=30)
    text = "\n".join(
        f"{r.run_id}  {r.state}  {r.preset}  {r.dataset} v{r.dataset_version}  epochs {r.epochs_completed}/{r.epochs}"
        + (f"  best val_loss {r.best_val_loss:.5f} (epoch {r.best_epoch})" if r.best_epoch else "")
        for r in runs.runs) or "no runs"
    print_result(args, runs, text=text)
    return 0


def cmd_export(args) -> int:
    from stemlab.v1 import training_pb2

    if not args.model:
        raise CliError("give the served model's name with --model (e.g. guitar)")
    if not args.run and not args.with_models:
        raise CliError("name a run to export, or an exported model with --with-model to export again")
    req = training_pb2.ExportModelRequest(run_id=args.run or "", model_name=args.model, overrides=dict(args.set),
                                          with_runs=args.with_runs, with_models=args.with_models,
                                          without_model=args.without_model or "")
    return start_and_follow(args, SERVICE, _stub(args).ExportModel(req, timeout=30))


def register(subparsers, groups: dict | None = None) -> None:
    p = subparsers.add_parser("train", help="train the separation network on a dataset")
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--dataset-version", type=int, default=None, help="version (default: latest)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="network size (default: thesis, or the preset of --init-from / --init-from-model)")
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="override a model or training setting, e.g. hourglass_filters=128 (repeatable)")
    p.add_argument("--epochs", type=int, default=None, help="(default 36)")
    p.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="chunks per step (default 4)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="(default 1000)")
    p.add_argument("--run-id", default=None, help="name of the run folder (default: dataset-preset-time)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", default=None, metavar="RUN",
                       help="start from this run's best weights (same network and spectrogram), e.g. to "
                            "fine-tune on a dataset with more songs; default: random weights")
    start.add_argument("--init-from-model", default=None, metavar="NAME[:VERSION][#MEMBER]",
                       help="start from an exported model's weights (newest version unless named; an ensemble's "
                            "first network unless #MEMBER names another), e.g. --init-from-model guitar to "
                            "fine-tune the shipped guitar model on your songs")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("resume", help="continue a training run from its last checkpoint")
    p.add_argument("run", help="run id")
    p.add_argument("--epochs", type=int, default=None, help="train up to this many epochs (default: as recorded)")
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="from now on: learning_rate, lr_plateau_patience, lr_plateau_factor, "
                        "min_learning_rate, loss_peak_power, loss_error_power, loss_phase_sensitive, "
                        "augment_gain_db, remix_probability, augment_eq_db or "
                        "augment_pitch_semitones (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_resume)

    p = subparsers.add_parser("runs", help="list training runs, or show one with its history")
    p.add_argument("run", nargs="?", default=None)
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_runs)

    p = subparsers.add_parser("export", help="publish a run's best weights as a served model version")
    p.add_argument("run", nargs="?", default=None,
                   help="run id; leave it out to export --with-model networks alone again, applied as that "
                        "model applies them (e.g. an export of older code, in the current, faster form)")
    p.add_argument("--model", required=True, help="served model name, e.g. guitar")
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="how the network is applied: mask_exponent, chunk_overlap or inference_batch (repeatable)")
    p.add_argument("--with", dest="with_runs", action="append", default=[], metavar="RUN",
                   help="another run whose network's mask is averaged with RUN's: an ensemble (repeatable)")
    p.add_argument("--with-model", dest="with_models", action="append", default=[], metavar="NAME[:VERSION][#MEMBER]",
                   help="an exported model's networks (or its #MEMBER-th, from 1) join the ensemble after the runs' "
                        "(repeatable)")
    p.add_argument("--without-model", default=None, metavar="NAME[:VERSION]",
                   help="another instrument's exported model (e.g. piano): where its mask is the larger, this "
                        "model leaves what it claims alone; its networks go into the export too (default: "
                        "what the --with-model models leave out, if they do)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_export)

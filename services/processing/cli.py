"""`stemlab mix`, `stemlab silence stats|adjust` and `stemlab dataset build`: clients of ProcessingService.

Light at import time (argparse, grpc, the generated contracts): the command line must start fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.common.cliutil import CliError, add_common_args, get_group, start_and_follow, stub

SERVICE = "processing"
# A mix's text output names this many failed and left-out tracks; --json has all of them.
SHOWN_TRACKS = 20
INSTRUMENTS = ("guitar", "piano", "bass", "drums", "percussion", "vocals", "other")


def _stub(args):
    from stemlab.v1 import processing_pb2_grpc

    return stub(args, SERVICE, processing_pb2_grpc.ProcessingServiceStub)


def _ratio_pair(text: str) -> tuple[float, float]:
    """"0.7:0.5" -> (0.7, 0.5)."""
    try:
        target, cutoff = (float(x) for x in text.split(":"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected TARGET:CUTOFF like 0.7:0.5, got {text!r}") from e
    return target, cutoff


def _source_ratio(text: str) -> tuple[str, float]:
    """"synthetic:3" -> ("synthetic", 3.0); a bare name weighs 1."""
    name, _, ratio = text.partition(":")
    try:
        value = float(ratio) if ratio else 1.0
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected SOURCE:RATIO like synthetic:3, got {text!r}") from e
    if not name or value <= 0:
        raise argparse.ArgumentTypeError(f"expected SOURCE:RATIO with a positive ratio, got {text!r}")
    return name, value


def _mix_set_args(p: argparse.ArgumentParser, rate_help: str = "sample rate of the mix set") -> None:
    p.add_argument("--instrument", required=True, choices=INSTRUMENTS)
    p.add_argument("--also", action="append", default=[], metavar="CLASS",
                   help="a class mixed into the instrument file too (repeatable)")
    p.add_argument("--rate", type=int, default=22050, help=rate_help)
    p.add_argument("--stereo", action="store_true", help="the stereo set (default: mono)")


def _mix_set(args):
    from stemlab.v1 import processing_pb2

    return processing_pb2.MixSetRef(instrument=args.instrument, also=args.also, rate_hz=args.rate, stereo=args.stereo)


def _silence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold-dbfs", type=float, default=None, help="silence is below this level (default -50)")
    p.add_argument("--min-silence-seconds", type=float, default=None,
                   help="silence lasts longer than this (default 1.0)")
    p.add_argument("--hop-seconds", type=float, default=None, help="level frame length (default 0.01)")
    p.add_argument("--level", choices=("rms", "peak"), default="", help="frame level measure (default rms)")


def _silence(args):
    from stemlab.v1 import processing_pb2

    msg = processing_pb2.SilenceParams(level=args.level)
    for name in ("threshold_dbfs", "min_silence_seconds", "hop_seconds"):
        if getattr(args, name) is not None:
            setattr(msg, name, getattr(args, name))
    return msg


# -- handlers -----------------------------------------------------------------------------------

def cmd_mix(args) -> int:
    from stemlab.v1 import processing_pb2

    rates = args.rate or [22050]
    job = _stub(args).StartMix(processing_pb2.MixRequest(
        instrument=args.instrument, also=args.also, rates_hz=rates, stereo=args.stereo,
        include_unchecked=args.include_unchecked, ignore_marks=args.ignore_marks, tracks=args.track,
        force=args.force), timeout=30)
    return start_and_follow(args, SERVICE, job, summary=_mix_text)


def _mix_text(job_id: str, result: dict) -> str:
    """What a mix did, in a few lines however large the library: counts, then the tracks that
    failed or were left out, with why."""
    counts = result.get("counts", {})
    done = ", ".join(f"{int(n)} {status}" for status, n in sorted(counts.items())) or "nothing to mix"
    lines = [f"{job_id} SUCCEEDED: {done}; {result.get('seconds_mixed', 0):g} s of audio mixed into "
             + ", ".join(result.get("mix_sets", []))
             + (" (stopped before the end)" if result.get("stopped") else "")]
    failed = [r for r in result.get("tracks", []) if r.get("status") == "failed"]
    lines += _track_rows("failed", failed, "error") + _track_rows("left out", result.get("left_out", []), "reason")
    return "\n".join(lines)


def _track_rows(title: str, rows: list[dict], why: str) -> list[str]:
    """"title (n):" and a line per track with its `why`, the first SHOWN_TRACKS of them."""
    if not rows:
        return []
    lines = [f"{title} ({len(rows)}):"] + [f"  {r['track']}: {r.get(why, '')}" for r in rows[:SHOWN_TRACKS]]
    if len(rows) > SHOWN_TRACKS:
        lines.append(f"  ... and {len(rows) - SHOWN_TRACKS} more (all of them with --json)")
    return lines


def cmd_silence_stats(args) -> int:
    from stemlab.v1 import processing_pb2

    target, cutoff = args.adjusted or (0.0, 0.0)
    job = _stub(args).StartSilenceStats(processing_pb2.SilenceStatsRequest(
        mix_set=_mix_set(args), silence=_silence(args), adjusted_target=target, adjusted_cutoff=cutoff), timeout=30)
    return start_and_follow(args, SERVICE, job)


def cmd_silence_adjust(args) -> int:
    from stemlab.v1 import processing_pb2

    req = processing_pb2.SilenceAdjustRequest(mix_set=_mix_set(args), silence=_silence(args),
                                              crossfade_shape=args.crossfade_shape, force=args.force)
    for name in ("target", "cutoff", "margin_seconds", "crossfade_seconds"):
        if getattr(args, name) is not None:
            setattr(req, name, getattr(args, name))
    return start_and_follow(args, SERVICE, _stub(args).StartSilenceAdjust(req, timeout=30))


def _read_track_list(path: str, what: str) -> list[str]:
    """Track ids, one per line; blank lines and '#' comments are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def cmd_dataset_build(args) -> int:
    from stemlab.v1 import processing_pb2

    sources = [processing_pb2.SourceRatio(source=s, ratio=r) for s, r in args.sources]
    target, cutoff = args.silence_adjusted or (0.0, 0.0)
    req = processing_pb2.DatasetBuildRequest(
        name=args.name, mix_set=_mix_set(args), sources=sources, max_tracks=args.max_tracks or 0,
        silence_target=target, silence_cutoff=cutoff, include_unchecked=args.include_unchecked,
        ignore_marks=args.ignore_marks)
    if args.validation_ratio is not None:
        req.validation_ratio = args.validation_ratio
    if args.validation_list:
        req.validation_tracks.extend(_read_track_list(args.validation_list, "validation list"))
        req.use_validation_tracks = True
    if args.tracks:
        only = _read_track_list(args.tracks, "track list")
        if not only:
            raise CliError(f"the track list {args.tracks} names no track")
        req.tracks.extend(only)
    return start_and_follow(args, SERVICE, _stub(args).StartDatasetBuild(req, timeout=30), summary=_build_text)


def _build_text(job_id: str, result: dict) -> str:
    """What a build made, and what would stop a training on it (no validation or no training pairs)."""
    if result.get("stopped"):
        return f"{job_id} SUCCEEDED: stopped before the end; nothing was published"
    version = int(result.get("version", 0))
    made = "a new version" if result.get("created") else "the same pairs as before"
    lines = [f"{job_id} SUCCEEDED: dataset {result.get('name')} version {version} ({made}): "
             f"{int(result.get('pairs', 0))} pairs, {int(result.get('train', 0))} training / "
             f"{int(result.get('validation', 0))} validation, {result.get('seconds', 0):g} s ({result.get('path')})"]
    lines += _track_rows("left out", result.get("left_out") or [], "reason")
    for title, key in (("listed but not mixed", "unknown_tracks"),
                       ("in the validation list but not mixed", "unknown_validation_tracks")):
        names = result.get(key) or []
        if names:
            lines.append(f"{title} ({len(names)}): {', '.join(names[:SHOWN_TRACKS])}"
                         + (" ..." if len(names) > SHOWN_TRACKS else ""))
    if not int(result.get("validation", 0)):
        lines.append("note: no validation pairs, which `stemlab train` needs (early stopping): check more tracks, "
                     "or raise --validation-ratio")
    elif not int(result.get("train", 0)):
        lines.append("note: no training pairs: this dataset can be evaluated, not trained on")
    return "\n".join(lines)


# -- registration -------------------------------------------------------------------------------

def register_dataset_commands(dataset_subparsers) -> None:
    """`stemlab dataset build` (the `dataset` group is shared with ingestion)."""
    p = dataset_subparsers.add_parser("build", help="publish a versioned manifest of instrument/rest pairs")
    p.add_argument("name", help="dataset name (letters, digits, '.', '_', '-')")
    _mix_set_args(p)
    p.add_argument("--from", dest="sources", action="append", type=_source_ratio, default=[],
                   metavar="SOURCE:RATIO", help="take tracks of this source with this weight, e.g. synthetic:3 "
                                                "(repeatable; default: every source)")
    p.add_argument("--max-tracks", type=int, default=None, help="at most this many tracks, shared by the ratios")
    p.add_argument("--silence-adjusted", type=_ratio_pair, default=None, metavar="TARGET:CUTOFF",
                   help="use the silence-adjusted set made by `stemlab silence adjust`")
    p.add_argument("--validation-ratio", type=float, default=None, help="share of tracks for validation (0.2)")
    p.add_argument("--validation-list", default=None, metavar="FILE",
                   help="file of track ids (one a line) that form the validation split")
    p.add_argument("--tracks", default=None, metavar="FILE",
                   help="file of track ids (one a line): only these tracks are candidates")
    p.add_argument("--include-unchecked", action="store_true")
    p.add_argument("--ignore-marks", action="store_true")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_dataset_build)


def register(subparsers, groups: dict | None = None) -> None:
    p = subparsers.add_parser("mix", help="mix usable library tracks into instrument/rest pairs")
    p.add_argument("--instrument", required=True, choices=INSTRUMENTS)
    p.add_argument("--also", action="append", default=[], metavar="CLASS",
                   help="a class mixed into the instrument file too (repeatable)")
    p.add_argument("--rate", action="append", type=int, default=[], help="sample rate (repeatable; default 22050)")
    p.add_argument("--stereo", action="store_true", help="keep two channels (default: mono, mean of channels)")
    p.add_argument("--include-unchecked", action="store_true", help="also tracks never checked for the instrument")
    p.add_argument("--ignore-marks", action="store_true", help="also tracks marked bleed, missing, …")
    p.add_argument("--track", action="append", default=[], help="only this track (repeatable)")
    p.add_argument("--force", action="store_true", help="re-mix even unchanged tracks")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_mix)

    silence = subparsers.add_parser("silence", help="silence statistics and silence-adjusted sets")
    sub = silence.add_subparsers(dest="silence_command", required=True)
    p = sub.add_parser("stats", help="audible share per track and the histogram of silence")
    _mix_set_args(p)
    _silence_args(p)
    p.add_argument("--adjusted", type=_ratio_pair, default=None, metavar="TARGET:CUTOFF",
                   help="measure the silence-adjusted set instead")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_silence_stats)

    p = sub.add_parser("adjust", help="cut silences until the audible share reaches the target")
    _mix_set_args(p)
    _silence_args(p)
    p.add_argument("--target", type=float, default=None, help="audible share to reach (0.7)")
    p.add_argument("--cutoff", type=float, default=None, help="discard tracks still under this share (0.5)")
    p.add_argument("--margin-seconds", type=float, default=None, help="silence kept next to audio (0.1)")
    p.add_argument("--crossfade-seconds", type=float, default=None, help="crossfade at each cut (0.02)")
    p.add_argument("--crossfade-shape", choices=("equal_power", "linear"), default="")
    p.add_argument("--force", action="store_true", help="redo even unchanged tracks")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_silence_adjust)

    if groups is not None:
        register_dataset_commands(get_group(subparsers, groups, "dataset", "track library and datasets"))

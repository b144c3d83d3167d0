"""`stemlab separate SONG --model guitar`: split a song into instrument and rest through serving.

The client library is loaded only when the command runs; it speaks TF Serving's protocol without
TensorFlow, so `separate` itself starts in a fraction of a second and stays small.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import time
from pathlib import Path

from services.common.cliutil import CliError, exit_on_terminate

FORMATS = ("wav", "flac", "mp3")


def register(subparsers, groups=None) -> None:
    """Hook for stemlab/cli.py: adds the `separate` subcommand."""
    add_separate_parser(subparsers)


def add_separate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "separate", help="split a song into instrument and rest with a served model",
        description="Separate SONG (any format ffmpeg reads) into instrument.<format> and rest.<format> "
                    "with a model served by TF Serving or the compatible server. The stems keep the "
                    "song's rate and channels and add up to it.")
    parser.add_argument("song", metavar="SONG", help="audio file to separate")
    parser.add_argument("--model", required=True, help="served model name, e.g. guitar or piano")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the latest)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default: separated/<model>/<song name>); stems of the same names "
                             "there are replaced")
    parser.add_argument("--format", action="append", choices=FORMATS, default=None,
                        help="output format; repeat for several (default wav)")
    parser.add_argument("--address", default=None,
                        help="serving host:port (default: $STEMLAB_SERVING_ADDRESS, else localhost at "
                             "$STEMLAB_SERVING_PORT or 8500; with --rest $STEMLAB_SERVING_REST_ADDRESS, else "
                             "$STEMLAB_SERVING_REST_PORT or 8501)")
    parser.add_argument("--rest", action="store_true", help="use the REST API instead of gRPC")
    parser.add_argument("--segment-seconds", type=float, default=None,
                        help="segment length sent to the model (0.1 to 600; default 10)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="share of a segment overlapping the next (0 to 0.95; default 0.25)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=cmd_separate)
    return parser


class _ProgressPrinter:
    """A bar redrawn in place on a terminal; plain lines (at most one a second) otherwise."""

    def __init__(self, out=None, quiet: bool = False):
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.quiet = quiet
        self.last_line_time = 0.0

    def __call__(self, done: float, total: float, message: str) -> None:
        if self.quiet:
            return
        fraction = done / total if total > 0 else 1.0
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns
            text = f" {100 * fraction:5.1f}% {message}"
            bar_width = max(10, min(40, width - len(text) - 4))
            filled = int(round(fraction * bar_width))
            self.out.write(("\r[" + "#" * filled + "." * (bar_width - filled) + "]" + text)[: width - 1])
            self.out.flush()
        elif fraction >= 1.0 or time.monotonic() - self.last_line_time >= 1.0:
            self.last_line_time = time.monotonic()
            print(f"{100 * fraction:5.1f}% {message}", file=self.out, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.out.write("\n")
            self.out.flush()


def bound_allocator() -> None:
    """Keep the process's peak memory what a few segments need, however long the song.

    glibc serves the multi-megabyte buffers of each request (rows, their bytes, the reply) from
    per-thread heaps that keep what was freed and creep up over a long song (+30 MB over ten
    minutes here); buffers over 1 MiB handed straight back to the OS, and two heaps, keep it flat.
    No-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold, m_arena_max = -3, -8  # malloc.h
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_arena_max, 2)


def _check_out_dir(out_dir: Path) -> None:
    """Say what is wrong with --out before the song is read (an OSError named a temporary file)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {out_dir} is a file, not a folder")
    nearest = out_dir.absolute()
    while not nearest.exists():  # made when the stems are written; nothing is made before
        nearest = nearest.parent
    if not nearest.is_dir():
        raise CliError(f"--out {out_dir}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise CliError(f"cannot write into {nearest} (no permission, or a read-only file system)")


def cmd_separate(args: argparse.Namespace) -> int:
    from services.common.audio import AudioError
    from services.serving import client

    bound_allocator()

    song = Path(args.song)
    out_dir = Path(args.out) if args.out else Path("separated") / args.model / song.stem
    _check_out_dir(out_dir)
    options = {}
    if args.segment_seconds is not None:
        options["segment_seconds"] = args.segment_seconds
    if args.overlap is not None:
        options["overlap"] = args.overlap
    try:
        client.check_segments(options.get("segment_seconds", client.DEFAULT_SEGMENT_SECONDS),
                              options.get("overlap", client.DEFAULT_OVERLAP), names=("--segment-seconds", "--overlap"))
    except ValueError as error:
        raise CliError(str(error)) from None
    printer = _ProgressPrinter(quiet=args.json)
    try:
        result = client.separate_file(
            song, out_dir, args.model, address=args.address, protocol="rest" if args.rest else "grpc",
            version=args.version, formats=tuple(args.format or ("wav",)), progress=printer, **options,
        )
    except (AudioError, client.ServingError, ValueError, OSError) as error:
        raise CliError(str(error)) from None
    finally:
        printer.close()
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for stem in ("instrument", "rest"):
            for path in result["paths"][stem].values():
                print(f"{stem}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `separate` on its own (python -m services.serving.cli SONG --model guitar)."""
    parser = argparse.ArgumentParser(prog="stemlab")
    add_separate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["separate", *(sys.argv[1:] if argv is None else argv)])
    exit_on_terminate()
    try:
        return cmd_separate(args)
    except CliError as error:
        print(f"stemlab: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Solo-instrument audio (the thesis' "pure" sets): download or read, cut into pieces, import.

A long recording of one instrument playing alone (a URL fetched with yt-dlp, or local files)
is cut into pieces of `piece_seconds` (the thesis used 3 minutes, ignoring pauses); a last
piece shorter than `min_piece_seconds` is dropped. Each piece becomes a track whose only stem
is the instrument; processing treats the missing rest stems as a silent rest.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from services.common import egress
from services.common.audio import FFMPEG_SAFE_INPUT, AudioError, audio_info
from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.library import CLASSES, Library, make_track_id
from services.ingestion.importers import (
    AUDIO_SUFFIXES,
    ImportReport,
    Progress,
    ShouldStop,
    StemSource,
    TrackSource,
    fingerprint,
    import_tracks,
    sorted_dir,
)

_FFMPEG_TIMEOUT_S = 3 * 3600
# Refuse downloads beyond this (a 10-hour compilation at 320 kbit/s is about 1.5 GB).
MAX_DOWNLOAD_BYTES = 4 << 30
MAX_DOWNLOAD_SECONDS_AUDIO = 12 * 3600
DOWNLOAD_TIMEOUT_S = 2 * 3600  # extraction and download together


class SoloImportError(InvalidArgumentError):
    """A solo source (URL or file) cannot be imported."""


class Stopped(Exception):
    """The download was cancelled."""


def validate_url(url: str, allow_hosts=(), allow_ports=egress.DEFAULT_PORTS) -> str:
    """The web's link check: http(s), a public address (unless allowed) on an allowed port."""
    try:
        return egress.check_url(url, allow_hosts, allow_ports=allow_ports)
    except egress.LinkError as e:
        raise SoloImportError(f"cannot download {url}: {e}") from None


def download_audio(url: str, out_dir: Path, should_stop: ShouldStop | None = None,
                   allow_hosts=(), allow_ports=egress.DEFAULT_PORTS) -> tuple[Path, str]:
    """Download the best audio of `url` into `out_dir` with yt-dlp, through the same egress guard
    as the web (every connection checked, one deadline and byte budget); returns (file, title)."""
    try:
        return egress.fetch(url, out_dir, MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_SECONDS_AUDIO, DOWNLOAD_TIMEOUT_S,
                            allow_hosts, should_stop=should_stop, allow_ports=allow_ports)
    except egress.LinkError as e:
        if should_stop is not None and should_stop():
            raise Stopped("cancelled") from None
        raise SoloImportError(f"cannot download {url}: {e}") from None


def cut_pieces(path: Path, out_dir: Path, piece_seconds: float, min_piece_seconds: float) -> list[Path]:
    """Cut an audio file into WAV pieces of `piece_seconds`; drop a short last piece.

    ffmpeg's segment muxer decodes and cuts in one streaming pass, so a three-hour recording
    never has to fit in memory (reading it whole would take gigabytes).
    """
    if piece_seconds <= 0 or min_piece_seconds < 0:
        raise SoloImportError("piece_seconds must be > 0 and min_piece_seconds >= 0")
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise SoloImportError("ffmpeg is not installed")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The segment muxer cuts between audio frames; 256-sample frames keep every cut within
    # a few milliseconds of the asked length.
    # Local files and audio demuxers only: a download or file that is a playlist reads nothing else.
    command = [ffmpeg, "-nostdin", "-v", "error", *FFMPEG_SAFE_INPUT, "-i", f"file:{path.resolve()}",
               "-map", "0:a:0", "-vn",
               "-af", "asetnsamples=n=256:p=0", "-c:a", "pcm_s16le", "-f", "segment", "-segment_time", f"{piece_seconds:g}",
               "-reset_timestamps", "1", str(out_dir / "piece%04d.wav")]
    try:
        result = subprocess.run(command, capture_output=True, timeout=_FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise SoloImportError(f"{path.name}: cutting timed out") from e
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SoloImportError(f"{path.name}: ffmpeg cannot read it ({message[-1] if message else 'no message'})")
    return [piece for piece, seconds in _pieces(out_dir) if seconds >= min_piece_seconds]


def _pieces(out_dir: Path) -> list[tuple[Path, float]]:
    """The cut pieces with their lengths (an empty trailing segment left out)."""
    found = []
    for piece in sorted(out_dir.glob("piece*.wav")):
        try:
            rate, _, frames = audio_info(piece)
        except AudioError:
            continue
        found.append((piece, frames / rate))
    return found


def dropped_tail(out_dir: Path, min_piece_seconds: float) -> float:
    """Seconds of the last piece `cut_pieces` left out for being shorter than the minimum (0: none)."""
    pieces = _pieces(out_dir)
    return pieces[-1][1] if pieces and pieces[-1][1] < min_piece_seconds else 0.0


def _origin(base: str, index: int, piece_seconds: float) -> str:
    return f"{base}#piece={index:03d}&seconds={piece_seconds:g}"


def _sources(pieces: list[Path], title: str, base_origin: str, instrument: str,
             piece_seconds: float) -> list[TrackSource]:
    out = []
    for i, piece in enumerate(pieces, start=1):
        name = f"{make_track_id(title)}_{i:03d}"
        out.append(TrackSource(
            name=name, source="solo", origin=_origin(base_origin, i, piece_seconds),
            title=f"{title} ({i}/{len(pieces)})",
            stems=[StemSource(path=piece, name=f"{instrument}.wav", raw_instrument=instrument,
                              cls=instrument)]))
    return out


def import_solo(library: Library, target: str, instrument: str, piece_seconds: float = 180.0,
                min_piece_seconds: float = 30.0, title: str = "",
                progress: Progress | None = None, should_stop: ShouldStop | None = None,
                allow_hosts=(), allow_ports=egress.DEFAULT_PORTS) -> ImportReport:
    """Import a URL (http/https, via yt-dlp) or a local file/folder of solo `instrument` audio.

    Idempotent: a URL whose pieces (for this piece length) are already in the library is not
    downloaded again; a local file is recognised by its path and content fingerprint.
    """
    if instrument not in CLASSES or instrument in ("mix", "excluded"):
        raise SoloImportError(f"instrument must be one of the instrument classes, not {instrument!r}")
    is_url = "://" in target
    work_root = library.data.downloads
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".solo-", dir=work_root))
    try:
        if is_url:
            validate_url(target, allow_hosts, allow_ports)
            known = sorted(t.id for t in library.tracks() if t.origin.startswith(f"{target}#")
                           and t.origin.endswith(f"&seconds={piece_seconds:g}"))
            if known:
                return ImportReport(unchanged=known)
            if progress:
                progress(0, 3, "downloading")
            try:
                file, found_title = download_audio(target, work, should_stop, allow_hosts, allow_ports)
            except Stopped:
                return ImportReport(stopped=True)
            inputs = [(file, title or found_title, target)]
        else:
            path = Path(target).expanduser()
            if not path.exists():
                raise NotFoundError(f"{path} does not exist")
            files = [path] if path.is_file() else [p for p in sorted_dir(path)
                                                   if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
            if not files:
                raise SoloImportError(f"no audio files in {path}")
            # A title given for a folder of several recordings names each with its file too.
            inputs = [(f, f"{title} {f.stem}" if title and len(files) > 1 else title or f.stem,
                       f"file://{f.resolve()}?sha256={fingerprint(f)[:16]}") for f in files]
        sources: list[TrackSource] = []
        report = ImportReport()
        for n, (file, piece_title, base) in enumerate(inputs):
            if should_stop is not None and should_stop():
                report.stopped = True
                return report
            if progress:
                progress(1, 3, f"cutting {file.name}")
            try:
                pieces = cut_pieces(file, work / f"pieces{n:03d}", piece_seconds, min_piece_seconds)
            except SoloImportError as e:
                report.errors.append({"track": piece_title, "stem": file.name, "reason": str(e)})
                continue
            if not pieces:
                report.errors.append({"track": piece_title, "stem": file.name,
                                      "reason": f"shorter than {min_piece_seconds:g} s"})
            elif tail := dropped_tail(work / f"pieces{n:03d}", min_piece_seconds):
                report.skipped.append({"track": piece_title, "reason": f"its last {tail:.1f} s are "
                                       f"left out (shorter than {min_piece_seconds:g} s, --min-piece-seconds)"})
            sources.extend(_sources(pieces, piece_title, base, instrument, piece_seconds))
        done = import_tracks(library, sources, link=True, should_stop=should_stop, total=len(sources),
                             progress=(lambda d, t, m="": progress(2 + d / max(t, 1), 3, m)) if progress else None)
        done.errors = report.errors + done.errors
        done.skipped = report.skipped + done.skipped
        return done
    finally:
        shutil.rmtree(work, ignore_errors=True)


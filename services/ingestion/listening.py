"""Listening support for the review page: an instrument's stems in N equal parts.

As the thesis' quality tool did, the stems of one instrument are summed, leading and trailing
silence is trimmed, and the rest is split into `parts` equal pieces that a person skims one
after the other. Boundaries are in seconds of the original stem files.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.audio import AudioError, read_audio, resample, to_mono, write_audio
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.library import Library

SILENCE_DBFS = -50.0          # the thesis' silence level
HOP_SECONDS = 0.05
MAX_PARTS = 100
DEFAULT_MAX_WAV_BYTES = 3 << 20   # stays under gRPC's default 4 MiB message limit
_WAV_HEADER_BYTES = 44


@dataclass
class Parts:
    track_id: str
    instrument: str
    stems: list[str]
    rate: int
    duration_seconds: float
    start_seconds: float          # first audible moment
    end_seconds: float            # last audible moment
    parts: list[tuple[float, float]]
    wav: bytes = b""              # the requested part, when asked for
    part_index: int = -1
    truncated: bool = False
    audible: bool = True
    extra: dict = field(default_factory=dict)


def audible_bounds(audio: np.ndarray, rate: int, silence_dbfs: float = SILENCE_DBFS,
                   hop_seconds: float = HOP_SECONDS) -> tuple[float, float] | None:
    """(start, end) seconds of the audio (channels, samples) without leading/trailing frames
    below `silence_dbfs`; None when nothing is audible."""
    hop = max(1, int(round(rate * hop_seconds)))
    n = -(-audio.shape[1] // hop)
    padded = np.zeros((audio.shape[0], n * hop), np.float64)
    padded[:, : audio.shape[1]] = audio
    power = (padded ** 2).reshape(audio.shape[0], n, hop).mean(axis=(0, 2))
    loud = np.flatnonzero(10 * np.log10(np.maximum(power, 1e-12)) > silence_dbfs)
    if len(loud) == 0:
        return None
    start = loud[0] * hop / rate
    end = min(audio.shape[1], (loud[-1] + 1) * hop) / rate
    return float(start), float(end)


def split_parts(start: float, end: float, parts: int) -> list[tuple[float, float]]:
    """`parts` equal (start, end) pieces of [start, end]."""
    if not 1 <= parts <= MAX_PARTS:
        raise InvalidArgumentError(f"parts must be between 1 and {MAX_PARTS}, got {parts}")
    edges = np.linspace(start, end, parts + 1)
    return [(round(float(a), 4), round(float(b), 4)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def instrument_audio(library: Library, track_id: str, instrument: str) -> tuple[np.ndarray, int, list[str]]:
    """The sum of a track's stems of `instrument`: (audio (channels, samples), rate, stem files)."""
    track = library.load(track_id)
    stems = track.stems_of(instrument)
    if not stems:
        raise NotFoundError(f"track {track_id} has no {instrument} stems")
    total, rate = None, 0
    for stem in stems:
        try:
            audio, stem_rate = read_audio(library.stem_path(track, stem))
        except AudioError as e:
            raise FailedPreconditionError(f"track {track_id}: {e}") from e
        if total is None:
            rate = stem_rate
        elif stem_rate != rate:
            audio = resample(audio, stem_rate, rate)
        if total is None:
            total = audio
            continue
        if audio.shape[0] != total.shape[0]:
            channels = max(audio.shape[0], total.shape[0])
            total = np.broadcast_to(total, (channels, total.shape[1])) if total.shape[0] == 1 else total
            audio = np.broadcast_to(audio, (channels, audio.shape[1])) if audio.shape[0] == 1 else audio
        n = max(total.shape[1], audio.shape[1])
        grown = np.zeros((total.shape[0], n), np.float32)
        grown[:, : total.shape[1]] += total
        grown[:, : audio.shape[1]] += audio
        total = grown
    return total, rate, [s.file for s in stems]


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """16-bit WAV file bytes of (channels, samples) audio (written through the audio module)."""
    with tempfile.TemporaryDirectory(prefix="stemlab-part-") as tmp:
        path = Path(tmp) / "part.wav"
        write_audio(path, audio, rate, subtype="PCM_16")
        return path.read_bytes()


# A part is sent at a lower rate rather than cut short, down to this one (what a listener
# judging bleed or a wrong class still hears well enough); below it, it is cut short.
MIN_LISTENING_RATE_HZ = 8000


def _fitting_rate(piece: np.ndarray, rate: int, max_bytes: int) -> int:
    """The file's rate, or a lower one at which the whole part fits `max_bytes` as 16-bit WAV."""
    fits = (max_bytes - _WAV_HEADER_BYTES) // (2 * piece.shape[0])
    if piece.shape[1] <= fits:
        return rate
    return max(MIN_LISTENING_RATE_HZ, int(rate * fits / piece.shape[1]) // 100 * 100)


def listening_parts(library: Library, track_id: str, instrument: str, parts: int = 5,
                    part_index: int = -1, rate: int = 0, mono: bool = False,
                    max_bytes: int = DEFAULT_MAX_WAV_BYTES) -> Parts:
    """Part boundaries of an instrument's stems and, with part_index >= 0, that part's audio.

    The audio is 16-bit WAV, optionally resampled (`rate`) and downmixed (`mono`). Without a
    `rate`, a part longer than `max_bytes` allows at the file's rate comes at a lower one (down to
    MIN_LISTENING_RATE_HZ) so it is heard whole; only what still does not fit is cut short, and
    `truncated` is set.
    """
    audio, file_rate, stem_files = instrument_audio(library, track_id, instrument)
    duration = audio.shape[1] / file_rate
    bounds = audible_bounds(audio, file_rate)
    audible = bounds is not None
    start, end = bounds if audible else (0.0, duration)
    result = Parts(track_id=track_id, instrument=instrument, stems=stem_files, rate=file_rate,
                   duration_seconds=round(duration, 4), start_seconds=round(start, 4),
                   end_seconds=round(end, 4), parts=split_parts(start, end, parts), audible=audible)
    if part_index < 0:
        return result
    if part_index >= parts:
        raise InvalidArgumentError(f"part_index must be below parts ({parts}), got {part_index}")
    if max_bytes < 1024:
        raise InvalidArgumentError("max_bytes must be at least 1024")
    a, b = result.parts[part_index]
    piece = audio[:, int(round(a * file_rate)): int(round(b * file_rate))]
    if mono:
        piece = to_mono(piece)
    out_rate = rate or _fitting_rate(piece, file_rate, max_bytes)
    if out_rate != file_rate:
        piece = resample(piece, file_rate, out_rate)
    limit = (max_bytes - _WAV_HEADER_BYTES) // (2 * piece.shape[0])
    if piece.shape[1] > limit:
        piece, result.truncated = piece[:, :limit], True
    if piece.shape[1] == 0:
        piece = np.zeros((piece.shape[0], 1), np.float32)
    result.wav = wav_bytes(piece, out_rate)
    result.part_index = part_index
    return result

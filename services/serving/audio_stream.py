"""Stems written block by block, so a separation holds a few segments, not the song (the song
is read in blocks by services.common.audio.AudioReader).

Stems are written under temporary names in the target folder and renamed into place only when
all of them are done, so a reader never sees a half-written file and a failed separation leaves
none behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from services.common import audio as audio_io
from services.common.audio import AudioError


class _Mp3Encoder:
    """ffmpeg's LAME encoder fed on a pipe, for libsndfile builds without MP3 (as write_audio does)."""

    def __init__(self, path: Path, final: Path, rate: int, channels: int):
        self.final = final
        self.errors = tempfile.TemporaryFile()
        command = [
            audio_io._tool("ffmpeg", final), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(rate),
            "-ac", str(channels), "-i", "pipe:0", "-c:a", "libmp3lame", "-b:a", "320k", "-f", "mp3", str(path),
        ]  # fmt: skip
        # Its own session, as the decoder's (services/common/audio.py): a signal to the caller's
        # process group reaches the caller, which stops the encoder itself.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.errors,
                                        start_new_session=True)

    def write(self, frames: np.ndarray) -> None:
        try:
            self.process.stdin.write(frames.astype("<f4", copy=False).tobytes())
        except BrokenPipeError:
            self.close()

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        code = self.process.wait()
        self.errors.seek(0)
        message = self.errors.read()
        self.errors.close()
        if code != 0:
            raise AudioError(self.final, f"ffmpeg could not encode MP3 ({audio_io._last_line(message, self.final)})")


def mp3_rate(rate: int) -> int:
    """`rate` where MP3 has it, else the highest MP3 rate below it (the lowest, below them all)."""
    if rate in audio_io.MP3_RATES_HZ:
        return rate
    below = [r for r in audio_io.MP3_RATES_HZ if r < rate]
    return max(below) if below else min(audio_io.MP3_RATES_HZ)


class StemWriter:
    """instrument.<format> and rest.<format> in ``folder``, written block by block.

    ``write(instrument, mix)`` takes (channels, k) blocks at ``rate``; rest is ``mix - instrument``
    in float32, so a FLOAT WAV pair adds up to the mix bit for bit. WAV is FLOAT, FLAC 24-bit,
    MP3 320 kbit/s at the song's rate or the nearest MP3 rate below it (integer formats and MP3
    clip to full scale). ``commit()`` renames every file
    into place; leaving the block without it removes them all.
    """

    SUBTYPES = {"wav": "FLOAT", "flac": "PCM_24"}

    def __init__(self, folder: str | os.PathLike, formats: Sequence[str], rate: int, channels: int,
                 stems: Sequence[str] = ("instrument", "rest")):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rate, self.channels = int(rate), int(channels)
        # MP3 knows some rates only: a 96 kHz song's MP3 stems are written at 48 kHz (the WAV and
        # FLAC ones keep the song's rate), resampled block by block as the rest is written.
        self.mp3_rate = mp3_rate(self.rate)
        self._mp3_resamplers = {stem: audio_io.StreamResampler(self.rate, self.mp3_rate, self.channels)
                                for stem in stems}
        self.paths: dict[str, dict[str, Path]] = {stem: {} for stem in stems}
        self._files: list[tuple[str, str, Path, object]] = []  # (stem, format, temporary, handle)
        try:
            for stem in stems:
                for fmt in formats:
                    final = self.folder / f"{stem}.{fmt}"
                    if fmt == "mp3" and self.channels > 2:
                        raise AudioError(final, f"MP3 holds 1 or 2 channels, got {self.channels}")
                    temporary = self._temporary(final)
                    self._files.append((stem, fmt, temporary, self._open(fmt, temporary, final)))
                    self.paths[stem][fmt] = final
        except BaseException:
            self._discard()
            raise

    def _temporary(self, final: Path) -> Path:
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=self.folder)
        os.close(handle)
        return Path(name)

    def _open(self, fmt: str, temporary: Path, final: Path):
        if fmt == "mp3":
            if "MP3" in sf.available_formats():
                return sf.SoundFile(str(temporary), "w", samplerate=self.mp3_rate, channels=self.channels,
                                    format="MP3", subtype="MPEG_LAYER_III", compression_level=0.0,
                                    bitrate_mode="CONSTANT")
            return _Mp3Encoder(temporary, final, self.mp3_rate, self.channels)
        handle = sf.SoundFile(str(temporary), "w", samplerate=self.rate, channels=self.channels,
                              subtype=self.SUBTYPES[fmt], format=fmt.upper())
        if fmt == "wav":
            # No PEAK chunk: its timestamp would make identical audio give different bytes.
            with contextlib.suppress(AttributeError):
                sf._snd.sf_command(handle._file, audio_io._SFC_SET_ADD_PEAK_CHUNK, sf._ffi.NULL, sf._snd.SF_FALSE)
        return handle

    def write(self, instrument: np.ndarray, mix: np.ndarray) -> None:
        if not np.isfinite(instrument).all():
            raise AudioError(self.paths["instrument"][next(iter(self.paths["instrument"]))],
                             "the model returned NaN or infinity")
        blocks = {"instrument": instrument.T, "rest": (mix - instrument).T}
        clipped: dict[str, np.ndarray] = {}
        for stem, fmt, _temporary, handle in self._files:
            frames = blocks[stem]
            if fmt != "wav":  # integer samples and MP3 wrap around instead of clipping
                if stem not in clipped:
                    clipped[stem] = np.clip(frames, -1.0, 1.0)
                frames = clipped[stem]
            if fmt == "mp3":
                frames = self._mp3_resamplers[stem].push(frames.T).T
            self._write(stem, fmt, handle, frames)

    def _write(self, stem: str, fmt: str, handle, frames: np.ndarray) -> None:
        try:
            handle.write(np.ascontiguousarray(frames, dtype=np.float32))
        except (sf.LibsndfileError, RuntimeError, OSError) as error:
            raise AudioError(self.paths[stem][fmt], f"write failed: {error}") from error

    def commit(self) -> dict[str, dict[str, str]]:
        """Close every file and rename it into place; returns {stem: {format: path}}."""
        for stem, fmt, _temporary, handle in self._files:
            if fmt == "mp3" and self.mp3_rate != self.rate:  # what the resampler still holds
                self._write(stem, fmt, handle, self._mp3_resamplers[stem].push(
                    np.zeros((self.channels, 0), np.float32), last=True).T)
        for _stem, _fmt, _temporary, handle in self._files:
            handle.close()
        for stem, fmt, temporary, _handle in self._files:
            os.chmod(temporary, 0o666 & ~audio_io._UMASK)  # mkstemp makes 0600 files
            os.replace(temporary, self.paths[stem][fmt])
        self._files = []
        return {stem: {fmt: str(path) for fmt, path in formats.items()} for stem, formats in self.paths.items()}

    def _discard(self) -> None:
        for _stem, _fmt, temporary, handle in self._files:
            with contextlib.suppress(Exception):
                handle.close()
            temporary.unlink(missing_ok=True)
        self._files = []

    def __enter__(self) -> StemWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._discard()  # nothing left after commit()

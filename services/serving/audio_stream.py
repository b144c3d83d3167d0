"""Songs read and stems written block by block, so a separation holds a few segments, not the song.

The same formats and checks as services.common.audio (whose helpers this uses): libsndfile reads
WAV/FLAC/OGG/AIFF..., everything else is decoded by an ffmpeg process on a pipe; stems are written
under temporary names in the target folder and renamed into place only when all of them are done,
so a reader never sees a half-written file and a failed separation leaves none behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from services.common import audio as audio_io
from services.common.audio import AudioError


class AudioReader:
    """An audio file opened for reading in blocks: ``rate``, ``channels``, ``frames`` (an estimate
    for formats ffmpeg decodes), and ``blocks()``, float32 (channels, k) arrays in order."""

    def __init__(self, path: str | os.PathLike, block_frames: int = 65536,
                 limits: audio_io.DecodeLimits | None = None):
        self.path = audio_io._existing_file(path)
        self.block_frames = int(block_frames)
        # The same bounds as read_audio's (docs/security.md): rate and channels lowered while
        # decoding, output counted against the byte and length caps, a wall-clock limit. None:
        # only the format checks (a local user's own file, streamed in bounded memory anyway).
        self.limits = limits
        self._soundfile: sf.SoundFile | None = None
        self._process: subprocess.Popen | None = None
        if self.path.suffix.lower() in audio_io.SOUNDFILE_READ_SUFFIXES:
            try:
                self._soundfile = sf.SoundFile(str(self.path))
            except (sf.LibsndfileError, RuntimeError):
                self._soundfile = None  # not what its name says: ffmpeg gets a try
            except OSError as error:
                raise AudioError(self.path, f"cannot open: {error.strerror or error}") from error
        if self._soundfile is not None:
            handle = self._soundfile
            self.rate, self.channels, self.frames = audio_io._checked_format(
                self.path, handle.samplerate, handle.channels, handle.frames)
            if limits is not None and limits.converts(self.rate, self.channels):
                handle.close()  # ffmpeg lowers the rate or channels while it decodes
                self._soundfile = None
        if self._soundfile is None:
            file_rate, file_channels, file_frames = audio_io._ffprobe(self.path)
            audio_io._checked_format(self.path, file_rate, file_channels, 1)  # the length is counted while decoding
            self.rate, self.channels = limits.output_format(file_rate, file_channels) if limits else (file_rate, file_channels)
            self.frames = int(file_frames * self.rate / file_rate)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def blocks(self) -> Iterator[np.ndarray]:
        """The song's samples, (channels, k) float32 blocks; AudioError for undecodable or non-finite audio."""
        source = self._soundfile_blocks() if self._soundfile is not None else self._ffmpeg_blocks()
        counter = audio_io._Counter(self.path, self.limits, self.rate, self.channels) if self.limits else None
        deadline = time.monotonic() + self.limits.timeout_seconds if self.limits else None
        delivered = 0
        for block in source:
            if not np.isfinite(block).all():
                raise AudioError(self.path, "decoded samples contain NaN or infinity")
            if counter is not None:
                counter.add(block.shape[1])
            if deadline is not None and time.monotonic() > deadline:
                raise AudioError(self.path, f"decoding took longer than {self.limits.timeout_seconds:g} s")
            delivered += block.shape[1]
            yield block
        if delivered == 0:
            raise AudioError(self.path, "contains no audio frames")

    def _soundfile_blocks(self) -> Iterator[np.ndarray]:
        handle = self._soundfile
        while True:
            try:
                frames = handle.read(self.block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as error:
                raise AudioError(self.path, f"cannot decode it ({error})") from error
            if frames.shape[0] == 0:
                return
            yield frames.T

    def _ffmpeg_blocks(self) -> Iterator[np.ndarray]:
        # Raw float32 at the rate and channel count chosen above, as services.common.audio decodes:
        # local files of the allowed audio demuxers only (no playlists, concat or network).
        length = ([] if self.limits is None or self.limits.max_seconds is None
                  else ["-t", f"{self.limits.max_seconds + 1:.3f}"])
        command = [
            audio_io._tool("ffmpeg", self.path), "-nostdin", "-v", "error", *audio_io.FFMPEG_SAFE_INPUT,
            "-i", audio_io._ffmpeg_input(self.path), "-map", "0:a:0", "-vn", "-ac", str(self.channels),
            "-ar", str(self.rate), *length, "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1",
        ]  # fmt: skip
        # stderr goes to a file, not a pipe nobody reads while stdout is drained.
        with tempfile.TemporaryFile() as errors:
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                             stdin=subprocess.DEVNULL)
            frame_bytes = 4 * self.channels
            wanted = self.block_frames * frame_bytes
            leftover = b""
            while True:
                data = leftover + self._process.stdout.read(wanted)
                usable = len(data) // frame_bytes * frame_bytes
                if usable == 0:
                    break
                leftover = data[usable:]
                yield np.frombuffer(data[:usable], dtype="<f4").reshape(-1, self.channels).T
            code = self._process.wait()
            if code != 0:
                errors.seek(0)
                raise AudioError(self.path, f"ffmpeg could not decode it ({audio_io._last_line(errors.read(), self.path)})")

    def close(self) -> None:
        if self._soundfile is not None:
            self._soundfile.close()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Mp3Encoder:
    """ffmpeg's LAME encoder fed on a pipe, for libsndfile builds without MP3 (as write_audio does)."""

    def __init__(self, path: Path, final: Path, rate: int, channels: int):
        self.final = final
        self.errors = tempfile.TemporaryFile()
        command = [
            audio_io._tool("ffmpeg", final), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(rate),
            "-ac", str(channels), "-i", "pipe:0", "-c:a", "libmp3lame", "-b:a", "320k", "-f", "mp3", str(path),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.errors)

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


class StemWriter:
    """instrument.<format> and rest.<format> in ``folder``, written block by block.

    ``write(instrument, mix)`` takes (channels, k) blocks at ``rate``; rest is ``mix - instrument``
    in float32, so a FLOAT WAV pair adds up to the mix bit for bit. WAV is FLOAT, FLAC 24-bit,
    MP3 320 kbit/s (integer formats and MP3 clip to full scale). ``commit()`` renames every file
    into place; leaving the block without it removes them all.
    """

    SUBTYPES = {"wav": "FLOAT", "flac": "PCM_24"}

    def __init__(self, folder: str | os.PathLike, formats: Sequence[str], rate: int, channels: int,
                 stems: Sequence[str] = ("instrument", "rest")):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rate, self.channels = int(rate), int(channels)
        self.paths: dict[str, dict[str, Path]] = {stem: {} for stem in stems}
        self._files: list[tuple[str, str, Path, object]] = []  # (stem, format, temporary, handle)
        try:
            for stem in stems:
                for fmt in formats:
                    final = self.folder / f"{stem}.{fmt}"
                    if fmt == "mp3":
                        if self.channels > 2:
                            raise AudioError(final, f"MP3 holds 1 or 2 channels, got {self.channels}")
                        if self.rate not in audio_io.MP3_RATES_HZ:
                            raise AudioError(final, f"MP3 does not support {self.rate} Hz; "
                                                    f"resample to one of {audio_io.MP3_RATES_HZ}")
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
                return sf.SoundFile(str(temporary), "w", samplerate=self.rate, channels=self.channels,
                                    format="MP3", subtype="MPEG_LAYER_III", compression_level=0.0,
                                    bitrate_mode="CONSTANT")
            return _Mp3Encoder(temporary, final, self.rate, self.channels)
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
            try:
                handle.write(np.ascontiguousarray(frames, dtype=np.float32))
            except (sf.LibsndfileError, RuntimeError, OSError) as error:
                raise AudioError(self.paths[stem][fmt], f"write failed: {error}") from error

    def commit(self) -> dict[str, dict[str, str]]:
        """Close every file and rename it into place; returns {stem: {format: path}}."""
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

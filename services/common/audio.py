"""Audio file I/O for all of stemlab: the one place that reads, writes and resamples audio.

Arrays are float32 with shape (channels, samples) everywhere. WAV/FLAC/OGG/AIFF go through
soundfile (libsndfile); MP3, M4A/AAC and anything libsndfile refuses go through an ffmpeg
subprocess. Writes land under a temporary name in the target folder and are renamed into place,
so a reader never sees a half-written file.

Decoding is bounded (`DecodeLimits`): what comes out of the decoder is counted block by block,
never trusted from the header, and decoding stops with an AudioError at the byte cap (default
512 MiB of float32, STEMLAB_MAX_DECODED_MB) or the length cap. Limits on rate and channels are
applied while decoding (ffmpeg resamples and mixes down in its pipe), so a 92 KB FLAC claiming
8 channels at 655 kHz never becomes gigabytes. ffmpeg reads local files only
(`-protocol_whitelist file`) with an explicit list of audio demuxers (`-format_whitelist`): no
playlists (hls/m3u8), concat scripts or network protocols, whatever the file's name or content.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from services.common.errors import InvalidArgumentError

MAX_RATE_HZ = 768_000
MAX_CHANNELS = 32

# Suffixes libsndfile reads natively; anything else (mp3, m4a, aac, opus, webm, ...) is decoded by
# ffmpeg. libsndfile can read MP3 too, but ffmpeg handles the encoder delay and odd frames of
# real-world MP3s more robustly, so MP3 is decoded by ffmpeg.
SOUNDFILE_READ_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".w64", ".rf64", ".caf", ".au"}
)
WRITE_SUBTYPES = {
    ".wav": ("FLOAT", "PCM_16", "PCM_24", "PCM_32"),
    ".flac": ("PCM_16", "PCM_24"),
}
DEFAULT_SUBTYPE = {".wav": "FLOAT", ".flac": "PCM_24"}
MP3_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

_FFMPEG_TIMEOUT_S = 600
# The demuxers ffmpeg may use on a file: audio containers only. Not hls (m3u8 playlists), concat,
# image sequences, lavfi, sdp/rtp or anything else that can name other files or the network.
FFMPEG_DEMUXERS = ("wav", "w64", "flac", "mp3", "ogg", "mov", "matroska", "aac", "aiff", "caf", "au", "asf",
                   "wv", "ape", "tta", "amr", "mpc", "mpc8", "ac3", "eac3", "dts", "truehd", "mlp", "loas", "rf64",
                   # the audio of common video files (no playlists: hls, concat and the like stay out)
                   "avi", "flv", "mpeg", "mpegts")
FFMPEG_SAFE_INPUT = ("-protocol_whitelist", "file", "-format_whitelist", ",".join(FFMPEG_DEMUXERS))
_BLOCK_FRAMES = 1 << 16


def _default_max_bytes() -> int:
    raw = os.environ.get("STEMLAB_MAX_DECODED_MB", "")
    return (int(raw) if raw.isdigit() and int(raw) > 0 else 512) << 20


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds of one decode, enforced on what the decoder produces.

    max_seconds: decoded length (counted) beyond which the file is refused.
    max_rate_hz / max_channels: higher rates are resampled, more channels mixed down, while decoding.
    max_bytes: float32 output beyond which decoding stops (memory bound).
    timeout_seconds: wall-clock bound of one decode.
    """

    max_seconds: float | None = None
    max_rate_hz: int | None = None
    max_channels: int | None = None
    max_bytes: int = field(default_factory=_default_max_bytes)
    timeout_seconds: float = _FFMPEG_TIMEOUT_S

    def converts(self, rate: int, channels: int) -> bool:
        return bool((self.max_rate_hz and rate > self.max_rate_hz) or (self.max_channels and channels > self.max_channels))

    def output_format(self, rate: int, channels: int) -> tuple[int, int]:
        return (min(rate, self.max_rate_hz or rate), min(channels, self.max_channels or channels))


# What the web decodes a song to: its own rate up to 48 kHz, at most stereo (docs/security.md).
WEB_MAX_RATE_HZ = 48_000
WEB_MAX_CHANNELS = 2

# Read once: os.umask can only be read by setting it, which is unsafe once threads run.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class AudioError(InvalidArgumentError):
    """An audio file could not be read or written.

    The message is "<file name>: <reason>" (no folders, so it can go to a client as is);
    `.path` holds the full path and `.reason` the reason alone.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{Path(path).name}: {reason}")


# ---------------------------------------------------------------------------------------------
# Pure array helpers


class DecoderStopped(RuntimeError):
    """ffmpeg was killed by a signal while decoding: says nothing about the file."""


def resampled_length(samples: int, from_hz: int, to_hz: int) -> int:
    """Number of samples after resampling: round(samples * to_hz / from_hz), halves rounded up."""
    return (samples * to_hz + from_hz // 2) // from_hz


def resample(audio: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Band-limited resampling (soxr, very high quality).

    audio: (channels, samples). Returns float32 (channels, resampled_length(samples, ...)).
    Returns the input (as float32) when the rates are equal.
    """
    audio = _as_channels_first(audio)
    if from_hz <= 0 or to_hz <= 0:
        raise ValueError(f"sample rates must be positive, got {from_hz} -> {to_hz}")
    if from_hz == to_hz:
        return audio
    n_out = resampled_length(audio.shape[1], from_hz, to_hz)
    if audio.shape[1] == 0:
        return np.zeros((audio.shape[0], 0), np.float32)
    # soxr wants (samples, channels).
    out = soxr.resample(np.ascontiguousarray(audio.T), from_hz, to_hz, quality="VHQ").T
    # soxr's own length can differ from the rounded one by a sample; fix it so callers can rely
    # on resampled_length().
    if out.shape[1] > n_out:
        out = out[:, :n_out]
    elif out.shape[1] < n_out:
        out = np.pad(out, ((0, 0), (0, n_out - out.shape[1])))
    return np.ascontiguousarray(out, dtype=np.float32)


class StreamResampler:
    """The same band-limited (soxr VHQ) resampling as `resample`, block by block.

    Feeding consecutive blocks (channels, k) gives the samples of resampling the whole signal,
    without a second whole-song copy (the separation client streams long songs through it).
    Blocks pass through unchanged when the rates match.
    """

    def __init__(self, from_hz: int, to_hz: int, channels: int):
        self.stream = None if from_hz == to_hz else soxr.ResampleStream(
            from_hz, to_hz, channels, dtype="float32", quality="VHQ")

    def push(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """(channels, k) -> (channels, m); pass last=True with the final block to flush."""
        if self.stream is None:
            return block
        return self.stream.resample_chunk(np.ascontiguousarray(block.T, dtype=np.float32), last=last).T


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Mean of the channels. (channels, samples) -> (1, samples)."""
    audio = _as_channels_first(audio)
    return audio.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)


# Downmix coefficients (left gains, right gains) for the usual WAV/SMPTE channel orders.
# Each side is divided by the sum of its gains so a full-scale signal stays in range.
_C = float(np.sqrt(0.5))
_STEREO_DOWNMIX = {
    3: ((1, 0, _C), (0, 1, _C)),  # L R C
    4: ((1, 0, _C, 0), (0, 1, 0, _C)),  # FL FR BL BR
    5: ((1, 0, _C, _C, 0), (0, 1, _C, 0, _C)),  # FL FR FC BL BR
    6: ((1, 0, _C, 0, _C, 0), (0, 1, _C, 0, 0, _C)),  # 5.1: FL FR FC LFE BL BR (LFE dropped)
    8: ((1, 0, _C, 0, _C, 0, _C, 0), (0, 1, _C, 0, 0, _C, 0, _C)),  # 7.1: ... SL SR
}


def to_stereo(audio: np.ndarray) -> np.ndarray:
    """(channels, samples) -> (2, samples).

    Mono is duplicated, stereo returned unchanged; 3-6 and 8 channels are downmixed with the
    ITU-style coefficients for their usual layout (LFE dropped), other counts by their mean.
    """
    audio = _as_channels_first(audio)
    channels = audio.shape[0]
    if channels == 1:
        return np.repeat(audio, 2, axis=0)
    if channels == 2:
        return audio
    if channels in _STEREO_DOWNMIX:
        gains = np.asarray(_STEREO_DOWNMIX[channels], np.float64)
        gains /= gains.sum(axis=1, keepdims=True)
        return (gains @ audio.astype(np.float64)).astype(np.float32)
    return np.repeat(to_mono(audio), 2, axis=0)


def _as_channels_first(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2:
        raise ValueError(f"audio must have shape (channels, samples), got {audio.shape}")
    return np.asarray(audio, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Reading


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(rate_hz, channels, frames) from the file header, without decoding the audio.

    For compressed formats read through ffprobe, frames is estimated from the stream duration.
    """
    path = _existing_file(path)
    if path.suffix.lower() in SOUNDFILE_READ_SUFFIXES:
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError):
            info = None
        if info is not None:
            return _checked_format(path, info.samplerate, info.channels, info.frames)
    rate, channels, frames = _ffprobe(path)
    return _checked_format(path, rate, channels, frames)


def read_audio(
    path: str | os.PathLike, rate: int | None = None, mono: bool = False, limits: DecodeLimits | None = None
) -> tuple[np.ndarray, int]:
    """Decode an audio file.

    Returns (audio float32 (channels, samples), rate_hz). With `rate`, the audio is resampled to
    it and `rate` is returned; with `mono`, channels are averaged to shape (1, samples).
    `limits` bound the decode (default: the byte cap only); rate and channel limits are applied
    while decoding, so the returned rate may be lower than the file's.
    Raises AudioError naming the file for anything missing, empty, undecodable, absurd or too large.
    """
    limits = limits or DecodeLimits()
    if rate is not None and not 0 < int(rate) <= MAX_RATE_HZ:
        raise AudioError(Path(path), f"requested rate {rate} Hz is outside 1..{MAX_RATE_HZ}")
    with AudioReader(path, block_frames=_BLOCK_FRAMES, limits=limits) as reader:
        blocks = list(reader.blocks())
        file_rate = reader.rate
    audio = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if mono:
        audio = to_mono(audio)
    if rate is not None and int(rate) != file_rate:
        audio = resample(audio, file_rate, int(rate))
        file_rate = int(rate)
    return audio, file_rate


class AudioReader:
    """An audio file opened for reading in blocks: ``rate``, ``channels``, ``frames`` (an estimate
    for formats ffmpeg decodes), and ``blocks()``, float32 (channels, k) arrays in order.

    The one decoder: read_audio collects its blocks, the separation client streams them.
    libsndfile reads what it can; anything else (or a file whose rate or channels the limits
    lower) is decoded by ffmpeg on a pipe.
    """

    def __init__(self, path: str | os.PathLike, block_frames: int = 65536,
                 limits: DecodeLimits | None = None):
        self.path = _existing_file(path)
        self.block_frames = int(block_frames)
        # The same bounds as read_audio's (docs/security.md): rate and channels lowered while
        # decoding, output counted against the byte and length caps, a wall-clock limit. None:
        # only the format checks (a local user's own file, streamed in bounded memory anyway).
        self.limits = limits
        self._soundfile: sf.SoundFile | None = None
        self._process: subprocess.Popen | None = None
        if self.path.suffix.lower() in SOUNDFILE_READ_SUFFIXES:
            try:
                self._soundfile = sf.SoundFile(str(self.path))
            except (sf.LibsndfileError, RuntimeError):
                self._soundfile = None  # not what its name says: ffmpeg gets a try
            except OSError as error:
                raise AudioError(self.path, f"cannot open: {error.strerror or error}") from error
        if self._soundfile is not None:
            handle = self._soundfile
            self.rate, self.channels, self.frames = _checked_format(
                self.path, handle.samplerate, handle.channels, handle.frames)
            if limits is not None and limits.converts(self.rate, self.channels):
                handle.close()  # ffmpeg lowers the rate or channels while it decodes
                self._soundfile = None
        if self._soundfile is None:
            file_rate, file_channels, file_frames = _ffprobe(self.path)
            _checked_format(self.path, file_rate, file_channels, 1)  # the length is counted while decoding
            self.rate, self.channels = limits.output_format(file_rate, file_channels) if limits else (file_rate, file_channels)
            self.frames = int(file_frames * self.rate / file_rate)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    @property
    def exact_length(self) -> bool:
        """Whether `frames` is the file's own count (libsndfile), not a compressed file's estimate."""
        return self._soundfile is not None

    def blocks(self) -> Iterator[np.ndarray]:
        """The song's samples, (channels, k) float32 blocks; AudioError for undecodable or non-finite audio."""
        source = self._soundfile_blocks() if self._soundfile is not None else self._ffmpeg_blocks()
        counter = _Counter(self.path, self.limits, self.rate, self.channels) if self.limits else None
        delivered = 0
        for block in source:
            if not np.isfinite(block).all():
                raise AudioError(self.path, "decoded samples contain NaN or infinity")
            if counter is not None:
                counter.add(block.shape[1])
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
            _tool("ffmpeg", self.path), "-nostdin", "-v", "error", *FFMPEG_SAFE_INPUT,
            "-i", _ffmpeg_input(self.path), "-map", "0:a:0", "-vn", "-ac", str(self.channels),
            "-ar", str(self.rate), *length, "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1",
        ]  # fmt: skip
        # stderr goes to a file, not a pipe nobody reads while stdout is drained. A timer bounds the
        # whole decode (for a stream: including the time the reader spends between blocks).
        timed_out = threading.Event()
        with tempfile.TemporaryFile() as errors:
            # A session of its own: a signal to the service's process group (supervisord stopping
            # the web) must stop the job through the service, not kill the decoder under it and
            # make a good file look undecodable. close() kills it when the reading stops.
            self._process = process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                                       stdin=subprocess.DEVNULL, start_new_session=True)

            def stop() -> None:
                timed_out.set()
                process.kill()

            timer = threading.Timer(self.limits.timeout_seconds, stop) if self.limits else None
            if timer is not None:
                timer.start()
            try:
                frame_bytes = 4 * self.channels
                wanted = self.block_frames * frame_bytes
                leftover = b""
                while True:
                    data = leftover + process.stdout.read(wanted)
                    usable = len(data) // frame_bytes * frame_bytes
                    if usable == 0:
                        break
                    leftover = data[usable:]
                    yield np.frombuffer(data[:usable], dtype="<f4").reshape(-1, self.channels).T
                code = process.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            if timed_out.is_set():
                raise AudioError(self.path, f"ffmpeg decoding took longer than {self.limits.timeout_seconds:g} s")
            if code < 0:
                raise DecoderStopped(f"the decoder of {self.path.name} was stopped by signal {-code}")
            if code != 0:
                errors.seek(0)
                raise AudioError(self.path, f"ffmpeg could not decode it ({_last_line(errors.read(1 << 16), self.path)})")

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



def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file does not exist")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise AudioError(path, f"cannot stat file: {error.strerror}") from error
    if size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    return path


def _checked_format(path: Path, rate: int, channels: int, frames: int) -> tuple[int, int, int]:
    if not 0 < rate <= MAX_RATE_HZ:
        raise AudioError(path, f"implausible sample rate {rate} Hz")
    if not 0 < channels <= MAX_CHANNELS:
        raise AudioError(path, f"unsupported channel count {channels} (at most {MAX_CHANNELS})")
    if frames <= 0:
        raise AudioError(path, "contains no audio frames")
    return rate, channels, frames


class _Counter:
    """Counts decoded frames against the limits; raises AudioError the moment one is passed."""

    def __init__(self, path: Path, limits: DecodeLimits, rate: int, channels: int):
        self.path, self.limits, self.rate, self.channels = path, limits, rate, channels
        self.frames = 0
        # A decoder may round up a little past the length cap: allow a tenth of a second.
        self.max_frames = None if limits.max_seconds is None else int((limits.max_seconds + 0.1) * rate)

    def add(self, frames: int) -> None:
        self.frames += frames
        if self.frames * self.channels * 4 > self.limits.max_bytes:
            raise AudioError(self.path, f"decodes to more than {self.limits.max_bytes >> 20} MiB "
                                        f"({self.channels} channels at {self.rate} Hz); refused")
        if self.max_frames is not None and self.frames > self.max_frames:
            raise AudioError(self.path, f"is longer than {self.limits.max_seconds:g} s (counted while decoding); "
                                        "refused")


def _tool(name: str, path: Path) -> str:
    found = shutil.which(name)
    if found is None:
        raise AudioError(path, f"cannot decode this format: {name} is not installed")
    return found


def _ffmpeg_input(path: Path) -> str:
    """The path as an explicit local-file URL. With the protocol whitelist this keeps ffmpeg from
    reading anything but this file: a name like "concat:..." or a playlist inside an uploaded
    file could otherwise make it open other files or fetch URLs."""
    return "file:" + str(path.resolve())


def _ffprobe(path: Path) -> tuple[int, int, int]:
    command = [
        _tool("ffprobe", path), "-v", "error", "-select_streams", "a:0",
        "-show_entries", "stream=sample_rate,channels,duration:format=duration",
        *FFMPEG_SAFE_INPUT, "-of", "json", _ffmpeg_input(path),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, timeout=_FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise AudioError(path, "ffprobe timed out") from error
    if result.returncode != 0:
        message = _last_line(result.stderr, path)
        if message.endswith("Invalid argument"):
            # What ffmpeg says of a file no accepted demuxer recognises.
            message = "not in a format that is accepted (audio, or the sound of a common video file)"
        raise AudioError(path, f"not a readable audio file: {message}")
    try:
        probe = json.loads(result.stdout or b"{}")
    except ValueError as error:
        raise AudioError(path, "ffprobe returned unreadable output") from error
    streams = probe.get("streams") or []
    if not streams:
        raise AudioError(path, "no audio stream found (not an audio file?)")
    stream = streams[0]
    try:
        rate = int(stream.get("sample_rate") or 0)
        channels = int(stream.get("channels") or 0)
        duration = float(stream.get("duration") or probe.get("format", {}).get("duration") or 0.0)
    except (TypeError, ValueError) as error:
        raise AudioError(path, "unreadable stream parameters") from error
    return rate, channels, int(round(duration * rate))


def _last_line(stderr: bytes, path: Path) -> str:
    """ffmpeg's last message, with the file's full path shortened to its name."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "no message"
    return lines[-1].replace(_ffmpeg_input(path), path.name).replace(str(path), path.name)


# ---------------------------------------------------------------------------------------------
# Writing


def write_audio(path: str | os.PathLike, audio: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    """Write audio (channels, samples) atomically; the format comes from the suffix.

    .wav: FLOAT (default), PCM_16, PCM_24 or PCM_32. .flac: PCM_24 (default) or PCM_16.
    .mp3: 320 kbit/s CBR (subtype ignored). Integer formats and MP3 clip to full scale; FLOAT
    keeps values as they are. A 1-D array is taken as one channel. NaN/inf are refused.
    Returns the final path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".wav", ".flac", ".mp3"):
        raise AudioError(path, f"cannot write '{suffix or 'no suffix'}' files: use .wav, .flac or .mp3")
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2:
        raise AudioError(path, f"audio must have shape (channels, samples), got {audio.shape}")
    channels, samples = audio.shape
    if not 0 < channels <= MAX_CHANNELS:
        hint = " (is it (samples, channels)? transpose it)" if samples <= MAX_CHANNELS else ""
        raise AudioError(path, f"audio has {channels} channels, expected 1..{MAX_CHANNELS}{hint}")
    if samples == 0:
        raise AudioError(path, "audio has no samples")
    if not np.issubdtype(audio.dtype, np.number):
        raise AudioError(path, f"audio has non-numeric dtype {audio.dtype}")
    if not np.isfinite(audio).all():
        raise AudioError(path, "audio contains NaN or infinity")
    rate = int(rate)
    if not 0 < rate <= MAX_RATE_HZ:
        raise AudioError(path, f"implausible sample rate {rate} Hz")

    frames = np.ascontiguousarray(audio.T, dtype=np.float32)
    if suffix == ".mp3":
        if channels > 2:
            raise AudioError(path, f"MP3 holds 1 or 2 channels, got {channels}")
        if rate not in MP3_RATES_HZ:
            raise AudioError(path, f"MP3 does not support {rate} Hz; resample to one of {MP3_RATES_HZ}")
        frames = np.clip(frames, -1.0, 1.0)
        with _atomic_target(path) as temporary:
            if _soundfile_writes_mp3():
                sf.write(str(temporary), frames, rate, format="MP3", subtype="MPEG_LAYER_III",
                         compression_level=0.0, bitrate_mode="CONSTANT")  # fmt: skip
            else:
                _ffmpeg_write_mp3(path, temporary, frames, rate)
        return path

    subtype = (subtype or DEFAULT_SUBTYPE[suffix]).upper()
    if subtype not in WRITE_SUBTYPES[suffix]:
        raise AudioError(
            path, f"{suffix} files take subtype {' or '.join(WRITE_SUBTYPES[suffix])}, not {subtype}"
        )
    if subtype.startswith("PCM"):
        # libsndfile wraps around instead of clipping when converting to integers.
        frames = np.clip(frames, -1.0, 1.0)
    with _atomic_target(path) as temporary:
        _write_soundfile(temporary, frames, rate, subtype, suffix[1:].upper())
    return path


# libsndfile's SFC_SET_ADD_PEAK_CHUNK command.
_SFC_SET_ADD_PEAK_CHUNK = 0x1050


def _write_soundfile(path: Path, frames: np.ndarray, rate: int, subtype: str, file_format: str) -> None:
    """soundfile write of frames (samples, channels); float WAVs get no PEAK chunk, whose
    timestamp would make identical audio give different bytes on every write."""
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=frames.shape[1], subtype=subtype,
                      format=file_format) as handle:  # fmt: skip
        if file_format == "WAV" and subtype == "FLOAT":
            try:
                sf._snd.sf_command(handle._file, _SFC_SET_ADD_PEAK_CHUNK, sf._ffi.NULL, sf._snd.SF_FALSE)
            except AttributeError:  # soundfile internals moved: files are still valid, just not reproducible
                pass
        handle.write(frames)


def _soundfile_writes_mp3() -> bool:
    return "MP3" in sf.available_formats()


def _ffmpeg_write_mp3(path: Path, temporary: Path, frames: np.ndarray, rate: int) -> None:
    command = [
        _tool("ffmpeg", path), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(rate),
        "-ac", str(frames.shape[1]), "-i", "pipe:0", "-c:a", "libmp3lame", "-b:a", "320k",
        "-f", "mp3", str(temporary),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        input=frames.astype("<f4").tobytes(),
        capture_output=True,
        timeout=_FFMPEG_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise AudioError(path, f"ffmpeg could not encode MP3 ({_last_line(result.stderr, path)})")


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it onto `path` only if the block succeeds."""
    if not path.parent.is_dir():
        raise AudioError(path, f"folder {path.parent} does not exist")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise AudioError(path, f"write failed: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)

"""Rendering MIDI parts to audio with FluidSynth, and the level arithmetic of stems and mix.

Each part is rendered on its own by the `fluidsynth` command line (fast render, one synthesis
thread). FluidSynth's reverb and chorus are switched off: in version 2.3 they make renders of the
same file differ from run to run, and stems must be byte-identical for a given seed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pretty_midi
from scipy.signal import lfilter, oaconvolve

from services.common.audio import read_audio
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

DEFAULT_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
# FluidSynth's master gain. Low enough that dense parts stay far from full scale in its float
# output; the level that ends up in the files is set afterwards by one global gain per song.
FLUIDSYNTH_GAIN = 0.4
MIX_PEAK_DBFS = -1.0
_RENDER_TIMEOUT_FLOOR_S = 120


class RenderError(FailedPreconditionError):
    """FluidSynth is missing or failed on a part."""


@dataclass(frozen=True)
class Soundfonts:
    """The soundfonts a song is rendered with: a base font, then overlays loaded on top of it.

    FluidSynth looks a preset up from the last font loaded down to the first, so a preset an
    overlay defines (e.g. a recorded grand piano on programs 0, 1 and 3) replaces the base font's
    and every other program still comes from the base font.
    """

    paths: tuple[Path, ...]

    @property
    def name(self) -> str:
        """File names joined by '+': one font keeps its plain name (and songs their identity)."""
        return "+".join(path.name for path in self.paths)


def check_soundfont(soundfont: str | os.PathLike | None,
                    overlays: Sequence[str | os.PathLike] = ()) -> Soundfonts:
    """The soundfont (the default when None) and its overlays, each checked to be a readable
    SoundFont 2 file."""
    paths = [Path(soundfont) if soundfont else DEFAULT_SOUNDFONT] + [Path(o) for o in overlays]
    if len(set(paths)) != len(paths):
        raise InvalidArgumentError(f"a soundfont is named twice: {' + '.join(map(str, paths))}")
    for path in paths:
        if not path.is_file():
            raise NotFoundError(f"soundfont {path} does not exist")
        with open(path, "rb") as handle:
            header = handle.read(12)
        # FluidSynth renders silence, exit status 0, from a file that is not a SoundFont.
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"sfbk":
            raise InvalidArgumentError(f"{path.name} is not a SoundFont 2 (.sf2) file")
    return Soundfonts(tuple(paths))


def fluidsynth_command(soundfonts: Soundfonts, midi_path: Path, wav_path: Path, rate: int) -> list[str]:
    executable = shutil.which("fluidsynth")
    if executable is None:
        raise RenderError("fluidsynth is not installed (apt-get install fluidsynth)")
    return [
        executable, "-n", "-i",
        "-R", "0", "-C", "0",  # reverb and chorus off: they are not deterministic
        # No fallback: when our soundfont fails to load, FluidSynth would quietly use its default one.
        "-o", "synth.default-soundfont=",
        "-g", str(FLUIDSYNTH_GAIN), "-r", str(rate),
        "-o", "synth.cpu-cores=1", "-o", "synth.dynamic-sample-loading=1",
        "-O", "float", "-T", "wav", "-F", str(wav_path),
        *(str(path) for path in soundfonts.paths), str(midi_path),  # the last loaded wins a preset
    ]  # fmt: skip


def render_midi(midi: pretty_midi.PrettyMIDI, soundfonts: Soundfonts, rate: int, samples: int) -> np.ndarray:
    """Render a MIDI object with `check_soundfont`'s fonts; returns float32 (2, samples), cut or
    zero-padded to `samples`."""
    with tempfile.TemporaryDirectory(prefix="stemlab-synth-") as folder:
        midi_path, wav_path = Path(folder) / "part.mid", Path(folder) / "part.wav"
        midi.write(str(midi_path))
        command = fluidsynth_command(soundfonts, midi_path, wav_path, rate)
        timeout_s = max(_RENDER_TIMEOUT_FLOOR_S, 2.0 * samples / rate)
        try:
            result = subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as error:
            raise RenderError(f"fluidsynth took longer than {timeout_s:.0f} s") from error
        errors = result.stderr.decode("utf-8", "replace")
        if "Failed to load" in errors:
            raise RenderError(f"fluidsynth could not load the soundfont {soundfonts.name}")
        if result.returncode != 0 or not wav_path.is_file():
            message = errors.strip().splitlines()
            raise RenderError(
                f"fluidsynth failed: {message[-1] if message else f'exit status {result.returncode}'}"
            )
        audio, _ = read_audio(wav_path)
    if not audio.any() and any(inst.notes for inst in midi.instruments):
        # What FluidSynth does with a damaged soundfont or a preset it lacks: exit 0, write zeros.
        warning = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RenderError(
            f"fluidsynth rendered silence for a part with notes ({warning[-1] if warning else 'no message'}); "
            f"is {soundfonts.name} complete?"
        )
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    if audio.shape[1] >= samples:
        return np.ascontiguousarray(audio[:, :samples])
    return np.pad(audio, ((0, 0), (0, samples - audio.shape[1])))


# ---------------------------------------------------------------------------------------------
# Room reverb (pure)


def room_impulse_response(rng: np.random.Generator, rate: int, rt60_seconds: float) -> np.ndarray:
    """A stereo room impulse response (2, samples): decorrelated noise decaying by 60 dB over
    `rt60_seconds`, darkened like air and walls do, after a short pre-delay. Unit energy per
    channel, so a send of s puts the reverb about 20*log10(s) dB under the dry sound."""
    length = max(1, int(rt60_seconds * rate))
    t = np.arange(length) / rate
    tail = rng.standard_normal((2, length)) * 10 ** (-3.0 * t / rt60_seconds)
    tail = lfilter([0.4], [1.0, -0.6], tail, axis=1)  # one-pole low-pass: high frequencies die first
    tail /= np.sqrt(np.sum(tail**2, axis=1, keepdims=True))
    predelay = np.zeros((2, int(0.012 * rate)))
    return np.concatenate([predelay, tail], axis=1).astype(np.float32)


def add_reverb(dry: np.ndarray, impulse_response: np.ndarray, send: float) -> np.ndarray:
    """dry (2, samples) plus `send` times its convolution with the room; same length (the tail
    past the end is cut, like the song's end cuts everything)."""
    if send <= 0.0:
        return dry
    # float32 FFTs: twice as fast as float64, and their error (~1e-7) is far below audibility.
    wet = oaconvolve(dry.astype(np.float32), impulse_response.astype(np.float32), axes=1)[:, : dry.shape[1]]
    return (dry + np.float32(send) * wet).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Levels (pure)


def headroom_gain(stems: list[np.ndarray], peak_dbfs: float = MIX_PEAK_DBFS) -> float:
    """The one gain for all stems that puts the peak of their sum at `peak_dbfs`."""
    mix_peak = float(np.abs(_sum(stems)).max())
    if mix_peak == 0.0:
        return 1.0
    return 10 ** (peak_dbfs / 20) / mix_peak


def _sum(stems: list[np.ndarray]) -> np.ndarray:
    """Sum in float64, one stem at a time (no (stems, channels, samples) copy)."""
    total = np.zeros(np.shape(stems[0]), dtype=np.float64)
    for stem in stems:
        total += stem
    return total


def quantise_pcm(audio: np.ndarray, bits: int) -> np.ndarray:
    """Round to the grid of `bits`-bit PCM, the values a PCM file of that depth stores exactly."""
    scale = float(2 ** (bits - 1))
    return (np.round(np.asarray(audio, dtype=np.float64) * scale) / scale).astype(np.float32)


def mix_stems(
    stems: list[np.ndarray], peak_dbfs: float = MIX_PEAK_DBFS, pcm_bits: int | None = None
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Scale stems (each (channels, samples)) by one gain and sum them into the mix.

    Relative levels between stems are kept (no per-stem normalisation). With `pcm_bits`, the
    stems are first put on that PCM grid, so the mix -- their exact sum, itself on the grid while
    it stays under full scale -- equals the sum of the stems as they are stored.
    Returns (scaled stems float32, mix float32, gain).
    """
    gain = headroom_gain(stems, peak_dbfs)
    scaled = [(s * np.float64(gain)).astype(np.float32) for s in stems]
    if pcm_bits is not None:
        scaled = [quantise_pcm(s, pcm_bits) for s in scaled]
    mix = _sum(scaled).astype(np.float32)
    return scaled, mix, gain

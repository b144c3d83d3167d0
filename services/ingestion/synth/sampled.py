"""A SoundFont 2 from recorded notes, to load on top of a General MIDI font when songs are rendered.

A multisampled instrument is a folder of single-note recordings named NOTE[vLAYER].EXT — `C4v8.ogg`,
`D#1v16.wav`, `As2.mp3` (s: sharp), `Bb3.flac` — where the optional layer number orders the
velocity layers (softest first; the npm `@audio-samples/piano-velocityN` packages of the Salamander
Grand Piano are laid out this way, the `tonejs-instrument-*-mp3` ones with one layer).
`build_soundfont` writes one instrument from them: every recording a zone over the keys nearest its
note and one equal share of the velocity range per layer, read as mono at `rate` by
services.common.audio.read_audio and cut to `seconds` with a short fade. It is offered on the
General MIDI programs given (by default 0, 1 and 3, the generator's acoustic pianos), so
`generate_songs(..., overlays=[font])` renders those parts with the recordings and every other
part with the base font.

With two layers or more, the default velocity modulators of SoundFont 2 (velocity to attenuation
and to filter cutoff) are switched off for the instrument: recorded layers already carry how loud
and how bright a note played that hard is, and the defaults would apply it twice. One layer keeps
them, so velocity still shapes the notes.

    .venv/bin/python -m services.ingestion.synth.sampled SAMPLES_DIR --out piano.sf2 \\
        [--programs 0,1,3] [--layers 2,4,6,8,10,12,14,16] [--rate 32000] [--seconds 6] [--release 0.25]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.audio import read_audio
from services.common.errors import InvalidArgumentError
from services.common.paths import atomic_write_bytes

AUDIO_SUFFIXES = (".ogg", ".wav", ".flac", ".mp3")
_NAME = re.compile(r"^([A-Ga-g])([#sb]?)(-?\d)(?:v(\d+))?$")
_PITCH = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
FADE_SECONDS = 0.4
# Generators and modulator sources of the SoundFont 2.01 specification (section 8).
_GEN_RELEASE_VOL_ENV, _GEN_INSTRUMENT, _GEN_KEY_RANGE, _GEN_VEL_RANGE = 38, 41, 43, 44
_GEN_SAMPLE_ID, _GEN_ROOT_KEY = 53, 58
_GEN_FILTER_FC, _GEN_ATTENUATION = 8, 48
_SRC_VELOCITY_NEGATIVE_CONCAVE = 0x0502  # the source of both default velocity modulators
_SAMPLE_GAP = 46  # zero samples the specification asks for after every sample


@dataclass(frozen=True)
class Recording:
    path: Path
    note: int  # MIDI note number
    layer: int  # velocity layer number as named (0 when the name has none)


def note_number(name: str) -> tuple[int, int]:
    """(MIDI note, layer) of a file stem like 'D#1v16' or 'Bb3'; C4 is note 60."""
    match = _NAME.match(name)
    if not match:
        raise InvalidArgumentError(f"{name!r}: expected a note name such as C4, D#1 or Bb3, then optionally vN")
    letter, accidental, octave, layer = match.groups()
    note = 12 * (int(octave) + 1) + _PITCH[letter.lower()] + {"#": 1, "s": 1, "b": -1, "": 0}[accidental]
    if not 0 <= note <= 127:
        raise InvalidArgumentError(f"{name!r}: note {note} is outside MIDI's 0-127")
    return note, int(layer or 0)


def find_recordings(folders: Sequence[str | os.PathLike], layers: Sequence[int] | None = None) -> list[Recording]:
    """Every recording under the folders (searched recursively), sorted by layer then note.

    `layers` keeps only those layer numbers (all when None). Files whose names are not notes are
    skipped; two recordings of one note and layer are an error.
    """
    found: dict[tuple[int, int], Recording] = {}
    seen_layers: set[int] = set()
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise InvalidArgumentError(f"{root}: not a folder")
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
                continue
            try:
                note, layer = note_number(path.stem)
            except InvalidArgumentError:
                continue
            seen_layers.add(layer)
            if layers is not None and layer not in layers:
                continue
            if (layer, note) in found:
                raise InvalidArgumentError(f"two recordings of note {note}, layer {layer}: {found[layer, note].path} and {path}")
            found[layer, note] = Recording(path, note, layer)
    if layers is not None and seen_layers and (missing := sorted(set(layers) - seen_layers)):
        raise InvalidArgumentError(f"no recordings of layer(s) {missing}; there are {sorted(seen_layers)}")
    if not found:
        raise InvalidArgumentError(f"no recordings named like C4v8{'/'.join(AUDIO_SUFFIXES)} under {', '.join(map(str, folders))}")
    return [found[key] for key in sorted(found)]


def decode(path: Path, rate: int, seconds: float) -> np.ndarray:
    """The recording as 16-bit mono at `rate`, cut to `seconds` with a linear fade-out at the cut.

    Raises AudioError (an InvalidArgumentError naming the file) when it cannot be decoded."""
    audio = read_audio(path, rate=rate, mono=True)[0][0, : int(seconds * rate)].copy()
    if not audio.size:
        raise InvalidArgumentError(f"{path.name}: no audio")
    fade = int(FADE_SECONDS * rate)
    if len(audio) > fade:
        audio[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    """Split 0-127 among sorted values: each gets the keys nearer to it than to its neighbours."""
    return [(0 if i == 0 else (values[i - 1] + v) // 2 + 1, 127 if i == len(values) - 1 else (v + values[i + 1]) // 2)
            for i, v in enumerate(values)]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def _list(kind: bytes, *chunks: bytes) -> bytes:
    body = kind + b"".join(chunks)
    return b"LIST" + struct.pack("<I", len(body)) + body


def _text(value: str) -> bytes:
    """An INFO string: zero-terminated and padded to an even length (FluidSynth refuses odd ones)."""
    data = value.encode("ascii", "replace") + b"\0"
    return data + b"\0" * (len(data) % 2)


def _name20(value: str) -> bytes:
    return value.encode("ascii", "replace")[:19].ljust(20, b"\0")


def soundfont_bytes(recordings: Sequence[Recording], programs: Sequence[int], rate: int, seconds: float,
                    release_seconds: float, name: str, copyright_text: str = "") -> bytes:
    """The SoundFont 2 file's bytes (see the module's docstring)."""
    layers = sorted({r.layer for r in recordings})
    velocity = dict(zip(layers, [(i * 128 // len(layers), (i + 1) * 128 // len(layers) - 1)
                                 for i in range(len(layers))], strict=True))
    samples, shdr, zones, position = bytearray(), bytearray(), [], 0
    for layer in layers:
        notes = sorted((r for r in recordings if r.layer == layer), key=lambda r: r.note)
        keys = _ranges([r.note for r in notes])
        for recording, (low, high) in zip(notes, keys, strict=True):
            audio = decode(recording.path, rate, seconds)
            start, end = position, position + len(audio)
            samples += audio.tobytes() + b"\0" * (2 * _SAMPLE_GAP)
            position = end + _SAMPLE_GAP
            shdr += struct.pack("<20sIIIIIBbHH", _name20(recording.path.stem), start, end, start + 8, end - 8,
                                rate, recording.note, 0, 0, 1)  # 1: a mono sample, no loop used
            zones.append((low, high, *velocity[layer], len(shdr) // 46 - 1, recording.note))
    shdr += struct.pack("<20sIIIIIBbHH", _name20("EOS"), 0, 0, 0, 0, 0, 0, 0, 0, 0)

    # The instrument: a global zone (release time; with layers, the default velocity modulators at
    # zero: an instrument modulator like a default one replaces it), then a zone per sample.
    ibag, igen, imod = bytearray(struct.pack("<HH", 0, 0)), bytearray(), bytearray()
    igen += struct.pack("<Hh", _GEN_RELEASE_VOL_ENV, round(1200 * math.log2(release_seconds)))
    if len(layers) > 1:
        imod += struct.pack("<HHhHH", _SRC_VELOCITY_NEGATIVE_CONCAVE, _GEN_ATTENUATION, 0, 0, 0)
        imod += struct.pack("<HHhHH", _SRC_VELOCITY_NEGATIVE_CONCAVE, _GEN_FILTER_FC, 0, 0, 0)
    for key_low, key_high, vel_low, vel_high, sample_id, note in zones:
        ibag += struct.pack("<HH", len(igen) // 4, len(imod) // 10)
        igen += struct.pack("<HBB", _GEN_KEY_RANGE, key_low, key_high) + struct.pack("<HBB", _GEN_VEL_RANGE, vel_low, vel_high)
        igen += struct.pack("<Hh", _GEN_ROOT_KEY, note) + struct.pack("<HH", _GEN_SAMPLE_ID, sample_id)
    ibag += struct.pack("<HH", len(igen) // 4, len(imod) // 10)
    igen += b"\0" * 4
    imod += b"\0" * 10
    inst = struct.pack("<20sH", _name20(name), 0) + struct.pack("<20sH", _name20("EOI"), len(ibag) // 4 - 1)

    phdr, pbag, pgen = bytearray(), bytearray(), bytearray()
    for i, program in enumerate(programs):
        phdr += struct.pack("<20sHHHIII", _name20(f"{name[:15]} {program}"), program, 0, i, 0, 0, 0)
        pbag += struct.pack("<HH", len(pgen) // 4, 0)
        pgen += struct.pack("<HH", _GEN_INSTRUMENT, 0)
    phdr += struct.pack("<20sHHHIII", _name20("EOP"), 0, 0, len(programs), 0, 0, 0)
    pbag += struct.pack("<HH", len(pgen) // 4, 0)
    pgen += b"\0" * 4

    info = [_chunk(b"ifil", struct.pack("<HH", 2, 1)), _chunk(b"isng", b"EMU8000\0"), _chunk(b"INAM", _text(name))]
    if copyright_text:
        info.append(_chunk(b"ICOP", _text(copyright_text)))
    body = b"sfbk" + _list(b"INFO", *info) + _list(b"sdta", _chunk(b"smpl", bytes(samples))) + _list(
        b"pdta", _chunk(b"phdr", bytes(phdr)), _chunk(b"pbag", bytes(pbag)), _chunk(b"pmod", b"\0" * 10),
        _chunk(b"pgen", bytes(pgen)), _chunk(b"inst", inst), _chunk(b"ibag", bytes(ibag)),
        _chunk(b"imod", bytes(imod)), _chunk(b"igen", bytes(igen)), _chunk(b"shdr", bytes(shdr)))
    if len(body) >= 2**32 - 8:
        raise InvalidArgumentError(f"{len(body)} bytes: too large for one SoundFont 2 file; use fewer layers or seconds")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def build_soundfont(folders: Sequence[str | os.PathLike], out: str | os.PathLike, programs: Sequence[int] = (0, 1, 3),
                    layers: Sequence[int] | None = None, rate: int = 32000, seconds: float = 6.0,
                    release_seconds: float = 0.25, name: str = "Recorded instrument",
                    copyright_text: str = "") -> dict:
    """Write the SoundFont (temporary name, then renamed into place); returns what it holds."""
    if not programs or len(set(programs)) != len(programs) or not all(0 <= p <= 127 for p in programs):
        raise InvalidArgumentError(f"programs must be distinct General MIDI programs 0-127, got {list(programs)}")
    if not 8000 <= rate <= 96000:
        raise InvalidArgumentError(f"rate must be 8000-96000 Hz, got {rate}")
    if not (math.isfinite(seconds) and 0.5 <= seconds <= 60):
        raise InvalidArgumentError(f"seconds must be 0.5-60, got {seconds}")
    if not (math.isfinite(release_seconds) and 0.001 <= release_seconds <= 20):
        raise InvalidArgumentError(f"release must be 0.001-20 s, got {release_seconds}")
    recordings = find_recordings(folders, layers)
    data = soundfont_bytes(recordings, programs, rate, seconds, release_seconds, name, copyright_text)
    atomic_write_bytes(out, data)
    return {"out": str(out), "recordings": len(recordings), "layers": len({r.layer for r in recordings}),
            "programs": list(programs), "bytes": len(data)}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="folders holding recordings named like C4v8.ogg")
    parser.add_argument("--out", required=True, help="the .sf2 file to write")
    parser.add_argument("--programs", type=_ints, default=[0, 1, 3])
    parser.add_argument("--layers", type=_ints, default=None, help="layer numbers to keep (default: all)")
    parser.add_argument("--rate", type=int, default=32000)
    parser.add_argument("--seconds", type=float, default=6.0, help="each recording is cut to this long")
    parser.add_argument("--release", type=float, default=0.25, help="seconds a note takes to fade once released")
    parser.add_argument("--name", default="Recorded instrument")
    parser.add_argument("--copyright", default="", help="credit for the recordings, kept in the file")
    args = parser.parse_args(argv)
    try:
        summary = build_soundfont(args.folders, args.out, args.programs, args.layers, args.rate, args.seconds,
                                  args.release, args.name, args.copyright)
    except InvalidArgumentError as error:
        print(f"sampled: {error}", file=sys.stderr)
        return 2
    print(f"{summary['out']}: {summary['recordings']} recordings in {summary['layers']} layer(s), "
          f"programs {summary['programs']}, {summary['bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

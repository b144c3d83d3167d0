"""Folder layouts and metadata of the real datasets, so generated songs import like real ones.

MedleyDB:  <Song>/<Song>_MIX.wav, <Song>/<Song>_STEMS/<Song>_STEM_NN.wav, <Song>/<Song>_METADATA.yaml
           (no _RAW folder: a synthetic stem has no separate raw recordings; the metadata still
           names the single raw track of each stem, as MedleyDB does, under raw_dir).
Slakh:     TrackNNNNN/mix.flac, stems/SNN.flac, MIDI/SNN.mid, all_src.mid, metadata.yaml
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pretty_midi
import yaml

from services.common.audio import write_audio
from services.common.paths import atomic_dir, atomic_write_text

LAYOUTS = ("medleydb", "slakh")
SLAKH_PCM_BITS = 24
MEDLEYDB_METADATA_VERSION = 1.2

_MEDLEYDB_BY_PROGRAM = {
    **dict.fromkeys((0, 1, 3), "piano"), **dict.fromkeys((2, 4, 5, 7), "electric piano"), 6: "harpsichord",
    **dict.fromkeys((8, 9, 10), "glockenspiel"), 11: "vibraphone", 12: "marimba", 13: "xylophone",
    14: "chimes", 15: "yangqin", **dict.fromkeys(range(16, 21), "organ"), 21: "accordion", 22: "harmonica",
    23: "accordion", 24: "acoustic guitar", 25: "acoustic guitar", 26: "clean electric guitar",
    27: "clean electric guitar", 28: "clean electric guitar", 29: "distorted electric guitar",
    30: "distorted electric guitar", 31: "clean electric guitar", 32: "double bass",
    **dict.fromkeys(range(33, 38), "electric bass"), 38: "synthesizer", 39: "synthesizer",
    40: "violin", 41: "viola", 42: "cello", 43: "double bass", 44: "string section", 45: "string section",
    46: "harp", 47: "timpani", 48: "string section", 49: "string section", 50: "synthesizer",
    51: "synthesizer", 52: "choir", 53: "vocalists", 54: "synthesizer", 55: "fx/processed sound",
    56: "trumpet", 57: "trombone", 58: "tuba", 59: "trumpet", 60: "french horn", 61: "brass section",
    62: "synthesizer", 63: "synthesizer", 64: "soprano saxophone", 65: "alto saxophone",
    66: "tenor saxophone", 67: "baritone saxophone", 68: "oboe", 69: "oboe", 70: "bassoon", 71: "clarinet",
    72: "piccolo", 73: "flute", 74: "flute", 75: "flute", 76: "fx/processed sound", 77: "bamboo flute",
    78: "flute", 79: "flute", **dict.fromkeys(range(80, 96), "synthesizer"),
    **dict.fromkeys(range(96, 104), "fx/processed sound"), 104: "sitar", 105: "banjo", 106: "shamisen",
    107: "guzheng", 108: "kalimba", 109: "bagpipe", 110: "violin", 111: "oboe",
    **dict.fromkeys((112, 113, 114, 115, 116), "auxiliary percussion"), 117: "toms", 118: "drum machine",
    119: "cymbal", **dict.fromkeys(range(120, 128), "fx/processed sound"),
}  # fmt: skip
VOICE_LABELS = frozenset({"choir", "vocalists"})

# Slakh's inst_class: the General MIDI family of the program ("Strings (continued)" for 48-55).
_SLAKH_CLASSES = (
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Strings (continued)", "Brass",
    "Reed", "Pipe", "Synth Lead", "Synth Pad", "Sound Effects", "Ethnic", "Percussive", "Sound Effects",
)  # fmt: skip
SLAKH_DRUM_PROGRAM = 128


def medleydb_instrument(program: int, is_drum: bool) -> str:
    """MedleyDB's instrument label for a General MIDI program."""
    return "drum set" if is_drum else _MEDLEYDB_BY_PROGRAM[int(program)]


def slakh_inst_class(program: int, is_drum: bool) -> str:
    return "Drums" if is_drum else _SLAKH_CLASSES[int(program) // 8]


def gm_program_name(program: int, is_drum: bool) -> str:
    return "Drums" if is_drum else pretty_midi.program_to_instrument_name(int(program))


@dataclasses.dataclass
class StemInfo:
    """What the metadata says about one stem. `number` is 1-based for MedleyDB, 0-based for Slakh."""

    number: int
    program: int
    is_drum: bool
    part: str  # the part's name in the arrangement or the MIDI track name
    component: str = ""  # MedleyDB: "melody", "bass" or ""
    integrated_loudness_lufs: float = float("-inf")

    @property
    def instrument(self) -> str:
        return medleydb_instrument(self.program, self.is_drum)


def song_name(layout: str, number: int) -> str:
    """Folder name of song `number` (0-based) in a generated set."""
    if layout == "medleydb":
        return f"Synth_Song{number + 1:03d}"
    return f"Track{number + 1:05d}"


def safe_song_name(text: str) -> str:
    """A folder name made from free text (e.g. a MIDI file name): letters, digits, _ and -."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return name[:100] or "Song"


def stem_path(layout: str, name: str, number: int) -> str:
    """The stem's path relative to the song folder."""
    if layout == "medleydb":
        return f"{name}_STEMS/{name}_STEM_{number:02d}.wav"
    return f"stems/S{number:02d}.flac"


def mix_path(layout: str, name: str) -> str:
    return f"{name}_MIX.wav" if layout == "medleydb" else "mix.flac"


def metadata_path(layout: str, name: str) -> str:
    return f"{name}_METADATA.yaml" if layout == "medleydb" else "metadata.yaml"


def first_stem_number(layout: str) -> int:
    return 1 if layout == "medleydb" else 0


# ---------------------------------------------------------------------------------------------
# Metadata (pure)


def medleydb_metadata(
    name: str, title: str, stems: list[StemInfo], genre: str, artist: str, origin: str, excerpt: bool
) -> dict:
    """A MedleyDB <Song>_METADATA.yaml document (keys as in MedleyDB 1.x/2.0)."""
    return {
        "album": "stemlab synthetic multitracks",
        "artist": artist,
        "composer": [artist],
        "excerpt": excerpt,
        "genre": genre,
        "has_bleed": False,
        "instrumental": not any(s.instrument in VOICE_LABELS for s in stems),
        "mix_filename": mix_path("medleydb", name),
        "origin": origin,
        "producer": [artist],
        "raw_dir": f"{name}_RAW",
        "stem_dir": f"{name}_STEMS",
        "stems": {
            f"S{s.number:02d}": {
                "component": s.component,
                "filename": Path(stem_path("medleydb", name, s.number)).name,
                "instrument": s.instrument,
                "raw": {"R01": {"filename": f"{name}_RAW_{s.number:02d}_01.wav", "instrument": s.instrument}},
            }
            for s in stems
        },
        "title": title,
        "version": MEDLEYDB_METADATA_VERSION,
        "website": [],
    }


def slakh_metadata(uuid: str, stems: list[StemInfo], overall_gain: float, plugin_name: str) -> dict:
    """A Slakh2100 TrackNNNNN/metadata.yaml document.

    Stems keep their natural relative levels here, unlike Slakh's loudness-normalised ones, so
    `normalized` is false and `normalization_factor` is null; `overall_gain` is the one gain
    applied to every stem. `lmd_midi_dir` is null: the MIDI comes from no Lakh MIDI file.
    """
    return {
        "UUID": uuid,
        "audio_dir": "stems",
        "lmd_midi_dir": None,
        "midi_dir": "MIDI",
        "normalization_factor": None,
        "normalized": False,
        "overall_gain": float(overall_gain),
        "stems": {
            f"S{s.number:02d}": {
                "audio_rendered": True,
                "inst_class": slakh_inst_class(s.program, s.is_drum),
                "integrated_loudness": _yaml_float(s.integrated_loudness_lufs),
                "is_drum": s.is_drum,
                "midi_program_name": gm_program_name(s.program, s.is_drum),
                "midi_saved": True,
                "plugin_name": plugin_name,
                "program_num": SLAKH_DRUM_PROGRAM if s.is_drum else int(s.program),
            }
            for s in stems
        },
    }


def _yaml_float(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def synth_uuid(*identity: object) -> str:
    """A 32-hex-digit id (Slakh uses the Lakh MIDI file's MD5) derived from what made the song."""
    return hashlib.md5(repr(identity).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing a song folder


def write_song(
    layout: str,
    folder: Path,
    name: str,
    rate: int,
    stems: list[np.ndarray],
    mix: np.ndarray,
    metadata: dict,
    stem_midis: list[pretty_midi.PrettyMIDI] | None = None,
    full_midi: pretty_midi.PrettyMIDI | bytes | None = None,
) -> None:
    """Write one song into `folder` (which must not exist) in one step: it is assembled in a
    temporary folder beside it and renamed, so a stopped or crashed run leaves no half song.

    stems: (channels, samples) arrays in stem-number order; mix: their sum.
    stem_midis / full_midi: Slakh's MIDI/SNN.mid files and all_src.mid.
    """
    numbers = list(range(first_stem_number(layout), first_stem_number(layout) + len(stems)))
    with atomic_dir(folder) as temporary:
        if layout == "medleydb":
            (temporary / f"{name}_STEMS").mkdir()
            for number, stem in zip(numbers, stems, strict=True):
                write_audio(temporary / stem_path(layout, name, number), stem, rate, subtype="FLOAT")
            write_audio(temporary / mix_path(layout, name), mix, rate, subtype="FLOAT")
        else:
            (temporary / "stems").mkdir()
            (temporary / "MIDI").mkdir()
            for number, stem in zip(numbers, stems, strict=True):
                write_audio(
                    temporary / stem_path(layout, name, number), stem, rate, subtype=f"PCM_{SLAKH_PCM_BITS}"
                )
            write_audio(temporary / mix_path(layout, name), mix, rate, subtype=f"PCM_{SLAKH_PCM_BITS}")
            for number, midi in zip(numbers, stem_midis or [], strict=False):
                midi.write(str(temporary / "MIDI" / f"S{number:02d}.mid"))
            if isinstance(full_midi, bytes):
                (temporary / "all_src.mid").write_bytes(full_midi)
            elif full_midi is not None:
                full_midi.write(str(temporary / "all_src.mid"))
        atomic_write_text(
            temporary / metadata_path(layout, name),
            yaml.safe_dump(metadata, sort_keys=True, default_flow_style=False, allow_unicode=True),
        )

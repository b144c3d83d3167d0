"""Tiny hand-made dataset folders (MedleyDB, Slakh, stem folders) for the ingestion tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

RATE = 8000


def tone(seconds: float, hz: float, rate: int = RATE, level: float = 0.3, channels: int = 2,
         seed: int = 0) -> np.ndarray:
    """A decaying, note-like harmonic tone, (channels, samples)."""
    t = np.arange(int(seconds * rate)) / rate
    note = sum(np.sin(2 * np.pi * hz * k * t) / k for k in (1, 2, 3))
    env = np.exp(-3 * (t % 0.5))
    x = level * note * env / 1.8
    return np.tile(x, (channels, 1)).astype(np.float32)


def drums(seconds: float, rate: int = RATE, level: float = 0.4, channels: int = 2, seed: int = 0) -> np.ndarray:
    """Noise bursts every quarter second: flat, percussive spectrum."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    x = rng.standard_normal(n) * 0.3
    t = np.arange(n) / rate
    x *= np.exp(-30 * (t % 0.25))
    return np.tile(level * x / max(1e-9, np.abs(x).max()), (channels, 1)).astype(np.float32)


def write(path: Path, audio: np.ndarray, rate: int = RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "VORBIS" if path.suffix == ".ogg" else "PCM_16"
    sf.write(str(path), audio.T, rate, subtype=subtype)
    return path


def make_medleydb(root: Path, songs: int = 2, seconds: float = 2.0, separate_metadata: bool = False) -> Path:
    """<root>/<Song>/<Song>_STEMS/<Song>_STEM_NN.wav, <Song>_MIX.wav and metadata YAML."""
    for i in range(1, songs + 1):
        song = f"Artist{i}_Song{i}"
        d = root / "Audio" / song if separate_metadata else root / song
        parts = {
            "S01": (["clean electric guitar"], tone(seconds, 220, seed=i)),
            "S02": (["electric bass"], tone(seconds, 55, seed=i)),
            "S03": (["drum set"], drums(seconds, seed=i)),
            "S04": (["piano", "tack piano"] if i == 2 else ["piano"], tone(seconds, 440, seed=i)),
        }
        stems = {}
        mix = np.zeros_like(parts["S01"][1])
        for key, (inst, audio) in parts.items():
            name = f"{song}_STEM_{key[1:]}.wav"
            write(d / f"{song}_STEMS" / name, audio)
            mix += audio
            stems[key] = {"component": "", "filename": name, "instrument": inst if len(inst) > 1 else inst[0]}
        write(d / f"{song}_MIX.wav", mix)
        meta = {"artist": f"Artist{i}", "title": f"Song {i}", "genre": "Rock", "has_bleed": "no",
                "mix_filename": f"{song}_MIX.wav", "stem_dir": f"{song}_STEMS", "stems": stems}
        meta_dir = root / "Metadata" if separate_metadata else d
        meta_dir.mkdir(parents=True, exist_ok=True)
        (meta_dir / f"{song}_METADATA.yaml").write_text(yaml.safe_dump(meta))
    return root


def make_slakh(root: Path, tracks: int = 2, seconds: float = 2.0) -> Path:
    """<root>/TrackNNNNN/{metadata.yaml, stems/SNN.flac, mix.flac}."""
    for i in range(1, tracks + 1):
        d = root / "train" / f"Track{i:05d}"
        stems = {
            "S00": {"program_num": 0, "is_drum": False, "inst_class": "Piano",
                    "midi_program_name": "Acoustic Grand Piano", "audio_rendered": True},
            "S01": {"program_num": 29, "is_drum": False, "inst_class": "Guitar",
                    "midi_program_name": "Overdriven Guitar", "audio_rendered": True},
            "S02": {"program_num": 0, "is_drum": True, "inst_class": "Drums",
                    "midi_program_name": "Acoustic Grand Piano", "audio_rendered": True},
            "S03": {"program_num": 48, "is_drum": False, "inst_class": "Strings (continued)",
                    "midi_program_name": "String Ensemble 1", "audio_rendered": False},
        }
        # Each track sounds its own (the importer recognises the same audio from a second place).
        audio = {"S00": tone(seconds, 440 + i), "S01": tone(seconds, 196 + i), "S02": drums(seconds, seed=i)}
        for key, a in audio.items():
            write(d / "stems" / f"{key}.flac", a)
        write(d / "mix.flac", sum(audio.values()) / 2)
        (d / "metadata.yaml").write_text(yaml.safe_dump({"audio_dir": "stems", "stems": stems}))
    return root

"""Helpers for the processing tests: small libraries written straight through services.common.library.

(Named test_processing_* so it sits with the processing tests; it holds no tests itself.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from services.common.library import Library, Stem, Track


def sine(freq_hz: float, seconds: float, rate_hz: int, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate_hz))) / rate_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t + phase)).astype(np.float32)


def write_stem(path: Path, audio: np.ndarray, rate_hz: int) -> None:
    """audio: (samples,) or (channels, samples)."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        audio = audio[np.newaxis]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio.T, rate_hz, subtype="FLOAT")


def make_track(data_root: Path, track_id: str, stems: dict[str, tuple[str, np.ndarray]], rate_hz: int = 22050,
               source: str = "synthetic", marks: dict[str, list[str]] | None = None) -> Track:
    """A library track from {file name: (class, audio)}; marks: {instrument: [mark, ...]}."""
    library = Library(data_root)
    folder = library.track_dir(track_id)
    stem_list = []
    longest = 0
    channels = 1
    for name, (cls, audio) in stems.items():
        write_stem(folder / "stems" / name, audio, rate_hz)
        audio = np.asarray(audio)
        longest = max(longest, audio.shape[-1])
        channels = max(channels, 1 if audio.ndim == 1 else audio.shape[0])
        stem_list.append(Stem(file=f"stems/{name}", raw_instrument=cls or "unknown", cls=cls))
    track = Track(id=track_id, source=source, title=track_id, rate=rate_hz, channels=channels,
                  duration_seconds=longest / rate_hz, stems=stem_list)
    for instrument, names in (marks or {}).items():
        for mark in names:
            track.set_mark(instrument, mark)
    library.save(track)
    return track


def read(path: Path) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and the rate."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio.T, rate

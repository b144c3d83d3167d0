"""Small synthetic datasets for the evaluation tests: a few seconds of tones and noise per track."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.common.audio import write_audio
from services.common.manifest import Manifest, Pair, publish_manifest
from services.common.paths import DataRoot

RATE_HZ = 22050


def track_signals(seed: int, seconds: float = 3.0, rate_hz: int = RATE_HZ) -> tuple[np.ndarray, np.ndarray]:
    """(instrument, rest), (samples,) float32: a harmonic tone with vibrato and a noisy rhythmic rest."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    f0 = 196.0 * 2 ** (seed % 5 / 12)
    phase = 2 * np.pi * f0 * t + 0.3 * np.sin(2 * np.pi * 5 * t)
    instrument = sum(0.2 / k * np.sin(k * phase) for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    clicks = (np.sin(2 * np.pi * 2 * t) > 0.95).astype(float)
    rest = 0.08 * rng.standard_normal(len(t)) * (0.3 + clicks) + 0.1 * np.sin(2 * np.pi * 55 * t)
    return instrument.astype(np.float32), rest.astype(np.float32)


def make_dataset(data_root: Path, name: str = "evalset", tracks: dict | None = None,
                 split: str = "validation", seconds: float = 3.0) -> tuple[Path, dict]:
    """Write tracks under mixes/ and publish a manifest. tracks: {name: (instrument, rest)} or None
    for three default tracks. Returns (manifest path, tracks)."""
    data = DataRoot(data_root).ensure()
    if tracks is None:
        tracks = {f"Song{i:02d}": track_signals(i, seconds) for i in range(3)}
    pairs = []
    for track, (instrument, rest) in tracks.items():
        folder = data.mixes / "guitar" / str(RATE_HZ) / track
        folder.mkdir(parents=True, exist_ok=True)
        write_audio(folder / "instrument.wav", instrument[np.newaxis], RATE_HZ)
        write_audio(folder / "rest.wav", rest[np.newaxis], RATE_HZ)
        pairs.append(Pair(track=track, source="synthetic", split=split,
                          instrument=data.relative(folder / "instrument.wav"), rest=data.relative(folder / "rest.wav"),
                          seconds=len(instrument) / RATE_HZ))
    manifest = Manifest(name=name, version=0, instrument="guitar", rate=RATE_HZ, channels=1, created="",
                        code_version="test", params={}, sources={"synthetic": 1.0}, pairs=pairs)
    path, _ = publish_manifest(data, manifest)
    return path, tracks


def write_estimates(folder: Path, estimates: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Path:
    for track, (instrument, rest) in estimates.items():
        (folder / track).mkdir(parents=True, exist_ok=True)
        write_audio(folder / track / "instrument.wav", np.asarray(instrument)[np.newaxis], RATE_HZ)
        if rest is not None:
            write_audio(folder / track / "rest.wav", np.asarray(rest)[np.newaxis], RATE_HZ)
    return folder

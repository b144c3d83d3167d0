"""Training data made in the test: a data root with harmonic 'instrument' and drum-like 'rest'
tracks and a manifest naming them, and the small settings the training tests train with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from services.common.manifest import Manifest, Pair

RATE = 22050
# Small and quick: 8 steps of 8 chunks per epoch with the tiny preset.
FAST = {"preset": "tiny", "steps_per_epoch": 8, "batch_size": 8, "seed": 3, "patience": 20}


def _instrument(rng, seconds):
    """A harmonic 'instrument': notes of random pitch with 5 harmonics, changing every 0.25 s."""
    t = np.arange(int(seconds * RATE)) / RATE
    out = np.zeros_like(t)
    note = int(0.25 * RATE)
    for start in range(0, t.size, note):
        f0 = rng.uniform(200, 800)
        seg = t[start : start + note]
        out[start : start + note] = sum(np.sin(2 * np.pi * f0 * k * seg) / k for k in range(1, 6))
    return (0.2 * out).astype(np.float32)


def _rest(rng, seconds):
    """A noisy, drum-like 'rest': decaying noise bursts every 0.2 s."""
    n = int(seconds * RATE)
    out = np.zeros(n)
    for start in range(0, n, int(0.2 * RATE)):
        burst = rng.standard_normal(min(3000, n - start)) * np.exp(-np.arange(min(3000, n - start)) / 600)
        out[start : start + burst.size] += burst
    return (0.2 * out).astype(np.float32)


def make_dataset(root: Path, tracks=8, validation=2, seconds=3.0, sources=None) -> Path:
    """A data root with tracks written as wav and a manifest naming them; returns the manifest path."""
    rng = np.random.default_rng(11)
    pairs = []
    for i in range(tracks):
        name = f"Synth_{i:02d}"
        folder = root / "mixes" / "guitar" / str(RATE) / name
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / "instrument.wav", _instrument(rng, seconds), RATE, subtype="FLOAT")
        sf.write(folder / "rest.wav", _rest(rng, seconds), RATE, subtype="FLOAT")
        source = "synthetic" if i % 2 == 0 else "solo"
        pairs.append(Pair(track=name, source=source, split="validation" if i < validation else "train",
                          instrument=f"mixes/guitar/{RATE}/{name}/instrument.wav",
                          rest=f"mixes/guitar/{RATE}/{name}/rest.wav", seconds=seconds))
    manifest = Manifest(name="synth", version=1, instrument="guitar", rate=RATE, channels=1, created="",
                        code_version="test", params={}, sources=sources or {"synthetic": 1.0, "solo": 1.0}, pairs=pairs)
    manifest.checksum = manifest.compute_checksum()
    path = root / "datasets" / "synth" / "v1" / "manifest.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(manifest.to_yaml())
    return path

"""Waveform pictures of a separation: mix, instrument and rest one above the other (PNG).

The envelope (per-column minimum and maximum) is computed on arrays, so a long song is drawn
from a few thousand numbers per row instead of millions of samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.common.paths import atomic_path


def envelope(audio: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest sample of each of `columns` equal stretches, over all channels.

    audio: (channels, samples). Returns two float32 arrays of shape (min(columns, samples),).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    samples = audio.shape[1]
    if samples == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    columns = max(1, min(int(columns), samples))
    edges = np.linspace(0, samples, columns + 1).astype(np.int64)
    lows = np.minimum.reduceat(audio.min(axis=0), edges[:-1])
    highs = np.maximum.reduceat(audio.max(axis=0), edges[:-1])
    return lows.astype(np.float32), highs.astype(np.float32)


def draw_waveforms(path: Path, rows: list[tuple[str, np.ndarray]], rate: int, columns: int = 1600) -> Path:
    """Write a PNG with one waveform row per (title, audio (channels, samples)) at `rate` Hz."""
    # Figure without pyplot: no global state, so separations in parallel threads can draw at once.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"mix": "#555555", "instrument": "#d9480f", "rest": "#1c7ed6"}
    figure = Figure(figsize=(12, 1.6 * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 1, sharex=True, squeeze=False)
    for axis, (title, audio) in zip(axes[:, 0], rows, strict=True):
        lows, highs = envelope(audio, columns)
        seconds = np.linspace(0, np.asarray(audio).shape[-1] / rate, len(lows))
        axis.fill_between(seconds, lows, highs, color=colours.get(title, "#333333"), linewidth=0)
        axis.set_ylim(-1.05, 1.05)
        axis.set_ylabel(title)
        axis.set_yticks([])
        axis.margins(x=0)
        for side in ("top", "right"):
            axis.spines[side].set_visible(False)
    axes[-1, 0].set_xlabel("seconds")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    return path

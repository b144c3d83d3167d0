"""The two windows of separation, in numpy only (no TensorFlow), so every side uses the same numbers.

- `hann`: the STFT window (model/spectral.py in TensorFlow, its keras.ops twin in
  research/thesis_gpu/features.py, and librosa's "hann" in the evaluation baselines, which is the
  same array).
- `triangle`: the cross-fade of overlapping pieces — the network's chunks of frames inside the
  SavedModel (model/separate.py) and the client's 10 s segments of a song (services/serving/client.py).
  docs/architecture.md ("Two overlap-add layers") says why there are two layers.
"""

from __future__ import annotations

import numpy as np


def hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window, (n_fft,) float32: 0.5 - 0.5 cos(2 pi n / n_fft), as librosa and scipy
    use for an STFT (fftbins=True)."""
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


def triangle(length: int) -> np.ndarray:
    """Triangular weights (length,) float32, peak 1, positive everywhere, so every position has a
    nonzero weight sum.

    Neighbouring pieces cross-fade linearly where they overlap; the borders, where a network sees
    the least context, get the least weight.
    """
    ramp = np.arange(1, length + 1, dtype=np.float64)
    return np.minimum(ramp, ramp[::-1]).astype(np.float32) / np.float32((length + 1) / 2)

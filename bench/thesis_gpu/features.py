"""Chunk features and training loss in keras.ops, for a trainer on any Keras backend.

The training service computes these in TensorFlow (services/training/data.chunk_features,
model/loss.masked_l1_per_chunk); a GPU machine without TensorFlow trains under JAX with these
instead. tests/test_thesis_gpu.py holds them equal to the TensorFlow ones.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from model.config import ModelConfig


def _frames(config: ModelConfig) -> np.ndarray:
    """Sample indices of each uncentred STFT frame of one segment: (chunk_frames, n_fft)."""
    return np.arange(config.chunk_frames)[:, None] * config.hop_length + np.arange(config.n_fft)[None, :]


def _window(config: ModelConfig) -> np.ndarray:
    """Periodic Hann, as model/spectral uses."""
    n = np.arange(config.n_fft)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.n_fft)).astype(np.float32)


def _rows(values):
    """(batch, frames, bins) -> (batch, bins - 1, frames, 1): DC dropped, frequency first."""
    return ops.expand_dims(ops.transpose(values[:, :, 1:], (0, 2, 1)), -1)


def chunk_features(instrument, rest, config: ModelConfig, phase_sensitive: bool = False):
    """Network input and target for segments (batch, segment_samples), as data.chunk_features."""
    frames, window = _frames(config), _window(config)

    def spectrum(signal):
        return ops.rfft(ops.take(signal, frames, axis=1) * window)

    mix_real, mix_imag = spectrum(instrument + rest)
    real, imag = spectrum(instrument)
    mix_magnitude = ops.sqrt(mix_real**2 + mix_imag**2)
    if phase_sensitive:
        projection = real * mix_real + imag * mix_imag
        silent = mix_magnitude == 0
        target = ops.where(silent, 0.0, projection / ops.where(silent, 1.0, mix_magnitude))
    else:
        target = ops.sqrt(real**2 + imag**2)
    return _rows(mix_magnitude), _rows(target)


def loss_per_chunk(mix_rows, target_rows, mask, eps: float, peak_power: float = 0.0, error_power: float = 1.0):
    """model/loss.masked_l1_per_chunk in keras.ops: (batch,) errors in units of each mix chunk's peak."""
    peak = ops.max(mix_rows, axis=(1, 2, 3), keepdims=True) + eps
    difference = ops.abs(target_rows / peak - mask * (mix_rows / peak))
    if error_power != 1.0:
        difference = difference**error_power
    error = ops.mean(difference, axis=(1, 2, 3))
    if peak_power:
        error = error * ops.reshape(peak, (-1,)) ** (peak_power * error_power)
    return error

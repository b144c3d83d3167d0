"""Chunk features and training loss in keras.ops, for a trainer on any Keras backend: the twin of
the TensorFlow ones (same window, model/windows.hann), held equal by tests/test_thesis_gpu.py.

The training service computes these in TensorFlow (services/training/data.chunk_features,
model/loss.masked_l1_per_chunk); a GPU machine without TensorFlow trains under JAX with these
instead.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from model.config import ModelConfig
from model.windows import hann


def _frames(config: ModelConfig) -> np.ndarray:
    """Sample indices of each uncentred STFT frame of one segment: (chunk_frames, n_fft)."""
    return np.arange(config.chunk_frames)[:, None] * config.hop_length + np.arange(config.n_fft)[None, :]


def _rows(values):
    """(batch, frames, bins) -> (batch, bins - 1, frames, 1): DC dropped, frequency first."""
    return ops.expand_dims(ops.transpose(values[:, :, 1:], (0, 2, 1)), -1)


def equalise(segments, eq_params, config: ModelConfig, eq_db: float):
    """sampling.ChunkSampler.draw's equaliser on the device: `segments` (batch, segment_samples)
    filtered by the curves of `eq_params` (batch, sampling.EQ_PARAMETERS), as sampling.equalise and
    sampling.eq_curve_db do in numpy (tests/test_thesis_gpu.py holds them equal). A GPU trainer
    draws unequalised chunks (ChunkSampler.draw_unequalised) and filters them here: the numpy FFTs
    held a piano run on a GPU to a fifth of the guitar's chunks per second."""
    frequencies = np.fft.rfftfreq(config.segment_samples, 1.0 / config.rate_hz)
    octaves = ops.convert_to_tensor(np.log2(np.maximum(frequencies, 20.0) / 1000.0).astype(np.float32))[None, :]
    p = ops.cast(eq_params, "float32")

    def column(i):
        return p[:, i : i + 1]

    curve = column(0) * octaves
    for bell in (1, 4):
        gain, centre, width = column(bell), column(bell + 1), column(bell + 2)
        curve = curve + gain * ops.exp(-0.5 * ((octaves - centre) / (width / 2.0)) ** 2)
    curve = ops.clip(curve - column(8) * ops.maximum(octaves - column(7), 0.0), -60.0, eq_db)
    gain = 10.0 ** (curve / 20.0)
    real, imag = ops.rfft(segments)
    return ops.irfft((real * gain, imag * gain), fft_length=config.segment_samples)


def chunk_features(instrument, rest, config: ModelConfig, phase_sensitive: bool = False):
    """Network input and target for segments (batch, segment_samples), as data.chunk_features."""
    frames, window = _frames(config), hann(config.n_fft)

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

"""The spectral front end: STFT, magnitudes, network rows and the exact inverse, in TensorFlow only.

Written once and used by the training pipeline, the separation graph and the SavedModel, so a
spectrogram always means the same thing. Centring follows librosa (reflect padding of n_fft // 2),
and the inverse divides by the actual window overlap, so it reconstructs the input exactly, edges
included.
"""

from __future__ import annotations

import tensorflow as tf

from model.config import ModelConfig
from model.windows import hann


def _window(config: ModelConfig) -> tf.Tensor:
    """Periodic Hann window, (n_fft,): model/windows.hann, the same array librosa uses."""
    return tf.constant(hann(config.n_fft))


def stft(waveform: tf.Tensor, config: ModelConfig, center: bool = True) -> tf.Tensor:
    """Complex STFT.

    waveform: (batch, samples) float32. With `center`, it is reflect-padded by n_fft // 2 on both
    sides (it must then be longer than n_fft // 2 samples).
    Returns (batch, frames, n_fft // 2 + 1) complex64; frames = 1 + samples // hop_length when
    centred, 1 + (samples - n_fft) // hop_length otherwise.
    """
    waveform = tf.convert_to_tensor(waveform, tf.float32)
    if center:
        pad = config.n_fft // 2
        waveform = tf.pad(waveform, [[0, 0], [pad, pad]], mode="REFLECT")
    frames = tf.signal.frame(waveform, config.n_fft, config.hop_length, pad_end=False)
    return tf.signal.rfft(frames * _window(config), fft_length=[config.n_fft])


def istft(spectrum: tf.Tensor, config: ModelConfig, length: tf.Tensor | int) -> tf.Tensor:
    """Inverse of the centred `stft`, returning exactly `length` samples.

    spectrum: (batch, frames, n_fft // 2 + 1) complex64. Returns (batch, length) float32.
    Overlap-add is divided by the summed squared window where frames actually overlap (not by the
    steady-state sum), so the first and last samples come back exactly too.
    """
    window = _window(config)
    frames = tf.signal.irfft(spectrum, fft_length=[config.n_fft]) * window
    signal = tf.signal.overlap_and_add(frames, config.hop_length)
    n_frames = tf.shape(spectrum)[1]
    window_sum = tf.signal.overlap_and_add(
        tf.tile(tf.expand_dims(tf.square(window), 0), [n_frames, 1]), config.hop_length
    )
    signal = signal / tf.where(window_sum > 1e-10, window_sum, tf.ones_like(window_sum))
    pad = config.n_fft // 2
    length = tf.cast(length, tf.int32)
    # Centred frames always cover the input; pad only guards odd callers passing a larger length.
    short = tf.maximum(0, pad + length - tf.shape(signal)[1])
    signal = tf.pad(signal, [[0, 0], [0, short]])
    return signal[:, pad : pad + length]


def magnitude(spectrum: tf.Tensor) -> tf.Tensor:
    """|spectrum|, same shape, float32."""
    return tf.abs(spectrum)


def to_network_rows(magnitudes: tf.Tensor) -> tf.Tensor:
    """(batch, frames, n_fft // 2 + 1) -> (batch, n_fft // 2, frames, 1): DC dropped, frequency first."""
    rows = tf.transpose(magnitudes[:, :, 1:], [0, 2, 1])
    return tf.expand_dims(rows, -1)


def from_network_rows(mask_rows: tf.Tensor) -> tf.Tensor:
    """(batch, n_fft // 2, frames, 1) -> (batch, frames, n_fft // 2 + 1), with a 0 mask at DC."""
    mask = tf.transpose(tf.squeeze(mask_rows, -1), [0, 2, 1])
    return tf.pad(mask, [[0, 0], [0, 0], [1, 0]])


def chunk_peak(magnitude_rows: tf.Tensor, eps: float) -> tf.Tensor:
    """Per-chunk normaliser: peak of each chunk + eps, (batch, rows, frames, 1) -> (batch, 1, 1, 1).

    The network divides its input by this, and the loss divides the target by the same number, so
    every chunk counts alike whatever its loudness (the thesis' normalisation).
    """
    return tf.reduce_max(magnitude_rows, axis=[1, 2, 3], keepdims=True) + eps

"""Training loss: L1 between the target magnitude and the masked mix magnitude."""

from __future__ import annotations

import tensorflow as tf

from model.spectral import chunk_peak


def masked_l1_per_chunk(mix_rows: tf.Tensor, target_rows: tf.Tensor, mask: tf.Tensor, eps: float,
                        peak_power: float = 0.0) -> tf.Tensor:
    """Mean |target - mask * mix| per chunk, in units of the mix chunk's peak, times peak ** peak_power.

    mix_rows, target_rows, mask: (batch, rows, frames, 1). Returns (batch,).
    Both magnitudes are divided by the mix chunk's peak (+eps), the number the network divided its
    input by. With peak_power 0 a quiet chunk weighs as much as a loud one (the thesis'
    normalisation); with 1 the loss is the plain L1 of the magnitudes, where loud chunks weigh
    more, as they do in a whole-track SDR. The thesis code summed; the mean has the same optimum
    and a learning rate that does not depend on chunk size (Adam does not mind the scale either).
    """
    peak = chunk_peak(mix_rows, eps)
    error = tf.reduce_mean(tf.abs(target_rows / peak - mask * (mix_rows / peak)), axis=[1, 2, 3])
    if peak_power:
        error = error * tf.pow(tf.reshape(peak, [-1]), peak_power)
    return error


def masked_l1(mix_rows: tf.Tensor, target_rows: tf.Tensor, mask: tf.Tensor, eps: float) -> tf.Tensor:
    """Scalar mean of `masked_l1_per_chunk` over the batch (the thesis' weighting)."""
    return tf.reduce_mean(masked_l1_per_chunk(mix_rows, target_rows, mask, eps))

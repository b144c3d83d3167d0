"""Training loss: L1 (or squared) error between the target and the masked mix magnitude.

The target is the instrument's magnitude, or with `loss_phase_sensitive` its part in phase with
the mix (services/training/data.chunk_features); the loss does not need to know which.
"""

from __future__ import annotations

import tensorflow as tf

from model.spectral import chunk_peak


def masked_l1_per_chunk(mix_rows: tf.Tensor, target_rows: tf.Tensor, mask: tf.Tensor, eps: float,
                        peak_power: float = 0.0, error_power: float = 1.0) -> tf.Tensor:
    """Mean |target - mask * mix| per chunk, in units of the mix chunk's peak, times peak ** peak_power.

    mix_rows, target_rows, mask: (batch, rows, frames, 1). Returns (batch,).
    Both magnitudes are divided by the mix chunk's peak (+eps), the number the network divided its
    input by. With peak_power 0 a quiet chunk weighs as much as a loud one (the thesis'
    normalisation); with 1 the loss is the plain L1 of the magnitudes, where loud chunks weigh
    more, as they do in a whole-track SDR. The thesis code summed; the mean has the same optimum
    and a learning rate that does not depend on chunk size (Adam does not mind the scale either).
    `error_power` 2 squares each bin's error instead (mean |.|^2, times peak ** (2 * peak_power)), so
    a loud bin of the rest let through weighs as it does in an energy ratio like SDR.
    """
    peak = chunk_peak(mix_rows, eps)
    difference = tf.abs(target_rows / peak - mask * (mix_rows / peak))
    if error_power != 1.0:
        difference = tf.pow(difference, error_power)
    error = tf.reduce_mean(difference, axis=[1, 2, 3])
    if peak_power:
        error = error * tf.pow(tf.reshape(peak, [-1]), peak_power * error_power)
    return error


def masked_l1(mix_rows: tf.Tensor, target_rows: tf.Tensor, mask: tf.Tensor, eps: float) -> tf.Tensor:
    """Scalar mean of `masked_l1_per_chunk` over the batch (the thesis' weighting)."""
    return tf.reduce_mean(masked_l1_per_chunk(mix_rows, target_rows, mask, eps))

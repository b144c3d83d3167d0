"""Separation of a waveform with a mask network: STFT, overlapping chunks, cross-faded mask, inverse.

Chunks overlap (config.chunk_overlap) and their masks are blended with a triangular weight, so the
mask does not jump at chunk borders (the thesis' clicks every 1.1 s). The instrument gets the mix
phase; rest = mix - instrument in the time domain, so the two always sum to the input exactly.
Several networks (an ensemble of runs trained apart) each give a mask; their mean is applied, so
the instrument is the mean of the instruments each would give alone.
Pure TensorFlow: the same code runs eagerly, in training and inside the exported SavedModel.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from model.config import ModelConfig
from model.spectral import from_network_rows, istft, magnitude, stft, to_network_rows
from model.windows import triangle


def crossfade_weights(config: ModelConfig) -> tf.Tensor:
    """Triangular weight over a chunk's frames, (chunk_frames,), never zero (edges still count):
    model/windows.triangle, the window the client cross-fades its segments with too."""
    return tf.constant(triangle(config.chunk_frames))


def _network_in_batches(network: keras.Model, chunks: tf.Tensor, batch: int) -> tf.Tensor:
    """network(chunks) in groups of `batch`, so long songs do not need all activations at once.

    chunks: (n, rows, chunk_frames, 1) -> masks of the same shape.
    """
    count = tf.shape(chunks)[0]
    groups = (count + batch - 1) // batch
    outputs = tf.TensorArray(tf.float32, size=groups, infer_shape=False, element_shape=tf.TensorShape(None))
    for g in tf.range(groups):
        outputs = outputs.write(g, network(chunks[g * batch : (g + 1) * batch], training=False))
    masks = outputs.concat()
    return tf.reshape(masks, tf.shape(chunks))


def spectrogram_mask(network: keras.Model, mix_magnitude: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """Instrument mask for a whole spectrogram.

    mix_magnitude: (batch, frames, n_fft // 2 + 1). Returns the mask, same shape, in [0, 1], 0 at DC.
    Frames are zero-padded up to the chunk grid; every frame is covered by one chunk or more and
    its mask is the weighted mean of those chunks' masks.
    """
    rows = tf.squeeze(to_network_rows(mix_magnitude), -1)  # (batch, rows, frames)
    size, step = config.chunk_frames, config.chunk_step_frames
    n_frames = tf.shape(rows)[2]
    n_chunks = 1 + (tf.maximum(n_frames - size, 0) + step - 1) // step
    padded_frames = (n_chunks - 1) * step + size
    rows = tf.pad(rows, [[0, 0], [0, 0], [0, padded_frames - n_frames]])
    chunks = tf.signal.frame(rows, size, step, axis=-1)  # (batch, rows, n_chunks, size)
    batch = tf.shape(chunks)[0]
    flat = tf.reshape(tf.transpose(chunks, [0, 2, 1, 3]), [-1, config.freq_rows, size, 1])

    masks = _network_in_batches(network, flat, config.inference_batch)
    masks = tf.transpose(tf.reshape(masks, [batch, n_chunks, config.freq_rows, size]), [0, 2, 1, 3])

    weights = crossfade_weights(config)
    blended = tf.signal.overlap_and_add(masks * weights, step)  # (batch, rows, padded_frames)
    weight_sum = tf.signal.overlap_and_add(tf.tile(weights[tf.newaxis], [n_chunks, 1]), step)
    mask_rows = (blended / weight_sum)[:, :, :n_frames]
    return from_network_rows(mask_rows[..., tf.newaxis])


def model_mask(networks: Sequence[keras.Model], mix_magnitude: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """A model's mask: the mean of its networks' masks, each shaped by config.mask_exponent first
    (as each member was chosen alone)."""
    masks = []
    for member in networks:
        mask = spectrogram_mask(member, mix_magnitude, config)
        masks.append(tf.pow(mask, config.mask_exponent) if config.mask_exponent != 1.0 else mask)
    return masks[0] if len(masks) == 1 else tf.add_n(masks) / float(len(masks))


def separate_waveform(network: keras.Model | Sequence[keras.Model], waveform: tf.Tensor,
                      config: ModelConfig,
                      excluded: tuple[Sequence[keras.Model], ModelConfig] | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Split mono waveforms at config.rate_hz into (instrument, rest).

    network: one network, or several (an ensemble) sharing config's spectrogram and chunks.
    waveform: (batch, samples) float32; channels of a stereo file travel as batch rows.
    excluded: another instrument's model (its networks, applied with its config; same spectrogram):
    in the bins where that model's mask is the larger, the instrument keeps only what that mask
    leaves, mask * (1 - other mask) — e.g. the guitar model leaves alone what the piano model
    claims more surely than it does.
    Returns instrument, rest: (batch, samples) each, with instrument + rest == waveform.
    """
    networks = list(network) if isinstance(network, Sequence) else [network]
    waveform = tf.convert_to_tensor(waveform, tf.float32)
    length = tf.shape(waveform)[1]
    # Reflect padding needs more than n_fft // 2 samples; very short inputs get trailing zeros.
    padded = tf.pad(waveform, [[0, 0], [0, tf.maximum(0, config.n_fft - length)]])
    spectrum = stft(padded, config)
    mix_magnitude = magnitude(spectrum)
    mask = model_mask(networks, mix_magnitude, config)
    if excluded is not None:
        other = model_mask(excluded[0], mix_magnitude, excluded[1])
        # Only where the other model is the surer: taken out wherever it was above zero, a loud
        # guitar lost the part the piano model half-claimed (docs/experiments/46, 47).
        mask = mask * (1.0 - tf.where(other > mask, other, tf.zeros_like(other)))
    instrument = istft(spectrum * tf.cast(mask, tf.complex64), config, tf.shape(padded)[1])[:, :length]
    return instrument, waveform - instrument

"""The stacked-hourglass mask network (one hourglass, as in the thesis), as a Keras 3 functional model.

Input: mix magnitude chunks (batch, freq_rows, chunk_frames, 1), linear (no log).
Output: a mask in [0, 1] of the same shape. The sigmoid bound is part of the model, so training
and inference see the same mask (the thesis trained unbounded and clipped at inference).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from model.config import ModelConfig


class PeakNormalise(layers.Layer):
    """Divides each chunk by its peak magnitude (+eps): (batch, rows, frames, 1) -> same shape.

    Inside the model so no caller can forget it; the mask it leads to is scale-free.
    """

    def __init__(self, eps: float, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def call(self, magnitude_rows):
        peak = ops.max(magnitude_rows, axis=(1, 2, 3), keepdims=True)
        return magnitude_rows / (peak + self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


class LogCompress(layers.Layer):
    """log1p(k * x) / log1p(k): maps 0..1 onto 0..1 while lifting quiet values (k > 0)."""

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x):
        return ops.log1p(self.scale * x) / ops.log1p(self.scale)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def _conv_block(x, filters: int, kernel: int, dropout: float, name: str, momentum: float, batch_norm: bool = True):
    """Conv (with bias, as the thesis counted it) -> batch norm -> ReLU -> dropout."""
    x = layers.Conv2D(filters, kernel, padding="same", name=f"{name}_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_drop")(x)
    return x


def _hourglass(x, depth: int, filters: int, dropout: float, name: str, momentum: float, skip_kernel: int,
               batch_norm: bool = True):
    """One hourglass level and everything below it: (b, h, w, c) -> (b, h, w, filters).

    skip = conv(x); low = conv(pool(x)); low = hourglass(low) or, at the bottom, conv(low);
    low = conv(low); return skip + upsample(low).
    """
    skip = _conv_block(x, filters, skip_kernel, dropout, f"{name}_skip", momentum, batch_norm)
    low = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    low = _conv_block(low, filters, 3, dropout, f"{name}_down", momentum, batch_norm)
    if depth > 1:
        low = _hourglass(low, depth - 1, filters, dropout, f"{name}_{depth - 1}", momentum, skip_kernel, batch_norm)
    else:
        low = _conv_block(low, filters, 3, dropout, f"{name}_bottom", momentum, batch_norm)
    low = _conv_block(low, filters, 3, dropout, f"{name}_up", momentum, batch_norm)
    low = layers.UpSampling2D(2, name=f"{name}_upsample")(low)
    return layers.Add(name=f"{name}_add")([skip, low])


def build_network(config: ModelConfig, batch_norm: bool = True) -> keras.Model:
    """Mask network for `config`: (batch, freq_rows, chunk_frames, 1) -> mask, same shape, in [0, 1].

    The frame axis is left open (None) so any multiple of 2**hourglass_depth frames works.
    batch_norm=False leaves out every batch norm layer: the shape `fold_batch_norm` fills.
    """
    magnitude_rows = keras.Input((config.freq_rows, None, 1), name="mix_magnitude")
    x = PeakNormalise(config.normalise_eps, name="peak_normalise")(magnitude_rows)
    if config.input_log_scale > 0:
        x = LogCompress(config.input_log_scale, name="log_compress")(x)
    for i, (filters, kernel) in enumerate(zip(config.front_filters, config.front_kernels, strict=True)):
        x = _conv_block(x, filters, kernel, config.dropout, f"front{i}", config.batch_norm_momentum, batch_norm)
    x = _hourglass(x, config.hourglass_depth, config.hourglass_filters, config.dropout,
                   f"hg{config.hourglass_depth}", config.batch_norm_momentum, config.skip_kernel, batch_norm)
    for i, (filters, kernel) in enumerate(zip(config.head_filters, config.head_kernels, strict=True)):
        # The thesis put batch norm on the first head layer only.
        x = _conv_block(x, filters, kernel, config.dropout, f"head{i}", config.batch_norm_momentum,
                        batch_norm=batch_norm and i == 0)
    mask = layers.Conv2D(1, 1, padding="same", activation="sigmoid", name="mask")(x)
    return keras.Model(magnitude_rows, mask, name="hourglass_mask")


def fold_batch_norm(network: keras.Model, config: ModelConfig) -> keras.Model:
    """An inference copy of `network` (built from `config`) with each batch norm folded into its conv.

    At inference a batch norm is a fixed affine map per channel, gamma * (x - mean) / sqrt(var + eps)
    + beta, so conv then batch norm is one conv with scaled kernel and shifted bias: the same mask up
    to float rounding, without the elementwise passes over every full-resolution activation (about
    30 % of the `cpu` network's separation time: docs/development.md, Benchmarks). For inference only: the copy
    cannot train as the original does (no batch statistics), so exports serve it and keep the
    original for fine-tuning.
    """
    folded = build_network(config, batch_norm=False)
    norms = {layer.name: layer for layer in network.layers if isinstance(layer, layers.BatchNormalization)}
    for layer in folded.layers:
        if not isinstance(layer, layers.Conv2D):
            continue
        source = network.get_layer(layer.name)
        kernel, bias = source.kernel.numpy(), source.bias.numpy()
        norm = norms.get(layer.name.removesuffix("_conv") + "_bn") if layer.name.endswith("_conv") else None
        if norm is not None:
            scale = norm.gamma.numpy() / np.sqrt(norm.moving_variance.numpy() + norm.epsilon)
            kernel = kernel * scale  # the output channel is the kernel's last axis
            bias = (bias - norm.moving_mean.numpy()) * scale + norm.beta.numpy()
        layer.set_weights([kernel, bias])
    return folded


def trainable_parameter_count(network: keras.Model) -> int:
    """Trainable parameters (batch-norm moving statistics excluded), as the thesis counted them."""
    return int(sum(int(ops.size(w)) for w in network.trainable_weights))

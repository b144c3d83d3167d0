"""Integrated loudness after ITU-R BS.1770-4 (K-weighting, 400 ms blocks, two gates), in LUFS.

Slakh records each stem's integrated loudness in its metadata; this computes the same quantity.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

BLOCK_SECONDS = 0.4
BLOCK_OVERLAP = 0.75
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0


def _k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two K-weighting biquads (b, a) at any rate: the analogue prototypes of BS.1770's
    48 kHz coefficients, re-derived per rate (after B. De Man's analysis of those filters)."""
    shelf_hz, shelf_gain_db, shelf_q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * shelf_hz / rate)
    v_high = 10 ** (shelf_gain_db / 20)
    v_band = v_high**0.4996667741545416
    a0 = 1 + k / shelf_q + k * k
    shelf = (
        np.array(
            [
                v_high + v_band * k / shelf_q + k * k,
                2 * (k * k - v_high),
                v_high - v_band * k / shelf_q + k * k,
            ]
        )
        / a0,
        np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / shelf_q + k * k) / a0]),
    )
    pass_hz, pass_q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * pass_hz / rate)
    a0 = 1 + k / pass_q + k * k
    high_pass = (
        np.array([1.0, -2.0, 1.0]),
        np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / pass_q + k * k) / a0]),
    )
    return [shelf, high_pass]


def integrated_loudness_lufs(audio: np.ndarray, rate: int) -> float:
    """Integrated loudness of audio (channels, samples) in LUFS; -inf for silence or audio
    shorter than one 400 ms block. Channels are weighted 1.0 (mono/stereo, no surround)."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim == 1:
        audio = audio[np.newaxis]
    block = int(round(BLOCK_SECONDS * rate))
    hop = int(round(block * (1 - BLOCK_OVERLAP)))
    if audio.shape[1] < block:
        return float("-inf")
    weighted = audio
    for b, a in _k_weighting(rate):
        weighted = lfilter(b, a, weighted, axis=1)
    # Mean square of each block via a cumulative sum: (channels, blocks).
    squares = np.concatenate([np.zeros((weighted.shape[0], 1)), np.cumsum(weighted**2, axis=1)], axis=1)
    starts = np.arange(0, weighted.shape[1] - block + 1, hop)
    power = ((squares[:, starts + block] - squares[:, starts]) / block).sum(axis=0)
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(power)
    gated = power[block_lufs > ABSOLUTE_GATE_LUFS]
    if gated.size == 0:
        return float("-inf")
    relative_gate = -0.691 + 10 * np.log10(gated.mean()) + RELATIVE_GATE_LU
    gated = power[(block_lufs > ABSOLUTE_GATE_LUFS) & (block_lufs > relative_gate)]
    return float(-0.691 + 10 * np.log10(gated.mean()))

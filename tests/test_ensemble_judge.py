"""bench/ensemble_judge.py scores what an exported ensemble would give, without exporting it."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from bench.ensemble_judge import instrument_estimate, member_masks, parse_combo, silent_share
from model.config import make_config
from model.network import build_network
from model.separate import separate_waveform


@pytest.mark.parametrize("samples", [4000, 200])  # 200: shorter than n_fft, padded like separation pads it
def test_combination_equals_the_ensemble_separation(samples):
    config = make_config("tiny", {"mask_exponent": 1.5})
    tf.keras.utils.set_random_seed(1)
    networks = [build_network(config), build_network(config)]
    mix = np.random.default_rng(0).normal(size=samples).astype(np.float32) * 0.1

    spectrum, masks = member_masks(networks, mix, config)
    judged = instrument_estimate(parse_combo("0+1@1.5", 2), spectrum, masks, config, samples)
    served, _ = separate_waveform(networks, tf.constant(mix[None]), config)
    np.testing.assert_allclose(judged, served.numpy()[0], atol=1e-5)

    alone = instrument_estimate(parse_combo("1@1.5", 2), spectrum, masks, config, samples)
    np.testing.assert_allclose(alone, separate_waveform(networks[1], tf.constant(mix[None]), config)[0].numpy()[0],
                               atol=1e-5)
    assert not np.allclose(alone, judged, atol=1e-4)  # the members differ, so the test can tell


def test_combination_syntax():
    weighted = parse_combo("0+2@1.25:0.6,0.4", 3)
    assert (weighted.members, weighted.exponent, weighted.weights, weighted.geometric) == ((0, 2), 1.25, (0.6, 0.4), False)
    masks = [np.full((2, 3), 0.25), np.full((2, 3), 0.5), np.full((2, 3), 1.0)]
    np.testing.assert_allclose(parse_combo("geo:0+2@1", 3).mask(masks), 0.5)
    np.testing.assert_allclose(parse_combo("0+1@2", 3).mask(masks), (0.0625 + 0.25) / 2)
    for bad in ("0+3@1.5", "0+1", "0+1@1.5:0.5", "0+1@1.5:0.7,0.7", "geo:0+1@1:0.5,0.5"):
        with pytest.raises(ValueError):
            parse_combo(bad, 3)


def test_silent_share_counts_the_error_where_the_instrument_rests():
    reference = np.concatenate([np.ones(100), np.zeros(100)])
    estimate = reference.copy()
    estimate[150:] = 1.0  # error of 50 only in the silent second block
    estimate[:10] = 0.0  # error of 10 in the loud first block
    assert silent_share(reference, estimate, 100) == pytest.approx(50 / 60)

"""research/ensemble_judge.py scores what an exported ensemble would give, without exporting it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from model.config import make_config
from model.network import build_network
from model.separate import separate_waveform
from research.ensemble_judge import (
    instrument_estimate,
    mean_interval,
    member_masks,
    parse_combo,
    pool_scores,
    silent_share,
    summary,
    write_scores,
)


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


def test_mean_interval_brackets_the_mean_and_widens_with_the_spread():
    rng = np.random.default_rng(3)
    steady = 0.2 + 0.05 * rng.standard_normal(30)
    noisy = 0.2 + 1.0 * rng.standard_normal(30)
    lo, hi = mean_interval(steady)
    assert lo < steady.mean() < hi and lo > 0  # a consistent gain: the interval excludes zero
    lo_n, hi_n = mean_interval(noisy)
    assert lo_n < noisy.mean() < hi_n and lo_n < 0 < hi_n  # the same mean gain in noise does not
    assert hi_n - lo_n > 10 * (hi - lo)
    assert mean_interval(np.full(5, 0.3)) == pytest.approx((0.3, 0.3))
    assert mean_interval(noisy) == (lo_n, hi_n)  # seeded: the same songs give the same interval


def test_pooled_scores_are_the_songs_of_every_file_together(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_scores(str(a), "piano-opl3", ["s1", "s2"], {"0+1@1.5": [1.0, 2.0], "1+2@1.25": [1.5, 1.0]})
    write_scores(str(b), "piano-sonivox", ["s3"], {"0+1@1.5": [0.0], "1+2@1.25": [2.0]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporary left
    label, pooled = pool_scores([str(a), str(b)])
    assert label == "piano-opl3 + piano-sonivox"
    assert pooled == {"0+1@1.5": [1.0, 2.0, 0.0], "1+2@1.25": [1.5, 1.0, 2.0]}
    lines = summary(label, pooled)
    assert "(3 songs)" in lines[0]
    assert "per song +0.500" in lines[2] and "2 of 3 better" in lines[2]  # (+0.5 - 1 + 2) / 3


def test_pool_refuses_files_that_do_not_match(tmp_path):
    a, b, bad, empty = (tmp_path / n for n in ("a.json", "b.json", "bad.json", "empty.json"))
    write_scores(str(a), "x", ["s1"], {"0+1@1.5": [1.0], "1+2@1.25": [1.5]})
    write_scores(str(b), "y", ["s2"], {"1+2@1.25": [1.5], "0+1@1.5": [1.0]})
    bad.write_text("{not json")
    empty.write_text(json.dumps({"dataset": "z", "songs": [], "scores": {"0+1@1.5": []}}))
    for files, message in (([a, b], "differ"), ([a, bad], "not a scores file"), ([empty], "no songs")):
        with pytest.raises(ValueError, match=message):
            pool_scores([str(f) for f in files])
    script = Path(__file__).resolve().parents[1] / "research" / "ensemble_judge.py"
    run = subprocess.run([sys.executable, str(script), "--pool", str(a), str(b)], capture_output=True, text=True)
    assert run.returncode == 2 and "differ" in run.stderr
    run = subprocess.run([sys.executable, str(script), "--dataset", "piano"], capture_output=True, text=True)
    assert run.returncode == 2 and "--root, --model, --combo required" in run.stderr
    run = subprocess.run([sys.executable, str(script), "--pool", str(a), "--combo", "0+1@1.5"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--pool only reads" in run.stderr
    run = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--dataset", "piano", "--model",
                          str(tmp_path), "--combo", "0@1", "--scores", str(tmp_path / "no" / "s.json")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no such folder" in run.stderr
    run = subprocess.run([sys.executable, str(script), "--pool", str(a)], capture_output=True, text=True)
    assert run.returncode == 0 and "x (1 songs)" in run.stdout

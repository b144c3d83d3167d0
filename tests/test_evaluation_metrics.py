"""bss_eval metrics and baselines on arrays: equal to mir_eval, silent references handled."""

from __future__ import annotations

import math
import warnings

import mir_eval.separation
import numpy as np
import pytest

from services.evaluation import baselines as bl
from services.evaluation import metrics
from services.evaluation.scoring import TrackTask, score_track
from tests.evaluation_data import RATE_HZ, track_signals


def _mir_eval(references, estimates):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mir_eval.separation.bss_eval_sources(np.asarray(references, np.float64),
                                                    np.asarray(estimates, np.float64), compute_permutation=False)


@pytest.fixture(scope="module")
def refs():
    instrument, rest = track_signals(1, seconds=2.0)
    return np.stack([instrument, rest]).astype(np.float64)


def test_whole_track_metrics_equal_a_direct_mir_eval_call(refs):
    rng = np.random.default_rng(3)
    estimates = refs + 0.05 * rng.standard_normal(refs.shape) + 0.1 * refs[::-1]
    ours = metrics.bss_eval_whole(refs, estimates)
    sdr, sir, sar, _ = _mir_eval(refs, estimates)
    for j, source in enumerate(metrics.SOURCES):
        assert ours[source] == {"sdr": sdr[j], "sir": sir[j], "sar": sar[j]}


def test_decomposition_reproduces_mir_eval_over_the_whole_track(refs):
    rng = np.random.default_rng(4)
    estimates = refs + 0.05 * rng.standard_normal(refs.shape) + 0.2 * refs[::-1]
    dec = metrics.decompose(refs, estimates)
    sdr, sir, sar, _ = _mir_eval(refs, estimates)
    for j in range(2):
        ours = metrics.ratios_db(dec.target[j], dec.interference[j], dec.artifacts[j])
        np.testing.assert_allclose(ours, (sdr[j], sir[j], sar[j]), atol=1e-6)
    # The three parts add up to the (zero-padded) estimate.
    total = dec.target + dec.interference + dec.artifacts
    np.testing.assert_allclose(total[:, : refs.shape[1]], estimates, atol=1e-9)


def test_mixture_baseline_scores_the_energy_ratio_of_the_sources(refs):
    mix = refs.sum(axis=0)
    ours = metrics.bss_eval_whole(refs, np.stack(bl.mixture_estimate(mix)))
    sdr, sir, sar, _ = _mir_eval(refs, np.stack([mix, mix]))
    assert [ours[s]["sdr"] for s in metrics.SOURCES] == list(sdr)
    # The mix is instrument + rest exactly: all of the rest is interference and nothing is an
    # artifact, so SDR ~ SIR ~ 10 log10(E_instrument / E_rest) (up to what the 512-tap filter can
    # explain of one source by the other) and SAR is huge.
    ratio_db = 10 * np.log10(np.sum(refs[0] ** 2) / np.sum(refs[1] ** 2))
    assert ours["instrument"]["sdr"] == pytest.approx(ratio_db, abs=0.5)
    assert ours["rest"]["sdr"] == pytest.approx(-ratio_db, abs=0.5)
    assert ours["instrument"]["sdr"] == pytest.approx(ours["instrument"]["sir"], abs=1e-6)
    assert ours["instrument"]["sar"] > 100 and ours["rest"]["sar"] > 100


def test_oracle_mask_beats_the_mixture_and_sums_to_the_mix(refs):
    instrument, rest = bl.oracle_ratio_mask(refs[0], refs[1], bl.model_stft_settings())
    np.testing.assert_allclose(instrument + rest, refs.sum(axis=0), atol=1e-6)
    oracle = metrics.bss_eval_whole(refs, np.stack([instrument, rest]))
    mixture = metrics.bss_eval_whole(refs, np.stack(bl.mixture_estimate(refs.sum(axis=0))))
    assert oracle["instrument"]["sdr"] > mixture["instrument"]["sdr"] + 5
    assert oracle["rest"]["sdr"] > mixture["rest"]["sdr"] + 5


def test_model_stft_settings_follow_model_config():
    s = bl.model_stft_settings()
    assert (s.n_fft, s.hop_length, s.window, s.center) == (1536, 384, "hann", True)
    assert bl.model_stft_settings({"n_fft": 512, "hop_length": 128}).n_fft == 512


def test_unknown_baseline_is_refused():
    assert bl.validate_baselines(["hpss", "mixture", "hpss"]) == ("mixture", "hpss")
    with pytest.raises(ValueError, match="unknown baselines"):
        bl.validate_baselines(["oracle", "wiener"])


def test_silent_reference_is_reported_not_raised():
    instrument, rest = track_signals(2, seconds=1.0)
    assert metrics.silent_reason(np.stack([instrument, rest])) is None
    reason = metrics.silent_reason(np.stack([np.zeros_like(instrument), rest]))
    assert reason.startswith("reference instrument is silent")
    assert metrics.silent_reason(np.stack([instrument, rest * 1e-5])).startswith("reference rest is silent")


def test_framewise_skips_windows_where_the_instrument_is_silent_and_takes_medians(refs):
    refs = refs.copy()
    refs[0, RATE_HZ:] = 0.0  # instrument silent in the second of two seconds
    rng = np.random.default_rng(5)
    estimates = refs + 0.02 * rng.standard_normal(refs.shape)
    frames = metrics.bss_eval_framewise(refs, estimates, window_samples=RATE_HZ // 2)
    assert frames.windows == 4 and frames.scored_windows == 2 and frames.skipped_windows == 2
    assert frames.skipped_reasons == {"reference instrument is silent": 2}
    # Medians equal the median of the per-window ratios computed from the same decomposition.
    dec = metrics.decompose(refs, estimates)
    per_window = [metrics.ratios_db(dec.target[0, k * RATE_HZ // 2:(k + 1) * RATE_HZ // 2],
                                    dec.interference[0, k * RATE_HZ // 2:(k + 1) * RATE_HZ // 2],
                                    dec.artifacts[0, k * RATE_HZ // 2:(k + 1) * RATE_HZ // 2])[0] for k in (0, 1)]
    assert frames.metrics["instrument"]["sdr"] == pytest.approx(float(np.median(per_window)))


def test_framewise_with_no_audible_window_gives_nan_not_an_error(refs):
    quiet = refs.copy()
    quiet[0] *= 1e-6
    frames = metrics.bss_eval_framewise(quiet, refs, window_samples=RATE_HZ)
    assert frames.scored_windows == 0 and math.isnan(frames.metrics["instrument"]["sdr"])


def test_score_track_skips_a_silent_instrument_and_flags_a_silent_estimate():
    instrument, rest = track_signals(3, seconds=1.0)
    stft = bl.model_stft_settings()
    silent = score_track(TrackTask("quiet", RATE_HZ, np.stack([np.zeros_like(instrument), rest]), None,
                                   ("oracle",), stft))
    assert silent["status"] == "skipped" and "instrument is silent" in silent["reason"]
    zero_estimate = np.stack([np.zeros_like(instrument), instrument + rest])
    scored = score_track(TrackTask("zero", RATE_HZ, np.stack([instrument, rest]), zero_estimate, (), stft))
    assert scored["status"] == "scored"
    assert "all zeros" in scored["methods"]["model"]["skipped"]
    assert scored["methods"]["mixture"]["whole"]["instrument"]["sdri"] == 0.0


def test_share_of_the_way_is_zero_at_the_mixture_one_at_the_oracle():
    from services.evaluation.metrics import share_of_the_way

    # 0.8 dB where returning the mix scores 0.0 and the oracle 12.3 is 6.5 % of the way.
    assert share_of_the_way(0.8, 0.0, 12.3) == pytest.approx(0.8 / 12.3)
    assert share_of_the_way(-2.0, 0.5, 13.0) == pytest.approx(-2.5 / 12.5)  # worse than the mix: negative
    assert share_of_the_way(13.0, 0.5, 13.0) == 1.0 and share_of_the_way(0.5, 0.5, 13.0) == 0.0
    assert math.isnan(share_of_the_way(3.0, 5.0, 5.0))  # the oracle no better than the mix: undefined
    assert math.isnan(share_of_the_way(math.inf, 0.0, 10.0))


def test_leakage_is_output_energy_over_mix_energy_in_db():
    from services.evaluation.metrics import is_absent, leakage_db

    rng = np.random.default_rng(0)
    mix = rng.standard_normal(22050)
    assert leakage_db(mix, mix) == pytest.approx(0.0)
    assert leakage_db(0.1 * mix, mix) == pytest.approx(-20.0)
    assert leakage_db(np.zeros_like(mix), mix) == -math.inf
    with pytest.raises(ValueError, match="silent"):
        leakage_db(mix, np.zeros_like(mix))
    assert is_absent(np.stack([np.zeros_like(mix), mix]))
    assert not is_absent(np.stack([mix, mix])) and not is_absent(np.stack([mix, np.zeros_like(mix)]))


def test_report_gives_the_share_of_the_medians_and_the_leakage_medians():
    from services.evaluation import report

    def track(name, model, mixture, oracle):
        def entry(sdr):
            return {"whole": {"instrument": {"sdr": sdr, "sir": 0.0, "sar": 0.0},
                              "rest": {"sdr": sdr, "sir": 0.0, "sar": 0.0}}}
        return {"track": name, "status": "scored", "reason": "",
                "methods": {"model": entry(model), "mixture": entry(mixture), "oracle": entry(oracle)}}

    tracks = [track("a", 2.0, 0.0, 10.0), track("b", 6.0, 2.0, 12.0), track("c", 4.0, 1.0, 11.0),
              {"track": "d", "status": "absent", "reason": "", "methods": {"model": {"leakage_db": -12.0}}},
              {"track": "e", "status": "absent", "reason": "", "methods": {"model": {"leakage_db": -30.0}}}]
    doc = report.build_report("r", tracks, {"dataset": {"name": "x", "version": 1}}, {})
    # medians: model 4, mixture 1, oracle 11 -> (4 - 1) / (11 - 1) = 30 %.
    assert doc["share_of_the_way"]["model"] == pytest.approx(0.3)
    assert doc["leakage"] == {"model": {"tracks": 2, "median_db": -21.0, "max_db": -12.0}}
    assert doc["counts"] == {"tracks": 5, "scored": 3, "skipped": 0, "absent": 2}

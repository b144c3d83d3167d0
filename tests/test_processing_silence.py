"""Silence detection, statistics and adjustment."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from services.processing import silence
from services.processing.mixing import mix
from services.processing.silence_sets import adjust_silence, silence_stats
from tests.test_processing_support import make_track, read, sine

RATE = 22050


def _planted(seconds: float, loud: list[tuple[float, float]], seed: int = 0, floor_dbfs: float = -70.0) -> np.ndarray:
    """Noise at `floor_dbfs` (below the -50 dBFS threshold) with loud noise in the `loud` intervals."""
    rng = np.random.default_rng(seed)
    audio = (10 ** (floor_dbfs / 20) * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
    for start, end in loud:
        a, b = int(start * RATE), int(end * RATE)
        audio[a:b] = 0.3 * rng.standard_normal(b - a)
    return audio


def test_silences_are_found_at_the_planted_intervals_within_10_ms():
    # silent: 0-1.5 (leading), 3.2-5.0 (middle), 6.1-7.0 (0.9 s: too short), 8.25-10 (trailing)
    audio = _planted(10.0, [(1.5, 3.2), (5.0, 6.1), (7.0, 8.25)])
    found = silence.find_silences(audio[np.newaxis], RATE)
    expected = [(0.0, 1.5), (3.2, 5.0), (8.25, 10.0)]
    assert len(found) == len(expected)
    for (start, end), (want_start, want_end) in zip(found, expected, strict=True):
        assert abs(start / RATE - want_start) <= 0.010
        assert abs(end / RATE - want_end) <= 0.010
    share = silence.audible_share(found, audio.size)
    assert share == pytest.approx(1 - (1.5 + 1.8 + 1.75) / 10, abs=0.003)


def test_a_quiet_passage_above_the_threshold_is_not_silence():
    audio = sine(220.0, 3.0, RATE, amplitude=10 ** (-45 / 20) * np.sqrt(2))  # -45 dBFS RMS
    assert silence.find_silences(audio[np.newaxis], RATE) == []
    quieter = sine(220.0, 3.0, RATE, amplitude=10 ** (-55 / 20) * np.sqrt(2))
    assert silence.find_silences(quieter[np.newaxis], RATE) == [(0, quieter.size)]
    # A loud right channel keeps a stereo frame audible.
    stereo = np.stack([np.zeros_like(audio), audio * 100])
    assert silence.find_silences(stereo, RATE) == []


def test_histogram_counts_tracks_per_10_percent_band_of_silence():
    bands = silence.silence_histogram([1.0, 0.95, 0.75, 0.7, 0.0, 0.05])
    assert [b["tracks"] for b in bands] == [2, 0, 1, 1, 0, 0, 0, 0, 0, 2]
    assert bands[0]["band"] == "0-10%" and bands[-1]["band"] == "90-100%"


def test_planned_cuts_reach_the_target_longest_first_and_only_as_much_as_needed():
    samples = 10 * RATE
    silences = [(0, 2 * RATE), (3 * RATE, 6 * RATE), (8 * RATE, samples)]  # 7 s silent, 30 % audible
    params = silence.AdjustParams(target=0.5, cutoff=0.3, margin_seconds=0.1)
    cuts = silence.plan_cuts(silences, samples, RATE, params)
    # 3 s of audio need a 6 s track: cut 4 s — all the middle silence but its margins, then 1.2 s of another.
    assert sum(c.samples for c in cuts) == 4 * RATE
    middle = next(c for c in cuts if c.kind == "middle")
    assert middle.samples == 3 * RATE - 2 * int(0.1 * RATE)
    assert middle.start == 3 * RATE + int(0.1 * RATE)
    other = next(c for c in cuts if c.kind != "middle")
    assert other.kind == "leading" and other.start == 0  # the leading 2 s ties the trailing 2 s and comes first
    assert other.samples == 4 * RATE - middle.samples
    assert silence.plan_cuts(silences, samples, RATE, silence.AdjustParams(target=0.3, cutoff=0.2)) == []


def test_cuts_are_click_free_on_a_continuous_sine():
    freq, amplitude = 440.0, 0.5
    audio = sine(freq, 3.0, RATE, amplitude)[np.newaxis]
    # Cut at a crest a stretch half a period off whole periods: the waveforms meet in opposite phase.
    period = RATE / freq
    start = RATE + int(round(period / 4))
    cut = silence.Cut(start, start + int(round(20.5 * period)), "middle")
    natural_step = 2 * np.pi * freq / RATE * amplitude
    hard = silence.apply_cuts(audio, [cut], crossfade_samples=0)
    assert np.abs(np.diff(hard[0])).max() > 10 * natural_step  # a click without a crossfade
    for shape in silence.CROSSFADE_SHAPES:
        out = silence.apply_cuts(audio, [cut], crossfade_samples=int(0.02 * RATE), shape=shape)
        assert out.shape[1] == audio.shape[1] - cut.samples
        assert np.abs(np.diff(out[0])).max() <= 1.5 * natural_step
    # Leading and trailing cuts fade in and out instead of starting mid-waveform.
    edges = silence.apply_cuts(audio, [silence.Cut(0, 1000, "leading"), silence.Cut(audio.shape[1] - 1000,
                                                                                    audio.shape[1], "trailing")],
                               crossfade_samples=441)
    assert abs(edges[0, 0]) < 0.01 and abs(edges[0, -1]) < 0.01
    assert np.abs(np.diff(edges[0])).max() <= 1.5 * natural_step


def _adjustable_library(root):
    """Three checked guitar tracks of 10 s with a continuous rest: 88 %, 28 % and 0 % audible guitar."""
    rest = sine(330.0, 10.0, RATE, 0.4)
    make_track(root, "Busy", {"g.wav": ("guitar", _planted(10.0, [(0.0, 8.8)], seed=1)), "r.wav": ("piano", rest)},
               marks={"guitar": ["checked"]})
    make_track(root, "Sparse", {"g.wav": ("guitar", _planted(10.0, [(2.0, 3.0), (5.0, 6.8)], seed=2)),
                                "r.wav": ("piano", rest)}, marks={"guitar": ["checked"]})
    make_track(root, "Silent", {"g.wav": ("guitar", _planted(10.0, [], seed=3)), "r.wav": ("piano", rest)},
               marks={"guitar": ["checked"]})
    mix(root, "guitar", rates_hz=[RATE], workers=1)


def test_silence_stats_report_shares_and_histogram(tmp_path):
    _adjustable_library(tmp_path)
    stats = silence_stats(tmp_path, "guitar", RATE, workers=1)
    shares = {r["track"]: r["audible_share"] for r in stats["tracks"]}
    assert shares["Busy"] == pytest.approx(0.88, abs=0.002)
    assert shares["Sparse"] == pytest.approx(0.28, abs=0.002)
    assert shares["Silent"] == 0.0
    assert [b["tracks"] for b in stats["histogram"]] == [0, 1, 0, 0, 0, 0, 0, 1, 0, 1]
    sparse = next(r for r in stats["tracks"] if r["track"] == "Sparse")
    assert np.allclose(sparse["silences"], [[0.0, 2.0], [3.0, 5.0], [6.8, 10.0]], atol=0.010)


def test_adjustment_reaches_the_target_or_discards(tmp_path):
    _adjustable_library(tmp_path)
    result = adjust_silence(tmp_path, "guitar", RATE, adjust_params=silence.AdjustParams(target=0.7, cutoff=0.5),
                            workers=1)
    rows = {r["track"]: r for r in result["tracks"]}
    assert rows["Busy"]["status"] == "unchanged" and rows["Busy"]["cuts"] == []
    assert rows["Silent"]["status"] == "discarded"
    sparse = rows["Sparse"]
    assert sparse["status"] == "adjusted" and sparse["reached_target"]
    assert sparse["audible_share_after"] >= 0.7
    # 2.8 s of guitar need at most 2.8 / 0.7 = 4 s; the cuts are where the silences were.
    assert sparse["seconds_after"] <= 2.8 / 0.7 + 0.03  # frames are 10 ms
    assert {c["kind"] for c in sparse["cuts"]} <= {"leading", "middle", "trailing"}
    trailing = next(c for c in sparse["cuts"] if c["kind"] == "trailing")
    assert trailing["end_seconds"] == pytest.approx(10.0) and trailing["start_seconds"] >= 6.9 - 1e-6
    folder = tmp_path / "mixes" / "guitar" / f"{RATE}-silence-0.7-0.5"
    assert sorted(p.name for p in folder.iterdir()) == ["Busy", "Silent", "Sparse"]
    assert not (folder / "Silent" / "instrument.wav").exists()
    assert yaml.safe_load((folder / "Silent" / "silence.yaml").read_text())["discarded"] is True
    # The same cuts in both files: instrument + rest is the cut mixture, same length, no click in the rest.
    instrument, _ = read(folder / "Sparse" / "instrument.wav")
    rest, _ = read(folder / "Sparse" / "rest.wav")
    assert instrument.shape == rest.shape
    assert np.abs(np.diff(rest[0])).max() <= 1.5 * 2 * np.pi * 330 / RATE * 0.4
    report = yaml.safe_load((folder / "Sparse" / "silence.yaml").read_text())
    assert report["summary"]["cuts"] == sparse["cuts"]
    # Measured again from the files: the set reaches the target.
    after = silence_stats(tmp_path, "guitar", RATE, adjusted=(0.7, 0.5), workers=1)
    assert {r["track"]: r["audible_share"] >= 0.7 for r in after["tracks"]} == {"Busy": True, "Sparse": True}
    # Unchanged inputs: nothing is redone.
    again = adjust_silence(tmp_path, "guitar", RATE, adjust_params=silence.AdjustParams(target=0.7, cutoff=0.5),
                           workers=1)
    assert again["counts"] == {"skipped": 3} and again["kept"] == 2


def test_bad_adjustment_parameters_are_refused():
    with pytest.raises(ValueError, match="cutoff"):
        silence.AdjustParams(target=0.5, cutoff=0.7)
    with pytest.raises(ValueError, match="margin"):
        silence.AdjustParams(margin_seconds=0.001, crossfade_seconds=0.02)
    with pytest.raises(ValueError, match="threshold"):
        silence.SilenceParams(threshold_dbfs=10)


def test_stats_of_a_missing_mix_set_say_what_to_run(tmp_path):
    with pytest.raises(LookupError, match="stemlab mix"):
        silence_stats(tmp_path, "piano", RATE)

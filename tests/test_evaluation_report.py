"""Evaluating a dataset split end to end in-process: estimates, baselines, skips, report files."""

from __future__ import annotations

import json
import warnings

import matplotlib.image
import mir_eval.separation
import numpy as np
import pytest

from services.common.audio import read_audio
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.paths import DataRoot
from services.evaluation import report
from services.evaluation.evaluate import EvaluationCancelled, EvaluationSettings, evaluate_dataset
from services.evaluation.sources import EstimatesFolderSource, ModelSource, open_source
from tests.evaluation_data import make_dataset, track_signals, write_estimates


def test_max_tracks_spreads_the_sample_over_the_whole_split():
    """Songs come in blocks (one soundfont or import after another): a sample of 4 from 4 blocks of
    5 takes one from each, not the first 4 of the first block."""
    from services.common.manifest import Pair
    from services.evaluation.evaluate import select_pairs

    pairs = [Pair(track=f"Song{i:03d}", source="synthetic", split="validation" if i % 7 else "train",
                  instrument="i.wav", rest="r.wav", seconds=1.0) for i in range(23, 0, -1)]
    validation = sorted(p.track for p in pairs if p.split == "validation")
    assert len(validation) == 20
    picked = [p.track for p in select_pairs(pairs, "validation", 4)]
    assert picked == [validation[0], validation[5], validation[10], validation[15]]
    assert [p.track for p in select_pairs(pairs, "validation", 0)] == validation
    assert [p.track for p in select_pairs(pairs, "validation", 50)] == validation
    assert len(select_pairs(pairs, "all", 7)) == 7 and len({p.track for p in select_pairs(pairs, "all", 7)}) == 7


class HalfMix(ModelSource):
    """A deliberately poor "model": half the mix as the instrument."""

    kind = "test"

    def provenance(self):
        return {"kind": self.kind}

    def separate(self, mix, rate_hz, track):
        return 0.5 * mix, 0.5 * mix


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation of perfect estimates on 3 tracks + 1 track with a silent instrument."""
    root = tmp_path_factory.mktemp("data")
    tracks = {f"Song{i:02d}": track_signals(i, seconds=2.0) for i in range(3)}
    silent_rest = track_signals(9, seconds=2.0)[1]
    tracks["Quiet"] = (np.zeros_like(silent_rest), silent_rest)
    make_dataset(root, tracks=tracks)
    # Perfect instrument estimates; rest.wav left out for one track (then rest = mix - instrument).
    estimates = write_estimates(root / "estimates", {
        name: (inst, rest if name != "Song01" else None) for name, (inst, rest) in tracks.items()})
    progress = []
    data = DataRoot(root)
    summary = evaluate_dataset(
        data, EstimatesFolderSource(estimates), "evalset",
        settings=EvaluationSettings(baselines=("mixture", "oracle"), framewise=True, workers=2, plot_tracks=2),
        progress=lambda d, t, m="": progress.append((d, t, m)), code_version="test")
    return data, tracks, summary, progress


def test_perfect_estimates_score_far_above_the_mixture(evaluated):
    _, _, summary, _ = evaluated
    med = summary["medians"]
    assert med["model"]["whole"]["instrument"]["sdr"] > med["mixture"]["whole"]["instrument"]["sdr"] + 40
    assert med["model"]["whole"]["instrument"]["sdri"] > 40
    assert med["oracle"]["whole"]["instrument"]["sdr"] > med["mixture"]["whole"]["instrument"]["sdr"]
    assert med["oracle"]["whole"]["rest"]["sdr"] > med["mixture"]["whole"]["rest"]["sdr"]
    assert med["model"]["framewise"]["tracks"] == 3


def test_silent_instrument_track_is_scored_by_leakage_not_bss_eval(evaluated):
    """A track without the instrument is "absent": bss_eval would refuse its all-zero reference, so
    it counts apart and gets the leakage of what came back (here silence: -inf dB)."""
    data, _, summary, progress = evaluated
    assert (summary["tracks"], summary["scored"], summary["skipped"], summary["absent"]) == (4, 3, 0, 1)
    doc = json.loads((data.evaluations / summary["report_id"] / "report.json").read_text())
    quiet = next(t for t in doc["tracks"] if t["track"] == "Quiet")
    assert quiet["status"] == "absent" and quiet["methods"] == {"model": {"leakage_db": "-inf"}}
    assert doc["leakage"] == {"model": {"tracks": 1, "median_db": "-inf", "max_db": "-inf"}}
    assert doc["medians"]["model"]["whole"]["tracks"] == 3
    assert "Tracks without the instrument (1" in (data.evaluations / summary["report_id"] / "report.md").read_text()
    assert progress[-1][:2] == (4, 4)


def test_per_track_numbers_equal_direct_mir_eval_calls(evaluated):
    data, tracks, summary, _ = evaluated
    doc = json.loads((data.evaluations / summary["report_id"] / "report.json").read_text())
    by_track = {t["track"]: t for t in doc["tracks"]}
    ds_track = "Song01"
    folder = data.mixes / "guitar" / "22050" / ds_track
    inst = read_audio(folder / "instrument.wav")[0][0].astype(np.float64)
    rest = read_audio(folder / "rest.wav")[0][0].astype(np.float64)
    refs = np.stack([inst, rest])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdr, sir, sar, _ = mir_eval.separation.bss_eval_sources(refs, np.stack([inst + rest] * 2), False)
        p_sdr, _, _, _ = mir_eval.separation.bss_eval_sources(refs, np.stack([inst, rest]), False)
    mixture = by_track[ds_track]["methods"]["mixture"]["whole"]
    assert [mixture["instrument"]["sdr"], mixture["rest"]["sdr"]] == list(sdr)
    assert [mixture["instrument"]["sir"], mixture["rest"]["sar"]] == [sir[0], sar[1]]
    model = by_track[ds_track]["methods"]["model"]["whole"]
    # rest = mix - instrument in float32 vs the file's rest: the same up to rounding.
    assert model["instrument"]["sdr"] == pytest.approx(p_sdr[0], rel=1e-3)
    assert model["instrument"]["sdri"] == pytest.approx(model["instrument"]["sdr"] - sdr[0])


def test_report_files_exist_and_parse(evaluated):
    data, _, summary, _ = evaluated
    folder = data.evaluations / summary["report_id"]
    doc = json.loads((folder / "report.json").read_text())
    assert doc["provenance"]["dataset"]["name"] == "evalset"
    assert doc["provenance"]["dataset"]["checksum"]
    assert doc["provenance"]["model"]["kind"] == "estimates"
    assert doc["settings"]["stft"]["n_fft"] == 1536
    md = (folder / "report.md").read_text()
    assert "| Track | Instrument SDR | SIR | SAR | Rest SDR | SIR | SAR |" in md
    assert "| Song02 |" in md and "| Quiet | -∞ |" in md
    html = (folder / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html
    images = sorted(p.name for p in (folder / "spectrograms").iterdir())
    assert images == ["Song00.png", "Song01.png"]
    pixels = matplotlib.image.imread(folder / "spectrograms" / "Song00.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100
    assert "![Song00](spectrograms/Song00.png)" in md
    assert not [p for p in data.evaluations.iterdir() if p.name.startswith(".")]


def test_compare_puts_two_reports_side_by_side(evaluated, tmp_path):
    data, _, summary, _ = evaluated
    worse = evaluate_dataset(data, HalfMix(), "evalset", settings=EvaluationSettings(
        baselines=("mixture",), workers=1, max_tracks=3, plot_tracks=0))
    a = report.load_report(data.evaluations, summary["report_id"])
    b = report.load_report(data.evaluations, worse["report_id"])
    cmp = report.compare_reports(a, b)
    row = next(r for r in cmp["rows"] if (r["method"], r["kind"], r["source"], r["metric"])
               == ("model", "whole", "instrument", "sdr"))
    assert row["delta"] == pytest.approx(row["b"] - row["a"]) and row["delta"] < -30
    assert "| model | whole | instrument | SDR |" in cmp["markdown"]
    assert any("scored tracks" in w for w in cmp["warnings"])
    # Per track, over the songs both scored: half the mix loses on each of them.
    paired = cmp["paired"]
    scored_a, scored_b = ([t["track"] for t in doc["tracks"] if t["status"] == "scored"] for doc in (a, b))
    assert len(scored_b) == 2 and set(scored_b) < set(scored_a)
    assert (paired["tracks"], paired["only_a"], paired["only_b"]) == (2, len(scored_a) - 2, 0)
    sdr = next(r for r in paired["rows"] if (r["method"], r["source"], r["metric"]) == ("model", "instrument", "sdr"))
    per_track = [_whole(b, t, "model", "sdr") - _whole(a, t, "model", "sdr") for t in scored_b]
    assert sdr["median"] == pytest.approx(np.median(per_track)) and sdr["mean"] == pytest.approx(np.mean(per_track))
    assert (sdr["tracks"], sdr["better"], sdr["worse"]) == (2, 0, 2) and sdr["median"] < -30
    assert "| model | instrument | SDR |" in cmp["markdown"] and "0 of 2 | 2 of 2 |" in cmp["markdown"]
    # The mixture baseline is the same on both: listed in the data, left out of the table.
    mixture = next(r for r in paired["rows"] if (r["method"], r["source"], r["metric"]) == ("mixture", "instrument", "sdr"))
    assert (mixture["better"], mixture["worse"], mixture["median"]) == (0, 0, 0.0)
    assert "| mixture | instrument |" not in cmp["markdown"]
    assert any("only one report" in w for w in cmp["warnings"])


def _whole(doc: dict, track: str, method: str, metric: str) -> float:
    entry = next(t for t in doc["tracks"] if t["track"] == track)
    return float(entry["methods"][method]["whole"]["instrument"][metric])


def test_bad_requests_raise_clear_errors(tmp_path):
    data = DataRoot(tmp_path).ensure()
    make_dataset(tmp_path, tracks={"A": track_signals(0, 1.0)})
    with pytest.raises(NotFoundError, match="no dataset named 'nope'"):
        evaluate_dataset(data, None, "nope")
    with pytest.raises(FailedPreconditionError, match="no tracks in split 'train'"):
        evaluate_dataset(data, None, "evalset", settings=EvaluationSettings(split="train"))
    with pytest.raises(InvalidArgumentError, match="unknown baselines"):
        evaluate_dataset(data, None, "evalset", settings=EvaluationSettings(baselines=("magic",)))
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        open_source(data, model="guitar", run="r1")
    with pytest.raises(InvalidArgumentError, match="NAME:VERSION"):
        open_source(data, model="guitar:latest")
    with pytest.raises(EvaluationCancelled):
        evaluate_dataset(data, None, "evalset", should_stop=lambda: True)
    assert list(data.evaluations.iterdir()) == []


def test_an_estimate_of_the_wrong_length_or_a_missing_one_skips_only_that_track(tmp_path):
    data = DataRoot(tmp_path).ensure()
    tracks = {name: track_signals(i, 1.0) for i, name in enumerate(("A", "B", "C"))}
    make_dataset(tmp_path, tracks=tracks)
    estimates = write_estimates(tmp_path / "est", {"A": (tracks["A"][0][:11025], None), "B": (tracks["B"][0], None)})
    summary = evaluate_dataset(data, EstimatesFolderSource(estimates), "evalset",
                               settings=EvaluationSettings(baselines=("mixture",), workers=1, plot_tracks=0))
    doc = report.load_report(data.evaluations, summary["report_id"])
    reasons = {s["track"]: s["reason"] for s in doc["skipped"]}
    assert sorted(reasons) == ["A", "C"] and summary["scored"] == 1
    assert "estimates must cover the whole track" in reasons["A"]
    assert "no instrument estimate for track C" in reasons["C"]
    # The job's summary (what `stemlab evaluate` prints) names them with the reason too.
    assert summary["skipped_tracks"] == doc["skipped"] and summary["skipped"] == 2

"""research/real_judge.py: the real-recordings choice rule."""

from __future__ import annotations

import json

import pytest

from research import real_judge


def report(sdrs: dict[str, float], leaks: dict[str, float]) -> dict:
    tracks = [{"track": t, "status": "scored", "methods": {"model": {"whole": {"instrument": {"sdr": v}}}}}
              for t, v in sdrs.items()]
    tracks += [{"track": t, "status": "absent", "methods": {"model": {"leakage_db": v}}} for t, v in leaks.items()]
    return {"tracks": tracks}


SHIPPED = report({f"m{i}": float(i % 5) for i in range(15)}, {"a1": -12.0, "a2": -10.0})


def test_a_candidate_better_on_every_mixture_with_no_more_leakage_passes():
    cand = report({f"m{i}": i % 5 + 0.5 + 0.01 * i for i in range(15)}, {"a1": -12.2, "a2": -10.5})
    r = real_judge.judge(SHIPPED, cand, looks=2)
    assert r["passes"] and r["better_on"] == 15 and r["interval_95"][0] > 0 and r["interval_bonferroni"][0] > 0
    assert r["interval_bonferroni"][0] <= r["interval_95"][0]  # the wider interval for two looks


def test_more_leakage_or_a_gain_on_few_mixtures_fails():
    leaky = report({f"m{i}": i % 5 + 0.5 for i in range(15)}, {"a1": -11.0, "a2": -9.0})
    r = real_judge.judge(SHIPPED, leaky)
    assert not r["passes"] and r["why"] == ["leakage more than 0.5 dB worse"]
    mixed = report({f"m{i}": i % 5 + (2.0 if i < 5 else -0.1) for i in range(15)}, {"a1": -12.0, "a2": -10.0})
    r = real_judge.judge(SHIPPED, mixed)
    assert not r["passes"] and "95 % interval reaches 0" in r["why"]


def test_the_rule_can_be_held_to_the_tracks_registered_and_refuses_different_tracks(tmp_path, capsys):
    cand = report({**{f"m{i}": i % 5 + 1.0 for i in range(15)}, "new": -30.0}, {"a1": -12.0, "a2": -10.0})
    with pytest.raises(ValueError, match="same tracks"):
        real_judge.judge(SHIPPED, cand)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join([*(f"m{i}" for i in range(15)), "a1", "a2"]) + "\n")
    ship_path, cand_path = tmp_path / "ship.json", tmp_path / "cand.json"
    ship_path.write_text(json.dumps(SHIPPED))
    cand_path.write_text(json.dumps(cand))
    assert real_judge.main([str(ship_path), str(cand_path), "--tracks", str(listed), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mixtures"] == 15 and out["passes"]


def test_resampling_by_recording_keeps_a_recordings_mixtures_together():
    assert real_judge.recording_of("val-guitar-em91-minus6db") == "em9"
    assert real_judge.recording_of("test-piano-fugue8493-plus6db") == "fugue849"
    assert real_judge.recording_of("val-piano-chopin12-0db") == "chopin"  # a tenth piece and more
    assert real_judge.recording_of("test-guitar-berklee41-0db") == "berklee4"
    # two recordings of three levels each: one gains 3 dB everywhere, the other loses 0.1 dB. By
    # mixture, half the mixtures gain; by recording a resample can hold only the losing recording.
    names = [f"val-guitar-{key}1-{level}" for key in ("aaa", "bbb") for level in ("minus6db", "0db", "plus6db")]
    shipped = report({n: 0.0 for n in names}, {})
    cand = report({n: (3.0 if "aaa" in n else -0.1) for n in names}, {})
    by_mixture = real_judge.judge(shipped, cand)
    by_recording = real_judge.judge(shipped, cand, by_recording=True)
    assert by_recording["resampled"] == "recordings" and by_mixture["resampled"] == "mixtures"
    assert by_recording["interval_95"] == [-0.1, 3.0]  # all-losing and all-gaining resamples both occur
    assert by_recording["interval_95"][0] <= by_mixture["interval_95"][0]


def test_reports_of_different_audio_under_the_same_names_are_refused(tmp_path):
    """tracks.json beside each report (realset/evaluate.py) holds each track's audio hash."""
    cand = report({f"m{i}": i % 5 + 1.0 for i in range(15)}, {"a1": -12.0, "a2": -10.0})
    paths = []
    for name, body, prints in (("shipped", SHIPPED, {"m1": "aa", "m2": "bb", "a1": "cc"}),
                               ("cand", cand, {"m1": "aa", "m2": "XX", "a1": "cc"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(body))
        (tmp_path / name / "tracks.json").write_text(json.dumps({"tracks": prints}))
        paths.append(str(tmp_path / name / "report.json"))
    with pytest.raises(SystemExit, match="different audio for 1 tracks \\(m2"):
        real_judge.main(paths + ["--json"])
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join([f"m{i}" for i in range(15) if i != 2] + ["a1", "a2"]))
    assert real_judge.main(paths + ["--json", "--tracks", str(listed)]) == 0  # m2 not judged
    (tmp_path / "cand" / "tracks.json").unlink()
    assert real_judge.main(paths + ["--json"]) == 0  # an older report without hashes: not checked

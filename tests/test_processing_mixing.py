"""Mixing library tracks into instrument/rest pairs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from services.common.errors import FailedPreconditionError
from services.common.library import Library
from services.processing.mixing import mix, require_usable
from tests.test_processing_support import make_track, read, sine

RATE = 22050


def _noise(seconds: float, seed: int, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def test_instrument_plus_rest_equals_the_sum_of_the_used_stems(tmp_path):
    guitar1, guitar2 = _noise(1.0, 1), _noise(1.0, 2)
    drums, bass = _noise(1.0, 3, amplitude=0.9), _noise(0.8, 4, amplitude=0.9)  # bass is shorter
    vocals = np.stack([_noise(1.0, 5), _noise(1.0, 6)])  # a stereo stem
    mixdown = _noise(1.0, 7)
    make_track(tmp_path, "Song", {"g1.wav": ("guitar", guitar1), "g2.wav": ("guitar", guitar2),
                                  "d.wav": ("drums", drums), "b.wav": ("bass", bass),
                                  "v.wav": ("vocals", vocals), "mix.wav": ("mix", mixdown),
                                  "x.wav": ("excluded", _noise(1.0, 8))},
               marks={"guitar": ["checked"]})
    result = mix(tmp_path, "guitar", rates_hz=[RATE], workers=1)
    assert result["counts"] == {"mixed": 1}
    folder = tmp_path / "mixes" / "guitar" / str(RATE) / "Song"
    instrument, rate = read(folder / "instrument.wav")
    rest, _ = read(folder / "rest.wav")
    assert rate == RATE and instrument.shape == rest.shape == (1, RATE)
    padded_bass = np.pad(bass, (0, RATE - bass.size))
    expected_rest = drums.astype(np.float64) + padded_bass + vocals.mean(axis=0)
    np.testing.assert_allclose(instrument[0], guitar1.astype(np.float64) + guitar2, atol=1e-6)
    np.testing.assert_allclose(rest[0], expected_rest, atol=1e-6)
    # Float files: the sum exceeds full scale and is kept, not clipped.
    assert np.abs(rest).max() > 1.0
    np.testing.assert_allclose(instrument[0] + rest[0], guitar1.astype(np.float64) + guitar2 + expected_rest, atol=2e-6)
    stats = yaml.safe_load((folder / "stats.yaml").read_text())
    assert stats["length_mismatch_seconds"] == pytest.approx(0.2, abs=1e-3)
    assert stats["padded_stems"] == ["stems/b.wav"]
    assert {s["file"] for s in stats["stems"]} == {"stems/g1.wav", "stems/g2.wav", "stems/d.wav", "stems/b.wav",
                                                   "stems/v.wav"}
    assert stats["rest"]["peak_dbfs"] > 0.0


def test_a_track_marked_bleed_or_unchecked_is_left_out(tmp_path):
    make_track(tmp_path, "Good", {"g.wav": ("guitar", _noise(0.5, 1)), "d.wav": ("drums", _noise(0.5, 2))},
               marks={"guitar": ["checked"]})
    make_track(tmp_path, "Bleedy", {"g.wav": ("guitar", _noise(0.5, 3)), "d.wav": ("drums", _noise(0.5, 4))},
               marks={"guitar": ["checked", "bleed"]})
    make_track(tmp_path, "Unchecked", {"g.wav": ("guitar", _noise(0.5, 5))})
    make_track(tmp_path, "NoGuitar", {"p.wav": ("piano", _noise(0.5, 6))}, marks={"piano": ["checked"]})
    result = mix(tmp_path, "guitar", rates_hz=[RATE], workers=1)
    assert [r["track"] for r in result["tracks"]] == ["Good"]
    assert {(r["track"], r["reason"]) for r in result["left_out"]} == {("Bleedy", "marked bleed"),
                                                                      ("Unchecked", "not checked")}
    root = tmp_path / "mixes" / "guitar" / str(RATE)
    assert sorted(p.name for p in root.iterdir()) == ["Good"]
    # --include-unchecked takes the unchecked one, never the bleeding one unless marks are ignored.
    result = mix(tmp_path, "guitar", rates_hz=[RATE], include_unchecked=True, workers=1)
    assert [r["track"] for r in result["tracks"]] == ["Good", "Unchecked"]
    result = mix(tmp_path, "guitar", rates_hz=[RATE], ignore_marks=True, include_unchecked=True, workers=1)
    assert "Bleedy" in [r["track"] for r in result["tracks"]]


@pytest.mark.parametrize("source_hz", [44100, 48000])
def test_resampling_keeps_frequency_and_length(tmp_path, source_hz):
    seconds = 1.0
    make_track(tmp_path, "Sine", {"g.wav": ("guitar", sine(1000.0, seconds, source_hz))}, rate_hz=source_hz,
               marks={"guitar": ["checked"]})
    result = mix(tmp_path, "guitar", rates_hz=[22050, 44100], workers=1)
    assert result["counts"] == {"mixed": 1}
    for rate in (22050, 44100):
        audio, file_rate = read(tmp_path / "mixes" / "guitar" / str(rate) / "Sine" / "instrument.wav")
        assert file_rate == rate
        assert audio.shape == (1, int(seconds * rate))
        spectrum = np.abs(np.fft.rfft(audio[0] * np.hanning(audio.shape[1])))
        peak_hz = np.argmax(spectrum) * rate / audio.shape[1]
        assert abs(peak_hz - 1000.0) <= 1.0
        # Band-limited: the level is kept away from the edges (no decimation without filtering).
        middle = audio[0, rate // 10: -rate // 10]
        assert np.abs(middle).max() == pytest.approx(0.5, abs=0.01)
        rest, _ = read(tmp_path / "mixes" / "guitar" / str(rate) / "Sine" / "rest.wav")
        assert not rest.any()  # a solo piece gets an all-zero rest


def test_stereo_mix_keeps_both_channels(tmp_path):
    left, right = _noise(0.5, 1), _noise(0.5, 2)
    make_track(tmp_path, "Wide", {"g.wav": ("guitar", np.stack([left, right])), "p.wav": ("piano", _noise(0.5, 3))},
               marks={"guitar": ["checked"]})
    mix(tmp_path, "guitar", rates_hz=[RATE], stereo=True, workers=1)
    audio, _ = read(tmp_path / "mixes" / "guitar" / f"{RATE}-stereo" / "Wide" / "instrument.wav")
    np.testing.assert_allclose(audio, np.stack([left, right]), atol=1e-7)
    rest, _ = read(tmp_path / "mixes" / "guitar" / f"{RATE}-stereo" / "Wide" / "rest.wav")
    assert rest.shape[0] == 2 and np.array_equal(rest[0], rest[1])  # a mono stem sits in the centre


def test_also_classes_join_the_instrument(tmp_path):
    g, p, d = _noise(0.5, 1), _noise(0.5, 2), _noise(0.5, 3)
    make_track(tmp_path, "Band", {"g.wav": ("guitar", g), "p.wav": ("piano", p), "d.wav": ("drums", d)},
               marks={"guitar": ["checked"]})
    mix(tmp_path, "guitar", also=["piano"], rates_hz=[RATE], workers=1)
    folder = tmp_path / "mixes" / "guitar+piano" / str(RATE) / "Band"
    np.testing.assert_allclose(read(folder / "instrument.wav")[0][0], g + p, atol=1e-6)
    np.testing.assert_allclose(read(folder / "rest.wav")[0][0], d, atol=1e-7)


def test_remixing_an_unchanged_track_is_skipped_and_a_changed_one_redone(tmp_path):
    make_track(tmp_path, "Song", {"g.wav": ("guitar", _noise(0.5, 1)), "d.wav": ("drums", _noise(0.5, 2))},
               marks={"guitar": ["checked"]})
    assert mix(tmp_path, "guitar", rates_hz=[RATE], workers=1)["counts"] == {"mixed": 1}
    wav = tmp_path / "mixes" / "guitar" / str(RATE) / "Song" / "instrument.wav"
    first_mtime = wav.stat().st_mtime_ns
    again = mix(tmp_path, "guitar", rates_hz=[RATE], workers=1)
    assert again["counts"] == {"skipped": 1} and wav.stat().st_mtime_ns == first_mtime
    # A new rate only mixes that rate.
    more = mix(tmp_path, "guitar", rates_hz=[RATE, 44100], workers=1)
    assert more["tracks"][0]["rates"] == {str(RATE): "skipped", "44100": "mixed"}
    # Changing a stem file makes the pair stale.
    stem = tmp_path / "library" / "Song" / "stems" / "g.wav"
    make_track(tmp_path, "Song", {"g.wav": ("guitar", _noise(0.5, 9)), "d.wav": ("drums", _noise(0.5, 2))},
               marks={"guitar": ["checked"]})
    os.utime(stem, ns=(first_mtime + 10**9, first_mtime + 10**9))
    assert mix(tmp_path, "guitar", rates_hz=[RATE], workers=1)["counts"] == {"mixed": 1}


def test_one_broken_track_is_reported_and_the_others_are_mixed(tmp_path):
    make_track(tmp_path, "A", {"g.wav": ("guitar", _noise(0.5, 1))}, marks={"guitar": ["checked"]})
    make_track(tmp_path, "B", {"g.wav": ("guitar", _noise(0.5, 2))}, marks={"guitar": ["checked"]})
    (tmp_path / "library" / "A" / "stems" / "g.wav").write_bytes(b"not audio at all")
    make_track(tmp_path, "C", {"g.wav": ("guitar", _noise(0.5, 3)), "u.wav": (None, _noise(0.5, 4))},
               marks={"guitar": ["checked"]})
    result = mix(tmp_path, "guitar", rates_hz=[RATE], workers=2)  # through the process pool
    by_track = {r["track"]: r for r in result["tracks"]}
    assert by_track["B"]["status"] == "mixed"
    assert by_track["A"]["status"] == "failed" and "g.wav" in by_track["A"]["error"]
    assert by_track["C"]["status"] == "failed" and "no class" in by_track["C"]["error"]
    assert result["counts"] == {"failed": 2, "mixed": 1}


def test_bad_requests_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="instrument must be one of"):
        mix(tmp_path, "kazoo", rates_hz=[RATE])
    with pytest.raises(ValueError, match="rate"):
        mix(tmp_path, "guitar", rates_hz=[100])
    with pytest.raises(ValueError, match="instrument must be one of"):
        mix(tmp_path, "mix", rates_hz=[RATE])


def test_a_stop_request_ends_the_job_after_the_running_track(tmp_path):
    for name in ("A", "B", "C"):
        make_track(tmp_path, name, {"g.wav": ("guitar", _noise(0.2, ord(name)))}, marks={"guitar": ["checked"]})
    seen = []
    result = mix(tmp_path, "guitar", rates_hz=[RATE], workers=1,
                 progress=lambda done, total, message="": seen.append((done, total, message)),
                 should_stop=lambda: len(seen) >= 2)
    assert result["stopped"] and [r["track"] for r in result["tracks"]] == ["A"]
    assert seen == [(0, 3, "3 tracks to do"), (1, 3, "A: mixed")]


def test_a_track_checked_for_the_instrument_without_its_stem_is_named_and_an_empty_mix_is_refused(tmp_path):
    # Stems named "Guitars.wav" used to stay unmapped; a person checks the song for guitar and
    # the mix used to leave it out without a word.
    make_track(tmp_path, "Song10", {"Guitars.wav": (None, _noise(0.5, 1)), "d.wav": ("drums", _noise(0.5, 2))},
               marks={"guitar": ["checked"]})
    make_track(tmp_path, "Unchecked", {"g.wav": ("guitar", _noise(0.5, 3))})
    library = Library(tmp_path)
    with pytest.raises(FailedPreconditionError) as e:
        require_usable(library, "guitar")
    assert str(e.value) == (
        "no track can be mixed for guitar: 1 checked for guitar, but no stem is classed guitar; 1 not checked "
        "(confirm a track with `stemlab dataset mark TRACK --instrument guitar --mark checked`, or pass "
        "--include-unchecked for generated songs)")
    with pytest.raises(FailedPreconditionError, match="no track in the library has a stem classed piano"):
        require_usable(library, "piano")
    require_usable(library, "guitar", include_unchecked=True)
    result = mix(tmp_path, "guitar", rates_hz=[RATE], include_unchecked=True, workers=1)
    assert [r["track"] for r in result["tracks"]] == ["Unchecked"]
    assert result["left_out"] == [{"track": "Song10", "reason": "checked for guitar, but no stem is classed guitar "
                                   "(unmapped: Guitars.wav; stemlab dataset set-class)"}]

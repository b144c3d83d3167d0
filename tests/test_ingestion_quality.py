"""Automatic quality checks: quiet on clean generated songs, loud on planted faults."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.audio import read_audio, write_audio
from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.importers import import_tracks, read_medleydb
from services.ingestion.mapping import Mapping
from services.ingestion.quality import Thresholds, check_library, check_track, longest_run, stem_features
from services.ingestion.synth import generate_songs


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "mdb"
    generate_songs(root, songs=2, seconds=6, seed=3, layout="medleydb", rate=22050)
    return root


@pytest.fixture
def library(tmp_path, generated):
    # Copy, not link: the tests below rewrite stems in the library.
    lib = Library(DataRoot(tmp_path / "data").ensure())
    report = import_tracks(lib, read_medleydb(generated, Mapping.defaults()), link=False)
    assert len(report.added) == 2 and not report.errors
    return lib


def test_clean_generated_songs_get_no_suggestions(library):
    result = check_library(library)
    assert result["tracks_checked"] == 2
    assert result["suggestions"] == 0, result["by_check"]
    assert all(not t.suggestions for t in library.tracks())


def _stem(lib, track, cls):
    return next(s for s in track.stems if s.cls == cls)


def _rewrite(lib, track, stem, fn):
    path = lib.stem_path(track, stem)
    audio, rate = read_audio(path)
    out, rate = fn(audio, rate)
    write_audio(path, out, rate)


def test_planted_faults_are_suggested_with_evidence(library):
    t1, t2 = library.tracks()
    guitar, bass, piano, drums = (_stem(library, t1, c) for c in ("guitar", "bass", "piano", "drums"))
    _rewrite(library, t1, guitar, lambda a, r: (np.clip(a * 20, -1, 1), r))                 # clipped
    _rewrite(library, t1, bass, lambda a, r: (np.zeros_like(a), r))                         # silent
    _rewrite(library, t1, piano, lambda a, r: (a + 0.2, r))                                 # DC-shifted
    _rewrite(library, t1, drums, lambda a, r: (a[:, : a.shape[1] - 2 * r], r))              # 2 s short
    result = check_library(library, track_id=t1.id)
    got = {(s["check"], s["stem"]) for s in library.load(t1.id).suggestions}
    assert ("clipping", guitar.file) in got
    assert ("missing", bass.file) in got
    assert ("dc_offset", piano.file) in got
    assert ("format", drums.file) in got
    assert result["flagged"] == {t1.id: len(got)}
    # Nothing is applied silently.
    assert not library.load(t1.id).marks
    by = {(s["check"], s["stem"]): s for s in library.load(t1.id).suggestions}
    assert by[("missing", bass.file)]["mark"] == "missing"
    assert by[("missing", bass.file)]["evidence"]["peak_dbfs"] < -60
    assert by[("format", drums.file)]["evidence"]["longest_seconds"] - by[("format", drums.file)]["evidence"]["seconds"] == pytest.approx(2.0, abs=0.01)
    assert by[("clipping", guitar.file)]["instrument"] == "guitar"
    # Re-running replaces the automatic suggestions instead of piling them up.
    check_library(library, track_id=t1.id)
    assert len(library.load(t1.id).suggestions) == len(got)


def test_bleed_inaudible_and_mislabeled(library):
    t = library.tracks()[1]
    piano, drums = _stem(library, t, "piano"), _stem(library, t, "drums")
    drums_audio, rate = read_audio(library.stem_path(t, drums))

    def bleed(a, r):
        a = a.copy()
        a[:, r: 4 * r] = 0.0  # the piano rests for three seconds ...
        n = min(a.shape[1], drums_audio.shape[1])
        a[:, :n] += 0.01 * drums_audio[:, :n]  # ... while its microphone hears the drums at -40 dB
        return a, r
    _rewrite(library, t, piano, bleed)
    check_library(library, track_id=t.id)
    s = [x for x in library.load(t.id).suggestions if x["check"] == "bleed"]
    assert [(x["stem"], x["evidence"]["from_stem"]) for x in s] == [(piano.file, drums.file)]
    assert s[0]["evidence"]["correlation"] > 0.7

    guitar = _stem(library, t, "guitar")
    _rewrite(library, t, guitar, lambda a, r: (a * 10 ** (-40 / 20), r))
    check_library(library, track_id=t.id)
    s = [x for x in library.load(t.id).suggestions if x["check"] == "inaudible"]
    assert [x["stem"] for x in s] == [guitar.file] and s[0]["evidence"]["below_rest_db"] > 30

    # A drum stem labelled piano: its spectrum is flat (noise-like), a piano's is peaky.
    feats = stem_features(drums_audio, rate, drums.file, "piano")
    assert feats.flatness > Thresholds().flatness_max
    assert [x["check"] for x in check_track([feats])] == ["mislabeled"]


def test_other_rates_and_short_tails_are_not_suggested():
    # Mixing resamples and pads stems exactly, so a 48 kHz DI in a 44.1 kHz session, or a stem
    # whose export stopped half a second early, is no fault; a stem cut 2 s short is.
    rate = 8000
    a = np.sin(np.arange(rate * 4) / rate * 2 * np.pi * 220)[None].astype(np.float32) * 0.5
    f1 = stem_features(a, rate, "stems/a.wav", "guitar")
    f2 = stem_features(a[:, : -rate // 2], rate, "stems/b.wav", "bass")
    f3 = stem_features(np.repeat(a, 2, axis=1), 2 * rate, "stems/c.wav", "drums")
    assert [s for s in check_track([f1, f2, f3]) if s["check"] == "format"] == []
    f4 = stem_features(a[:, : -2 * rate], rate, "stems/d.wav", "piano")
    assert [(s["check"], s["stem"]) for s in check_track([f1, f4]) if s["check"] == "format"] == [
        ("format", "stems/d.wav")]


def test_longest_run():
    assert longest_run(np.array([0, 1, 1, 0, 1, 1, 1, 0], bool)) == (3, 2)
    assert longest_run(np.zeros(5, bool)) == (0, 0)


def test_unknown_track_is_not_found(library):
    from services.common.errors import NotFoundError
    with pytest.raises(NotFoundError):
        check_library(library, track_id="nope")


"""Dataset manifests built from mix sets."""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pytest

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.library import Library
from services.common.manifest import find_manifest, load_manifest
from services.processing.datasets import allocate, build_dataset, track_hash_fraction
from services.processing.mixing import mix
from services.processing.silence import AdjustParams
from services.processing.silence_sets import adjust_silence
from tests.test_processing_support import make_track

RATE = 22050


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


def _library(root, synthetic: int = 6, solo: int = 3):
    for i in range(synthetic):
        make_track(root, f"Synth{i:02d}", {"g.wav": ("guitar", _noise(0.3, i)), "d.wav": ("drums", _noise(0.3, 100 + i))},
                   source="synthetic", marks={"guitar": ["checked"]})
    for i in range(solo):
        make_track(root, f"Solo{i:02d}", {"g.wav": ("guitar", _noise(0.3, 200 + i))}, source="solo",
                   marks={"guitar": ["checked"]})
    mix(root, "guitar", rates_hz=[RATE], workers=1)


def test_building_twice_gives_the_same_version_and_a_changed_parameter_a_new_one(tmp_path):
    _library(tmp_path)
    first = build_dataset(tmp_path, "g22", "guitar", RATE, workers=1)
    assert first["created"] and first["version"] == 1 and first["pairs"] == 9
    text = find_manifest(tmp_path, "g22", 1).read_text()
    second = build_dataset(tmp_path, "g22", "guitar", RATE, workers=1)
    assert not second["created"] and second["version"] == 1
    assert find_manifest(tmp_path, "g22", 1).read_text() == text
    third = build_dataset(tmp_path, "g22", "guitar", RATE, validation_ratio=0.5, workers=1)
    assert third["created"] and third["version"] == 2
    assert find_manifest(tmp_path, "g22", 1).read_text() == text  # the old version is untouched


def test_pairs_carry_checksums_and_an_md5_split(tmp_path):
    _library(tmp_path)
    build_dataset(tmp_path, "g22", "guitar", RATE, workers=1)
    manifest = load_manifest(find_manifest(tmp_path, "g22"))
    assert manifest.instrument == "guitar" and manifest.rate == RATE and manifest.channels == 1
    assert manifest.checksum == manifest.compute_checksum()
    for pair in manifest.pairs:
        for role in ("instrument", "rest"):
            path = manifest.path_of(getattr(pair, role), tmp_path)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == pair.sha256[role]
        expected = "validation" if int(hashlib.md5(pair.track.encode()).hexdigest(), 16) / 16**32 < 0.2 else "train"
        assert pair.split == expected
        assert pair.seconds == pytest.approx(0.3, abs=1e-3)
        assert re.fullmatch(rf"mixes/guitar/{RATE}/{pair.track}/instrument\.[0-9a-f]{{16}}\.wav", pair.instrument)
    assert manifest.params["source_tracks"]["Synth00"]["stems"][0]["file"] == "stems/d.wav"
    assert manifest.code_version


def test_an_explicit_validation_list_decides_the_split(tmp_path):
    _library(tmp_path)
    result = build_dataset(tmp_path, "g22", "guitar", RATE, validation_tracks=["Solo01", "Synth03", "Nope"], workers=1)
    manifest = load_manifest(find_manifest(tmp_path, "g22"))
    assert sorted(p.track for p in manifest.split("validation")) == ["Solo01", "Synth03"]
    assert result["unknown_validation_tracks"] == ["Nope"]


def test_a_track_list_restricts_the_candidates_and_only_then_enters_the_manifest(tmp_path):
    _library(tmp_path)
    plain = build_dataset(tmp_path, "all", "guitar", RATE, workers=1)
    assert "tracks" not in load_manifest(find_manifest(tmp_path, "all")).params
    result = build_dataset(tmp_path, "some", "guitar", RATE, tracks=["Synth01", "Solo02", "Synth04", "Gone"], workers=1)
    manifest = load_manifest(find_manifest(tmp_path, "some"))
    assert sorted(p.track for p in manifest.pairs) == ["Solo02", "Synth01", "Synth04"]
    assert manifest.params["tracks"] == ["Gone", "Solo02", "Synth01", "Synth04"]
    assert result["unknown_tracks"] == ["Gone"] and plain["unknown_tracks"] == []
    # The md5 split of a listed track is the one it has without the list.
    everything = {p.track: p.split for p in load_manifest(find_manifest(tmp_path, "all")).pairs}
    assert all(p.split == everything[p.track] for p in manifest.pairs)
    with pytest.raises(FailedPreconditionError, match="among the listed tracks"):
        build_dataset(tmp_path, "none", "guitar", RATE, tracks=["Gone"], workers=1)
    with pytest.raises(InvalidArgumentError, match="empty"):
        build_dataset(tmp_path, "none", "guitar", RATE, tracks=[], workers=1)
    assert not (tmp_path / "datasets" / "none").exists()


def test_sources_are_combined_by_ratio_under_a_cap(tmp_path):
    _library(tmp_path, synthetic=6, solo=3)
    result = build_dataset(tmp_path, "mixed", "guitar", RATE, sources={"synthetic": 3, "solo": 1}, max_tracks=4,
                           workers=1)
    manifest = load_manifest(find_manifest(tmp_path, "mixed"))
    chosen = {p.source: sorted(q.track for q in manifest.pairs if q.source == p.source) for p in manifest.pairs}
    synth_ids = sorted((f"Synth{i:02d}" for i in range(6)), key=track_hash_fraction)
    solo_ids = sorted((f"Solo{i:02d}" for i in range(3)), key=track_hash_fraction)
    assert chosen == {"synthetic": sorted(synth_ids[:3]), "solo": sorted(solo_ids[:1])}
    assert manifest.sources == {"solo": 1.0, "synthetic": 3.0}
    assert result["selection"] == {"solo": {"available": 3, "chosen": 1}, "synthetic": {"available": 6, "chosen": 3}}
    only_solo = build_dataset(tmp_path, "solo", "guitar", RATE, sources={"solo": 1}, workers=1)
    assert only_solo["pairs"] == 3


def test_allocation_keeps_the_ratio_when_a_source_runs_short():
    assert allocate({"synthetic": 100, "solo": 100}, {"synthetic": 3, "solo": 1}, 10) == {"synthetic": 8, "solo": 2}
    assert allocate({"synthetic": 100, "solo": 1}, {"synthetic": 3, "solo": 1}, 8) == {"synthetic": 6, "solo": 1}
    assert allocate({"synthetic": 5}, {"synthetic": 1}, None) == {"synthetic": 5}


def test_a_track_marked_bleed_after_mixing_is_left_out_in_a_new_version(tmp_path):
    _library(tmp_path, synthetic=3, solo=0)
    assert build_dataset(tmp_path, "g22", "guitar", RATE, workers=1)["pairs"] == 3
    library = Library(tmp_path)
    track = library.load("Synth01")
    track.set_mark("guitar", "bleed")
    library.save(track)
    result = build_dataset(tmp_path, "g22", "guitar", RATE, workers=1)
    assert result["created"] and result["version"] == 2 and result["pairs"] == 2
    assert result["left_out"] == [{"track": "Synth01", "reason": "not usable for guitar now (marked bleed)"}]


def test_a_track_removed_from_the_library_after_mixing_is_left_out(tmp_path):
    _library(tmp_path, synthetic=3, solo=0)
    shutil.rmtree(Library(tmp_path).track_dir("Synth02"))  # its mix stays behind
    result = build_dataset(tmp_path, "g22", "guitar", RATE, workers=1)
    assert result["created"] and result["pairs"] == 2
    assert result["left_out"] == [{"track": "Synth02", "reason": "no longer in the library"}]


def test_a_silence_adjusted_dataset_leaves_out_discarded_tracks(tmp_path):
    make_track(tmp_path, "Loud", {"g.wav": ("guitar", _noise(2.0, 1))}, marks={"guitar": ["checked"]})
    make_track(tmp_path, "Quiet", {"g.wav": ("guitar", np.zeros(2 * RATE, np.float32)), "d.wav": ("drums", _noise(2.0, 2))},
               marks={"guitar": ["checked"]})
    mix(tmp_path, "guitar", rates_hz=[RATE], workers=1)
    with pytest.raises(LookupError, match="silence adjust"):
        build_dataset(tmp_path, "adj", "guitar", RATE, silence_adjusted=(0.7, 0.5), workers=1)
    adjust_silence(tmp_path, "guitar", RATE, adjust_params=AdjustParams(0.7, 0.5), workers=1)
    result = build_dataset(tmp_path, "adj", "guitar", RATE, silence_adjusted=(0.7, 0.5), workers=1)
    manifest = load_manifest(find_manifest(tmp_path, "adj"))
    assert [p.track for p in manifest.pairs] == ["Loud"]
    assert re.fullmatch(rf"mixes/guitar/{RATE}-silence-0.7-0.5/Loud/instrument\.[0-9a-f]{{16}}\.wav", manifest.pairs[0].instrument)
    assert result["left_out"] == [{"track": "Quiet", "reason": "discarded by silence adjustment"}]


def test_bad_requests_raise_clear_errors(tmp_path):
    _library(tmp_path, synthetic=1, solo=0)
    with pytest.raises(ValueError, match="unknown source"):
        build_dataset(tmp_path, "x", "guitar", RATE, sources={"youtube": 1})
    with pytest.raises(ValueError, match="invalid dataset name"):
        build_dataset(tmp_path, "../x", "guitar", RATE)
    with pytest.raises(LookupError, match="stemlab mix"):
        build_dataset(tmp_path, "x", "guitar", 44100)
    with pytest.raises(Exception, match="no usable pairs"):
        build_dataset(tmp_path, "x", "guitar", RATE, sources={"solo": 1})

"""Slakh2100 as published: BabySlakh (16 kHz WAV, no split folders) and slakh2100_flac_redux
(train/validation/test/omitted, FLAC), where metadata and files disagree.

The fixtures are made here with the keys of the published metadata.yaml (UUID, audio_dir,
lmd_midi_dir, midi_dir, normalization_factor, normalized, overall_gain, target_peak; per stem
audio_rendered, inst_class, integrated_loudness, is_drum, midi_program_name, midi_saved,
plugin_name, program_num). BabySlakh's files mark every stem `audio_rendered: false` and
`midi_saved: false` although it ships their audio; a stem Slakh never rendered has
`plugin_name: None` and no integrated_loudness. The audio is tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.importers import count_candidates, import_tracks, read_slakh
from services.ingestion.mapping import Mapping
from tests.ingestion_data import drums, tone, write
from tests.servicetools import ServiceProcess, run_cli

BABY_RATE = 16000
REDUX_RATE = 44100


def _stem(inst_class, program_name, program, plugin, loudness=-27.75, is_drum=False, rendered=True):
    entry = {"audio_rendered": rendered, "inst_class": inst_class, "integrated_loudness": loudness,
             "is_drum": is_drum, "midi_program_name": program_name, "midi_saved": rendered,
             "plugin_name": plugin, "program_num": program}
    if plugin == "None":  # never rendered: Slakh has no loudness for it
        del entry["integrated_loudness"]
    return entry


# Track00001's stems (S00 as in the Slakh documentation: Distortion Guitar, program 30).
TRACK1_STEMS = {
    "S00": _stem("Guitar", "Distortion Guitar", 30, "elektrik_guitar.nkm", -12.82074180245363),
    "S01": _stem("Piano", "Acoustic Grand Piano", 0, "the_grandeur.nkm"),
    "S02": _stem("Bass", "Electric Bass (pick)", 34, "classic_bass.nkm"),
    "S03": _stem("Guitar", "Overdriven Guitar", 29, "elektrik_guitar.nkm"),
    "S04": _stem("Guitar", "Electric Guitar (jazz)", 26, "funk_guitar.nkm"),
    "S05": _stem("Strings (continued)", "String Ensemble 1", 48, "session_strings.nkm"),
    "S06": _stem("Drums", "Drums", 128, "pop_kit.nkm", is_drum=True),
    "S07": _stem("Guitar", "Electric Guitar (clean)", 27, "jazz_guitar2.nkm"),
    "S08": _stem("Guitar", "Acoustic Guitar (steel)", 25, "nylon_guitar.nkm"),
    "S09": _stem("Piano", "Bright Acoustic Piano", 1, "the_grandeur.nkm"),
    "S10": _stem("Organ", "Drawbar Organ", 16, "organ.nkm"),
}
TRACK1_CLASSES = {"S00": "guitar", "S01": "piano", "S02": "bass", "S03": "guitar", "S04": "guitar",
                  "S05": "other", "S06": "drums", "S07": "guitar", "S08": "guitar", "S09": "piano",
                  "S10": "other"}


# UUID -> where Lakh has the MIDI file (lmd_midi_dir), as Slakh's metadata gives it.
LMD_DIRS = {"1a81ae092884234f3264e2f45927f00a": "lmd_matched/O/O/H/TROOHTB128F931F9DF",
            "136e224ff9848e53c33322f58d58f1b3": "lmd_matched/Z/V/A/TRZVABW12903CC606A"}


def _metadata(uuid: str, stems: dict) -> dict:
    return {"UUID": uuid, "audio_dir": "stems", "lmd_midi_dir": f"{LMD_DIRS[uuid]}/{uuid}.mid", "midi_dir": "MIDI",
            "normalization_factor": -13.0, "normalized": True, "overall_gain": 0.18270259567062658,
            "stems": stems, "target_peak": -1.0}


def _audio(entry: dict, seconds: float, rate: int, n: int, track: int):
    # Each track sounds its own (the importer recognises the same audio from a second place).
    if entry["is_drum"]:
        return drums(seconds, rate=rate, channels=1, seed=n + 100 * track)
    return tone(seconds, 110 * (1 + n % 5) + track, rate=rate, channels=1)


def _write_track(d: Path, meta: dict, files: list[str], suffix: str, rate: int, seconds: float) -> Path:
    """TrackNNNNN/: metadata.yaml, stems/<file><suffix> for each of `files`, mix, MIDI/, all_src.mid."""
    mix = None
    track = int(d.name.removeprefix("Track"))
    for n, key in enumerate(files):
        entry = meta["stems"].get(key, {"is_drum": False})
        audio = _audio(entry, seconds, rate, n, track)
        write(d / "stems" / f"{key}{suffix}", audio, rate)
        mix = audio if mix is None else mix + audio
    write(d / f"mix{suffix}", mix / max(1, len(files)), rate)
    (d / "MIDI").mkdir(parents=True, exist_ok=True)
    for key in meta["stems"]:
        (d / "MIDI" / f"{key}.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0")
    (d / "all_src.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0")
    (d / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
    return d


def make_babyslakh(root: Path, seconds: float = 0.5) -> Path:
    """babyslakh_16k/: Track00001 as published (every stem flagged not rendered, every stem there)
    and Track00002 with a stem Slakh never rendered (no file) beside two it did."""
    baby = {k: {**v, "audio_rendered": False, "midi_saved": False} for k, v in TRACK1_STEMS.items()}
    _write_track(root / "Track00001", _metadata("1a81ae092884234f3264e2f45927f00a", baby), list(baby),
                 ".wav", BABY_RATE, seconds)
    track2 = {"S00": _stem("Piano", "Electric Piano 1", 4, "scarbee_clavinet_full.nkm", rendered=False),
              "S01": _stem("Ethnic", "Fiddle", 110, "None", rendered=False),
              "S02": _stem("Drums", "Drums", 128, "pop_kit.nkm", is_drum=True, rendered=False)}
    _write_track(root / "Track00002", _metadata("136e224ff9848e53c33322f58d58f1b3", track2), ["S00", "S02"],
                 ".wav", BABY_RATE, seconds)
    return root


def make_redux(root: Path, seconds: float = 0.25) -> Path:
    """slakh2100_flac_redux/{train,validation,test,omitted}/TrackNNNNN with FLAC stems.

    train/Track00001: S03 listed as rendered but its file is missing; S04 not rendered and not
    there (they agree); stems/S11.flac is there but not listed. omitted/Track00002 is a MIDI
    duplicate that redux left out.
    """
    stems = {k: dict(v) for k, v in TRACK1_STEMS.items() if k in ("S00", "S01", "S02", "S03", "S06")}
    stems["S04"] = _stem("Ethnic", "Fiddle", 110, "None", rendered=False)
    _write_track(root / "train" / "Track00001", _metadata("1a81ae092884234f3264e2f45927f00a", stems),
                 ["S00", "S01", "S02", "S06", "S11"], ".flac", REDUX_RATE, seconds)
    small = {k: dict(TRACK1_STEMS[k]) for k in ("S00", "S01", "S06")}
    for split, name in (("validation", "Track01501"), ("test", "Track01876"), ("omitted", "Track00002")):
        _write_track(root / split / name, _metadata("136e224ff9848e53c33322f58d58f1b3", small), list(small),
                     ".flac", REDUX_RATE, seconds)
    return root


@pytest.fixture
def library(tmp_path) -> Library:
    return Library(DataRoot(tmp_path / "data").ensure())


@pytest.fixture(scope="module")
def mapping() -> Mapping:
    return Mapping.defaults()


def test_babyslakh_imports_every_stem_that_exists_and_reports_the_flags(tmp_path, library, mapping):
    root = make_babyslakh(tmp_path / "babyslakh_16k")
    report = import_tracks(library, read_slakh(root, mapping))
    assert report.added == ["Track00001", "Track00002"] and not report.errors and not report.unmapped
    t = library.load("Track00001")
    assert (t.rate, t.channels, t.duration_seconds) == (BABY_RATE, 1, 0.5)
    got = {s.file: (s.raw_instrument, s.cls) for s in t.stems}
    want = {f"stems/{k}.wav": (v["midi_program_name"], TRACK1_CLASSES[k]) for k, v in TRACK1_STEMS.items()}
    assert got == {**want, "stems/mix.wav": ("mix", "mix")}
    assert got["stems/S00.wav"] == ("Distortion Guitar", "guitar")
    assert got["stems/S01.wav"] == ("Acoustic Grand Piano", "piano")
    assert {"guitar", "piano", "bass", "drums", "mix"} <= t.classes()

    # Every flag that the files contradict is reported; Track00002's Fiddle was never rendered
    # and is not there, so metadata and files agree about it and it is neither imported nor listed.
    assert [(d["track"], d["stem"], d["file"], d["action"]) for d in report.disagreements] == (
        [("Track00001", k, f"stems/{k}.wav", "imported") for k in TRACK1_STEMS]
        + [("Track00002", "S00", "stems/S00.wav", "imported"), ("Track00002", "S02", "stems/S02.wav", "imported")])
    first = report.disagreements[0]
    assert first["reason"] == "metadata.yaml says audio_rendered: false, but the file exists"
    assert (first["instrument"], first["class"]) == ("Distortion Guitar, program 30", "guitar")
    assert report.to_dict()["counts"] == {"added": 2, "updated": 0, "unchanged": 0, "errors": 0,
                                          "disagreements": 13, "skipped": 0, "ignored": 0,
                                          "duplicates": 0}
    assert [s.file for s in library.load("Track00002").stems] == ["stems/S00.wav", "stems/S02.wav", "stems/mix.wav"]

    # A second import changes nothing and still says where the metadata is wrong.
    again = import_tracks(library, read_slakh(root, mapping))
    assert again.unchanged == ["Track00001", "Track00002"] and len(again.disagreements) == 13


def test_redux_layout_splits_flac_omitted_and_both_disagreements(tmp_path, library, mapping):
    root = make_redux(tmp_path / "slakh2100_flac_redux")
    assert count_candidates("slakh", root) == 3
    report = import_tracks(library, read_slakh(root, mapping))
    assert report.added == ["Track00001", "Track01501", "Track01876"] and not report.errors
    assert report.skipped == [{"track": "Track00002", "reason": "in omitted/: Slakh2100-redux left it out as a "
                                                                "MIDI duplicate of another track"}]
    t = library.load("Track00001")
    assert t.rate == REDUX_RATE and t.origin == str((root / "train" / "Track00001").resolve())
    assert {s.file: (s.raw_instrument, s.cls, s.suggested) for s in t.stems} == {
        "stems/S00.flac": ("Distortion Guitar", "guitar", False),
        "stems/S01.flac": ("Acoustic Grand Piano", "piano", False),
        "stems/S02.flac": ("Electric Bass (pick)", "bass", False),
        "stems/S06.flac": ("Drums", "drums", False),
        "stems/S11.flac": ("S11", None, False),
        "stems/mix.flac": ("mix", "mix", False),
    }
    assert report.unmapped == {"S11": 1}
    assert [(d["track"], d["stem"], d["file"], d["action"], d["reason"]) for d in report.disagreements] == [
        ("Track00001", "S03", "stems/S03", "skipped",
         "listed in metadata.yaml as rendered, but there is no stems/S03.flac or stems/S03.wav"),
        ("Track00001", "S11", "stems/S11.flac", "imported",
         "not listed in metadata.yaml: imported without a class (give it one before the track can be mixed)"),
    ]
    assert report.disagreements[0]["instrument"] == "Overdriven Guitar, program 29"
    # --limit counts imported tracks; pointing at omitted/ itself imports its tracks.
    assert import_tracks(library, read_slakh(root, mapping, limit=1)).unchanged == ["Track00001"]
    assert import_tracks(library, read_slakh(root / "omitted", mapping)).added == ["Track00002"]


def test_cli_import_lists_stems_and_disagreements_through_the_service(tmp_path):
    baby = make_babyslakh(tmp_path / "babyslakh_16k")
    redux = make_redux(tmp_path / "slakh2100_flac_redux")
    with ServiceProcess("ingestion", tmp_path / "data") as svc:
        env = {"STEMLAB_INGESTION_ADDRESS": svc.address}
        r = run_cli("dataset", "import", "slakh", str(baby), env=env)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert "SUCCEEDED: 2 added, 0 updated, 0 unchanged, 0 errors, 13 metadata/file disagreements, " \
               "0 tracks skipped, 0 unmapped names" in out
        assert "Track00001 (added): 12 stems, 16000 Hz, 0.5 s" in out
        lines = out.splitlines()
        assert any(line.split() == ["stems/S00.wav", "guitar", "Distortion", "Guitar"] for line in lines)
        assert any(line.split() == ["stems/S01.wav", "piano", "Acoustic", "Grand", "Piano"] for line in lines)
        assert any(line.split() == ["stems/S06.wav", "drums", "Drums"] for line in lines)
        assert "metadata and files disagree (13); the files were followed:" in out
        assert ("  Track00001 S00 [Distortion Guitar, program 30 -> guitar] imported: stems/S00.wav: "
                "metadata.yaml says audio_rendered: false, but the file exists") in lines

        r = run_cli("dataset", "import", "slakh", str(redux), env=env)
        assert r.returncode == 0, r.stderr
        assert "3 added" in r.stdout and "2 metadata/file disagreements, 1 tracks skipped, 1 unmapped names" \
            in r.stdout
        # Named by the library id: BabySlakh's Track00001 already holds "Track00001".
        assert ("  Track00001_2 S03 [Overdriven Guitar, program 29 -> guitar] skipped: stems/S03: "
                "listed in metadata.yaml as rendered, but there is no stems/S03.flac or stems/S03.wav"
                in r.stdout.splitlines())
        assert "  Track00002: in omitted/: Slakh2100-redux left it out as a MIDI duplicate of another track" \
            in r.stdout.splitlines()
        assert "Track00001_2 (added): 6 stems, 44100 Hz, 0.2 s" in r.stdout

        r = run_cli("dataset", "import", "slakh", str(baby), "--json", env=env)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1])["result"]
        assert result["unchanged"] == ["Track00001", "Track00002"]
        assert result["counts"]["disagreements"] == 13
        assert {(d["track"], d["stem"], d["action"], d["class"]) for d in result["disagreements"]} >= {
            ("Track00001", "S00", "imported", "guitar"), ("Track00001", "S01", "imported", "piano")}

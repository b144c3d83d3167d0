"""research/real_instrument.py: a real take as the instrument of a generated song."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
import yaml

from realset.build import rms
from research import real_instrument
from services.common.audio import resample
from services.ingestion.importers import read_medleydb
from services.ingestion.mapping import Mapping
from tests.test_real_rest import make_song

HEADER = "file\trepo\tcommit\tpath\tlicence\twhat\n"


def make_takes(folder, names, seconds=1.0, rate=44100):
    """Takes as the helper folder holds them: tones at another rate, listed in takes.tsv."""
    folder.mkdir()
    rows = [HEADER]
    for i, name in enumerate(names):
        t = np.arange(int(seconds * rate)) / rate
        sf.write(folder / name, 0.05 * np.sin(2 * np.pi * (220 + 50 * i) * t), rate)
        rows.append(f"{name}\tsome/repo\tabc123\taudio/{name}\tCC BY 4.0\ta take\n")
    (folder / "takes.tsv").write_text("".join(rows))
    return folder


def test_the_take_replaces_the_guitar_at_its_level_and_the_song_still_sums(tmp_path):
    songs = tmp_path / "songs"
    song = make_song(songs, seconds=2.0)
    old_guitar = sf.read(song / "Synth_Song0001_STEMS" / "Synth_Song0001_STEM_01.wav")[0]
    takes = make_takes(tmp_path / "takes", ["01_Funk1-97-C_comp_mic.wav"])

    assert real_instrument.main([str(songs), str(takes), "--instrument", "guitar", "--seed", "4"]) == 0

    meta = yaml.safe_load((song / "Synth_Song0001_METADATA.yaml").read_text())
    given = meta["real_instrument"]
    assert given["take"] == "01_Funk1-97-C_comp_mic.wav" and given["replaced"] == ["S01"]
    assert sorted(meta["stems"]) == ["S02", "S80"]
    assert not (song / "Synth_Song0001_STEMS" / "Synth_Song0001_STEM_01.wav").exists()
    stems = {k: sf.read(song / meta["stem_dir"] / s["filename"])[0] for k, s in meta["stems"].items()}
    mix = sf.read(song / meta["mix_filename"])[0]
    np.testing.assert_allclose(mix, sum(stems.values()), atol=1e-6)
    level = 20 * np.log10(rms(stems["S80"].mean(axis=1)) / rms(old_guitar.mean(axis=1)))
    assert level == pytest.approx(given["level_db"], abs=0.01) and abs(level) <= 3.0

    track = next(t for t in read_medleydb(songs, Mapping.load()) if not isinstance(t, dict))
    assert sorted(s.cls for s in track.stems if s.cls != "mix") == ["drums", "guitar"]

    before = (song / "Synth_Song0001_MIX.wav").read_bytes()
    real_instrument.main([str(songs), str(takes), "--instrument", "guitar"])
    assert (song / "Synth_Song0001_MIX.wav").read_bytes() == before  # a song given a take is left alone


def reserve(monkeypatch, comp):
    """Stands for the reserved composition, which the project does not name: `comp` reserved too."""
    digest = hashlib.sha256(comp.encode()).hexdigest()
    monkeypatch.setattr(real_instrument, "RESERVED_COMPOSITIONS", real_instrument.RESERVED_COMPOSITIONS | {digest})


def test_takes_of_the_real_set_its_compositions_or_a_reserved_composition_are_refused(tmp_path, monkeypatch):
    reserve(monkeypatch, "Rock3-148-C")
    names = ["02_Jazz2-110-Bb_solo_mic.wav",  # a composition a validation take of the set plays
             "01_Rock3-148-C_comp_mic.wav",  # a reserved composition, any player
             "00_Rock3-148-C_solo_mix.wav",
             "02_Funk2-119-G_solo_mic.wav"]
    usable, refused = real_instrument.read_takes(make_takes(tmp_path / "takes", names))
    assert [t.file.name for t in usable] == ["02_Funk2-119-G_solo_mic.wav"]
    assert refused["02_Jazz2-110-Bb_solo_mic.wav"] == "composition Jazz2-110-Bb is played in the real-recordings set"
    assert refused["00_Rock3-148-C_solo_mix.wav"] == "a composition an independent check reserves"
    assert set(refused) == set(names[:3])
    assert len(real_instrument.RESERVED_COMPOSITIONS) == 2  # the issue reserves one GuitarSet take


def test_a_song_without_the_instrument_is_left_alone(tmp_path):
    songs = tmp_path / "songs"
    song = make_song(songs)
    before = (song / "Synth_Song0001_MIX.wav").read_bytes()
    takes = make_takes(tmp_path / "takes", ["01_Funk1-97-C_comp_mic.wav"])
    assert real_instrument.main([str(songs), str(takes), "--instrument", "piano"]) == 0
    assert (song / "Synth_Song0001_MIX.wav").read_bytes() == before
    assert "real_instrument" not in yaml.safe_load((song / "Synth_Song0001_METADATA.yaml").read_text())


def test_absent_songs_have_a_silent_instrument_and_the_rest_unchanged(tmp_path):
    songs = tmp_path / "songs"
    song = make_song(songs)
    drums = sf.read(song / "Synth_Song0001_STEMS" / "Synth_Song0001_STEM_02.wav")[0]
    assert real_instrument.main([str(songs), "--absent", "--instrument", "guitar"]) == 0

    meta = yaml.safe_load((song / "Synth_Song0001_METADATA.yaml").read_text())
    assert meta["real_instrument"] == {"stem": "S80", "absent": True, "replaced": ["S01"]}
    silent = sf.read(song / meta["stem_dir"] / meta["stems"]["S80"]["filename"])[0]
    assert not silent.any()
    np.testing.assert_allclose(sf.read(song / meta["mix_filename"])[0], drums, atol=1e-6)  # the mix is the rest
    track = next(t for t in read_medleydb(songs, Mapping.load()) if not isinstance(t, dict))
    assert sorted(s.cls for s in track.stems if s.cls != "mix") == ["drums", "guitar"]


def test_a_song_without_the_instrument_becomes_absent_too(tmp_path):
    songs = tmp_path / "songs"
    song = make_song(songs)
    real_instrument.main([str(songs), "--absent", "--instrument", "piano"])
    meta = yaml.safe_load((song / "Synth_Song0001_METADATA.yaml").read_text())
    assert meta["real_instrument"]["replaced"] == [] and meta["stems"]["S80"]["instrument"] == "piano"
    assert sorted(meta["stems"]) == ["S01", "S02", "S80"]


def test_a_guitarset_folder_gets_its_table_and_the_refusals_still_apply(tmp_path, monkeypatch):
    reserve(monkeypatch, "Rock3-148-C")
    folder = tmp_path / "audio_mono-mic"
    folder.mkdir()
    for name in ("00_Funk1-97-C_comp_mic.wav", "03_Jazz2-110-Bb_comp_mic.wav", "00_Rock3-148-C_solo_mic.wav",
                 "notes.wav"):
        sf.write(folder / name, np.zeros(22050), 22050)
    assert real_instrument.main(["--guitarset-tsv", str(folder)]) == 0
    usable, refused = real_instrument.read_takes(folder)
    assert [t.file.name for t in usable] == ["00_Funk1-97-C_comp_mic.wav"]
    assert usable[0].licence.startswith("CC BY 4.0")
    assert set(refused) == {"03_Jazz2-110-Bb_comp_mic.wav", "00_Rock3-148-C_solo_mic.wav"}


def test_a_bad_takes_table_or_file_is_a_clear_error_and_no_song_changes(tmp_path):
    songs = tmp_path / "songs"
    song = make_song(songs)
    before = (song / "Synth_Song0001_MIX.wav").read_bytes()
    takes = tmp_path / "takes"
    takes.mkdir()
    (takes / "takes.tsv").write_text("file,repo\nx.wav,r\n")  # commas, not tabs
    with pytest.raises(SystemExit, match="no column"):
        real_instrument.main([str(songs), str(takes)])
    (takes / "takes.tsv").write_text(HEADER + "01_Funk1-97-C_comp_mic.wav\tr\tc\tp\tCC0\ta take\n")
    (takes / "01_Funk1-97-C_comp_mic.wav").write_bytes(b"not audio")
    with pytest.raises(SystemExit, match="cannot read"):
        real_instrument.main([str(songs), str(takes)])
    assert (song / "Synth_Song0001_MIX.wav").read_bytes() == before


def test_a_renamed_file_is_still_refused_by_its_source_path(tmp_path):
    folder = make_takes(tmp_path / "takes", ["mine.wav"])
    (folder / "takes.tsv").write_text(HEADER + "mine.wav\tsome/repo\tabc\taudio/02_Jazz2-110-Bb_solo_mic.wav\tCC BY 4.0\tx\n")
    usable, refused = real_instrument.read_takes(folder)
    assert not usable and "Jazz2-110-Bb" in refused["mine.wav"]


def test_a_copy_of_a_set_recording_is_refused_by_its_sound(tmp_path, capsys):
    """The same recording under another repository and name, at another level and rate, with
    other audio around it, is still the set's recording: training on it would leak the yardstick."""
    stem = sf.read(real_instrument.STEMS / "val-guitar-elecguit1-0db" / "electric-guitar.flac")[0]
    rng = np.random.default_rng(0)
    copy = np.concatenate([0.01 * rng.standard_normal(22050), 0.3 * stem, 0.01 * rng.standard_normal(22050)])
    takes = make_takes(tmp_path / "takes", ["tone.wav"])
    sf.write(takes / "found.flac", resample(copy[None, :], 22050, 44100)[0], 44100)
    with (takes / "takes.tsv").open("a") as f:
        f.write("found.flac\tother/repo\tdef456\tsounds/guitar.flac\tCC0 1.0\ta guitar phrase\n")
    songs = tmp_path / "songs"
    song = make_song(songs, seconds=2.0)

    assert real_instrument.main([str(songs), str(takes), "--instrument", "guitar", "--seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["takes"] == {"tone.wav": 1}
    assert "val-guitar-elecguit" in report["refused"]["found.flac"]
    given = yaml.safe_load((song / "Synth_Song0001_METADATA.yaml").read_text())["real_instrument"]
    assert given["take"] == "tone.wav"

"""Synthetic multitracks: reproducible, stems that sum to the mix, silences where parts rest, and
folders and metadata laid out like the real MedleyDB and Slakh so one importer reads both."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile as sf
import yaml

from services.common.audio import read_audio
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.ingestion.synth import generate_songs, render_midi_file
from services.ingestion.synth.arrangement import compose_song
from services.ingestion.synth.generate import song_room
from services.ingestion.synth.loudness import integrated_loudness_lufs
from services.ingestion.synth.rendering import (
    DEFAULT_SOUNDFONT,
    add_reverb,
    check_soundfont,
    mix_stems,
    render_midi,
)

pytestmark = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not DEFAULT_SOUNDFONT.is_file(),
    reason="fluidsynth or FluidR3_GM missing",
)

RATE = 22050
SECONDS = 8.0
SEED = 7

# Hand-written in the structure of MedleyDB's <Song>_METADATA.yaml files (values invented).
MEDLEYDB_SAMPLE = """
album: Night Songs
artist: An Artist
composer: [An Artist]
excerpt: no
genre: Singer/Songwriter
has_bleed: yes
instrumental: no
mix_filename: AnArtist_NightSong_MIX.wav
origin: Dolan Studio
producer: [A Producer]
raw_dir: AnArtist_NightSong_RAW
stem_dir: AnArtist_NightSong_STEMS
stems:
  S01:
    component: melody
    filename: AnArtist_NightSong_STEM_01.wav
    instrument: female singer
    raw:
      R01: {filename: AnArtist_NightSong_RAW_01_01.wav, instrument: female singer}
  S02:
    component: ''
    filename: AnArtist_NightSong_STEM_02.wav
    instrument: clean electric guitar
    raw:
      R01: {filename: AnArtist_NightSong_RAW_02_01.wav, instrument: clean electric guitar}
      R02: {filename: AnArtist_NightSong_RAW_02_02.wav, instrument: clean electric guitar}
title: Night Song
version: 1.2
website: [www.example.com]
"""

# Hand-written in the structure of Slakh2100's TrackNNNNN/metadata.yaml files (values invented).
SLAKH_SAMPLE = """
UUID: 1a81ae092884234f3264e2f45927f00a
audio_dir: stems
lmd_midi_dir: lmd_matched/O/O/H/TROOHTB128F931F9DF/1a81ae092884234f3264e2f45927f00a.mid
midi_dir: MIDI
normalization_factor: -13.0
normalized: true
overall_gain: 0.18270259567062658
stems:
  S00:
    audio_rendered: true
    inst_class: Guitar
    integrated_loudness: -12.202014000324407
    is_drum: false
    midi_program_name: Distortion Guitar
    midi_saved: true
    plugin_name: elektrik_guitar.nkm
    program_num: 30
  S01:
    audio_rendered: true
    inst_class: Drums
    integrated_loudness: -11.37
    is_drum: true
    midi_program_name: Drums
    midi_saved: true
    plugin_name: session_drums_2.nkm
    program_num: 128
"""

MEDLEYDB_VOCABULARY = {
    "acoustic guitar", "clean electric guitar", "distorted electric guitar", "piano", "electric piano",
    "electric bass", "double bass", "drum set", "synthesizer", "string section", "vocalists", "choir",
    "brass section", "trumpet", "trombone", "organ", "fx/processed sound", "violin", "cello",
}  # fmt: skip
SLAKH_CLASSES = {
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Strings (continued)", "Brass",
    "Reed", "Pipe", "Synth Lead", "Synth Pad", "Sound Effects", "Ethnic", "Percussive", "Drums",
}  # fmt: skip


def checksums(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def medleydb_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("medleydb")
    calls = []
    summary = generate_songs(out, 3, SECONDS, SEED, rate=RATE, progress=lambda *a: calls.append(a))
    return out, summary, calls


@pytest.fixture(scope="module")
def slakh_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("slakh")
    return out, generate_songs(out, 2, SECONDS, SEED, layout="slakh", rate=RATE)


def test_same_seed_gives_byte_identical_files(medleydb_set, tmp_path):
    out, summary, _ = medleydb_set
    again = generate_songs(tmp_path, 3, SECONDS, SEED, rate=RATE)
    assert checksums(tmp_path) == checksums(out)
    assert len(checksums(out)) == sum(len(s["stems"]) + 2 for s in summary["songs"])
    other = generate_songs(tmp_path / "other", 1, SECONDS, SEED + 1, rate=RATE)
    assert checksums(tmp_path / "other") != {
        k: v for k, v in checksums(out).items() if k.startswith("Synth_Song001")
    }
    assert [s["instruments"] for s in again["songs"]] == [s["instruments"] for s in summary["songs"]]
    assert other["songs"][0]["name"] == "Synth_Song001"


def test_start_index_continues_the_same_set(slakh_set, tmp_path):
    out, _ = slakh_set
    summary = generate_songs(tmp_path, 1, SECONDS, SEED, layout="slakh", rate=RATE, start_index=1)
    assert summary["songs"][0]["name"] == "Track00002"
    assert checksums(tmp_path / "Track00002") == checksums(out / "Track00002")


@pytest.mark.parametrize("which", ["medleydb", "slakh"])
def test_stems_sum_to_the_mix_which_is_never_clipped(which, medleydb_set, slakh_set):
    out, summary = (medleydb_set[0], medleydb_set[1]) if which == "medleydb" else slakh_set
    for song in summary["songs"]:
        folder = Path(song["folder"])
        mix, rate = read_audio(folder / song["mix"])
        stems = [read_audio(folder / row["file"])[0] for row in song["stems"]]
        assert rate == RATE and mix.shape == (2, int(SECONDS * RATE))
        assert all(stem.shape == mix.shape for stem in stems)
        # Float WAV: exact up to float32 rounding. Slakh's 24-bit FLAC: stems are quantised first
        # and the mix is their sum, so it is exact there too.
        np.testing.assert_allclose(np.sum(stems, axis=0), mix, atol=1e-4)
        assert 20 * np.log10(np.abs(mix).max()) <= -1.0 + 1e-3


def test_stems_keep_their_natural_relative_levels(medleydb_set):
    _, summary, _ = medleydb_set
    song = summary["songs"][0]
    arrangement = compose_song(SEED, 0, SECONDS)
    folder = Path(song["folder"])
    ratios = []
    for part, row in zip(arrangement.parts, song["stems"], strict=True):
        dry = render_midi(arrangement.part_midi(part), check_soundfont(None), RATE, int(SECONDS * RATE))
        raw = add_reverb(dry, song_room(arrangement, RATE), part.reverb_send)
        stem = read_audio(folder / row["file"])[0]
        ratios.append(np.abs(stem).max() / np.abs(raw).max())
    # One gain for all stems: no stem was normalised on its own.
    np.testing.assert_allclose(ratios, song["gain"], rtol=1e-5)
    peaks = [row["peak_dbfs"] for row in song["stems"]]
    assert max(peaks) - min(peaks) > 1.0


def test_parts_rest_in_some_sections_and_the_stem_is_silent_there(medleydb_set):
    _, summary, _ = medleydb_set
    checked = 0
    for song in summary["songs"]:
        spans = [(s["start_seconds"], s["end_seconds"]) for s in song["sections"]]
        for row in song["stems"]:
            stem = read_audio(Path(song["folder"]) / row["file"])[0]
            for (start, end), active in zip(spans, row["active_sections"], strict=True):
                if active or end - start < 2.0:
                    continue
                # Allow release tails to die away, then demand silence (stopping 50 ms short of
                # the end: humanised onsets of the next section may come early).
                tail = stem[:, int((end - 0.5) * RATE) : int((end - 0.05) * RATE)]
                assert np.sqrt(np.mean(tail**2)) < 1e-3, (song["name"], row["part"], start)
                checked += 1
    assert checked >= 3


def test_guitar_and_piano_appear_in_most_songs_and_sometimes_rest():
    songs = [compose_song(SEED, index, 60.0) for index in range(120)]
    with_guitar = [s for s in songs if any(p.role in ("guitar", "lead_guitar") for p in s.parts)]
    with_piano = [s for s in songs if any(p.role == "piano" for p in s.parts)]
    assert 0.75 <= len(with_guitar) / len(songs) <= 0.95
    assert 0.75 <= len(with_piano) / len(songs) <= 0.95
    assert all(with_guitar or with_piano for s in songs)
    guitar_rests = [s for s in with_guitar if any(not all(p.active) for p in s.parts if p.role == "guitar")]
    piano_rests = [s for s in with_piano if any(not all(p.active) for p in s.parts if p.role == "piano")]
    assert 0.2 <= len(guitar_rests) / len(with_guitar) < 1.0
    assert 0.2 <= len(piano_rests) / len(with_piano) < 1.0
    programs = {p.program for s in songs for p in s.parts if p.role in ("guitar", "lead_guitar")}
    assert programs == set(range(24, 31))
    assert {p.program for s in songs for p in s.parts if p.role == "piano"} == {0, 1, 2, 4, 5}
    families = {p.role for s in songs for p in s.parts} - {"guitar", "lead_guitar", "piano", "bass", "drums"}
    assert len(families) >= 3
    assert {p.style for s in songs for p in s.parts if p.role == "guitar"} == {"strum", "arpeggio", "riff"}
    assert any(p.role == "lead_guitar" for s in songs for p in s.parts)
    assert {sec.name for s in songs for sec in s.sections} == {"intro", "verse", "chorus", "bridge", "outro"}
    assert len({(s.tempo_bpm, s.key_root, s.mode) for s in songs}) > 60


def test_arrangements_are_humanised():
    drums = next(p for p in compose_song(SEED, 3, 30.0).parts if p.role == "drums")
    velocities = {n.velocity for n in drums.instrument.notes}
    assert len(velocities) > 10
    beat = 60.0 / compose_song(SEED, 3, 30.0).tempo_bpm
    offsets = [abs(n.start / (beat / 2) - round(n.start / (beat / 2))) for n in drums.instrument.notes]
    assert 0 < np.median(offsets) < 0.1


def test_medleydb_layout_and_metadata_match_the_real_format(medleydb_set):
    out, summary, _ = medleydb_set
    sample = yaml.safe_load(MEDLEYDB_SAMPLE)
    assert sorted(p.name for p in out.iterdir()) == ["Synth_Song001", "Synth_Song002", "Synth_Song003"]
    for song in summary["songs"]:
        name, folder = song["name"], out / song["name"]
        metadata = yaml.safe_load((folder / f"{name}_METADATA.yaml").read_text())
        assert set(metadata) == set(sample)
        for key in sample:
            assert type(metadata[key]) is type(sample[key]) or sample[key] == "", key
        assert (folder / metadata["mix_filename"]).is_file()
        assert metadata["stem_dir"] == f"{name}_STEMS"
        stem_keys = set(sample["stems"]["S01"])
        raw_keys = set(sample["stems"]["S01"]["raw"]["R01"])
        assert list(metadata["stems"]) == [f"S{k:02d}" for k in range(1, len(metadata["stems"]) + 1)]
        for stem_id, stem in metadata["stems"].items():
            assert set(stem) == stem_keys
            assert stem["filename"] == f"{name}_STEM_{stem_id[1:]}.wav"
            assert (folder / metadata["stem_dir"] / stem["filename"]).is_file()
            assert stem["instrument"] in MEDLEYDB_VOCABULARY
            assert stem["component"] in ("", "melody", "bass")
            assert all(set(raw) == raw_keys for raw in stem["raw"].values())
        assert sf.info(folder / metadata["mix_filename"]).subtype == "FLOAT"
        assert metadata["instrumental"] == (not {"choir", "vocalists"} & set(song["instruments"]))


def test_slakh_layout_and_metadata_match_the_real_format(slakh_set):
    out, summary = slakh_set
    sample = yaml.safe_load(SLAKH_SAMPLE)
    assert sorted(p.name for p in out.iterdir()) == ["Track00001", "Track00002"]
    for song in summary["songs"]:
        folder = out / song["name"]
        metadata = yaml.safe_load((folder / "metadata.yaml").read_text())
        assert set(metadata) == set(sample)
        assert len(metadata["UUID"]) == 32 and int(metadata["UUID"], 16) >= 0
        assert (metadata["audio_dir"], metadata["midi_dir"]) == ("stems", "MIDI")
        assert isinstance(metadata["overall_gain"], float) and metadata["normalized"] is False
        assert list(metadata["stems"]) == [f"S{k:02d}" for k in range(len(metadata["stems"]))]
        all_src = pretty_midi.PrettyMIDI(str(folder / "all_src.mid"))
        assert len(all_src.instruments) == len(metadata["stems"])
        for stem_id, stem in metadata["stems"].items():
            assert set(stem) == set(sample["stems"]["S00"])
            assert stem["inst_class"] in SLAKH_CLASSES
            info = sf.info(folder / "stems" / f"{stem_id}.flac")
            assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_24", RATE)
            midi = pretty_midi.PrettyMIDI(str(folder / "MIDI" / f"{stem_id}.mid"))
            assert len(midi.instruments) == 1 and midi.instruments[0].is_drum == stem["is_drum"]
            if stem["is_drum"]:
                assert (stem["program_num"], stem["inst_class"]) == (128, "Drums")
            else:
                assert midi.instruments[0].program == stem["program_num"]
            loudness = integrated_loudness_lufs(read_audio(folder / "stems" / f"{stem_id}.flac")[0], RATE)
            assert stem["integrated_loudness"] == pytest.approx(loudness, abs=0.01)
        assert sf.info(folder / "mix.flac").subtype == "PCM_24"


def test_progress_is_reported_up_to_the_total(medleydb_set):
    _, _, calls = medleydb_set
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == 3 and all(c[1] == 3 for c in calls)
    assert any("rendering" in c[2] for c in calls)


def test_summary_is_plain_json(medleydb_set):
    _, summary, _ = medleydb_set
    assert json.loads(json.dumps(summary)) == summary
    song = summary["songs"][0]
    assert {"name", "folder", "mix", "stems", "instruments", "has_guitar", "has_piano"} <= set(song)
    assert summary["totals"]["songs"] == 3 and summary["stopped"] is False


def write_user_midi(path: Path) -> None:
    midi = pretty_midi.PrettyMIDI(initial_tempo=100)
    piano = pretty_midi.Instrument(0, name="Keys")
    guitar = pretty_midi.Instrument(25, name="Gtr")
    drums = pretty_midi.Instrument(0, is_drum=True, name="Kit")
    for k in range(8):
        piano.notes.append(pretty_midi.Note(80, 60 + k % 5, k * 0.5, k * 0.5 + 0.4))
        drums.notes.append(pretty_midi.Note(100, 36 if k % 2 == 0 else 38, k * 0.5, k * 0.5 + 0.1))
    for k in range(4):  # guitar only in the second half
        guitar.notes.append(pretty_midi.Note(90, 52 + k, 4.0 + k * 0.5, 4.4 + k * 0.5))
    midi.instruments += [piano, guitar, drums]
    midi.write(str(path))


@pytest.mark.parametrize("layout", ["medleydb", "slakh"])
def test_user_midi_file_renders_one_stem_per_instrument(tmp_path, layout):
    source = tmp_path / "my song.mid"
    write_user_midi(source)
    summary = render_midi_file(source, tmp_path / "out", layout=layout, rate=RATE)
    assert summary["name"] == "my_song"
    assert [row["instrument"] for row in summary["stems"]] == ["piano", "acoustic guitar", "drum set"]
    folder = Path(summary["folder"])
    stems = [read_audio(folder / row["file"])[0] for row in summary["stems"]]
    mix = read_audio(folder / summary["mix"])[0]
    np.testing.assert_allclose(np.sum(stems, axis=0), mix, atol=1e-4)
    # the last note ends at 5.9 s (to a MIDI tick), then a 2 s tail
    assert mix.shape[1] == pytest.approx((5.9 + 2.0) * RATE, abs=0.01 * RATE)
    guitar = stems[1]
    assert np.abs(guitar[:, : int(3.9 * RATE)]).max() == 0.0
    assert np.abs(guitar[:, int(4.1 * RATE) :]).max() > 1e-3
    if layout == "slakh":
        assert (folder / "all_src.mid").read_bytes() == source.read_bytes()
        programs = [
            pretty_midi.PrettyMIDI(str(folder / "MIDI" / f"S{k:02d}.mid")).instruments[0] for k in range(3)
        ]
        assert [(i.program, i.is_drum) for i in programs] == [(0, False), (25, False), (0, True)]
    else:
        metadata = yaml.safe_load((folder / "my_song_METADATA.yaml").read_text())
        assert metadata["stems"]["S02"]["instrument"] == "acoustic guitar"


def test_bad_requests_are_refused_with_a_clear_error(tmp_path, medleydb_set):
    out, _, _ = medleydb_set
    junk = tmp_path / "junk.sf2"
    junk.write_bytes(b"not a soundfont" * 10)
    with pytest.raises(InvalidArgumentError, match="layout"):
        generate_songs(tmp_path, 1, SECONDS, SEED, layout="musdb")
    with pytest.raises(InvalidArgumentError, match="songs"):
        generate_songs(tmp_path, 0, SECONDS, SEED)
    with pytest.raises(InvalidArgumentError, match="seconds"):
        generate_songs(tmp_path, 1, 0.5, SEED)
    with pytest.raises(InvalidArgumentError, match="rate"):
        generate_songs(tmp_path, 1, SECONDS, SEED, rate=12345)
    with pytest.raises(NotFoundError, match="soundfont"):
        generate_songs(tmp_path, 1, SECONDS, SEED, soundfont=tmp_path / "missing.sf2")
    with pytest.raises(InvalidArgumentError, match="junk.sf2"):
        generate_songs(tmp_path, 1, SECONDS, SEED, soundfont=junk)
    broken = tmp_path / "broken.sf2"  # a SoundFont header and nothing behind it
    broken.write_bytes(b"RIFF\x10\x00\x00\x00sfbk" + bytes(100))
    with pytest.raises(FailedPreconditionError, match="broken.sf2"):
        # FluidSynth would fall back to another soundfont and exit 0; that must not pass.
        generate_songs(tmp_path / "x", 1, 3.0, SEED, rate=RATE, soundfont=broken)
    with pytest.raises(FailedPreconditionError, match="Synth_Song001"):
        generate_songs(out, 2, SECONDS, SEED, rate=RATE)
    not_midi = tmp_path / "notes.mid"
    not_midi.write_text("hello")
    with pytest.raises(InvalidArgumentError, match="notes.mid"):
        render_midi_file(not_midi, tmp_path / "x")
    empty = tmp_path / "empty.mid"
    pretty_midi.PrettyMIDI().write(str(empty))
    with pytest.raises(InvalidArgumentError, match="no notes"):
        render_midi_file(empty, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.sf2",
        "empty.mid",
        "junk.sf2",
        "notes.mid",
        "x",
    ]
    assert list((tmp_path / "x").iterdir()) == []


def test_stopping_keeps_finished_songs_and_leaves_no_half_song(tmp_path):
    def should_stop():  # asked before each part: stop once the first song is written
        return (tmp_path / "Synth_Song001").exists()

    summary = generate_songs(tmp_path, 3, 3.0, SEED, rate=RATE, should_stop=should_stop)
    assert summary["stopped"] is True
    assert [s["name"] for s in summary["songs"]] == ["Synth_Song001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Synth_Song001"]


def test_mix_arithmetic_keeps_levels_and_sums_exactly_on_the_pcm_grid():
    rng = np.random.default_rng(0)
    stems = [rng.normal(0, scale, (2, 1000)).astype(np.float32) for scale in (0.1, 0.5, 2.0)]
    scaled, mix, gain = mix_stems(stems, peak_dbfs=-1.0, pcm_bits=24)
    assert np.abs(mix).max() == pytest.approx(10 ** (-1 / 20), abs=1e-6)
    np.testing.assert_array_equal(np.sum(np.asarray(scaled, np.float64), axis=0).astype(np.float32), mix)
    for stem in scaled + [mix]:
        np.testing.assert_array_equal(
            np.round(stem.astype(np.float64) * 2**23), stem.astype(np.float64) * 2**23
        )
    np.testing.assert_allclose(scaled[2] / gain, stems[2], atol=2**-23 / gain)


def test_loudness_of_a_full_scale_sine_is_minus_3_lufs():
    t = np.arange(48000 * 5) / 48000
    tone = np.sin(2 * np.pi * 997 * t)[np.newaxis]
    assert integrated_loudness_lufs(tone, 48000) == pytest.approx(-3.01, abs=0.02)
    assert integrated_loudness_lufs(np.vstack([tone, tone]) * 0.1, 48000) == pytest.approx(-20.0, abs=0.02)
    assert integrated_loudness_lufs(np.zeros((2, 48000)), 48000) == float("-inf")

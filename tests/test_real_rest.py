"""research/real_rest.py: real recordings added to generated songs as accompaniment stems."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import yaml

from realset.build import ALL, RATE
from research import real_rest
from services.ingestion.importers import read_medleydb
from services.ingestion.mapping import Mapping


def make_song(root, name="Synth_Song0001", seconds=2.0):
    """A two-stem song in the layout `stemlab synth` writes (stereo float WAV, MIX = sum of stems)."""
    song = root / name
    stems = song / f"{name}_STEMS"
    stems.mkdir(parents=True)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    parts = {"S01": ("acoustic guitar", 0.3 * np.sin(2 * np.pi * 196 * t)),
             "S02": ("drum set", 0.1 * np.sign(np.sin(2 * np.pi * 2 * t)))}
    meta = {"mix_filename": f"{name}_MIX.wav", "stem_dir": f"{name}_STEMS", "stems": {}}
    mix = np.zeros((n, 2))
    for key, (instrument, audio) in parts.items():
        file = f"{name}_STEM_{key[1:]}.wav"
        stereo = np.repeat(audio[:, None], 2, axis=1)
        sf.write(stems / file, stereo, RATE, subtype="FLOAT")
        mix += stereo
        meta["stems"][key] = {"component": "", "filename": file, "instrument": instrument, "raw": {}}
    sf.write(song / meta["mix_filename"], mix, RATE, subtype="FLOAT")
    (song / f"{name}_METADATA.yaml").write_text(yaml.safe_dump(meta))
    return song


def fake_audio(r):
    """Stands for reading the recording from its repository snapshot: 0.5 s of a tone."""
    return 0.2 * np.sin(2 * np.pi * 440 * np.arange(int(0.5 * RATE)) / RATE)


def test_added_stems_sum_into_the_mix_are_recorded_and_imported_as_accompaniment(tmp_path):
    song = make_song(tmp_path)
    rng = np.random.default_rng(0)
    voice = next(i for i, (r, _) in enumerate(real_rest.POOL) if r.key == "vignesh")
    loop = next(i for i, (r, _) in enumerate(real_rest.POOL) if r.loop)
    added = real_rest.add_to_song(song, [voice, loop], [-6.0, 0.0], rng, fake_audio)

    assert [a["recording"] for a in added] == ["vignesh", real_rest.POOL[loop][0].key]
    meta = yaml.safe_load((song / "Synth_Song0001_METADATA.yaml").read_text())
    assert meta["real_rest"] == added
    stems = [sf.read(song / meta["stem_dir"] / s["filename"])[0] for s in meta["stems"].values()]
    mix, rate = sf.read(song / meta["mix_filename"])
    assert rate == RATE and len(stems) == 4
    np.testing.assert_allclose(mix, sum(stems), atol=1e-6)  # the references still sum to the mix
    # -6 dB against the mix before it (0.5 s of tone repeated with gaps over the 2 s)
    before = sum(stems[:2]).mean(axis=1)
    ratio = real_rest.rms(stems[2].mean(axis=1)) / real_rest.rms(before)
    assert 20 * np.log10(ratio) == pytest.approx(-6.0, abs=0.01)

    track = next(t for t in read_medleydb(tmp_path, Mapping.load()) if not isinstance(t, dict))
    classes = {s.name: s.cls for s in track.stems if s.cls != "mix"}
    assert sorted(classes.values()) == ["drums", "drums", "guitar", "vocals"]  # a breakbeat loop, a singer


def test_a_song_that_has_additions_is_left_alone(tmp_path):
    song = make_song(tmp_path)
    real_rest.add_to_song(song, [0], [0.0], np.random.default_rng(0), fake_audio)
    before = (song / "Synth_Song0001_MIX.wav").read_bytes()
    assert real_rest.add_to_song(song, [1], [0.0], np.random.default_rng(1), fake_audio) == []
    assert (song / "Synth_Song0001_MIX.wav").read_bytes() == before


def test_placement_fills_the_length_from_short_and_long_recordings():
    rng = np.random.default_rng(3)
    short = np.ones(RATE)  # 1 s, repeated with gaps of up to 2 s over 10 s
    placed = real_rest.place(short, 10 * RATE, loop=False, rng=rng)
    assert len(placed) == 10 * RATE and placed.max() == pytest.approx(1.0)
    assert 0.3 < np.mean(placed > 0.5) < 0.9
    looped = real_rest.place(np.arange(100.0), 1000, loop=True, rng=rng)
    assert len(looped) == 1000 and np.all(np.diff(looped)[np.diff(looped) < 0] == -99)  # seamless
    long = np.arange(5000.0)
    cut = real_rest.place(long, 1000, loop=False, rng=rng)
    assert np.all(np.diff(cut) == 1.0)


def test_the_pool_never_uses_a_recording_of_the_real_set_nor_a_guitar_or_piano():
    real_rest.check_pool()
    real_rest.check_pool(real_rest.POOL + real_rest.VOICES)
    mapping = Mapping.load()
    assert all(mapping.lookup(name) not in (None, "guitar", "piano") for _, name in real_rest.POOL)
    # --voices: every one a voice, imported as vocals; none of the library's guitar riffs the set uses
    assert len(real_rest.VOICES) == 63 and {mapping.lookup(name) for _, name in real_rest.VOICES} == {"vocals"}
    clash = [(dataclasses.replace(ALL[0], key="x", half="train"), "female singer")]
    with pytest.raises(ValueError, match="not for training"):
        real_rest.check_pool(clash)

"""The shipped instrument mapping and the whole-word file-name matching."""

from __future__ import annotations

import pretty_midi
import pytest

from services.common.library import CLASSES
from services.ingestion.mapping import filename_words


def test_every_general_midi_program_and_slakh_class_is_mapped(mapping):
    missing = [n for n in pretty_midi.INSTRUMENT_MAP if mapping.lookup(n) is None]
    assert missing == [] and len(pretty_midi.INSTRUMENT_MAP) == 128
    assert mapping.lookup("Overdriven Guitar") == "guitar"
    assert mapping.lookup("Electric Piano 1") == "piano"
    assert mapping.lookup("Clavinet") == "other"
    assert mapping.lookup("Fretless Bass") == "bass"
    for inst_class, cls in {"Piano": "piano", "Guitar": "guitar", "Bass": "bass", "Drums": "drums",
                            "Strings (continued)": "other", "Chromatic Percussion": "other",
                            "Synth Lead": "other", "Sound Effects": "other", "Percussive": "percussion"}.items():
        assert mapping.lookup(inst_class) == cls, inst_class


def test_medleydb_vocabulary(mapping):
    expected = {
        "acoustic guitar": "guitar", "clean electric guitar": "guitar", "distorted electric guitar": "guitar",
        "lap steel guitar": "guitar", "banjo": "other", "mandolin": "other", "ukulele": "other",
        "piano": "piano", "tack piano": "other", "electric piano": "piano", "synthesizer": "other",
        "drum set": "drums", "kick drum": "drums", "snare drum": "drums", "electric bass": "bass",
        "double bass": "bass", "vocalists": "vocals", "male singer": "vocals", "female singer": "vocals",
        "string section": "other", "violin": "other", "cello": "other", "fx/processed sound": "other",
        "Main System": "excluded", "auxiliary percussion": "percussion", "distorted_guitar": "guitar",
    }
    assert {k: mapping.lookup(k) for k in expected} == expected
    assert set(mapping.entries.values()) <= set(CLASSES)


def test_unknown_names_are_never_guessed(mapping):
    assert mapping.lookup("zither") is None
    assert mapping.classify_instruments(["zither"]).cls is None
    assert mapping.classify_instruments(["electric bass", "acoustic guitar"]).cls is None  # disagree
    assert mapping.classify_instruments(["male singer", "female singer"]).cls == "vocals"


@pytest.mark.parametrize("name, cls", [
    ("Bass Guitar.wav", "bass"), ("07_ElecGtr1.wav", "guitar"), ("EGtr_DI.wav", "guitar"),
    ("Gtr1.wav", "guitar"), ("Pno.wav", "piano"), ("Keys.wav", "piano"), ("01_Kick.wav", "drums"),
    ("drums_1.ogg", "drums"), ("song.ogg", "mix"), ("HiHat.wav", "drums"), ("BassDI.wav", "bass"),
    ("LeadVox.wav", "vocals"), ("AcousticBass.wav", "bass"), ("Guitarist notes.wav", None),
    ("Guitar_and_Vox.wav", None), ("Theremin.wav", None),
])
def test_file_names_match_whole_words_longest_first(mapping, name, cls):
    m = mapping.suggest_from_filename(name)
    assert m.cls == cls
    assert m.suggested == (cls is not None)


def test_filename_words():
    assert filename_words("07_ElecGtr1.wav") == ["elec", "gtr"]
    assert filename_words("EGtr_DI.wav") == ["e", "gtr", "di"]
    assert filename_words("Bass Guitar.wav") == ["bass", "guitar"]

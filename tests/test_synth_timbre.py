"""Random timbre per part (services.ingestion.synth.timbre): SF2.01 NRPN generator offsets that
FluidSynth applies, drawn per part without touching the notes."""

from __future__ import annotations

import mido
import numpy as np
import pretty_midi
import pytest
import soundfile as sf
import yaml

from services.common.errors import InvalidArgumentError
from services.ingestion.synth import generate_songs
from services.ingestion.synth.rendering import check_soundfont, render_midi
from services.ingestion.synth.timbre import GENERATORS, draw_offsets, nrpn_events, part_rng, with_timbre

RATE = 22050


def test_offsets_are_drawn_within_their_ranges_and_scale_with_strength():
    full = draw_offsets(part_rng(1000, 4, 2), 1.0)
    assert full == draw_offsets(part_rng(1000, 4, 2), 1.0)  # one stream per (seed, song, part)
    assert full != draw_offsets(part_rng(1000, 4, 3), 1.0)
    half = draw_offsets(part_rng(1000, 4, 2), 0.5)
    for gen in GENERATORS:
        value = full[gen.number] * gen.nrpn_scale
        assert gen.low - gen.nrpn_scale <= value <= gen.high + gen.nrpn_scale
        assert abs(half[gen.number] - full[gen.number] / 2) <= 1
    assert set(draw_offsets(part_rng(1, 1, 1), 0.0).values()) == {0}
    with pytest.raises(ValueError):
        draw_offsets(part_rng(1, 1, 1), 1.5)


def test_each_generator_is_sent_as_four_messages_in_order_on_ticks_of_their_own(tmp_path):
    offsets = {8: -1500, 52: 7}
    midi = pretty_midi.PrettyMIDI(initial_tempo=180.0, resolution=480)
    midi.instruments.append(pretty_midi.Instrument(25))
    midi.instruments[0].notes.append(pretty_midi.Note(90, 60, 0.0, 1.0))
    with_timbre(midi, offsets)
    midi.write(str(tmp_path / "part.mid"))
    ticks, messages = 0, []
    for message in mido.MidiFile(tmp_path / "part.mid").tracks[1]:
        ticks += message.time
        if message.type == "control_change":
            messages.append((ticks, message.control, message.value))
    # FluidSynth acts on the data MSB (6) with the LSB (38) it has: pretty_midi orders the messages
    # of one tick by controller number, so only ticks of their own keep 99, 98, 38, 6 in order.
    assert [(c, v) for _, c, v in messages] == [
        (99, 120), (98, 8), (38, (8192 - 1500) & 127), (6, (8192 - 1500) >> 7),
        (99, 120), (98, 52), (38, (8192 + 7) & 127), (6, (8192 + 7) >> 7),
    ]
    assert len({t for t, _, _ in messages}) == 8
    with pytest.raises(ValueError):
        nrpn_events({120: 1}, 0.001)


def _guitar_part(offsets: dict[int, int] | None) -> np.ndarray:
    midi = pretty_midi.PrettyMIDI(initial_tempo=120.0, resolution=480)
    guitar = pretty_midi.Instrument(25)
    guitar.notes = [pretty_midi.Note(100, pitch, 0.2 + 0.5 * k, 0.6 + 0.5 * k) for k, pitch in enumerate((52, 59, 64, 71))]
    midi.instruments.append(guitar)
    if offsets is not None:
        with_timbre(midi, offsets)
    return render_midi(midi, check_soundfont(None), RATE, int(2.5 * RATE))


def _centroid_hz(audio: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(audio.mean(axis=0))) ** 2
    return float((power * np.fft.rfftfreq(audio.shape[1], 1 / RATE)).sum() / power.sum())


def test_fluidsynth_applies_the_offsets_and_zero_offsets_change_nothing():
    plain = _guitar_part(None)
    assert np.array_equal(_guitar_part({gen.number: 0 for gen in GENERATORS}), plain)
    darker = _guitar_part({8: -3600 // 2})  # filter cutoff three octaves down
    assert _centroid_hz(darker) < 0.7 * _centroid_hz(plain)
    slow = _guitar_part({34: 7200 // 2})  # attack 64 times as long (1 ms in FluidR3: 64 ms)
    onset = int(np.argmax(np.abs(plain[0]) > 1e-4))
    first = slice(onset, onset + int(0.02 * RATE))  # the first 20 ms of the first note
    assert np.sqrt(np.mean(slow[:, first] ** 2)) < 0.5 * np.sqrt(np.mean(plain[:, first] ** 2))


def test_songs_with_timbre_keep_their_notes_and_record_it(tmp_path):
    plain = generate_songs(tmp_path / "plain", 1, 8, seed=3, rate=RATE)
    varied = generate_songs(tmp_path / "varied", 1, 8, seed=3, rate=RATE, timbre=1.0)
    assert varied["timbre"] == 1.0 and plain["timbre"] == 0.0
    rows = [[(r["part"], r["program"]) for r in s["songs"][0]["stems"]] for s in (plain, varied)]
    assert rows[0] == rows[1]
    differ = 0
    for row in plain["songs"][0]["stems"]:
        a, _ = sf.read(tmp_path / "plain" / "Synth_Song001" / row["file"])
        b, _ = sf.read(tmp_path / "varied" / "Synth_Song001" / row["file"])
        differ += not np.array_equal(a, b)
    assert differ == len(rows[0])
    again = generate_songs(tmp_path / "again", 1, 8, seed=3, rate=RATE, timbre=1.0)  # the same draws
    assert again["songs"][0]["stems"] == varied["songs"][0]["stems"]
    mix = "Synth_Song001/Synth_Song001_MIX.wav"
    assert (tmp_path / "again" / mix).read_bytes() == (tmp_path / "varied" / mix).read_bytes()
    metadata = yaml.safe_load((tmp_path / "varied" / "Synth_Song001" / "Synth_Song001_METADATA.yaml").read_text())
    assert "timbre 1" in metadata["origin"]
    # The slakh layout writes each part's MIDI with the messages it was rendered with.
    generate_songs(tmp_path / "slakh", 1, 8, seed=3, rate=RATE, layout="slakh", timbre=0.5)
    stem_midi = pretty_midi.PrettyMIDI(str(next((tmp_path / "slakh").glob("*/MIDI/S00.mid"))))
    sent = [c.number for c in stem_midi.instruments[0].control_changes if c.number in (99, 98, 38, 6)]
    assert sent == [99, 98, 38, 6] * len(GENERATORS)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgumentError, match="timbre"):
            generate_songs(tmp_path / "bad", 1, 8, seed=3, rate=RATE, timbre=bad)
    assert not (tmp_path / "bad").exists()

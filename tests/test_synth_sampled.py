"""Recorded notes as a SoundFont overlay: the font FluidSynth loads plays the recordings at the right
pitch and layer on the chosen programs, every other program still comes from the base font, and a
song rendered with the overlay says so in its metadata."""

import shutil
import subprocess
import sys

import numpy as np
import pretty_midi
import pytest
import soundfile as sf
import yaml

from services.common.errors import InvalidArgumentError, NotFoundError
from services.ingestion.synth import generate_songs
from services.ingestion.synth.rendering import DEFAULT_SOUNDFONT, check_soundfont, render_midi
from services.ingestion.synth.sampled import build_soundfont, find_recordings, note_number

pytestmark = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or shutil.which("ffmpeg") is None or not DEFAULT_SOUNDFONT.is_file(),
    reason="fluidsynth, ffmpeg or FluidR3_GM missing",
)

RATE = 22050
QUIET, LOUD = 0.05, 0.5  # the two layers' amplitudes


def tone(frequency: float, amplitude: float, seconds: float = 1.5, rate: int = 44100) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t) * np.exp(-t)).astype(np.float32)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recordings")
    for name, note in (("C4", 60), ("A4", 69)):
        frequency = 440 * 2 ** ((note - 69) / 12)
        sf.write(folder / f"{name}v1.wav", tone(frequency, QUIET), 44100)
        (folder / "loud").mkdir(exist_ok=True)
        sf.write(folder / "loud" / f"{name}v2.flac", tone(frequency, LOUD), 44100)
    sf.write(folder / "room tone.wav", tone(50, 0.1), 44100)  # not a note: skipped
    (folder / "README.txt").write_text("recorded in a small room")
    return folder


@pytest.fixture(scope="module")
def overlay(recordings, tmp_path_factory):
    out = tmp_path_factory.mktemp("font") / "sines.sf2"
    summary = build_soundfont([recordings], out, programs=(0, 1), rate=RATE, seconds=1.0)
    assert summary["recordings"] == 4 and summary["layers"] == 2
    return out


def render(notes, program, fonts):
    midi = pretty_midi.PrettyMIDI()
    part = pretty_midi.Instrument(program=program)
    part.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=s + 0.5) for p, v, s in notes]
    midi.instruments.append(part)
    return render_midi(midi, check_soundfont(fonts[0], fonts[1:]), RATE, RATE * len(notes)).mean(axis=0)


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio)), 8 * len(audio)))
    return float(np.fft.rfftfreq(8 * len(audio), 1 / RATE)[np.argmax(spectrum)])


def test_note_names_and_layers():
    assert note_number("C4") == (60, 0)
    assert note_number("D#1v16") == (27, 16)
    assert note_number("Bb3v2") == (58, 2)
    assert note_number("A0") == (21, 0)
    assert note_number("As2") == (46, 0)  # tonejs-instruments' sharps
    for bad in ("H4", "C#", "room tone", "A9v1"):
        with pytest.raises(InvalidArgumentError):
            note_number(bad)


def test_the_overlay_plays_the_recordings_at_pitch_and_by_layer(overlay):
    # C4 soft, then D4 (no recording: C4's shifted up two semitones), then A4 hard.
    audio = render([(60, 30, 0.0), (62, 30, 1.0), (69, 120, 2.0)], 0, [DEFAULT_SOUNDFONT, overlay])
    segments = [audio[k * RATE + 500: k * RATE + 500 + RATE // 3] for k in range(3)]
    assert peak_hz(segments[0]) == pytest.approx(261.6, abs=2)
    assert peak_hz(segments[1]) == pytest.approx(293.7, abs=2)
    assert peak_hz(segments[2]) == pytest.approx(440.0, abs=2)
    # The layers set the level (velocity's default attenuation is off): about LOUD / QUIET apart.
    ratio = np.sqrt(np.mean(segments[2] ** 2) / np.mean(segments[0] ** 2))
    assert 5 < ratio < 20


def test_one_layer_keeps_velocity_shaping_the_level(recordings, tmp_path):
    single = tmp_path / "single.sf2"
    build_soundfont([recordings], single, programs=(0,), layers=[1], rate=RATE, seconds=1.0)
    audio = render([(60, 30, 0.0), (60, 120, 1.0)], 0, [DEFAULT_SOUNDFONT, single])
    soft, hard = (audio[k * RATE + 500: k * RATE + 500 + RATE // 3] for k in range(2))
    assert np.sqrt(np.mean(hard ** 2) / np.mean(soft ** 2)) > 3


def test_other_programs_still_come_from_the_base_font(overlay):
    notes = [(60, 100, 0.0), (67, 100, 1.0)]
    with_overlay = render(notes, 40, [DEFAULT_SOUNDFONT, overlay])
    base_only = render(notes, 40, [DEFAULT_SOUNDFONT])
    assert np.abs(with_overlay).max() > 0.01
    np.testing.assert_array_equal(with_overlay, base_only)
    # ...and the overlay's programs do not: program 0 now sounds like the sine recordings.
    assert not np.array_equal(render(notes, 0, [DEFAULT_SOUNDFONT, overlay]), render(notes, 0, [DEFAULT_SOUNDFONT]))


def test_a_song_rendered_with_an_overlay_names_it(overlay, tmp_path):
    # Seed 7's first song has a piano on program 0 (tests/test_synth.py's arrangement).
    plain = generate_songs(tmp_path / "plain", 1, 4.0, 7, rate=RATE)
    layered = generate_songs(tmp_path / "layered", 1, 4.0, 7, rate=RATE, overlays=[overlay])
    assert plain["overlay_soundfonts"] == [] and layered["overlay_soundfonts"] == [str(overlay)]
    assert layered["soundfont"] == str(DEFAULT_SOUNDFONT)
    song = tmp_path / "layered" / "Synth_Song001"
    metadata = yaml.safe_load((song / "Synth_Song001_METADATA.yaml").read_text())
    assert "FluidR3_GM.sf2+sines.sf2" in metadata["origin"]
    stems = {row["part"]: row for row in layered["songs"][0]["stems"]}
    assert "piano" in stems

    def stem(root, part):
        index = [row["part"] for row in plain["songs"][0]["stems"]].index(part)
        files = sorted((root / "Synth_Song001" / "Synth_Song001_STEMS").glob("*.wav"))
        return sf.read(files[index])[0]

    assert not np.allclose(stem(tmp_path / "plain", "piano"), stem(tmp_path / "layered", "piano"), atol=1e-3)


def test_bad_fonts_and_recordings_are_refused_and_nothing_is_overwritten(recordings, overlay, tmp_path):
    junk = tmp_path / "junk.sf2"
    junk.write_bytes(b"not a soundfont" * 10)
    with pytest.raises(NotFoundError, match="missing.sf2"):
        check_soundfont(None, [tmp_path / "missing.sf2"])
    with pytest.raises(InvalidArgumentError, match="junk.sf2"):
        check_soundfont(None, [junk])
    with pytest.raises(InvalidArgumentError, match="named twice"):
        check_soundfont(overlay, [overlay])
    with pytest.raises(InvalidArgumentError, match="no recordings"):
        find_recordings([tmp_path])
    with pytest.raises(InvalidArgumentError, match="layer"):
        find_recordings([recordings], layers=[3])
    twice = tmp_path / "twice"
    twice.mkdir()
    sf.write(twice / "C4v1.wav", tone(261.6, 0.1), 44100)
    sf.write(twice / "C4v1.flac", tone(261.6, 0.1), 44100)
    with pytest.raises(InvalidArgumentError, match="two recordings"):
        find_recordings([twice])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "C4v1.ogg").write_bytes(b"OggS" + bytes(64))
    out = tmp_path / "kept.sf2"
    out.write_bytes(b"an earlier font")
    with pytest.raises(InvalidArgumentError, match="C4v1.ogg"):
        build_soundfont([broken], out)
    with pytest.raises(InvalidArgumentError, match="programs"):
        build_soundfont([recordings], out, programs=(0, 0))
    assert out.read_bytes() == b"an earlier font"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "junk.sf2", "kept.sf2", "twice"]


def test_command_line(recordings, tmp_path):
    out = tmp_path / "cli.sf2"
    command = [sys.executable, "-m", "services.ingestion.synth.sampled", str(recordings), "--out", str(out),
               "--layers", "2", "--programs", "0", "--rate", str(RATE), "--seconds", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 recordings in 1 layer(s)" in result.stdout
    assert out.read_bytes()[:4] == b"RIFF" and out.read_bytes()[8:12] == b"sfbk"
    result = subprocess.run(command[:-2] + ["--seconds", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "seconds must be" in result.stderr

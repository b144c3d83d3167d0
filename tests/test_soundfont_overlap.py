"""research/soundfont_overlap.py: telling a held-out soundfont's reused samples from its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research.soundfont_overlap import overlap, parse_programs, render_programs, similarity
from services.ingestion.synth.rendering import DEFAULT_SOUNDFONT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("fluidsynth") is None or not DEFAULT_SOUNDFONT.is_file(),
                                reason="fluidsynth or FluidR3_GM missing")


def test_similarity_is_one_for_the_same_sound_at_any_delay_and_level_and_low_for_another():
    rng = np.random.default_rng(0)
    sound = rng.standard_normal(4000) * np.exp(-np.arange(4000) / 800)
    later = np.concatenate([np.zeros(300), 0.2 * sound])[:4000]
    assert similarity(sound, later) > 0.97  # a little of the tail is cut off by the delay
    assert similarity(sound, rng.standard_normal(4000)) < 0.2
    assert similarity(sound, np.zeros(4000)) == 0.0


def test_a_font_shares_every_program_with_itself_and_none_with_other_instruments():
    notes = render_programs(DEFAULT_SOUNDFONT, [0, 19, 25])  # piano, church organ, steel guitar
    assert all(len(n) == 3 and np.abs(n[0]).max() > 0 for n in notes.values())
    same = overlap(notes, {"FluidR3": notes})
    assert all(r["similarity"] > 0.99 and r["font"] == "FluidR3" for r in same.values())
    # The same font's other instruments at the same pitches: well below the threshold.
    swapped = {0: notes[19], 19: notes[25], 25: notes[0]}
    other = overlap(notes, {"swapped": swapped})
    assert all(r["similarity"] < 0.8 for r in other.values()), other


def test_the_command_reports_shared_programs_and_refuses_bad_input(tmp_path):
    script = [sys.executable, str(ROOT / "research" / "soundfont_overlap.py")]
    out = tmp_path / "overlap.json"
    done = subprocess.run([*script, "--held", str(DEFAULT_SOUNDFONT), "--train", str(DEFAULT_SOUNDFONT),
                           "--programs", "0,24-25", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 programs share" in done.stdout and out.is_file()
    not_a_font = tmp_path / "x.sf2"
    not_a_font.write_bytes(b"not a soundfont")
    bad = subprocess.run([*script, "--held", str(not_a_font), "--train", str(DEFAULT_SOUNDFONT), "--programs", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a SoundFont 2" in bad.stderr
    with pytest.raises(ValueError, match="0..127"):
        parse_programs("120-130")

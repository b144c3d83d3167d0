"""Which General MIDI programs of a held-out soundfont are really the samples of a training font?

A test set rendered with "another soundfont" is held out by its timbres only if that font does not
reuse a training font's samples, and GM fonts are often assembled from one another. Every program
is rendered from both fonts the way the generator renders songs (services.ingestion.synth.rendering:
FluidSynth, no reverb or chorus) as the same notes — one at each of a few pitches, one second each —
and each pair of notes is compared by its peak normalised cross-correlation: 1.0 for the same
sample at any delay and level, near 0 for unrelated sounds. A program is shared when the mean over
its pitches reaches --threshold (0.95 by default: another recording of the same instrument lands
well below it).

    .venv/bin/python research/soundfont_overlap.py --held /usr/share/sounds/sf2/TimGM6mb.sf2 \
        --train /usr/share/sounds/sf2/sf_GMbank.sf2 --train /usr/share/sounds/sf2/FluidR3_GM.sf2 \
        [--programs 0-127] [--out research/results/soundfont_overlap.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pretty_midi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.errors import StemlabError  # noqa: E402
from services.common.paths import atomic_write_text  # noqa: E402
from services.ingestion.synth.rendering import check_soundfont, render_midi  # noqa: E402

RATE = 22050
PITCHES = (48, 64, 80)
NOTE_SECONDS, SLOT_SECONDS = 1.0, 1.5  # each note gets a slot long enough for its release
CHANNELS = 15  # programs rendered at once: one per MIDI channel, the drum channel left out


def render_programs(soundfont: str | Path, programs: list[int], pitches=PITCHES, rate: int = RATE,
                    ) -> dict[int, list[np.ndarray]]:
    """{program: [mono audio of its note at each pitch]}, rendered as the generator renders songs."""
    fonts = check_soundfont(soundfont)
    notes: dict[int, list[np.ndarray]] = {}
    for start in range(0, len(programs), CHANNELS):
        batch = programs[start:start + CHANNELS]
        midi = pretty_midi.PrettyMIDI()
        slots = {}
        for i, program in enumerate(batch):
            part = pretty_midi.Instrument(program)
            for j, pitch in enumerate(pitches):
                slot = i * len(pitches) + j
                slots[program, j] = slot
                t = slot * SLOT_SECONDS + 0.05
                part.notes.append(pretty_midi.Note(100, pitch, t, t + NOTE_SECONDS))
            midi.instruments.append(part)
        samples = int(len(batch) * len(pitches) * SLOT_SECONDS * rate)
        audio = render_midi(midi, fonts, rate, samples).mean(axis=0)
        slot_len = int(SLOT_SECONDS * rate)
        for program in batch:
            notes[program] = [audio[slots[program, j] * slot_len:(slots[program, j] + 1) * slot_len]
                              for j in range(len(pitches))]
    return notes


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Peak of the normalised cross-correlation over every delay: 1.0 for one sound at any delay
    and gain, 0 when either is silent."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 0.0
    size = len(a) + len(b)
    correlation = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    return float(np.abs(correlation).max() / norm)


def overlap(held: dict[int, list[np.ndarray]], train: dict[str, dict[int, list[np.ndarray]]]) -> dict[int, dict]:
    """For each program of `held`: the training font it sounds most like, and how much (mean over pitches)."""
    result = {}
    for program, notes in held.items():
        scores = {name: float(np.mean([similarity(a, b) for a, b in zip(notes, font[program], strict=True)]))
                  for name, font in train.items()}
        best = max(scores, key=scores.get)
        result[program] = {"font": best, "similarity": round(scores[best], 4)}
    return result


def parse_programs(text: str) -> list[int]:
    programs = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        programs.update(range(int(low), int(high or low) + 1))
    if not programs or min(programs) < 0 or max(programs) > 127:
        raise ValueError(f"programs {text!r}: GM programs are 0..127")
    return sorted(programs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", action="append", required=True, help="a held-out (test or judge) soundfont")
    parser.add_argument("--train", action="append", required=True, help="a training soundfont")
    parser.add_argument("--programs", default="0-127", help="GM programs, e.g. 0-7,24-31")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", help="also write the per-program results here (JSON)")
    args = parser.parse_args()
    try:
        programs = parse_programs(args.programs)
        train = {Path(f).name: render_programs(f, programs) for f in args.train}
        report = {"pitches": list(PITCHES), "threshold": args.threshold, "train": [Path(f).name for f in args.train],
                  "held": {}}
        for font in args.held:
            found = overlap(render_programs(font, programs), train)
            shared = [p for p, r in found.items() if r["similarity"] >= args.threshold]
            report["held"][Path(font).name] = {"shared_programs": shared, "programs": found}
            print(f"{Path(font).name}: {len(shared)} of {len(programs)} programs share a training font's samples "
                  f"(mean similarity >= {args.threshold})")
            for name in train:
                mine = [p for p in shared if found[p]["font"] == name]
                if mine:
                    print(f"  with {name}: {len(mine)}: {', '.join(map(str, mine))}")
            for label, group in (("pianos 0-7", range(8)), ("guitars 24-31", range(24, 32))):
                if any(p in found for p in group):
                    print(f"  {label}: " + " ".join(f"{p}:{found[p]['similarity']:.2f}" for p in group if p in found))
    except (ValueError, StemlabError, OSError) as e:  # a bad font or program list: one line, exit 2
        print(f"soundfont_overlap: {e}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

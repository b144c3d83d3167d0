"""Song arrangements composed programmatically as pretty_midi parts.

A song has a genre, tempo, key, chord progressions and sections (intro, verse, chorus, bridge,
outro). Each part (guitar, piano, bass, drums and a few other families) plays in some sections
and rests in others, so its stem contains real silences, as multitracks recorded by people do.
Everything here is pure: the same (seed, index, seconds) gives the same arrangement.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pretty_midi

SECTION_NAMES = ("intro", "verse", "chorus", "bridge", "outro")
FORM = ("intro", "verse", "chorus", "verse", "chorus", "bridge", "chorus", "outro")
SECTION_BARS = {"intro": (2, 4), "verse": (4, 8), "chorus": (4, 8), "bridge": (2, 4), "outro": (2, 4)}
BEATS_PER_BAR = 4

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
# Progressions as 0-based scale degrees, one chord per bar.
PROGRESSIONS = {
    "major": (
        (0, 4, 5, 3),
        (5, 3, 0, 4),
        (0, 3, 4, 3),
        (0, 5, 3, 4),
        (0, 3, 5, 4),
        (1, 4, 0, 5),
        (3, 0, 4, 5),
    ),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2), (5, 6, 0, 0), (0, 5, 3, 4)),
}

GUITAR_PROGRAMS = {
    24: "acoustic guitar (nylon)", 25: "acoustic guitar (steel)", 26: "electric guitar (jazz)",
    27: "electric guitar (clean)", 28: "electric guitar (muted)", 29: "overdriven guitar", 30: "distortion guitar",
}  # fmt: skip
PIANO_PROGRAMS = (0, 1, 2, 4, 5)

# Per genre: tempo range, chance of 7th chords, swing, and weights for the programs and styles.
GENRES = {
    "Pop": dict(
        tempo=(90, 128), sevenths=0.2, swing=0.0, mode_minor=0.3,
        guitar={25: 3, 27: 3, 28: 1, 29: 1, 24: 1}, piano={0: 3, 1: 2, 4: 2, 5: 1, 2: 1},
        bass={33: 3, 34: 2, 38: 1}, drums=("pop", "rock", "halftime"),
        others={"strings": 2, "pad": 3, "organ": 1, "brass": 1, "synth_lead": 2, "voice": 2},
    ),
    "Rock": dict(
        tempo=(100, 150), sevenths=0.05, swing=0.0, mode_minor=0.5,
        guitar={29: 4, 30: 4, 27: 1, 25: 1}, piano={0: 2, 1: 3, 2: 1},
        bass={34: 3, 33: 2}, drums=("rock", "rock", "halftime"),
        others={"strings": 1, "pad": 1, "organ": 3, "brass": 1, "synth_lead": 1, "voice": 1},
    ),
    "Singer/Songwriter": dict(
        tempo=(70, 115), sevenths=0.15, swing=0.0, mode_minor=0.35,
        guitar={25: 4, 24: 3, 27: 1}, piano={0: 4, 1: 1, 4: 1},
        bass={33: 2, 32: 2}, drums=("pop", "halftime"),
        others={"strings": 3, "pad": 1, "organ": 1, "brass": 0, "synth_lead": 0, "voice": 2},
    ),
    "Jazz": dict(
        tempo=(100, 170), sevenths=0.9, swing=1.0, mode_minor=0.3,
        guitar={26: 5, 27: 1, 24: 1}, piano={0: 4, 4: 2, 2: 1},
        bass={32: 4, 33: 1}, drums=("swing",),
        others={"strings": 1, "pad": 0, "organ": 2, "brass": 3, "synth_lead": 0, "voice": 1},
    ),
    "Electronic/Fusion": dict(
        tempo=(110, 132), sevenths=0.3, swing=0.0, mode_minor=0.6,
        guitar={27: 2, 28: 3, 30: 1}, piano={5: 2, 4: 2, 2: 1, 0: 1},
        bass={38: 4, 39: 2, 33: 1}, drums=("four_on_floor",),
        others={"strings": 1, "pad": 4, "organ": 1, "brass": 1, "synth_lead": 4, "voice": 2},
    ),
    "World/Folk": dict(
        tempo=(80, 130), sevenths=0.1, swing=0.0, mode_minor=0.5,
        guitar={24: 4, 25: 3}, piano={0: 3, 1: 1},
        bass={32: 3, 33: 2}, drums=("pop", "halftime"),
        others={"strings": 4, "pad": 1, "organ": 1, "brass": 1, "synth_lead": 0, "voice": 2},
    ),
}  # fmt: skip

OTHER_PROGRAMS = {
    "strings": (48, 49, 50, 44),
    "pad": (89, 88, 90, 91, 95),
    "organ": (16, 17, 18, 19),
    "brass": (61, 56, 62, 57),
    "synth_lead": (80, 81, 84, 87),
    "voice": (52, 53, 54),
}

# Chance a part plays in a section of each kind (intro, verse, chorus, bridge, outro).
ACTIVITY = {
    "drums": (0.35, 0.95, 1.0, 0.6, 0.55),
    "bass": (0.3, 0.95, 1.0, 0.75, 0.5),
    "guitar": (0.55, 0.7, 0.9, 0.5, 0.55),
    "lead_guitar": (0.15, 0.25, 0.6, 0.7, 0.3),
    "piano": (0.6, 0.5, 0.75, 0.6, 0.6),
    "strings": (0.4, 0.35, 0.8, 0.7, 0.6),
    "pad": (0.6, 0.5, 0.7, 0.7, 0.7),
    "organ": (0.3, 0.5, 0.8, 0.6, 0.4),
    "brass": (0.1, 0.2, 0.85, 0.4, 0.3),
    "synth_lead": (0.2, 0.3, 0.8, 0.6, 0.2),
    "voice": (0.3, 0.4, 0.85, 0.6, 0.4),
}

# The room every part of a song shares, and how much of each part is sent to it: FluidSynth's own
# reverb is off (not deterministic), so stems get a convolution reverb afterwards.
ROOM_RT60_SECONDS = (0.4, 1.2)
REVERB_SEND = {
    "drums": (0.08, 0.2), "bass": (0.0, 0.08), "guitar": (0.12, 0.3), "lead_guitar": (0.2, 0.4),
    "piano": (0.12, 0.3), "strings": (0.3, 0.5), "pad": (0.25, 0.45), "organ": (0.15, 0.3),
    "brass": (0.2, 0.35), "synth_lead": (0.15, 0.35), "voice": (0.3, 0.5),
}  # fmt: skip

# General MIDI drum notes.
KICK, SNARE, SIDE_STICK, CLOSED_HAT, PEDAL_HAT, OPEN_HAT = 36, 38, 37, 42, 44, 46
CRASH, RIDE, LOW_TOM, MID_TOM, HIGH_TOM = 49, 51, 45, 47, 50

GUITAR_PRESENCE = 0.85
PIANO_PRESENCE = 0.85
SECOND_GUITAR_CHANCE = 0.35
MIN_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class Chord:
    """A chord as its root pitch class and its pitch classes, root first (triad or seventh)."""

    root: int
    pitch_classes: tuple[int, ...]

    def intervals(self) -> tuple[int, ...]:
        return tuple((pc - self.root) % 12 for pc in self.pitch_classes)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    start_bar: int
    bars: int


@dataclasses.dataclass
class Part:
    """One instrument part: what is rendered to one stem."""

    name: str  # unique in the song, e.g. "guitar 1"
    role: str  # guitar, piano, bass, drums, strings, pad, organ, brass, synth_lead, voice
    program: int
    is_drum: bool
    style: str
    active: tuple[bool, ...]  # one flag per section of the song
    melody: bool  # carries the tune (MedleyDB's "melody" component)
    instrument: pretty_midi.Instrument
    reverb_send: float = 0.0  # level of the room reverb added to the dry render


@dataclasses.dataclass
class Arrangement:
    seed: int
    index: int
    genre: str
    tempo_bpm: float
    key_root: int  # pitch class of the tonic
    mode: str  # major or minor
    seconds: float
    sections: list[Section]
    chords: list[Chord]  # one per bar
    parts: list[Part]
    room_rt60_seconds: float = 0.0  # reverberation time of the song's (synthetic) room

    @property
    def beat_seconds(self) -> float:
        return 60.0 / self.tempo_bpm

    @property
    def bar_seconds(self) -> float:
        return BEATS_PER_BAR * self.beat_seconds

    @property
    def key_name(self) -> str:
        return pretty_midi.key_number_to_key_name(self.key_root + (12 if self.mode == "minor" else 0))

    def section_spans_seconds(self) -> list[tuple[str, float, float]]:
        """(name, start_seconds, end_seconds) of each section, cut at the song's end."""
        spans = []
        for section in self.sections:
            start = section.start_bar * self.bar_seconds
            end = min((section.start_bar + section.bars) * self.bar_seconds, self.seconds)
            if start < self.seconds:
                spans.append((section.name, start, end))
        return spans

    def part_midi(self, part: Part) -> pretty_midi.PrettyMIDI:
        """A MIDI file holding one part, lasting exactly the song (so renders cover all of it)."""
        return self._midi([part])

    def full_midi(self) -> pretty_midi.PrettyMIDI:
        return self._midi(self.parts)

    def _midi(self, parts: list[Part]) -> pretty_midi.PrettyMIDI:
        midi = pretty_midi.PrettyMIDI(initial_tempo=self.tempo_bpm, resolution=480)
        midi.time_signature_changes.append(pretty_midi.TimeSignature(BEATS_PER_BAR, 4, 0.0))
        midi.key_signature_changes.append(
            pretty_midi.KeySignature(self.key_root + (12 if self.mode == "minor" else 0), 0.0)
        )
        for part in parts:
            instrument = pretty_midi.Instrument(part.program, is_drum=part.is_drum, name=part.name)
            instrument.notes = list(part.instrument.notes)
            instrument.control_changes = list(part.instrument.control_changes)
            # A harmless controller event at the very end makes the file last the whole song, so a
            # part that rests at the end still renders to full length.
            volume = next((c.value for c in instrument.control_changes if c.number == 7), 100)
            instrument.control_changes.append(pretty_midi.ControlChange(7, volume, self.seconds))
            midi.instruments.append(instrument)
        return midi


# ---------------------------------------------------------------------------------------------


def song_rng(seed: int, index: int) -> np.random.Generator:
    """Each song draws from its own stream, so song N is the same whatever start_index or count."""
    return np.random.default_rng([int(seed) % (1 << 64), int(index), 0x5EED])


def compose_song(seed: int, index: int, seconds: float) -> Arrangement:
    """Compose song number `index` of the set made with `seed`; it lasts `seconds`."""
    if not math.isfinite(seconds) or seconds < MIN_SECONDS:
        raise ValueError(f"a song must last at least {MIN_SECONDS} seconds, got {seconds}")
    rng = song_rng(seed, index)
    genre = str(rng.choice(sorted(GENRES)))
    style = GENRES[genre]
    tempo = float(rng.integers(style["tempo"][0], style["tempo"][1] + 1))
    mode = "minor" if rng.random() < style["mode_minor"] else "major"
    key_root = int(rng.integers(0, 12))
    sevenths = rng.random() < style["sevenths"]
    bar_seconds = BEATS_PER_BAR * 60.0 / tempo
    total_bars = max(1, math.ceil(seconds / bar_seconds))
    sections = _sections(rng, total_bars)
    progressions = {name: PROGRESSIONS[mode][rng.integers(len(PROGRESSIONS[mode]))] for name in SECTION_NAMES}
    progressions["outro"] = progressions["verse"]
    chords = []
    for section in sections:
        degrees = progressions[section.name]
        for bar in range(section.bars):
            chords.append(_chord(key_root, mode, degrees[bar % len(degrees)], sevenths))

    context = _Context(rng, tempo, key_root, mode, seconds, sections, chords, swing=style["swing"] > 0.5)
    plan = _plan_parts(rng, style)
    activity = _activity(rng, plan, sections)
    parts = []
    for (name, role, program, part_style, melody), active in zip(plan, activity, strict=True):
        instrument = pretty_midi.Instrument(program, is_drum=(role == "drums"), name=name)
        _mix_controls(rng, role, instrument)
        context.active = active
        GENERATORS[role](context, instrument, part_style)
        _humanise(rng, instrument, seconds, tight=(role == "drums"))
        if instrument.notes:
            send = float(rng.uniform(*REVERB_SEND[role]))
            parts.append(
                Part(
                    name, role, program, role == "drums", part_style, tuple(active), melody, instrument, send
                )
            )
    rt60_seconds = float(rng.uniform(*ROOM_RT60_SECONDS))
    return Arrangement(
        seed, index, genre, tempo, key_root, mode, float(seconds), sections, chords, parts, rt60_seconds
    )


def _sections(rng: np.random.Generator, total_bars: int) -> list[Section]:
    """The song form covering at least `total_bars` (the song's end cuts the last section).

    Short songs keep the first sections, one bar each; long ones stretch sections in whole
    phrases of two bars, as songs do.
    """
    lengths = [int(rng.choice(SECTION_BARS[name])) for name in FORM]
    if total_bars < len(FORM):
        form, lengths = FORM[:total_bars], [1] * total_bars
    else:
        scale = total_bars / sum(lengths)
        if scale > 1:
            lengths = [2 * max(1, round(n * scale / 2)) for n in lengths]
        else:
            lengths = [max(1, int(n * scale)) for n in lengths]
        lengths[-1] += max(0, total_bars - sum(lengths))
        form = FORM
    sections, bar = [], 0
    for name, bars in zip(form, lengths, strict=True):
        sections.append(Section(name, bar, bars))
        bar += bars
    return sections


def _chord(key_root: int, mode: str, degree: int, seventh: bool) -> Chord:
    scale = MAJOR if mode == "major" else MINOR
    steps = (0, 2, 4, 6) if seventh else (0, 2, 4)
    pcs = tuple((key_root + scale[(degree + s) % 7]) % 12 for s in steps)
    return Chord(pcs[0], pcs)


def _weighted(rng: np.random.Generator, weights: dict) -> object:
    keys = [k for k, w in weights.items() if w > 0]
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _plan_parts(rng: np.random.Generator, style: dict) -> list[tuple[str, str, int, str, bool]]:
    """(name, role, program, style, melody) of each part of the song."""
    has_guitar = rng.random() < GUITAR_PRESENCE
    has_piano = rng.random() < PIANO_PRESENCE
    if not (has_guitar or has_piano):
        has_guitar = rng.random() < 0.5
        has_piano = not has_guitar
    plan = []
    if rng.random() < 0.92:
        plan.append(("drums", "drums", 0, str(rng.choice(style["drums"])), False))
    if rng.random() < 0.92:
        plan.append(("bass", "bass", int(_weighted(rng, style["bass"])), "bass", False))
    melody_taken = False
    if has_guitar:
        program = int(_weighted(rng, style["guitar"]))
        plan.append(("guitar 1", "guitar", program, _guitar_style(rng, program), False))
        if rng.random() < SECOND_GUITAR_CHANCE:
            lead_program = int(_weighted(rng, style["guitar"]))
            plan.append(("guitar 2", "lead_guitar", lead_program, "lead", True))
            melody_taken = True
    if has_piano:
        program = (
            int(rng.choice(PIANO_PROGRAMS)) if rng.random() < 0.3 else int(_weighted(rng, style["piano"]))
        )
        piano_style = str(
            rng.choice(("block", "arpeggio", "melody") if not melody_taken else ("block", "arpeggio"))
        )
        melody_taken |= piano_style == "melody"
        plan.append(("piano", "piano", program, piano_style, piano_style == "melody"))
    families = [k for k, w in style["others"].items() if w > 0]
    weights = np.array([style["others"][k] for k in families], float)
    count = int(rng.choice((1, 2, 3), p=(0.3, 0.45, 0.25)))
    chosen = rng.choice(
        len(families), size=min(count, len(families)), replace=False, p=weights / weights.sum()
    )
    for k in sorted(chosen):
        role = families[k]
        program = int(rng.choice(OTHER_PROGRAMS[role]))
        melody = role in ("synth_lead", "voice", "brass") and not melody_taken and rng.random() < 0.7
        melody_taken |= melody
        part_style = "melody" if melody else ("stabs" if role == "brass" else "chords")
        plan.append((role.replace("_", " "), role, program, part_style, melody))
    return plan


def _guitar_style(rng: np.random.Generator, program: int) -> str:
    if program in (29, 30):
        return str(rng.choice(("riff", "riff", "strum")))
    if program == 24:
        return str(rng.choice(("arpeggio", "arpeggio", "strum")))
    if program == 28:
        return str(rng.choice(("riff", "strum")))
    return str(rng.choice(("strum", "strum", "arpeggio", "riff")))


def _activity(rng: np.random.Generator, plan: list, sections: list[Section]) -> list[list[bool]]:
    """Which sections each part plays in: decided per kind of section, with some variation
    between repeats; every part plays somewhere and no section is empty."""
    table = []
    for _, role, *_ in plan:
        by_kind = {name: rng.random() < ACTIVITY[role][SECTION_NAMES.index(name)] for name in SECTION_NAMES}
        flags = [by_kind[s.name] != (rng.random() < 0.15) for s in sections]
        if not any(flags):
            flags[int(rng.integers(len(flags)))] = True
        table.append(flags)
    for column in range(len(sections)):
        if not any(row[column] for row in table):
            # Prefer the accompaniment (bass, pads) to fill an otherwise silent section.
            order = sorted(
                range(len(plan)), key=lambda i: plan[i][1] not in ("bass", "pad", "strings", "piano")
            )
            table[order[0]][column] = True
    return table


def _mix_controls(rng: np.random.Generator, role: str, instrument: pretty_midi.Instrument) -> None:
    """Channel volume and pan: a plausible mix balance that differs from song to song."""
    volume = {
        "drums": (95, 112), "bass": (92, 110), "guitar": (85, 110), "lead_guitar": (85, 105),
        "piano": (85, 110), "strings": (65, 90), "pad": (60, 85), "organ": (70, 95),
        "brass": (75, 100), "synth_lead": (75, 95), "voice": (70, 95),
    }[role]  # fmt: skip
    pan = 64 if role in ("drums", "bass") else int(np.clip(64 + rng.normal(0, 22), 10, 118))
    instrument.control_changes.append(pretty_midi.ControlChange(7, int(rng.integers(*volume)), 0.0))
    instrument.control_changes.append(pretty_midi.ControlChange(10, pan, 0.0))


def _humanise(
    rng: np.random.Generator, instrument: pretty_midi.Instrument, seconds: float, tight: bool
) -> None:
    """Jitter onsets and velocities like a player would; keep every note inside the song."""
    limit = seconds - 0.05
    kept = []
    for note in sorted(instrument.notes, key=lambda n: (n.start, n.pitch)):
        shift = float(rng.normal(0.0, 0.004 if tight else 0.009))
        start = max(0.0, note.start + shift)
        end = min(note.end + shift, limit)
        if start >= limit - 0.02 or end - start < 0.02:
            continue
        velocity = int(np.clip(round(note.velocity + rng.normal(0.0, 6.0)), 1, 127))
        kept.append(pretty_midi.Note(velocity, note.pitch, round(start, 6), round(end, 6)))
    instrument.notes = kept


# ---------------------------------------------------------------------------------------------
# Part generators. Each writes notes for the bars of active sections into the instrument.


class _Context:
    def __init__(self, rng, tempo, key_root, mode, seconds, sections, chords, swing):
        self.rng = rng
        self.beat = 60.0 / tempo
        self.key_root = key_root
        self.scale = MAJOR if mode == "major" else MINOR
        self.seconds = seconds
        self.sections = sections
        self.chords = chords
        self.swing = swing
        self.active: list[bool] = []

    def bars(self):
        """(bar, chord, section, first_bar_of_section, last_bar_of_section) for active bars."""
        for k, section in enumerate(self.sections):
            if not self.active[k]:
                continue
            for offset in range(section.bars):
                bar = section.start_bar + offset
                yield bar, self.chords[bar], section, offset == 0, offset == section.bars - 1

    def time(self, bar: int, beat: float) -> float:
        if self.swing and abs(beat % 1.0 - 0.5) < 1e-9:
            beat += 1.0 / 6.0  # swung eighths: the off-beat lands on the third triplet
        return (bar * BEATS_PER_BAR + beat) * self.beat

    def scale_pitches(self, low: int, high: int, pentatonic: bool = False) -> list[int]:
        degrees = (0, 1, 2, 4, 5) if pentatonic else range(7)
        pcs = {(self.key_root + self.scale[d]) % 12 for d in degrees}
        return [p for p in range(low, high + 1) if p % 12 in pcs]


def _add(instrument, pitch, start, end, velocity):
    if 0 <= pitch <= 127 and end > start:
        instrument.notes.append(pretty_midi.Note(int(np.clip(velocity, 1, 127)), int(pitch), start, end))


def _lowest(pc: int, low: int) -> int:
    """The lowest pitch with pitch class `pc` at or above `low`."""
    return low + (pc - low) % 12


def _guitar_voicing(chord: Chord) -> list[int]:
    """Six strings of an open-position-like voicing: root between E2 and D#3."""
    root = _lowest(chord.root, 40)
    intervals = chord.intervals()
    third, fifth = intervals[1], intervals[2]
    top = root + 12 + intervals[3] if len(intervals) > 3 else root + 24
    return sorted({root, root + fifth, root + 12, root + 12 + third, root + 12 + fifth, top})


def _close_voicing(chord: Chord, low: int) -> list[int]:
    pitches, floor = [], low
    for pc in chord.pitch_classes:
        pitch = _lowest(pc, floor)
        pitches.append(pitch)
        floor = pitch + 1
    return pitches


STRUM_PATTERNS = ("D.DU.UDU", "D.D.D.D.", "D..D..D.", "D.DUD.DU", "DUDUDUDU", "D...D.DU")


def _guitar(ctx: _Context, instrument, style: str) -> None:
    rng = ctx.rng
    muted = instrument.program == 28
    if style == "strum":
        pattern = STRUM_PATTERNS[rng.integers(len(STRUM_PATTERNS))]
        for bar, chord, *_ in ctx.bars():
            voicing = _guitar_voicing(chord)
            hits = [k for k, c in enumerate(pattern) if c != "."]
            for i, slot in enumerate(hits):
                nxt = hits[i + 1] if i + 1 < len(hits) else 8
                start, end = ctx.time(bar, slot / 2), ctx.time(bar, nxt / 2)
                if muted:
                    end = start + 0.45 * (end - start)
                down = pattern[slot] == "D"
                strings = voicing if down else voicing[-4:][::-1]
                base = 92 if slot % 2 == 0 else 72
                for k, pitch in enumerate(strings):  # a strum sweeps across the strings
                    offset = k * float(rng.uniform(0.008, 0.016))
                    _add(instrument, pitch, start + offset, end, base - 4 * (not down) + rng.integers(-5, 6))
    elif style == "arpeggio":
        order = [(0, 2, 3, 4, 5, 4, 3, 2), (0, 3, 2, 4, 1, 3, 2, 4), (0, 2, 4, 5, 3, 4, 2, 3)][
            rng.integers(3)
        ]
        for bar, chord, *_ in ctx.bars():
            voicing = _guitar_voicing(chord)
            for slot in range(8):
                pitch = voicing[order[slot] % len(voicing)]
                start = ctx.time(bar, slot / 2)
                _add(
                    instrument,
                    pitch,
                    start,
                    start + 2.5 * ctx.beat / 2,
                    80 + 10 * (slot == 0) + rng.integers(-6, 7),
                )
    elif style == "riff":
        rhythm = rng.random(8) < 0.65
        rhythm[0] = True
        palm = rng.random(8) < 0.5
        for bar, chord, *_ in ctx.bars():
            root = _lowest(chord.root, 40)
            for slot in np.flatnonzero(rhythm):
                start = ctx.time(bar, slot / 2)
                length = (0.35 if palm[slot] else 0.9) * ctx.beat / 2 * (2 if slot == 0 else 1)
                for pitch in (root, root + 7, root + 12):  # power chord
                    _add(instrument, pitch, start, start + length, 100 if slot % 2 == 0 else 88)
    else:
        _melody(ctx, instrument, low=55, high=84, pentatonic=True, density=0.75)


def _melody(ctx: _Context, instrument, low: int, high: int, pentatonic: bool, density: float,
            long_notes: bool = False) -> None:  # fmt: skip
    """A phrase-based tune: steps along the scale, chord tones on strong beats, breaths between phrases."""
    rng = ctx.rng
    pitches = ctx.scale_pitches(low, high, pentatonic)
    position = len(pitches) // 2
    durations = (2.0, 1.0, 4.0) if long_notes else (0.5, 1.0, 0.5, 1.5, 2.0)
    for bar, chord, _, first, _ in ctx.bars():
        if first or rng.random() < 0.2:
            position = int(np.clip(position + rng.integers(-2, 3), 0, len(pitches) - 1))
        beat = 0.0 if rng.random() < 0.7 else 0.5
        while beat < BEATS_PER_BAR:
            duration = float(rng.choice(durations))
            if rng.random() < density:
                if beat % 2 == 0:  # strong beat: move to the nearest chord tone
                    tones = [i for i, p in enumerate(pitches) if p % 12 in chord.pitch_classes]
                    if tones:
                        position = min(tones, key=lambda i: abs(i - position))
                start = ctx.time(bar, beat)
                end = ctx.time(bar, min(beat + duration, BEATS_PER_BAR)) - 0.02
                _add(instrument, pitches[position], start, end, 88 + 8 * (beat == 0) + rng.integers(-8, 9))
                position = int(np.clip(position + rng.choice((-2, -1, -1, 1, 1, 2, 0)), 0, len(pitches) - 1))
            beat += duration


def _piano(ctx: _Context, instrument, style: str) -> None:
    rng = ctx.rng
    acoustic = instrument.program in (0, 1, 3)
    rhythm = [(0, 4), (0, 2, 4), (0, 1, 2, 3, 4), (0, 1.5, 2.5, 3.5, 4)][
        rng.integers(4)
    ]  # onsets, then bar end
    for bar, chord, *_ in ctx.bars():
        bar_start, bar_end = ctx.time(bar, 0), ctx.time(bar, BEATS_PER_BAR)
        bass_note = _lowest(chord.root, 36)
        _add(instrument, bass_note, bar_start, bar_end - 0.05, 78 + rng.integers(-5, 6))
        if style != "melody":
            _add(instrument, bass_note + 12, bar_start, bar_end - 0.05, 68)
        right = _close_voicing(chord, 60 if style == "block" else 55)
        if style == "block":
            for onset, nxt in zip(rhythm[:-1], rhythm[1:], strict=True):
                start, end = ctx.time(bar, onset), ctx.time(bar, nxt) - 0.03
                for pitch in right:
                    _add(instrument, pitch, start, end, 76 + 8 * (onset == 0) + rng.integers(-5, 6))
        elif style == "arpeggio":
            tones = right + [p + 12 for p in right]
            step = 0.5 if rng.random() < 0.7 else 0.25
            for k in range(int(BEATS_PER_BAR / step)):
                start = ctx.time(bar, k * step)
                index = k % (2 * len(tones) - 2)
                index = index if index < len(tones) else 2 * len(tones) - 2 - index
                _add(instrument, tones[index], start, start + 3 * step * ctx.beat, 72 + rng.integers(-6, 7))
        else:
            for onset in (0, 2):
                start, end = ctx.time(bar, onset), ctx.time(bar, onset + 2) - 0.03
                for pitch in _close_voicing(chord, 52):
                    _add(instrument, pitch, start, end, 64)
        if acoustic:  # sustain pedal, lifted just before each chord change
            instrument.control_changes.append(pretty_midi.ControlChange(64, 100, bar_start + 0.01))
            instrument.control_changes.append(pretty_midi.ControlChange(64, 0, bar_end - 0.04))
    if style == "melody":
        _melody(ctx, instrument, low=67, high=91, pentatonic=False, density=0.8)


def _bass(ctx: _Context, instrument, style: str) -> None:
    rng = ctx.rng
    pattern = [
        ((0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)),
        ((0, 1.5), (1.5, 0.5), (2, 1.5), (3.5, 0.5)),
        tuple((k / 2, 0.45) for k in range(8)),
        ((0, 2.0), (2, 1.0), (3, 1.0)),
    ][rng.integers(4)]
    walking = instrument.program == 32
    for bar, chord, *_ in ctx.bars():
        root = _lowest(chord.root, 28)
        fifth = root + chord.intervals()[2]
        for k, (onset, length) in enumerate(pattern):
            if walking:
                pitch = (root, root + chord.intervals()[1], fifth, root + 12)[k % 4]
            else:
                pitch = root if k % 2 == 0 or rng.random() < 0.6 else rng.choice((fifth, root + 12))
            start = ctx.time(bar, onset)
            _add(
                instrument,
                pitch,
                start,
                start + length * ctx.beat * 0.92,
                95 + 8 * (onset == 0) + rng.integers(-6, 7),
            )


def _drums(ctx: _Context, instrument, style: str) -> None:
    rng = ctx.rng
    kick = {"rock": (0, 2, 2.5), "pop": (0, 1.5, 2.5), "halftime": (0, 1.75), "swing": (0, 2),
            "four_on_floor": (0, 1, 2, 3)}[style]  # fmt: skip
    snare = {"rock": (1, 3), "pop": (1, 3), "halftime": (2,), "swing": (), "four_on_floor": (1, 3)}[style]
    for bar, _, section, first, last in ctx.bars():
        sparse = section.name in ("intro", "outro") and rng.random() < 0.5
        if style == "swing":
            cymbal = [(b, RIDE) for b in (0, 1, 1.5, 2, 3, 3.5)] + [(1, PEDAL_HAT), (3, PEDAL_HAT)]
        elif style == "four_on_floor":
            cymbal = [(b + 0.5, OPEN_HAT) for b in range(4)] + [(b / 2, CLOSED_HAT) for b in range(0, 8, 2)]
        else:
            cymbal = [(b / 2, CLOSED_HAT if section.name != "chorus" else RIDE) for b in range(8)]
        hits = [(b, note, 70 + 15 * (b % 1 == 0)) for b, note in cymbal]
        if not sparse:
            hits += [(b, KICK, 105) for b in kick]
            hits += [(b, SNARE, 100) for b in snare]
            if style == "swing":
                hits += [(b, SNARE, 45) for b in (1.5, 3.5) if rng.random() < 0.5]
        if first and section.name != "intro":
            hits.append((0, CRASH, 110))
        if last and not sparse and rng.random() < 0.6:  # a fill into the next section
            hits = [h for h in hits if h[0] < 3]
            for k, note in enumerate((SNARE, SNARE, HIGH_TOM, MID_TOM, MID_TOM, LOW_TOM, LOW_TOM, KICK)):
                hits.append((3 + k / 8, note, 85 + 3 * k))
        for beat, note, velocity in hits:
            start = ctx.time(bar, beat)
            _add(instrument, note, start, start + 0.1, velocity + rng.integers(-8, 9))


def _sustained(ctx: _Context, instrument, style: str, low: int, velocity: int) -> None:
    """Held chords with smooth voice leading (strings, pads, organ, choir)."""
    previous = None
    for bar, chord, *_ in ctx.bars():
        voicing = _close_voicing(chord, low)
        if previous is not None:  # choose the inversion nearest to the last chord
            options = [sorted(voicing[k:] + [p + 12 for p in voicing[:k]]) for k in range(len(voicing))]
            voicing = min(options, key=lambda v: sum(abs(a - b) for a, b in zip(v, previous, strict=False)))
        previous = voicing
        start, end = ctx.time(bar, 0), ctx.time(bar, BEATS_PER_BAR) - 0.02
        for pitch in voicing:
            _add(instrument, pitch, start, end, velocity + ctx.rng.integers(-5, 6))


def _other(ctx: _Context, instrument, style: str, role: str) -> None:
    if style == "melody":
        low, high = {"brass": (58, 82), "voice": (60, 79), "synth_lead": (64, 88)}[role]
        _melody(
            ctx, instrument, low, high, pentatonic=role != "voice", density=0.85, long_notes=role == "voice"
        )
    elif style == "stabs":
        rhythm = (
            ((0, 0.4), (1.5, 0.3), (2.5, 0.4))
            if ctx.rng.random() < 0.5
            else ((0, 1.0), (2.5, 0.4), (3.5, 0.3))
        )
        for bar, chord, *_ in ctx.bars():
            for onset, length in rhythm:
                start = ctx.time(bar, onset)
                for pitch in _close_voicing(chord, 58):
                    _add(instrument, pitch, start, start + length * ctx.beat, 96 + ctx.rng.integers(-6, 7))
    else:
        low = {"strings": 55, "pad": 52, "organ": 53, "voice": 57, "brass": 55, "synth_lead": 60}[role]
        _sustained(ctx, instrument, style, low, 72 if role != "organ" else 80)


GENERATORS = {
    "guitar": _guitar,
    "lead_guitar": lambda ctx, instrument, style: _melody(
        ctx, instrument, 55, 84, pentatonic=True, density=0.75
    ),
    "piano": _piano,
    "bass": _bass,
    "drums": _drums,
    **{
        role: (lambda r: lambda ctx, inst, style: _other(ctx, inst, style, r))(role)
        for role in OTHER_PROGRAMS
    },
}

"""Random timbre per part: SoundFont generator offsets sent as SF2.01 NRPN messages.

A network trained on four soundfonts learns those fonts' samples; songs in a font it never heard
sound different mostly in their brightness, resonance and envelopes. FluidSynth adds a channel's
NRPN generator values (SoundFont 2.01, section 9.6: NRPN MSB 120, LSB = generator number, a 14-bit
data entry centred on 8192, times the generator's NRPN scale) to every voice the channel plays, so
one MIDI part can darken, sharpen or soften a preset without editing the font. Each part of a song
draws its own offsets, so the same preset sounds a little different from song to song.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pretty_midi

NRPN_MSB, NRPN_LSB, DATA_ENTRY_MSB, DATA_ENTRY_LSB = 99, 98, 6, 38
SF2_NRPN_MSB = 120  # "this NRPN is a SoundFont generator"


@dataclass(frozen=True)
class Generator:
    number: int      # SF2 generator number
    name: str
    nrpn_scale: int  # SF2 units per NRPN data step (FluidSynth's fluid_gen_info)
    low: float       # offset range at strength 1, in SF2 units
    high: float


# Ranges chosen to stay within what a player or an engineer does to an instrument: a darker or
# brighter tone and some resonance (filter), a softer attack, a shorter or longer decay and ring,
# a touch of vibrato, a few cents of detuning.
GENERATORS = (
    Generator(8, "filter cutoff (cents)", 2, -3600.0, 0.0),
    Generator(9, "filter resonance (cB)", 1, 0.0, 120.0),
    Generator(34, "volume attack (timecents)", 2, 0.0, 3600.0),
    Generator(36, "volume decay (timecents)", 2, -1200.0, 1200.0),
    Generator(37, "volume sustain (cB of attenuation)", 1, 0.0, 120.0),
    Generator(38, "volume release (timecents)", 2, -1200.0, 1200.0),
    Generator(6, "vibrato depth (cents)", 2, 0.0, 24.0),
    Generator(52, "fine tune (cents)", 1, -12.0, 12.0),
)


def draw_offsets(rng: np.random.Generator, strength: float) -> dict[int, int]:
    """Generator number -> offset in NRPN data steps, each uniform over its range times `strength`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"timbre strength must be between 0 and 1, got {strength}")
    offsets = {}
    for gen in GENERATORS:
        value = rng.uniform(gen.low, gen.high) * strength  # draw even when 0: same stream for any strength
        offsets[gen.number] = int(round(value / gen.nrpn_scale))
    return offsets


def nrpn_events(offsets: dict[int, int], tick_seconds: float) -> list[pretty_midi.ControlChange]:
    """The controller messages that set `offsets`, from the song's start, `tick_seconds` being the
    length of one tick of the file they go in.

    Each value needs four messages in order (NRPN MSB, NRPN LSB, data LSB, data MSB — FluidSynth acts
    on the data MSB). pretty_midi sorts messages of one tick by controller number, which would put
    the data entry first, so every message gets its own tick: 32 messages take about 50 ms at 120 bpm,
    and FluidSynth applies the values to notes already sounding too.
    """
    events, k = [], 0
    for number, steps in sorted(offsets.items()):
        if not 0 <= number < 100:
            raise ValueError(f"generator {number} is not addressable by an SF2 NRPN LSB")
        data = int(np.clip(8192 + steps, 0, 16383))
        for controller, value in ((NRPN_MSB, SF2_NRPN_MSB), (NRPN_LSB, number),
                                  (DATA_ENTRY_LSB, data & 0x7F), (DATA_ENTRY_MSB, data >> 7)):
            # 1.5 ticks apart: rounding to the tick grid can never merge two messages
            events.append(pretty_midi.ControlChange(controller, value, 1.5 * k * tick_seconds))
            k += 1
    return events


def part_rng(seed: int, index: int, part: int) -> np.random.Generator:
    """The timbre stream of part `part` of song `index`: apart from the song's own stream, so the
    notes of a song do not depend on whether its timbres are drawn."""
    return np.random.default_rng([int(seed) % (1 << 64), int(index), int(part), 0x7B8E])


def with_timbre(midi: pretty_midi.PrettyMIDI, offsets: dict[int, int]) -> pretty_midi.PrettyMIDI:
    """`midi` (one or more parts, changed in place and returned) with `offsets` set on every part."""
    tick_seconds = midi.tick_to_time(1)  # the file's own resolution and first tempo
    for instrument in midi.instruments:
        instrument.control_changes = nrpn_events(offsets, tick_seconds) + list(instrument.control_changes)
    return midi

"""Synthetic multitrack songs: compose, render each part with FluidSynth, write a dataset layout.

`generate_songs` makes a set of songs from a seed; `render_midi_file` renders a user's General
MIDI file one instrument per stem, as Slakh did with the Lakh MIDI files.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pretty_midi

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.ingestion.synth.arrangement import MIN_SECONDS, Arrangement, compose_song
from services.ingestion.synth.layouts import (
    LAYOUTS,
    SLAKH_PCM_BITS,
    StemInfo,
    first_stem_number,
    medleydb_metadata,
    mix_path,
    safe_song_name,
    slakh_metadata,
    song_name,
    stem_path,
    synth_uuid,
    write_song,
)
from services.ingestion.synth.loudness import integrated_loudness_lufs
from services.ingestion.synth.production import (
    bus_rng,
    check_strength,
    draw_bus,
    draw_stem_chain,
    produce_song,
    rms_db,
    stem_rng,
)
from services.ingestion.synth.rendering import (
    add_reverb,
    check_soundfont,
    mix_stems,
    render_midi,
    room_impulse_response,
)
from services.ingestion.synth.timbre import draw_offsets, part_rng, with_timbre

MAX_SONGS = 10_000
MAX_SECONDS = 3600.0
MAX_MIDI_BYTES = 20 * 1024 * 1024
MAX_MIDI_INSTRUMENTS = 64
MIDI_TAIL_SECONDS = 2.0  # let the last notes ring out after a user's MIDI file ends
RATES_HZ = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
# FluidSynth processes rendering parts of one song at once (each uses one core).
RENDER_WORKERS = max(1, min(4, os.cpu_count() or 1))
GUITAR_PROGRAMS = range(24, 32)
PIANO_PROGRAMS = (0, 1, 2, 3, 4, 5)

Progress = Callable[[float, float, str], None]
ShouldStop = Callable[[], bool]


class _Stopped(Exception):
    pass


def generate_songs(
    out_dir: str | os.PathLike,
    songs: int,
    seconds: float,
    seed: int,
    layout: str = "medleydb",
    soundfont: str | os.PathLike | None = None,
    rate: int = 44100,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    start_index: int = 0,
    overlays: Sequence[str | os.PathLike] = (),
    timbre: float = 0.0,
    produce: float = 0.0,
) -> dict:
    """Generate `songs` songs of `seconds` each under `out_dir` in the given dataset layout.

    Song k (counting from `start_index`) depends only on (seed, k, seconds, rate, soundfonts, timbre,
    produce), so
    two runs give byte-identical files and a set can be extended later with `start_index`.
    `overlays` are soundfonts loaded on top of `soundfont`: the presets they hold replace the base
    font's (rendering.Soundfonts); the arrangements stay those of (seed, k).
    `timbre` (0 to 1) gives each part random SoundFont generator offsets of that strength
    (synth.timbre: filter, envelope, vibrato, tuning); the notes stay those of (seed, k).
    `produce` (0 to 1) runs each stem through random effects of that strength and the mix through a
    bus compressor and limiter whose gain every stem shares (synth.production); the processed stems
    are the references and still sum to the mix.
    Each song folder appears complete or not at all. Existing song folders are never replaced.
    Returns a summary: {"layout", "rate", "seconds", "seed", "out_dir", "stopped", "songs": [...],
    "totals": {...}}; when `should_stop` returns True the songs finished so far are kept and
    "stopped" is True.
    """
    _check_layout(layout)
    songs, start_index = int(songs), int(start_index)
    if not 1 <= songs <= MAX_SONGS:
        raise InvalidArgumentError(f"songs must be between 1 and {MAX_SONGS}, got {songs}")
    if start_index < 0:
        raise InvalidArgumentError(f"start_index must not be negative, got {start_index}")
    seconds = float(seconds)
    if not (math.isfinite(seconds) and MIN_SECONDS <= seconds <= MAX_SECONDS):
        raise InvalidArgumentError(f"seconds must be between {MIN_SECONDS} and {MAX_SECONDS}, got {seconds}")
    rate = _check_rate(rate)
    timbre = float(timbre)
    if not (math.isfinite(timbre) and 0.0 <= timbre <= 1.0):
        raise InvalidArgumentError(f"timbre must be between 0 and 1, got {timbre}")
    try:
        produce = check_strength(produce)
    except ValueError as error:
        raise InvalidArgumentError(str(error)) from error
    soundfonts = check_soundfont(soundfont, overlays)
    out_dir = Path(out_dir)
    names = [song_name(layout, start_index + i) for i in range(songs)]
    existing = [name for name in names if (out_dir / name).exists()]
    if existing:
        raise FailedPreconditionError(
            f"{len(existing)} song folder(s) already exist in {out_dir} (first: {existing[0]}); "
            "choose another folder or a start_index past them"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    samples = int(round(seconds * rate))
    summaries, stopped, started = [], False, time.monotonic()
    for i, name in enumerate(names):
        try:
            summaries.append(
                _generate_one(
                    out_dir, name, start_index + i, seed, seconds, samples, layout, soundfonts, rate, timbre,
                    produce, lambda fraction, message, i=i: progress and progress(i + fraction, songs, message),
                    should_stop,
                )
            )  # fmt: skip
        except _Stopped:
            stopped = True
            break
        if progress:
            progress(i + 1, songs, f"{name} written")
    return {
        "layout": layout,
        "rate": rate,
        "seconds": seconds,
        "seed": int(seed),
        "start_index": start_index,
        "out_dir": str(out_dir),
        "soundfont": str(soundfonts.paths[0]),
        "overlay_soundfonts": [str(path) for path in soundfonts.paths[1:]],
        "timbre": timbre,
        "produce": produce,
        "stopped": stopped,
        "songs": summaries,
        "totals": {
            "songs": len(summaries),
            "stems": sum(len(s["stems"]) for s in summaries),
            "audio_seconds": len(summaries) * seconds,
            "songs_with_guitar": sum(s["has_guitar"] for s in summaries),
            "songs_with_piano": sum(s["has_piano"] for s in summaries),
            "wall_seconds": round(time.monotonic() - started, 3),
        },
    }


def _generate_one(out_dir, name, index, seed, seconds, samples, layout, soundfonts, rate, timbre, produce,
                  report, should_stop):
    arrangement = compose_song(seed, index, seconds)
    parts = arrangement.parts
    room = song_room(arrangement, rate)
    midis = [arrangement.part_midi(part) for part in parts]
    if timbre:
        midis = [with_timbre(midi, draw_offsets(part_rng(seed, index, k), timbre))
                 for k, midi in enumerate(midis)]
    audio = _render_parts(
        midis, [part.name for part in parts], soundfonts, rate, samples,
        lambda k, message: report(k / (len(parts) + 1), f"{name}: {message}"), should_stop,
        room=room, sends=[part.reverb_send for part in parts],
    )  # fmt: skip
    effects, bus = [[] for _ in parts], None
    if produce:
        chains = [
            draw_stem_chain(stem_rng(seed, index, k), produce, part.program, part.is_drum, rate,
                            arrangement.tempo_bpm, rms_db(stem))
            for k, (part, stem) in enumerate(zip(parts, audio, strict=True))
        ]
        audio, bus = produce_song(audio, chains, draw_bus(bus_rng(seed, index), produce), rate)
        effects = [chain.effects for chain in chains]
    pcm_bits = SLAKH_PCM_BITS if layout == "slakh" else None
    stems, mix, gain = mix_stems(audio, pcm_bits=pcm_bits)

    first = first_stem_number(layout)
    infos = [
        StemInfo(
            number=first + k,
            program=part.program,
            is_drum=part.is_drum,
            part=part.name,
            component="melody" if part.melody else ("bass" if part.role == "bass" else ""),
            integrated_loudness_lufs=_stem_loudness(layout, stem, rate),
        )
        for k, (part, stem) in enumerate(zip(parts, stems, strict=True))
    ]
    identity = ("stemlab-synth", int(seed), index, seconds, rate, soundfonts.name) + ((timbre,) if timbre else ()) \
        + ((("produce", produce),) if produce else ())
    how = f"FluidSynth with {soundfonts.name}" + (f", timbre {timbre:g}" if timbre else "") \
        + (f", production {produce:g}" if produce else "")
    if layout == "medleydb":
        metadata = medleydb_metadata(
            name, title=name.replace("_", " "), stems=infos, genre=arrangement.genre, artist="stemlab synth",
            origin=f"stemlab synth: {how}, seed {int(seed)}, song {index}", excerpt=False,
        )  # fmt: skip
        write_song(layout, out_dir / name, name, rate, stems, mix, metadata)
    else:
        metadata = slakh_metadata(synth_uuid(*identity), infos, gain, plugin_name=soundfonts.name)
        full_midi = arrangement.full_midi()
        if timbre:  # the stems' own messages, each part's on its channel
            for instrument, midi in zip(full_midi.instruments, midis, strict=True):
                instrument.control_changes = list(midi.instruments[0].control_changes)
        write_song(layout, out_dir / name, name, rate, stems, mix, metadata,
                   stem_midis=midis, full_midi=full_midi)  # fmt: skip
    summary = _song_summary(layout, out_dir / name, name, infos, stems, rate)
    for row, part, chain in zip(summary["stems"], parts, effects, strict=True):
        row["style"] = part.style
        row["active_sections"] = list(part.active)
        if produce:
            row["production"] = chain
    return summary | ({"production": {"strength": produce, "bus": bus}} if produce else {}) | {
        "genre": arrangement.genre,
        "tempo_bpm": arrangement.tempo_bpm,
        "key": arrangement.key_name,
        "sections": [
            {"name": n, "start_seconds": round(a, 3), "end_seconds": round(b, 3)}
            for n, a, b in arrangement.section_spans_seconds()
        ],
        "gain": gain,
    }


def song_room(arrangement: Arrangement, rate: int) -> np.ndarray:
    """The song's room impulse response (2, samples), drawn from its own seed stream."""
    rng = np.random.default_rng([int(arrangement.seed) % (1 << 64), int(arrangement.index), 0xEC40])
    return room_impulse_response(rng, rate, arrangement.room_rt60_seconds)


def _render_parts(
    midis, labels, soundfonts, rate, samples, report, should_stop, room=None, sends=None
) -> list[np.ndarray]:
    """Render parts (and add their reverb, when a room is given) with up to RENDER_WORKERS at
    once; the results do not depend on the order they finish in. Raises _Stopped when asked to."""

    def render(k: int) -> np.ndarray:
        dry = render_midi(midis[k], soundfonts, rate, samples)
        return dry if room is None else add_reverb(dry, room, sends[k])

    results: list[np.ndarray | None] = [None] * len(midis)
    with concurrent.futures.ThreadPoolExecutor(max_workers=RENDER_WORKERS) as pool:
        pending = {}
        for k in range(len(midis)):
            if should_stop and should_stop():
                for future in pending:
                    future.cancel()
                raise _Stopped
            report(k, f"rendering {labels[k]}")
            pending[pool.submit(render, k)] = k
            if len(pending) >= RENDER_WORKERS:
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    results[pending.pop(future)] = future.result()
        for future, k in pending.items():
            results[k] = future.result()
    return results


def _song_summary(layout, folder, name, infos, stems, rate) -> dict:
    stem_rows = []
    for info, stem in zip(infos, stems, strict=True):
        stem_rows.append(
            {
                "stem": f"S{info.number:02d}",
                "file": stem_path(layout, name, info.number),
                "instrument": info.instrument,
                "program": info.program,
                "is_drum": info.is_drum,
                "part": info.part,
                "peak_dbfs": _dbfs(float(np.abs(stem).max())),
            }
        )
    return {
        "name": name,
        "folder": str(folder),
        "mix": mix_path(layout, name),
        "rate": rate,
        "stems": stem_rows,
        "instruments": sorted({row["instrument"] for row in stem_rows}),
        "has_guitar": any(not i.is_drum and i.program in GUITAR_PROGRAMS for i in infos),
        "has_piano": any(not i.is_drum and i.program in PIANO_PROGRAMS for i in infos),
    }


def _stem_loudness(layout: str, stem: np.ndarray, rate: int) -> float:
    """Only Slakh's metadata records loudness; skip the filtering for MedleyDB."""
    return integrated_loudness_lufs(stem, rate) if layout == "slakh" else float("-inf")


def _dbfs(value: float) -> float | None:
    return round(20 * math.log10(value), 2) if value > 0 else None


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _check_rate(rate: int) -> int:
    if int(rate) not in RATES_HZ:
        raise InvalidArgumentError(f"rate must be one of {RATES_HZ}, got {rate}")
    return int(rate)


def render_midi_file(
    midi_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str = "medleydb",
    soundfont: str | os.PathLike | None = None,
    rate: int = 44100,
    name: str | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    overlays: Sequence[str | os.PathLike] = (),
) -> dict:
    """Render a General MIDI file into one song folder, one stem per instrument track.

    Each instrument (pretty_midi's split by program, channel and drum flag) is rendered on its own
    with the file's tempo map; stems share one global gain and sum to the mix. The folder is named
    `name` or, by default, after the MIDI file. Returns the song summary; when stopped, nothing is
    written and {"stopped": True} is returned.
    """
    _check_layout(layout)
    rate = _check_rate(rate)
    midi_path = Path(midi_path)
    if not midi_path.is_file():
        raise NotFoundError(f"MIDI file {midi_path} does not exist")
    size = midi_path.stat().st_size
    if not 0 < size <= MAX_MIDI_BYTES:
        raise InvalidArgumentError(
            f"{midi_path.name}: a MIDI file must hold 1 byte to {MAX_MIDI_BYTES} bytes, not {size}"
        )
    data = midi_path.read_bytes()
    try:
        midi = pretty_midi.PrettyMIDI(str(midi_path))
    except Exception as error:  # mido and pretty_midi raise many kinds on malformed files
        raise InvalidArgumentError(f"{midi_path.name}: not a readable MIDI file ({error})") from error
    instruments = [inst for inst in midi.instruments if inst.notes]
    if not instruments:
        raise InvalidArgumentError(f"{midi_path.name}: the MIDI file contains no notes")
    if len(instruments) > MAX_MIDI_INSTRUMENTS:
        raise InvalidArgumentError(
            f"{midi_path.name}: {len(instruments)} instrument tracks, at most {MAX_MIDI_INSTRUMENTS} are rendered"
        )
    seconds = midi.get_end_time() + MIDI_TAIL_SECONDS
    if seconds > MAX_SECONDS:
        raise InvalidArgumentError(f"{midi_path.name}: {seconds:.0f} s is longer than {MAX_SECONDS:.0f} s")
    soundfonts = check_soundfont(soundfont, overlays)
    name = safe_song_name(name or midi_path.stem)
    folder = Path(out_dir) / name
    if folder.exists():
        raise FailedPreconditionError(f"{folder} already exists")
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    samples = int(round(seconds * rate))
    solo_midis = []
    for instrument in instruments:
        solo = copy.deepcopy(midi)  # keeps the tempo map, key and time signatures
        solo.instruments = [copy.deepcopy(instrument)]
        solo_midis.append(solo)
    labels = [instrument.name.strip() or f"track {k + 1}" for k, instrument in enumerate(instruments)]
    try:
        audio = _render_parts(
            solo_midis, labels, soundfonts, rate, samples,
            lambda k, message: progress and progress(k, len(instruments) + 1, message), should_stop,
        )  # fmt: skip
    except _Stopped:
        return {"stopped": True}
    stems, mix, gain = mix_stems(audio, pcm_bits=SLAKH_PCM_BITS if layout == "slakh" else None)

    first = first_stem_number(layout)
    infos = [
        StemInfo(
            number=first + k,
            program=inst.program,
            is_drum=inst.is_drum,
            part=inst.name.strip() or pretty_midi.program_to_instrument_name(inst.program),
            component="bass" if not inst.is_drum and 32 <= inst.program <= 39 else "",
            integrated_loudness_lufs=_stem_loudness(layout, stem, rate),
        )
        for k, (inst, stem) in enumerate(zip(instruments, stems, strict=True))
    ]
    if layout == "medleydb":
        metadata = medleydb_metadata(
            name, title=midi_path.stem, stems=infos, genre="", artist="",
            origin=f"rendered from {midi_path.name} with FluidSynth and {soundfonts.name}", excerpt=False,
        )  # fmt: skip
        write_song(layout, folder, name, rate, stems, mix, metadata)
    else:
        # Slakh's UUID is the MD5 of its Lakh MIDI file; do the same for the user's file.
        metadata = slakh_metadata(hashlib.md5(data).hexdigest(), infos, gain, plugin_name=soundfonts.name)
        write_song(layout, folder, name, rate, stems, mix, metadata, stem_midis=solo_midis, full_midi=data)
    if progress:
        progress(len(instruments) + 1, len(instruments) + 1, f"{name} written")
    return _song_summary(layout, folder, name, infos, stems, rate) | {
        "gain": gain,
        "seconds": seconds,
        "stopped": False,
    }

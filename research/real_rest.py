"""Real recordings added to generated songs as extra accompaniment stems (issue 36, experiment 25).

`stemlab synth` songs have no voices, and every part is a soundfont (the overlay fonts are recorded
notes, still played by MIDI). Real songs have singers, real drum kits, hand percussion, winds and
strings. This tool takes a folder of generated songs in the MedleyDB layout, before they are
imported, and gives a share of them one or two real recordings from a training pool as new stems:
a random stretch of the recording, at a random level against the song's mix. The stem file, its
METADATA.yaml entry (a MedleyDB instrument name, so the importer gives it its class) and the MIX
file are written together, each atomically (services.common.audio.write_audio, paths.atomic_write_text); the song's METADATA lists
what was added under `real_rest`. Running it again on a song that has additions leaves it alone.

The pool holds only recordings that are in neither half of `realset/` (checked against
`realset.build.ALL`: no repository path in both) and none of those reserved for the independent
check; licences as in realset/PROVENANCE.md. Percussion loops repeat seamlessly; other recordings
shorter than the song are placed one after another with random gaps and the set's 10 ms fades.

    .venv/bin/python -m research.real_rest SONGS_FOLDER [--mirrors /work/.mirror] [--seed 0]
    # then: stemlab dataset import medleydb SONGS_FOLDER
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from realset.build import (
    ALL,
    BERKLEE,
    CC0,
    LIBTSM,
    MIRW,
    MIT,
    RATE,
    SMS,
    SMST,
    SONIC,
    TONEJS,
    Recording,
    faded,
    read_recording,
    rec,
    rms,
)
from services.common.audio import write_audio
from services.common.paths import atomic_write_text

SHARES = (0.2, 0.5, 0.3)  # songs given 0, 1 and 2 real recordings
LEVEL_DB = (-12.0, 0.0)  # a real stem's RMS against the song's mix before it, uniform in this range
GAP_SECONDS = (0.0, 2.0)  # silence between repeats of a short non-loop recording

# (recording, MedleyDB instrument name). The file name field is unused here.
POOL: list[tuple[Recording, str]] = [
    (rec("vignesh", SMST, "sounds/vignesh.wav", SMS, "Carnatic singing (male)", "", "train"), "male singer"),
    (rec("soprano", SMST, "sounds/soprano-E4.wav", SMS, "soprano singing E4", "", "train"), "female singer"),
    (rec("carnatic", SMST, "sounds/carnatic.wav", SMS, "Carnatic ensemble: voice, violin, mridangam", "",
         "train"), "vocalists"),
    (rec("choir", SONIC, "etc/samples/ambi_choir.flac", CC0, "choir (freesound 207809)", "", "train"), "choir"),
    (rec("bendir", SMST, "sounds/bendir.wav", SMS, "bendir (frame drum)", "", "train"), "auxiliary percussion"),
    (rec("mridangam", SMST, "sounds/mridangam.wav", SMS, "mridangam", "", "train"), "tabla"),
    (rec("oboe", SMST, "sounds/oboe-A4.wav", SMS, "oboe A4", "", "train"), "oboe"),
    (rec("flute", SMST, "sounds/flute-A4.wav", SMS, "flute A4", "", "train"), "flute"),
    (rec("trumpet", SMST, "sounds/trumpet-A4.wav", SMS, "trumpet A4", "", "train"), "trumpet"),
    (rec("violin", SMST, "sounds/violin-B3.wav", SMS, "violin B3", "", "train"), "violin"),
    (rec("vibraphone", SMST, "sounds/vibraphone-C6.wav", SMS, "vibraphone C6", "", "train"), "vibraphone"),
    (rec("organ", SMST, "sounds/organ-C3.wav", SMS, "organ C3", "", "train"), "organ"),
    (rec("bongo", LIBTSM, "data/Bongo.wav", MIT, "bongo recording", "", "train"), "bongo"),
    (rec("castviolin", LIBTSM, "data/CastanetsViolin.wav", MIT, "castanets and violin", "", "train"), "violin"),
    (rec("glock", LIBTSM, "data/Glockenspiel.wav", MIT, "glockenspiel", "", "train"), "glockenspiel"),
    (rec("synthmono", LIBTSM, "data/SynthMono.wav", MIT, "monophonic synthesiser", "", "train"), "synthesizer"),
    (rec("synthpoly", LIBTSM, "data/SynthPoly.wav", MIT, "polyphonic synthesiser", "", "train"), "synthesizer"),
    (rec("tamborim", MIRW, "audio/tamborim.wav", MIT, "tamborim", "", "train"), "tambourine"),
    (rec("breakbeat", SONIC, "etc/samples/loop_breakbeat.flac", CC0, "breakbeat loop (freesound 160354)", "",
         "train", loop=True), "drum set"),
    (rec("compus", SONIC, "etc/samples/loop_compus.flac", CC0, "drum loop (freesound 212288)", "", "train",
         loop=True), "drum set"),
    (rec("industrial", SONIC, "etc/samples/loop_industrial.flac", CC0, "drum loop (freesound 222072)", "",
         "train", loop=True), "drum set"),
    (rec("garzul", SONIC, "etc/samples/loop_garzul.flac", CC0, "drum loop (freesound 213524)", "", "train",
         loop=True), "drum set"),
    (rec("tabla", SONIC, "etc/samples/loop_tabla.flac", CC0, "tabla loop (freesound 242591)", "", "train",
         loop=True), "tabla"),
    (rec("perc1", SONIC, "etc/samples/loop_perc1.flac", CC0, "percussion loop (freesound 415574)", "", "train",
         loop=True), "auxiliary percussion"),
    (rec("perc2", SONIC, "etc/samples/loop_perc2.flac", CC0, "percussion loop (freesound 415573)", "", "train",
         loop=True), "auxiliary percussion"),
]


# `--voices` (experiment 49): the OLPC Berklee Sound Library's voices in Tonejs/audio — men and women
# singing sustained vowels at many pitches, alone and in groups, hums, long vocal chords, gliding
# lines, a hallway conversation (288 s). Songs a user uploads have singers; the pool above has four.
_SINGERS = {"femalevoice": "female singer", "malevoice": "male singer"}
_BERKLEE_VOICES = (
    "femalevoice_aa_A3 femalevoice_aa_A4 femalevoice_aa_A5 femalevoice_aa_C6 femalevoice_aa_Db4 femalevoice_aa_Db5 "
    "femalevoice_aa_Eb4 femalevoice_aa_F5 femalevoice_oo_A4 femalevoice_oo_A5 femalevoice_oo_C6 femalevoice_oo_Db4 "
    "femalevoice_oo_Db5 femalevoice_oo_femalevoice_oo_A3 femalevoices_aa2_A3 femalevoices_aa2_A4 femalevoices_aa2_A5 "
    "femalevoices_aa2_C#4 femalevoices_aa2_C5 femalevoices_aa2_C6 femalevoices_aa2_F#5 femalevoices_oo2_A3 "
    "femalevoices_oo2_A4 femalevoices_oo2_A5 femalevoices_oo2_C#4 femalevoices_oo2_C#5 femalevoices_oo2_c6 "
    "malevoice_aa_A2 malevoice_aa_A3 malevoice_aa_Ab4 malevoice_aa_C#4 malevoice_aa_C3 malevoice_aa_F4 malevoice_oo_A2 "
    "malevoice_oo_A3 malevoice_oo_A4 malevoice_oo_C3 malevoice_oo_D#4 malevoice_oo_F3 malevoice_oo_F4 malevoice_oo_G2 "
    "malevoices_aa2_A2 malevoices_aa2_C#4 malevoices_aa2_C3 malevoices_aa2_F3 malevoices_aa2_F4 malevoices_oo2_A2 "
    "malevoices_oo2_A3 malevoices_oo2_A4 malevoices_oo2_C#4 malevoices_oo2_C3 malevoices_oo2_F3 malevoices_oo2_F4 "
    "vocal_hum_1 vocal_hum_2 vocal_hum_3 voclongchord voclongchord2 voclongchord3 voclongchord4 up_down_vocals_1 "
    "down_vocals_1 hallwaytalking_").split()
VOICES: list[tuple[Recording, str]] = [
    (rec(f"berklee-{name}", TONEJS, f"berklee/{name}.mp3", BERKLEE, f"voice ({name}, OLPC Berklee Sound Library)", "",
         "train"), _SINGERS.get(name.split("_")[0], "vocalists"))
    for name in _BERKLEE_VOICES]


def check_pool(pool=POOL) -> None:
    """Refuse a pool that shares a recording with the real-recordings set."""
    used = {(r.repo, r.path) for r in ALL}
    clash = sorted(f"{r.repo}:{r.path}" for r, _ in pool if (r.repo, r.path) in used)
    if clash:
        raise ValueError(f"in the real-recordings set, not for training: {', '.join(clash)}")


def place(audio: np.ndarray, length: int, loop: bool, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of `audio`: a random stretch, a seamless loop, or repeats with random gaps."""
    if len(audio) >= length:
        start = int(rng.integers(0, len(audio) - length + 1))
        return audio[start:start + length].copy()
    if loop:
        start = int(rng.integers(0, len(audio)))
        return np.roll(np.tile(audio, length // len(audio) + 2), -start)[:length]
    unit = faded(audio)
    out = np.zeros(length)
    at = int(rng.uniform(*GAP_SECONDS) * RATE)
    while at < length:
        n = min(len(unit), length - at)
        out[at:at + n] = unit[:n]
        at += len(unit) + int(rng.uniform(*GAP_SECONDS) * RATE)
    return out


def add_to_song(song: Path, picks: list[int], levels: list[float], rng: np.random.Generator,
                audio_of, pool=POOL) -> list[dict]:
    """Add pool[picks[i]] at levels[i] dB to one song; returns what was added (empty if it had additions)."""
    meta_path = song / f"{song.name}_METADATA.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    if meta.get("real_rest") is not None or not picks:
        return []
    mix_path = song / meta["mix_filename"]
    mix, rate = sf.read(mix_path, always_2d=True, dtype="float64")
    if rate != RATE:
        raise ValueError(f"{song.name}: {rate} Hz; the pool is read at {RATE} Hz (synth --rate {RATE})")
    mix_rms = rms(mix.mean(axis=1))
    stems_dir = song / meta["stem_dir"]
    added = []
    for n, (pick, level) in enumerate(zip(picks, levels, strict=True)):
        r, instrument = pool[pick]
        part = place(audio_of(r), len(mix), r.loop, rng)
        part *= 10 ** (level / 20) * mix_rms / max(rms(part), 1e-9)
        stereo = np.repeat(part[:, None], mix.shape[1], axis=1)
        key = f"S{90 + n:02d}"
        name = f"{song.name}_STEM_{90 + n:02d}.wav"
        write_audio(stems_dir / name, stereo.T, RATE, subtype="FLOAT")
        mix = mix + stereo
        meta["stems"][key] = {"component": "", "filename": name, "instrument": instrument, "raw": {}}
        added.append({"stem": key, "recording": r.key, "repository": r.repo, "path": r.path,
                      "commit": r.commit, "licence": r.licence, "level_db": round(level, 2)})
    write_audio(mix_path, mix.T, RATE, subtype="FLOAT")
    meta["real_rest"] = added
    atomic_write_text(meta_path, yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    return added


def songs_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / f"{p.name}_METADATA.yaml").is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("songs", type=Path, help="a folder of generated songs (MedleyDB layout)")
    ap.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voices", action="store_true", help="the Berklee library's 63 voice recordings join the pool")
    args = ap.parse_args(argv)
    if not args.songs.is_dir():
        raise SystemExit(f"real_rest: {args.songs} is not a folder of generated songs")
    pool = POOL + VOICES if args.voices else POOL
    check_pool(pool)
    cache: dict[str, np.ndarray] = {}

    def audio_of(r: Recording) -> np.ndarray:
        if r.key not in cache:
            cache[r.key] = read_recording(args.mirrors, r)
        return cache[r.key]

    counts = {}
    songs = songs_in(args.songs)
    for song in songs:
        # One stream per song (its name), so adding songs to the folder does not change earlier draws.
        rng = np.random.default_rng([args.seed, int.from_bytes(song.name.encode()[-8:], "big")])
        k = int(rng.choice(len(SHARES), p=SHARES))
        picks = [int(i) for i in rng.choice(len(pool), size=k, replace=False)]
        levels = [float(rng.uniform(*LEVEL_DB)) for _ in picks]
        for a in add_to_song(song, picks, levels, rng, audio_of, pool):
            counts[a["recording"]] = counts.get(a["recording"], 0) + 1
    print(json.dumps({"songs": len(songs), "added": counts}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

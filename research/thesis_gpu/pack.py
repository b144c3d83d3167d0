"""Pack songs of the guitar and piano training sets small enough to carry to a GPU machine.

    .venv/bin/python -m research.thesis_gpu.pack --data /work/pretrain --out .gpu/data \
        --train-songs 80 --validation-songs 6 --quality 0.5

A GPU machine lent for a few minutes takes at most ~50 MB with the code, and the datasets' pairs
are 1.7 GB per instrument. Both instruments' sets are mixes of the same synthetic songs, so a song
is three sources — guitar, piano, and everything else (the guitar set's rest minus the piano) —
and from those both pairs are rebuilt exactly: guitar against piano + other, piano against
guitar + other. Each song is one three-channel Ogg Vorbis file (86 songs of 30 s took 35 MiB at
quality 0.5; on one song the codec's waveform error sat 24-28 dB under each source); `index.json`
records where the songs came from. Songs are drawn by a seeded shuffle from those both sets split alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from services.common.audio import read_audio
from services.common.manifest import find_manifest, load_manifest
from services.common.paths import atomic_path, atomic_write_text

SOURCES = ("guitar", "piano", "other")


def pack(data: Path, out: Path, train_songs: int, validation_songs: int, quality: float, seed: int,
         skip_train_songs: int = 0, single_instrument_songs: bool = False) -> dict:
    """Write the songs and index.json under `out`; returns the index.

    `skip_train_songs` passes over the first songs the same seed would pack (checked, not written):
    shards of one order that never overlap, each small enough for one call to a GPU machine
    (`--skip-train-songs 0`, `80`, `160`... with `--train-songs 80`; train_jax takes several --data).
    `single_instrument_songs` packs songs of one set only too (a guitar song without piano: its
    piano channel silent), listed under that set alone in index["sets"], so each instrument's
    trainer sees exactly its own dataset's songs; by default only songs in both sets.
    """
    manifests = {name: load_manifest(find_manifest(data, name)) for name in ("guitar", "piano")}
    pairs = {name: {p.track: p for p in m.pairs} for name, m in manifests.items()}
    index: dict = {"rate_hz": manifests["guitar"].rate, "sources": list(SOURCES), "quality": quality, "seed": seed,
                   "datasets": {n: {"name": m.name, "version": m.version, "checksum": m.checksum}
                                for n, m in manifests.items()},
                   "songs": {"train": [], "validation": []}, "skipped_train_songs": skip_train_songs,
                   "sets": {"guitar": {"train": [], "validation": []}, "piano": {"train": [], "validation": []}}}
    rng = np.random.default_rng(seed)
    snr: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
    for split, wanted in (("train", train_songs), ("validation", validation_songs)):
        passed = skip_train_songs if split == "train" else 0
        candidates = sorted(t for t in set(pairs["guitar"]) | set(pairs["piano"])
                            if all(pairs[n][t].split == split for n in pairs if t in pairs[n])
                            and (single_instrument_songs or all(t in pairs[n] for n in pairs)))
        for track in [candidates[i] for i in rng.permutation(len(candidates))]:
            if len(index["songs"][split]) == wanted:
                break
            sets = [n for n in ("guitar", "piano") if track in pairs[n]]
            read = {n: [read_audio(data / rel, rate=index["rate_hz"], mono=True)[0][0]
                        for rel in (pairs[n][track].instrument, pairs[n][track].rest)] for n in sets}
            n = min(len(x) for both in read.values() for x in both)
            if len(sets) == 2:
                (guitar, guitar_rest), (piano, piano_rest) = read["guitar"], read["piano"]
                other = guitar_rest[:n] - piano[:n]
                # Both rests must be the same song minus one instrument, or the split is not exact.
                if np.max(np.abs(piano_rest[:n] - guitar[:n] - other), initial=0.0) > 1e-4:
                    print(f"skipped {track}: its guitar and piano mixes are not of the same stems", file=sys.stderr)
                    continue
            else:  # one set's song: the other instrument is silent, and the rest is all "other"
                own, other = read[sets[0]]
                silent = np.zeros(n, np.float32)
                guitar, piano = (own, silent) if sets == ["guitar"] else (silent, own)
                other = other[:n]
            if passed:  # another shard's song
                passed -= 1
                continue
            sources = np.stack([guitar[:n], piano[:n], other], axis=1)
            with atomic_path(out / split / f"{track}.ogg") as tmp:
                sf.write(tmp, sources, index["rate_hz"], format="OGG", subtype="VORBIS", compression_level=1.0 - quality)
                decoded = sf.read(tmp, dtype="float32", always_2d=True)[0][:n]
            snr[split].append(_snr_db(sources[: len(decoded)], decoded))
            index["songs"][split].append(track)
            for name in sets:
                index["sets"][name][split].append(track)
        if len(index["songs"][split]) < wanted:
            after = f" after the {skip_train_songs} passed over" if split == "train" and skip_train_songs else ""
            which = "in either set" if single_instrument_songs else "in both sets"
            raise SystemExit(f"only {len(index['songs'][split])} {split} songs are {which}{after}; asked for {wanted}")
    # What the codec costs: each source against its own decoded error, median over the songs.
    every = [x for split in snr.values() for x in split]
    index["codec_snr_db"] = {name: round(float(np.nanmedian([x[i] for x in every])), 1) if every else None
                             for i, name in enumerate(SOURCES)}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    return index


def _snr_db(sources: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per source (column): 10 log10(energy / energy of the codec's error); NaN for a silent source."""
    energy = np.sum(sources.astype(np.float64) ** 2, axis=0)
    error = np.sum((decoded.astype(np.float64) - sources) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(energy > 0, 10.0 * np.log10(energy / np.maximum(error, 1e-20)), np.nan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data root holding the guitar and piano datasets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-songs", type=int, default=80)
    parser.add_argument("--validation-songs", type=int, default=6)
    parser.add_argument("--quality", type=float, default=0.5, help="Vorbis quality, 0..1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-train-songs", type=int, default=0,
                        help="pass over the first N train songs of the order (another shard's)")
    parser.add_argument("--single-instrument-songs", action="store_true",
                        help="pack songs of one set only too (default: only songs in both sets)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.quality <= 1.0:
        parser.error("--quality must be within 0..1")
    index = pack(args.data, args.out, args.train_songs, args.validation_songs, args.quality, args.seed,
                 args.skip_train_songs, args.single_instrument_songs)
    size = sum(f.stat().st_size for f in args.out.rglob("*.ogg"))
    print(f"{len(index['songs']['train'])} train + {len(index['songs']['validation'])} validation songs, "
          f"{size / 2**20:.1f} MiB in {args.out}; codec SNR (median dB) {index['codec_snr_db']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pack songs of the guitar and piano training sets small enough to carry to a GPU machine.

    .venv/bin/python -m bench.thesis_gpu.pack --data /work/pretrain --out .gpu/data \
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
         skip_train_songs: int = 0) -> dict:
    """Write the songs and index.json under `out`; returns the index.

    `skip_train_songs` passes over the first songs the same seed would pack (checked, not written):
    shards of one order that never overlap, each small enough for one call to a GPU machine
    (`--skip-train-songs 0`, `80`, `160`... with `--train-songs 80`; train_jax takes several --data).
    """
    manifests = {name: load_manifest(find_manifest(data, name)) for name in ("guitar", "piano")}
    pairs = {name: {p.track: p for p in m.pairs} for name, m in manifests.items()}
    index: dict = {"rate_hz": manifests["guitar"].rate, "sources": list(SOURCES), "quality": quality, "seed": seed,
                   "datasets": {n: {"name": m.name, "version": m.version, "checksum": m.checksum}
                                for n, m in manifests.items()},
                   "songs": {"train": [], "validation": []}, "skipped_train_songs": skip_train_songs}
    rng = np.random.default_rng(seed)
    for split, wanted in (("train", train_songs), ("validation", validation_songs)):
        passed = skip_train_songs if split == "train" else 0
        both = sorted(t for t, p in pairs["guitar"].items()
                      if t in pairs["piano"] and p.split == split and pairs["piano"][t].split == split)
        for track in [both[i] for i in rng.permutation(len(both))]:
            if len(index["songs"][split]) == wanted:
                break
            g, p = pairs["guitar"][track], pairs["piano"][track]
            guitar, guitar_rest, piano, piano_rest = (
                read_audio(data / rel, rate=index["rate_hz"], mono=True)[0][0]
                for rel in (g.instrument, g.rest, p.instrument, p.rest))
            n = min(map(len, (guitar, guitar_rest, piano, piano_rest)))
            other = guitar_rest[:n] - piano[:n]
            # Both rests must be the same song minus one instrument, or the split is not exact.
            if np.max(np.abs(piano_rest[:n] - guitar[:n] - other), initial=0.0) > 1e-4:
                print(f"skipped {track}: its guitar and piano mixes are not of the same stems", file=sys.stderr)
                continue
            if passed:  # another shard's song
                passed -= 1
                continue
            with atomic_path(out / split / f"{track}.ogg") as tmp:
                sf.write(tmp, np.stack([guitar[:n], piano[:n], other], axis=1), index["rate_hz"],
                         format="OGG", subtype="VORBIS", compression_level=1.0 - quality)
            index["songs"][split].append(track)
        if len(index["songs"][split]) < wanted:
            after = f" after the {skip_train_songs} passed over" if split == "train" and skip_train_songs else ""
            raise SystemExit(f"only {len(index['songs'][split])} {split} songs are in both sets{after}; asked for {wanted}")
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    return index


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
    args = parser.parse_args(argv)
    if not 0.0 <= args.quality <= 1.0:
        parser.error("--quality must be within 0..1")
    index = pack(args.data, args.out, args.train_songs, args.validation_songs, args.quality, args.seed,
                 args.skip_train_songs)
    size = sum(f.stat().st_size for f in args.out.rglob("*.ogg"))
    print(f"{len(index['songs']['train'])} train + {len(index['songs']['validation'])} validation songs, "
          f"{size / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

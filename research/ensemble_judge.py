"""Judge ways of combining exported networks without exporting each: every member's mask is
computed once per song, then each combination (which members, mask exponent, weights, arithmetic
or geometric mean) is applied and scored with mir_eval's bss_eval, per song against the first,
with a 95 % bootstrap interval of that per-song mean over the songs.

    .venv/bin/python research/ensemble_judge.py --root DATA --dataset piano-opl3 [--split all] \
        [--max-tracks 0] --model model/pretrained/piano/6 [--model DATA/models/piano-cand/1] \
        --combo 0+1@1.5 --combo 0+2@1.25 --combo 0+1@1.5:0.6,0.4 --combo geo:0+1@1.5 [--silent-share]

Members are numbered over the --model folders in order (an ensemble export counts as several).
A combination is `[geo:]I+J+...@EXPONENT[:W1,W2,...]`: each member's mask raised to the exponent,
then their (weighted) mean, as model.separate applies an ensemble — or their geometric mean.
Songs are picked as the evaluation service picks them (select_pairs), and the instrument SDR is the
one `stemlab evaluate` reports (bss_eval with the instrument as the single reference gives the same
SDR as with both references). `--silent-share` adds, for the first combination, the share of the
instrument's error energy that falls in 1-s blocks where the instrument is silent (-60 dB under its
loudest block): what a gate silencing those blocks could remove at most.

`--scores FILE` also writes every song's scores as JSON; `--pool FILE FILE ...` then reads such
files (the same combinations, in the same order) and gives the per-song figures over all their
songs together, e.g. both judge fonts pooled:

    .venv/bin/python research/ensemble_judge.py --pool opl3.json sonivox.json

Exporting each candidate and running `stemlab evaluate --saved-model` gives the same numbers; this
only saves the repeated network passes when many combinations are compared.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mir_eval  # noqa: E402
import tensorflow as tf  # noqa: E402

from model.export import ExportError, check_ensemble, load_exported_networks  # noqa: E402
from model.separate import spectrogram_mask  # noqa: E402
from model.spectral import istft, magnitude, stft  # noqa: E402
from services.common.manifest import DatasetNotFoundError, ManifestError, find_manifest, load_manifest  # noqa: E402
from services.common.paths import DataRoot, atomic_write_text  # noqa: E402
from services.evaluation.evaluate import load_references, select_pairs  # noqa: E402

_COMBO = re.compile(r"^(geo:)?(\d+(?:\+\d+)*)@([0-9.]+)(?::([0-9.,]+))?$")


@dataclass(frozen=True)
class Combo:
    text: str
    members: tuple[int, ...]
    exponent: float
    weights: tuple[float, ...]
    geometric: bool

    def mask(self, masks: list[np.ndarray]) -> np.ndarray:
        chosen = [masks[i].astype(np.float32) for i in self.members]
        if self.geometric:
            return np.exp(np.mean([np.log(m + 1e-12) for m in chosen], axis=0)) ** self.exponent
        return sum(w * m ** self.exponent for w, m in zip(self.weights, chosen, strict=True))


def parse_combo(text: str, members: int) -> Combo:
    match = _COMBO.match(text)
    if not match:
        raise ValueError(f"combination {text!r}: expected [geo:]I+J@EXPONENT[:W1,W2]")
    geo, idx, exponent, weights = match.groups()
    chosen = tuple(int(i) for i in idx.split("+"))
    if any(i >= members for i in chosen):
        raise ValueError(f"combination {text!r}: there are only {members} members (0..{members - 1})")
    w = tuple(float(x) for x in weights.split(",")) if weights else tuple(1 / len(chosen) for _ in chosen)
    if len(w) != len(chosen) or abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"combination {text!r}: one weight per member, summing to 1")
    if geo and weights:
        raise ValueError(f"combination {text!r}: the geometric mean takes no weights")
    return Combo(text, chosen, float(exponent), w, bool(geo))


def member_masks(networks: list, mix: np.ndarray, config) -> tuple[tf.Tensor, list[np.ndarray]]:
    """The mix's spectrum (padded as model.separate pads it) and each network's mask of it."""
    padded = tf.pad(tf.constant(mix[None], tf.float32), [[0, 0], [0, max(0, config.n_fft - len(mix))]])
    spectrum = stft(padded, config)
    return spectrum, [spectrogram_mask(n, magnitude(spectrum), config).numpy() for n in networks]


def instrument_estimate(combo: Combo, spectrum: tf.Tensor, masks: list[np.ndarray], config,
                        samples: int) -> np.ndarray:
    """What model.separate.separate_waveform gives for these members at this exponent."""
    padded = max(samples, config.n_fft)
    return istft(spectrum * tf.cast(combo.mask(masks), tf.complex64), config, padded).numpy()[0][:samples]


def instrument_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # bss_eval_sources: deprecated, still the metric
        sdr = mir_eval.separation.bss_eval_sources(reference[None], estimate[None], compute_permutation=False)[0]
    return float(sdr[0])


def silent_share(reference: np.ndarray, estimate: np.ndarray, block: int) -> float:
    blocks = len(reference) // block
    ref = (reference[: blocks * block].reshape(blocks, block) ** 2).sum(1)
    err = ((reference - estimate)[: blocks * block].reshape(blocks, block) ** 2).sum(1)
    silent = ref < 1e-6 * ref.max()
    return float(err[silent].sum() / max(err.sum(), 1e-20))


def mean_interval(diff: np.ndarray, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the per-song mean difference (songs resampled with replacement).

    It measures how much the mean depends on which songs were drawn; it cannot see how much it
    depends on the training run (another run of the same recipe can move it further)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summary(label: str, scores: dict[str, list[float]]) -> list[str]:
    """Per combination: median, per-song mean difference from the first with its interval, wins."""
    texts = list(scores)
    base = np.array(scores[texts[0]])
    lines = [f"{label} ({len(base)} songs), instrument SDR per song against {texts[0]}:"]
    for text in texts:
        s = np.array(scores[text])
        diff = s - base
        lo, hi = mean_interval(diff)
        lines.append(f"  {text:24s} median {np.median(s):6.2f}  per song {diff.mean():+.3f} "
                     f"[{lo:+.2f}, {hi:+.2f}], {int((diff > 0).sum())} of {len(s)} better")
    return lines


def write_scores(path: str, dataset: str, songs: list[str], scores: dict[str, list[float]]) -> None:
    # written beside and renamed into place: a stopped run never leaves half a file
    atomic_write_text(path, json.dumps({"dataset": dataset, "songs": songs, "scores": scores}, indent=1))


def pool_scores(paths: list[str]) -> tuple[str, dict[str, list[float]]]:
    """Several --scores files as one set of songs; their combinations must match in order."""
    label, pooled = [], None
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            scores = {str(k): [float(x) for x in v] for k, v in data["scores"].items()}
            dataset = str(data["dataset"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a scores file of ensemble_judge --scores ({e})") from e
        if not scores or len({len(v) for v in scores.values()}) != 1 or not next(iter(scores.values())):
            raise ValueError(f"{path}: no songs, or combinations scored on different songs")
        if pooled is None:
            pooled = {k: [] for k in scores}
        if list(scores) != list(pooled):
            raise ValueError(f"{path}: combinations {list(scores)} differ from {list(pooled)}")
        for k, v in scores.items():
            pooled[k] += v
        label.append(dataset)
    return " + ".join(label), pooled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="data root holding the dataset")
    parser.add_argument("--dataset")
    parser.add_argument("--split", default="all", choices=("all", "train", "validation"))
    parser.add_argument("--max-tracks", type=int, default=0)
    parser.add_argument("--model", action="append", default=[], help="an exported version folder")
    parser.add_argument("--combo", action="append", default=[], help="the first is the baseline")
    parser.add_argument("--silent-share", action="store_true")
    parser.add_argument("--scores", metavar="FILE", help="also write every song's scores here (JSON)")
    parser.add_argument("--pool", nargs="+", metavar="FILE", help="pool --scores files; nothing is computed")
    args = parser.parse_args()

    if args.pool:
        if args.root or args.dataset or args.model or args.combo or args.scores:
            parser.error("--pool only reads --scores files: give it no --root, --dataset, --model, --combo or --scores")
        try:
            label, pooled = pool_scores(args.pool)
        except ValueError as e:
            parser.error(str(e))
        print("\n".join(summary(label, pooled)))
        return 0
    missing = [f"--{n}" for n in ("root", "dataset", "model", "combo") if not getattr(args, n)]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --pool)")
    if args.scores and not Path(args.scores).resolve().parent.is_dir():
        parser.error(f"--scores {args.scores}: no such folder")  # before the songs, not after

    networks, configs = [], []
    for folder in args.model:
        try:
            nets, cfg = load_exported_networks(folder, folded=True)  # as served: the same masks, faster
        except (ExportError, OSError) as e:
            parser.error(f"{folder}: not an exported model version ({e})")
        networks += nets
        configs.append(cfg)
    try:  # the export's own rule: every member sees the same spectrogram and chunks
        check_ensemble(configs)
    except ExportError as e:
        parser.error(f"{' and '.join(args.model)}: {e}")
    config = configs[0]
    try:
        combos = [parse_combo(c, len(networks)) for c in args.combo]
    except ValueError as e:
        parser.error(str(e))
    data = DataRoot(args.root)
    try:
        manifest = load_manifest(find_manifest(data, args.dataset, None))
    except (ManifestError, DatasetNotFoundError) as e:
        parser.error(str(e))
    pairs = select_pairs(manifest.pairs, args.split, args.max_tracks)
    if not pairs:
        parser.error(f"{args.dataset}: no tracks in split {args.split}")

    scores = {c.text: [] for c in combos}
    shares = []
    for pair in pairs:
        instrument, rest = load_references(data, pair, config.rate_hz)
        mix = instrument + rest
        spectrum, masks = member_masks(networks, mix, config)
        for k, combo in enumerate(combos):
            estimate = instrument_estimate(combo, spectrum, masks, config, len(mix))
            scores[combo.text].append(instrument_sdr(instrument, estimate))
            if k == 0 and args.silent_share:
                shares.append(silent_share(instrument, estimate, config.rate_hz))
        print(pair.track, " ".join(f"{scores[c.text][-1]:.2f}" for c in combos), flush=True)

    print("\n" + "\n".join(summary(args.dataset, scores)))
    if args.scores:
        try:
            write_scores(args.scores, args.dataset, [p.track for p in pairs], scores)
        except OSError as e:
            print(f"ensemble_judge: could not write --scores {args.scores}: {e}", file=sys.stderr)
            return 1
    if shares:
        print(f"  share of {combos[0].text}'s error in silent blocks: median {np.median(shares):.3f}, "
              f"max {max(shares):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

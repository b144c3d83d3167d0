"""The real-recordings choice rule (docs/experiments/23, 24, 25) as one command.

A candidate's report on a half of the real-recordings set against the shipped model's report on the
same half (both `report.json` of `stemlab evaluate`, as `realset/evaluate.py` writes them):

1. on the present tracks, the median over mixtures of the per-mixture instrument SDR difference
   (candidate − shipped) has a bootstrap interval (10 000 resamples of the mixtures, numpy
   `default_rng(0)`) entirely above 0 at 95 % and, with `--looks K` (K candidates judged on the same
   half), at the Bonferroni level 1 − 0.05/K as well;
2. on the absent tracks, the median leakage (output energy over input energy, dB) is not worse
   than the shipped model's by more than 0.5 dB.

`--tracks FILE` restricts both reports to the tracks named in FILE (one per line), e.g. the half's
list as it stood when the rule was registered (`git show COMMIT:realset/lists/guitar-val.txt`).

Reports that `realset/evaluate.py` wrote carry a `tracks.json` beside them (each track's audio
hash); the two reports must agree on every judged track's, else the set changed between them and the
comparison is refused.

`--by-recording` resamples recordings rather than mixtures (a cluster bootstrap: a drawn recording
brings all its pieces and levels along), since the mixtures of one recording are not independent;
its intervals are wider and honest about how few recordings a half holds. The rules registered in
entries 23-28 resample mixtures; a rule must say which it uses.

    .venv/bin/python -m research.real_judge SHIPPED.json CANDIDATE.json [--looks 2] [--tracks FILE] [--by-recording] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

RESAMPLES = 10_000
LEAKAGE_SLACK_DB = 0.5


def scores(report: dict, tracks: set[str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(instrument SDR of each present track, leakage dB of each absent track) of the model."""
    sdr, leak = {}, {}
    for t in report["tracks"]:
        if tracks is not None and t["track"] not in tracks:
            continue
        model = t.get("methods", {}).get("model", {})
        if t["status"] == "scored":
            sdr[t["track"]] = float(model["whole"]["instrument"]["sdr"])
        elif t["status"] == "absent":
            leak[t["track"]] = float(model["leakage_db"])
    return sdr, leak


def same_audio(shipped: Path, candidate: Path, tracks: set[str] | None = None) -> None:
    """Refuse two reports whose tracks.json (realset/evaluate.py writes one beside each report) give
    a judged track different audio: the set changed between the two scorings. Reports without one
    (older ones) are not checked."""
    a, b = (p.parent / "tracks.json" for p in (shipped, candidate))
    if not (a.is_file() and b.is_file()):
        return
    pa, pb = (json.loads(p.read_text())["tracks"] for p in (a, b))
    differ = sorted(t for t in set(pa) & set(pb) if (tracks is None or t in tracks) and pa[t] != pb[t])
    if differ:
        raise ValueError(f"the two reports scored different audio for {len(differ)} tracks "
                         f"({', '.join(differ[:3])}…): a set rebuilt between them; score both on one version")


def recording_of(track: str) -> str:
    """`val-guitar-em91-0db` -> `em9`: the recording a realset track was cut from. realset/build.py
    names tracks half-instrument-KEYPIECE-level, and keys may end in digits (em9, fugue849), so the
    longest of the set's keys followed by a piece number wins; a key the set does not know loses one
    digit, its piece number."""
    from realset.build import ALL

    piece = track.split("-")[2] if track.count("-") >= 3 else track
    known = [r.key for r in ALL if piece.startswith(r.key) and piece[len(r.key):].isdigit()]
    return max(known, key=len) if known else re.sub(r"\d$", "", piece)


def resample_medians(d: np.ndarray, groups: list[str] | None) -> np.ndarray:
    """Medians of RESAMPLES bootstrap resamples of `d`: of its entries, or of whole groups of them."""
    rng = np.random.default_rng(0)
    if groups is None:
        return np.median(d[rng.integers(0, len(d), (RESAMPLES, len(d)))], axis=1)
    members = [np.flatnonzero(np.array(groups) == g) for g in sorted(set(groups))]
    picks = rng.integers(0, len(members), (RESAMPLES, len(members)))
    return np.array([np.median(d[np.concatenate([members[i] for i in row])]) for row in picks])


def judge(shipped: dict, candidate: dict, looks: int = 1, tracks: set[str] | None = None,
          by_recording: bool = False) -> dict:
    ship_sdr, ship_leak = scores(shipped, tracks)
    cand_sdr, cand_leak = scores(candidate, tracks)
    if sorted(ship_sdr) != sorted(cand_sdr) or sorted(ship_leak) != sorted(cand_leak):
        raise ValueError("the two reports do not score the same tracks")
    if not ship_sdr:
        raise ValueError("no present tracks to judge")
    names = sorted(ship_sdr)
    d = np.array([cand_sdr[t] - ship_sdr[t] for t in names])
    boot = resample_medians(d, [recording_of(t) for t in names] if by_recording else None)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    alpha = 0.05 / looks
    blo, bhi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    leak_c = float(np.median(list(cand_leak.values()))) if cand_leak else None
    leak_s = float(np.median(list(ship_leak.values()))) if ship_leak else None
    leak_ok = leak_c is None or leak_c <= leak_s + LEAKAGE_SLACK_DB
    return {
        "mixtures": len(d), "absent": len(cand_leak),
        "resampled": "recordings" if by_recording else "mixtures",
        "model_median": float(np.median([cand_sdr[t] for t in names])),
        "shipped_median": float(np.median([ship_sdr[t] for t in names])),
        "difference_median": float(np.median(d)), "interval_95": [float(lo), float(hi)],
        "looks": looks, "interval_bonferroni": [float(blo), float(bhi)],
        "better_on": int(np.sum(d > 0)),
        "leakage_median": leak_c, "shipped_leakage_median": leak_s,
        "passes": bool(lo > 0 and blo > 0 and leak_ok),
        "why": [w for w, bad in (("95 % interval reaches 0", lo <= 0),
                                 ("Bonferroni interval reaches 0", looks > 1 and blo <= 0),
                                 (f"leakage more than {LEAKAGE_SLACK_DB} dB worse", not leak_ok)) if bad],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shipped", type=Path)
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--looks", type=int, default=1, help="candidates judged on the same half (Bonferroni)")
    ap.add_argument("--tracks", type=Path, default=None, help="judge only the tracks listed in this file")
    ap.add_argument("--by-recording", action="store_true", help="resample recordings, not mixtures")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tracks = None
    if args.tracks is not None:
        tracks = {line.strip() for line in args.tracks.read_text().splitlines() if line.strip()}
    try:
        same_audio(args.shipped, args.candidate, tracks)
        r = judge(json.loads(args.shipped.read_text()), json.loads(args.candidate.read_text()), args.looks, tracks,
                  args.by_recording)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"real_judge: {e}") from e
    if args.json:
        print(json.dumps(r, sort_keys=True))
        return 0
    lo, hi = r["interval_95"]
    blo, bhi = r["interval_bonferroni"]
    leak = "no absent tracks" if r["leakage_median"] is None else (
        f"leakage {r['leakage_median']:.2f} dB (shipped {r['shipped_leakage_median']:.2f})")
    print(f"{r['mixtures']} mixtures: model {r['model_median']:.2f} dB (shipped {r['shipped_median']:.2f}); "
          f"per mixture {r['difference_median']:+.2f} [95 % {lo:+.2f}, {hi:+.2f}] "
          + (f"[{100 - 5 / r['looks']:g} % {blo:+.2f}, {bhi:+.2f}] " if r["looks"] > 1 else "")
          + f"better on {r['better_on']}; {leak}; "
          + ("PASSES" if r["passes"] else "fails: " + "; ".join(r["why"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

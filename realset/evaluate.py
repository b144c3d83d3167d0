"""Evaluate models on the real-recordings set through the product's own commands.

Starts a private stack (ingestion, processing and evaluation services on free ports, data under
--data), then runs what a user would:

    stemlab dataset import stems realset/stems
    stemlab mix --instrument guitar|piano --include-unchecked
    stemlab dataset build real-<instrument>-<half> --tracks realset/lists/<instrument>-<half>.txt \
        --validation-list (the same file) --include-unchecked
    stemlab evaluate --saved-model MODEL --dataset real-<instrument>-<half> --baselines mixture,oracle,hpss

copies each report to --out/<instrument>-<half>/ with `tracks.json` beside it (a SHA-256 of each
track's stem files, so `research/real_judge.py` can refuse to compare reports of different audio),
and writes --out/table.md (the README table). The set may not change while it is scored: the
hashes are taken before the import and again at the end, and a difference stops the run.
The services stop when it ends. Choose on the validation half (`--halves val`); the test half is
for the final table.

    nice -n 10 .venv/bin/python realset/evaluate.py --data /tmp/realset-data --out /tmp/real-reports \
        [--guitar-model model/pretrained/guitar/12] [--piano-model model/pretrained/piano/9] [--halves val,test] \
        [--set mask_exponent=0.7]   # repeatable: forwarded to every `stemlab evaluate` of the run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REALSET = REPO / "realset"
SERVICES = ("ingestion", "processing", "evaluation")
RATE = 22050
BASELINES = "mixture,oracle,hpss"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The three services as processes on free ports, with one private data root."""

    def __init__(self, data: Path, read_roots: tuple[Path, ...] = ()):
        self.data = data
        self.read_roots = read_roots  # what the services must read besides the data root
        self.ports = {name: free_port() for name in SERVICES}
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict:
        env = {**os.environ, "STEMLAB_DATA": str(self.data),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for name, port in self.ports.items():
            env[f"STEMLAB_{name.upper()}_PORT"] = str(port)
            env[f"STEMLAB_{name.upper()}_ADDRESS"] = f"127.0.0.1:{port}"
        # the services refuse paths outside the data root and the import roots: the set and the models
        roots = [os.environ.get("STEMLAB_IMPORT_ROOTS", ""), *(str(r.resolve()) for r in self.read_roots)]
        env["STEMLAB_IMPORT_ROOTS"] = os.pathsep.join(r for r in roots if r)
        return env

    def __enter__(self) -> Stack:
        self.data.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            log = open(self.data / f"{name}.log", "ab")
            self.procs.append(subprocess.Popen([sys.executable, "-m", f"services.{name}.server"], cwd=REPO,
                                               env=self.env(), stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for name, port in self.ports.items():
            self._wait(name, port)
        return self

    def _wait(self, name: str, port: int, timeout: float = 120.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the {name} service did not start; see {self.data / (name + '.log')}")

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stemlab(self, *args: str, timeout: float = 3600) -> dict:
        """One `stemlab … --json` command; its last JSON document."""
        cmd = [sys.executable, "-m", "stemlab.cli", *args, "--json"]
        print("$ stemlab " + " ".join(args), flush=True)
        got = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if got.returncode != 0:
            raise SystemExit(f"stemlab {' '.join(args)} failed ({got.returncode}):\n{got.stderr[-3000:]}")
        return last_json(got.stdout)


def last_json(text: str) -> dict:
    """The last top-level JSON object in `text` (progress lines may come before it)."""
    decoder = json.JSONDecoder()
    found, i = {}, 0
    while (start := text.find("{", i)) != -1:
        try:
            found, i = decoder.raw_decode(text, start)
        except ValueError:
            i = start + 1
    return found


def report_id(result: dict) -> str:
    for key in ("report_id",):
        if key in result:
            return result[key]
    inner = result.get("result") or result.get("job", {}).get("result") or {}
    if "report_id" in inner:
        return inner["report_id"]
    raise SystemExit(f"no report id in the evaluation's output: {json.dumps(result)[:500]}")


def half_tracks(instrument: str, half: str) -> list[str]:
    lines = (REALSET / "lists" / f"{instrument}-{half}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def fingerprints(tracks: list[str], stems: Path = REALSET / "stems") -> dict[str, str]:
    """Each track's SHA-256 over its stem files' names and bytes: what the track's audio is."""
    out = {}
    for track in tracks:
        h = hashlib.sha256()
        for f in sorted((stems / track).iterdir()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        out[track] = h.hexdigest()
    return out


def build_and_evaluate(stack: Stack, models: dict[str, Path], halves: list[str], out: Path,
                       overrides: tuple[str, ...] = ()) -> list[Path]:
    before = {(i, h): fingerprints(half_tracks(i, h)) for i in models for h in halves}
    stack.stemlab("dataset", "import", "stems", str(REALSET / "stems"))
    reports = []
    for instrument, model in models.items():
        stack.stemlab("mix", "--instrument", instrument, "--rate", str(RATE), "--include-unchecked")
        for half in halves:
            tracks = REALSET / "lists" / f"{instrument}-{half}.txt"
            name = f"real-{instrument}-{half}"
            built = stack.stemlab("dataset", "build", name, "--instrument", instrument, "--rate", str(RATE),
                                  "--tracks", str(tracks), "--validation-list", str(tracks), "--include-unchecked")
            unknown = (built.get("result") or {}).get("unknown_tracks") or []
            if unknown:  # a half scored without some of its tracks would not be the set's half
                raise SystemExit(f"{name}: the list names tracks the import did not bring in "
                                 f"({', '.join(unknown[:5])}); nothing was scored")
            result = stack.stemlab("evaluate", "--saved-model", str(model.resolve()), "--dataset", name,
                                   "--split", "validation", "--baselines", BASELINES,
                                   *(arg for kv in overrides for arg in ("--set", kv)))
            source = stack.data / "evaluations" / report_id(result)
            target = out / f"{instrument}-{half}"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
            (target / "tracks.json").write_text(json.dumps({"tracks": before[instrument, half]}, indent=1,
                                                           sort_keys=True) + "\n")
            reports.append(target / "report.json")
    changed = sorted(t for key, prints in before.items() for t, h in fingerprints(list(prints)).items()
                     if prints[t] != h)
    if changed:
        raise SystemExit(f"realset/stems changed while it was scored ({', '.join(changed[:5])}…): "
                         "the reports mix two versions of the set; score again")
    return reports


def summary(report_path: Path) -> dict:
    """The numbers of one report that the README table shows."""
    doc = json.loads(report_path.read_text())

    def med(method: str, value: str = "sdr") -> float:
        v = ((doc["medians"].get(method) or {}).get("whole") or {}).get("instrument", {}).get(value)
        return np.nan if v is None else float(v)

    def leak(method: str, word: str = "") -> float:
        values = [float(t["methods"][method]["leakage_db"]) for t in doc["tracks"]
                  if t["status"] == "absent" and method in t["methods"] and word in t["track"]]
        return float(np.median(values)) if values else np.nan

    share = doc.get("share_of_the_way") or {}
    return {
        "dataset": doc["provenance"]["dataset"]["name"],
        "model": (doc["provenance"].get("model") or {}).get("saved_model", ""),
        "tracks": doc["counts"]["scored"], "absent": doc["counts"].get("absent", 0),
        "mixture": med("mixture"), "hpss": med("hpss"), "model_sdr": med("model"), "oracle": med("oracle"),
        "share_model": share.get("model", np.nan), "share_hpss": share.get("hpss", np.nan),
        "share_model_per_track": med("model", "share"),
        "leak_model": leak("model"), "leak_hpss": leak("hpss"),
        "leak_model_solo_piano": leak("model", "solopiano"), "leak_model_speech": leak("model", "speech"),
    }


def table(rows: list[dict]) -> str:
    def f(x, pct=False):
        if x is None or (isinstance(x, float) and np.isnan(x)):
            return "–"
        return f"{100 * x:.0f} %" if pct else f"{x:.2f}"

    head = ("| set | tracks | mixture | HPSS floor | model | oracle | share of the way (of medians; median per track) "
            "| leakage, absent (model; HPSS) | guitar model on solo piano |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        solo = f(r["leak_model_solo_piano"]) if r["dataset"].startswith("real-guitar") else "–"
        lines.append(f"| {r['dataset']} | {r['tracks']} + {r['absent']} absent | {f(r['mixture'])} | {f(r['hpss'])} "
                     f"| {f(r['model_sdr'])} | {f(r['oracle'])} | {f(r['share_model'], True)}; "
                     f"{f(r['share_model_per_track'], True)} | {f(r['leak_model'])}; {f(r['leak_hpss'])} | {solo} |")
    return "\n".join(lines) + "\n"


def by_level(report_path: Path) -> list[str]:
    """Rows of median instrument SDR per instrument-to-rest level (model, HPSS, mixture, oracle), and
    for the band songs at the balance the band mixed them (version 4)."""
    doc = json.loads(report_path.read_text())
    rows = []
    for level in ("minus6db", "0db", "plus6db", "mix"):
        tracks = [t for t in doc["tracks"] if t["status"] == "scored" and t["track"].endswith(f"-{level}")]
        if not tracks:
            continue
        name = "band's own mix" if level == "mix" else level.replace("minus", "−").replace("plus", "+").replace("db", " dB")
        rows.append(f"| {doc['provenance']['dataset']['name']} | {name} | {len(tracks)} "
                    f"| {_median_of(tracks, 'mixture')} | {_median_of(tracks, 'hpss')} "
                    f"| {_median_of(tracks, 'model')} | {_median_of(tracks, 'oracle')} "
                    f"| {_median_of(tracks, 'model', 'share')} |")
    return rows


def _median_of(tracks: list[dict], method: str, value: str = "sdr") -> str:
    """The median whole-track instrument `value` of `method` over `tracks`, formatted for a table."""
    values = [((t["methods"].get(method) or {}).get("whole") or {}).get("instrument", {}).get(value)
              for t in tracks]
    values = [float(v) for v in values if v is not None]
    if not values:
        return "–"
    m = float(np.median(values))
    return f"{100 * m:.0f} %" if value == "share" else f"{m:.2f}"


def render(reports: list[Path]) -> str:
    text = table([summary(p) for p in reports])
    text += ("\nBy instrument-to-rest level (median instrument SDR, dB; share: median per track):\n\n"
             "| set | level | tracks | mixture | HPSS | model | oracle | share |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
    text += "\n".join(row for p in reports for row in by_level(p)) + "\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="private data root (created; must not be shared)")
    parser.add_argument("--out", type=Path, required=True, help="where the reports and table.md go")
    parser.add_argument("--guitar-model", type=Path, default=REPO / "model/pretrained/guitar/12")
    parser.add_argument("--piano-model", type=Path, default=REPO / "model/pretrained/piano/9")
    parser.add_argument("--instruments", default="guitar,piano", help="comma-separated (default both)")
    parser.add_argument("--halves", default="val", help="val, test or val,test (default val: choose on val)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="forwarded to `stemlab evaluate --set` (e.g. mask_exponent=0.7; repeatable)")
    parser.add_argument("--from-reports", action="store_true",
                        help="no stack: write the table from the reports already in --out/*/report.json")
    args = parser.parse_args()
    if args.from_reports:
        # guitar before piano, the validation half before the test half
        reports = sorted(args.out.glob("*/report.json"), key=lambda p: (p.parent.name.split("-")[0],
                                                                          p.parent.name.endswith("-test")))
        if not reports:
            raise SystemExit(f"no */report.json under {args.out}")
        text = render(reports)
        (args.out / "table.md").write_text(text)
        print(text)
        return
    wanted = [i.strip() for i in args.instruments.split(",") if i.strip()]
    models = {i: m for i, m in (("guitar", args.guitar_model), ("piano", args.piano_model)) if i in wanted}
    halves = [h.strip() for h in args.halves.split(",") if h.strip()]
    if args.data is None:
        raise SystemExit("--data DIR (a private data root) is required")
    if not set(halves) <= {"val", "test"} or not halves or not models:
        raise SystemExit("--halves takes val and/or test; --instruments guitar and/or piano")
    args.out.mkdir(parents=True, exist_ok=True)
    with Stack(args.data, (REALSET / "stems", *models.values())) as stack:
        reports = build_and_evaluate(stack, models, halves, args.out, tuple(args.overrides))
    text = render(reports)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

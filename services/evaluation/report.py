"""Evaluation reports: medians over tracks, report.json / report.md / report.html, and comparisons.

Pure except `write_report` and `load_report`. Non-finite numbers cannot live in JSON: report.json
stores +/-infinity as the strings "inf" / "-inf" and NaN (nothing to take a median of) as null.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.paths import PathError, atomic_write_text, safe_join
from services.evaluation.metrics import METRICS, SOURCES

REPORT_SCHEMA = 1
# Order of methods in tables: the model first, then the baselines.
METHOD_ORDER = ("model", "mixture", "oracle", "hpss")
METHOD_TITLES = {"model": "model", "mixture": "mixture (estimate = mix)", "oracle": "oracle ratio mask",
                 "hpss": "HPSS (harmonic = instrument)"}
_KINDS = ("whole", "framewise")
_VALUES = (*METRICS, "sdri", "share")


def method_names(tracks: list[dict]) -> list[str]:
    found = {m for t in tracks for m in t.get("methods", {})}
    return [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))


def medians(tracks: list[dict]) -> dict:
    """{method: {kind: {source: {metric: median over scored tracks}, "tracks": n}}} (NaN when none)."""
    out: dict = {}
    for method in method_names(tracks):
        out[method] = {}
        for kind in _KINDS:
            rows = [t["methods"][method][kind] for t in tracks
                    if t["status"] == "scored" and kind in t["methods"].get(method, {})]
            if not rows:
                continue
            entry: dict = {"tracks": len(rows)}
            for source in SOURCES:
                entry[source] = {}
                for value in _VALUES:
                    numbers = [r[source][value] for r in rows if value in r[source]]
                    numbers = [x for x in numbers if not (isinstance(x, float) and math.isnan(x))]
                    entry[source][value] = float(np.median(numbers)) if numbers else math.nan
            out[method][kind] = entry
    return out


def leakage_medians(tracks: list[dict]) -> dict:
    """{method: {"tracks", "median_db", "max_db"}} over the absent tracks (no instrument in them)."""
    out: dict = {}
    for method in method_names(tracks):
        values = [t["methods"][method]["leakage_db"] for t in tracks
                  if t["status"] == "absent" and "leakage_db" in t["methods"].get(method, {})]
        if values:
            out[method] = {"tracks": len(values), "median_db": float(np.median(values)), "max_db": float(np.max(values))}
    return out


def shares_of_the_way(med: dict, kind: str = "whole") -> dict:
    """{method: (median SDR - mixture's) / (oracle's - mixture's)} of the instrument, from the medians.

    Besides the median of the per-track shares (medians[...]["share"]), the share the medians
    themselves go: what "x % of the way" means when a table shows medians only.
    """
    from services.evaluation.metrics import share_of_the_way

    def sdr(method):
        return number(((med.get(method) or {}).get(kind) or {}).get("instrument", {}).get("sdr"))

    if kind not in (med.get("oracle") or {}) or kind not in (med.get("mixture") or {}):
        return {}
    return {m: share_of_the_way(sdr(m), sdr("mixture"), sdr("oracle"))
            for m in med if m not in ("mixture", "oracle") and kind in med[m]}


def build_report(report_id: str, tracks: list[dict], provenance: dict, settings: dict) -> dict:
    """The whole report as one dict (what report.json holds, before json_safe)."""
    skipped = [{"track": t["track"], "reason": t["reason"]} for t in tracks if t["status"] == "skipped"]
    absent = sum(t["status"] == "absent" for t in tracks)
    med = medians(tracks)
    method_skips = [{"track": t["track"], "method": m, "reason": e["skipped"]}
                    for t in tracks for m, e in t.get("methods", {}).items() if "skipped" in e]
    return {
        "schema": REPORT_SCHEMA,
        "id": report_id,
        "provenance": provenance,
        "settings": settings,
        "counts": {"tracks": len(tracks), "scored": len(tracks) - len(skipped) - absent, "skipped": len(skipped),
                   "absent": absent},
        "skipped": skipped,
        "method_skips": method_skips,
        "medians": med,
        "share_of_the_way": shares_of_the_way(med),
        "leakage": leakage_medians(tracks),
        "tracks": tracks,
    }


def json_safe(value):
    """Copy of `value` with inf -> "inf"/"-inf", NaN -> None, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, np.integer):
        return int(value)
    return value


def number(value) -> float:
    """Inverse of json_safe for one metric: "inf" -> inf, None -> NaN."""
    if value is None:
        return math.nan
    return float(value)


def write_report(folder: Path, doc: dict) -> None:
    """report.json, report.md and report.html into `folder` (each written atomically)."""
    safe = json_safe(doc)
    atomic_write_text(folder / "report.json", json.dumps(safe, indent=2, sort_keys=False, allow_nan=False) + "\n")
    atomic_write_text(folder / "report.md", render_markdown(safe))
    atomic_write_text(folder / "report.html", render_html(safe))


def load_report(evaluations_dir: Path, ref: str) -> dict:
    """A report by id (a folder under DATA/evaluations)."""
    try:
        path = safe_join(evaluations_dir, ref, "report.json")
    except PathError as e:
        raise InvalidArgumentError(f"invalid report id {ref!r}: {e}") from e
    if not path.is_file():
        raise NotFoundError(f"no evaluation report {ref!r}")
    return parse_report(path.read_text(encoding="utf-8"), str(path))


def parse_report(text: str, where: str = "report") -> dict:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidArgumentError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or "medians" not in doc or "id" not in doc:
        raise InvalidArgumentError(f"{where} is not an evaluation report (no id/medians)")
    return doc


# ---------------------------------------------------------------------------------------------
# Rendering


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if value in ("inf", "-inf"):
        return "∞" if value == "inf" else "-∞"
    return f"{float(value):.{digits}f}"


def percent(value) -> str:
    """A share of the way as a whole percentage ("–" when undefined)."""
    if value is None or isinstance(value, str) or math.isnan(float(value)):
        return "–"
    return f"{100 * float(value):.0f} %"


def model_label(doc: dict) -> str:
    model = (doc.get("provenance") or {}).get("model") or {}
    kind = model.get("kind", "")
    if kind == "served_model":
        return f"{model.get('model')}" + (f":{model['version']}" if model.get("version") else "")
    changed = ", ".join(f"{k}={v}" for k, v in sorted((model.get("overrides") or {}).items()))
    changed = f" ({changed})" if changed else ""
    if kind == "run":
        return f"run {model.get('run')}{changed}"
    if kind == "saved_model":
        return f"SavedModel {Path(str(model.get('saved_model', ''))).name}{changed}"
    if kind == "estimates":
        return f"estimates from {Path(str(model.get('estimates_dir', ''))).name}/"
    return "baselines only"


def summary_rows(doc: dict, kind: str = "whole") -> list[list[str]]:
    """Rows of the median table: Method | Inst SDR SIR SAR SDRi | Rest SDR SIR SAR SDRi | tracks."""
    rows = []
    for method, kinds in doc["medians"].items():
        if kind not in kinds:
            continue
        m = kinds[kind]
        title = METHOD_TITLES.get(method, method) + (f" ({model_label(doc)})" if method == "model" else "")
        rows.append([title, *[percent(m[s].get(v)) if v == "share" else fmt(m[s].get(v))
                              for s in SOURCES for v in _VALUES], str(m["tracks"])])
    return rows


_LEAKAGE_HEAD = ["Method", "Median leakage (dB)", "Worst (dB)", "Absent tracks"]


def leakage_rows(doc: dict) -> list[list[str]]:
    """Leakage on the absent tracks: what the method returns as the instrument where there is none."""
    return [[METHOD_TITLES.get(m, m) + (f" ({model_label(doc)})" if m == "model" else ""),
             fmt(v["median_db"]), fmt(v["max_db"]), str(v["tracks"])]
            for m, v in (doc.get("leakage") or {}).items()]


def absent_track_rows(doc: dict) -> list[list[str]]:
    methods = list(doc.get("leakage") or {})
    return [[t["track"], *[fmt(t["methods"].get(m, {}).get("leakage_db")) for m in methods]]
            for t in doc["tracks"] if t["status"] == "absent"]


def share_line(doc: dict) -> str:
    shares = doc.get("share_of_the_way") or {}
    if not shares:
        return ""
    parts = ", ".join(f"{METHOD_TITLES.get(m, m).split(' (')[0]} {percent(v)}" for m, v in shares.items())
    return ("Share of the way from the mixture to the oracle, of the median instrument SDRs "
            f"((method − mixture) / (oracle − mixture)): {parts}. The Share columns are medians of the "
            "per-track shares.")


_SUMMARY_HEAD = ["Method", "Instrument SDR", "SIR", "SAR", "SDRi", "Share", "Rest SDR", "SIR", "SAR", "SDRi", "Share",
                 "Tracks"]
_TRACK_HEAD = ["Track", "Instrument SDR", "SIR", "SAR", "Rest SDR", "SIR", "SAR"]


def track_rows(doc: dict, method: str, kind: str = "whole") -> list[list[str]]:
    """The thesis' table for one method: Track | SDR SIR SAR (instrument) | SDR SIR SAR (rest), then the median."""
    rows = []
    for t in doc["tracks"]:
        entry = t.get("methods", {}).get(method)
        if t["status"] != "scored" or entry is None:
            continue
        if "skipped" in entry:
            rows.append([t["track"], *["–"] * 6])
            continue
        if kind in entry:
            rows.append([t["track"], *[fmt(entry[kind][s][v]) for s in SOURCES for v in METRICS]])
    med = doc["medians"].get(method, {}).get(kind)
    if med:
        rows.append(["**median**", *[fmt(med[s][v]) for s in SOURCES for v in METRICS]])
    return rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _provenance_lines(doc: dict) -> list[str]:
    prov = doc.get("provenance", {})
    ds = prov.get("dataset", {})
    lines = [f"- model: {model_label(doc)} — `{json.dumps(prov.get('model'), sort_keys=True)}`",
             f"- dataset: {ds.get('name')} v{ds.get('version')} ({ds.get('instrument')}, {ds.get('rate_hz')} Hz), "
             f"split {doc.get('settings', {}).get('split')}, manifest checksum `{ds.get('checksum')}`",
             f"- code version: {prov.get('code_version') or 'unknown'}",
             f"- created: {prov.get('created')}, took {prov.get('elapsed_seconds')} s"]
    s = doc.get("settings", {})
    lines.append(f"- metric: {s.get('metric')}; STFT for baselines: `{json.dumps(s.get('stft'), sort_keys=True)}`; "
                 f"silent reference: RMS below {s.get('silent_rms_dbfs')} dBFS")
    return lines


def render_markdown(doc: dict) -> str:
    """report.md: medians, per-track tables per method, skipped tracks, images, provenance."""
    out = [f"# Evaluation {doc['id']}", "",
           f"{model_label(doc)} on {doc['provenance']['dataset']['name']} "
           f"v{doc['provenance']['dataset']['version']}: {doc['counts']['scored']} tracks scored, "
           f"{doc['counts']['skipped']} skipped. Values in dB, medians over tracks; "
           "SDRi = SDR minus the mixture's SDR.", "",
           "## Medians (whole track)", "", _md_table(_SUMMARY_HEAD, summary_rows(doc, "whole")), ""]
    if share_line(doc):
        out += [share_line(doc), ""]
    if doc.get("leakage"):
        out += [f"Tracks without the instrument ({doc['counts'].get('absent', 0)}, silent reference): leakage = "
                "energy of the returned instrument over the mix's, dB (0 returns the mix, lower is better).", "",
                _md_table(_LEAKAGE_HEAD, leakage_rows(doc)), ""]
    if any("framewise" in k for k in doc["medians"].values()):
        out += ["## Medians (framewise, median over 1-second windows per track)", "",
                _md_table(_SUMMARY_HEAD, summary_rows(doc, "framewise")), ""]
    for method in doc["medians"]:
        out += [f"## {METHOD_TITLES.get(method, method)} — per track", "",
                _md_table(_TRACK_HEAD, track_rows(doc, method)), ""]
    if doc.get("leakage"):
        out += ["## Tracks without the instrument — leakage per track (dB)", "",
                _md_table(["Track", *[METHOD_TITLES.get(m, m) for m in doc["leakage"]]], absent_track_rows(doc)), ""]
    if doc["skipped"] or doc["method_skips"]:
        out += ["## Skipped", ""]
        out += [f"- {s['track']}: {s['reason']}" for s in doc["skipped"]]
        out += [f"- {s['track']} ({s['method']}): {s['reason']}" for s in doc["method_skips"]]
        out.append("")
    images = [t for t in doc["tracks"] if t.get("spectrogram")]
    if images:
        out += ["## Spectrograms (mix, true instrument, estimated instrument)", ""]
        out += [f"![{t['track']}]({t['spectrogram']})" for t in images]
        out.append("")
    out += ["## Provenance", "", *_provenance_lines(doc), ""]
    return "\n".join(out)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def render_html(doc: dict) -> str:
    """report.html: the same content as report.md, self-contained apart from the PNG files."""
    e = html.escape
    parts = [f"<h1>Evaluation {e(doc['id'])}</h1>",
             f"<p>{e(model_label(doc))} on {e(str(doc['provenance']['dataset']['name']))}: "
             f"{doc['counts']['scored']} tracks scored, {doc['counts']['skipped']} skipped. dB, medians over tracks.</p>",
             "<h2>Medians (whole track)</h2>", _html_table(_SUMMARY_HEAD, summary_rows(doc, "whole"))]
    if share_line(doc):
        parts.append(f"<p>{e(share_line(doc))}</p>")
    if doc.get("leakage"):
        parts += ["<h2>Tracks without the instrument: leakage (dB)</h2>", _html_table(_LEAKAGE_HEAD, leakage_rows(doc)),
                  _html_table(["Track", *[METHOD_TITLES.get(m, m) for m in doc["leakage"]]], absent_track_rows(doc))]
    if any("framewise" in k for k in doc["medians"].values()):
        parts += ["<h2>Medians (framewise)</h2>", _html_table(_SUMMARY_HEAD, summary_rows(doc, "framewise"))]
    for method in doc["medians"]:
        parts += [f"<h2>{e(METHOD_TITLES.get(method, method))} — per track</h2>",
                  _html_table(_TRACK_HEAD, track_rows(doc, method))]
    skips = [f"{s['track']}: {s['reason']}" for s in doc["skipped"]]
    skips += [f"{s['track']} ({s['method']}): {s['reason']}" for s in doc["method_skips"]]
    if skips:
        parts += ["<h2>Skipped</h2><ul>", *[f"<li>{e(s)}</li>" for s in skips], "</ul>"]
    for t in doc["tracks"]:
        if t.get("spectrogram"):
            parts.append(f'<figure><img src="{e(t["spectrogram"])}" alt="{e(t["track"])}">'
                         f"<figcaption>{e(t['track'])}</figcaption></figure>")
    parts += ["<h2>Provenance</h2><ul>", *[f"<li>{e(line[2:])}</li>" for line in _provenance_lines(doc)], "</ul>"]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .6em}td{text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Evaluation {e(doc['id'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Comparing two reports


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def compare_reports(a: dict, b: dict) -> dict:
    """Median metrics of two reports side by side: {"a", "b", "rows", "warnings", "markdown"}.

    rows: one per (method, kind, source, metric) present in either report, with values and B - A.
    """
    warnings = []
    da, db = (r.get("provenance", {}).get("dataset", {}) for r in (a, b))
    if da.get("checksum") != db.get("checksum"):
        warnings.append(f"different datasets ({da.get('name')} v{da.get('version')} vs "
                        f"{db.get('name')} v{db.get('version')}): numbers are not directly comparable")
    if (a.get("settings", {}).get("split"), a.get("counts", {}).get("scored")) != (
            b.get("settings", {}).get("split"), b.get("counts", {}).get("scored")):
        warnings.append("different splits or numbers of scored tracks")
    rows = []
    methods = [m for m in METHOD_ORDER if m in a["medians"] or m in b["medians"]]
    methods += sorted((set(a["medians"]) | set(b["medians"])) - set(METHOD_ORDER))
    for method in methods:
        for kind in _KINDS:
            ma, mb = a["medians"].get(method, {}).get(kind), b["medians"].get(method, {}).get(kind)
            if not ma and not mb:
                continue
            for source in SOURCES:
                for value in _VALUES:
                    va = number(ma[source].get(value)) if ma else math.nan
                    vb = number(mb[source].get(value)) if mb else math.nan
                    rows.append({"method": method, "kind": kind, "source": source, "metric": value,
                                 "a": va, "b": vb, "delta": vb - va if math.isfinite(va) and math.isfinite(vb)
                                 else math.nan})
    for method in sorted(set(a.get("leakage") or {}) | set(b.get("leakage") or {}), key=_method_rank):
        va, vb = (number(((r.get("leakage") or {}).get(method) or {}).get("median_db")) for r in (a, b))
        rows.append({"method": method, "kind": "absent", "source": "instrument", "metric": "leakage_db", "a": va,
                     "b": vb, "delta": vb - va if math.isfinite(va) and math.isfinite(vb) else math.nan})
    paired = paired_differences(a, b)
    if paired["only_a"] or paired["only_b"]:
        warnings.append(f"{paired['only_a'] + paired['only_b']} tracks scored in only one report are left out "
                        "of the per-track differences")
    result = {"a": {"id": a["id"], "label": model_label(a)}, "b": {"id": b["id"], "label": model_label(b)},
              "rows": rows, "paired": paired, "warnings": warnings}
    result = json_safe(result)
    result["markdown"] = render_comparison(result)
    return result


def _scored(doc: dict) -> dict[str, dict]:
    return {t["track"]: t.get("methods", {}) for t in doc.get("tracks", []) if t.get("status") == "scored"}


def paired_differences(a: dict, b: dict) -> dict:
    """Per-track B − A of the whole-track metrics, over the tracks both reports scored.

    Two medians can differ because of a few tracks, or be equal while most tracks moved; the
    median and mean of the per-track differences, and on how many tracks B is ahead, say which.
    rows: one per (method, source, metric) with a finite value in both reports for some track.
    """
    ta, tb = _scored(a), _scored(b)
    common = sorted(set(ta) & set(tb))
    methods = [m for m in METHOD_ORDER if any(m in ta[t] and m in tb[t] for t in common)]
    rows = []
    for method in methods:
        for source in SOURCES:
            for metric in METRICS:
                diffs = []
                for track in common:
                    va, vb = (number(((side[track].get(method) or {}).get("whole") or {}).get(source, {}).get(metric))
                              for side in (ta, tb))
                    if math.isfinite(va) and math.isfinite(vb):
                        diffs.append(vb - va)
                if diffs:
                    rows.append({"method": method, "source": source, "metric": metric, "tracks": len(diffs),
                                 "median": float(np.median(diffs)), "mean": float(np.mean(diffs)),
                                 "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)})
    return {"tracks": len(common), "only_a": len(set(ta) - set(tb)), "only_b": len(set(tb) - set(ta)), "rows": rows}


def render_comparison(cmp: dict) -> str:
    head = ["Method", "Kind", "Source", "Metric", f"A: {cmp['a']['label']}", f"B: {cmp['b']['label']}", "B − A"]
    rows = [[r["method"], r["kind"], r["source"], r["metric"].upper(), fmt(r["a"]), fmt(r["b"]),
             _signed(r["delta"])]
            for r in cmp["rows"]]
    lines = [f"A = {cmp['a']['id']}, B = {cmp['b']['id']}", ""]
    lines += [f"> warning: {w}" for w in cmp["warnings"]]
    if cmp["warnings"]:
        lines.append("")
    lines.append(_md_table(head, rows))
    paired = cmp.get("paired") or {}
    # Rows where no track moved (a baseline scored twice on the same songs) say nothing.
    moved = [r for r in paired.get("rows", []) if r["better"] or r["worse"]]
    if moved:
        lines += ["", f"Per track, B − A over the {paired['tracks']} tracks both reports scored (whole track):", ""]
        lines.append(_md_table(
            ["Method", "Source", "Metric", "Median", "Mean", "B ahead", "B behind"],
            [[r["method"], r["source"], r["metric"].upper(), _signed(r["median"]), _signed(r["mean"]),
              f"{r['better']} of {r['tracks']}", f"{r['worse']} of {r['tracks']}"] for r in moved]))
    return "\n".join(lines) + "\n"


def _signed(value) -> str:
    """A difference with its sign; None (no value) and "inf" strings as fmt writes them."""
    return ("+" if isinstance(value, float) and value > 0 else "") + fmt(value)

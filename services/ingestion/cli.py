"""`stemlab dataset …` and `stemlab synth`: the command-line client of the ingestion service.

Light at import time: argparse, grpc and the generated contracts only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.common.cliutil import (
    CliError,
    add_common_args,
    get_group,
    message_to_dict,
    print_result,
    start_and_follow,
    stub,
)

SERVICE = "ingestion"
CLASSES = ("guitar", "bass", "drums", "percussion", "piano", "vocals", "other", "mix", "excluded")
MARKS = ("missing", "bleed", "bad_quality", "inaudible", "mislabeled", "detailed", "checked")
FORMATS = ("medleydb", "slakh", "stems", "solo", "tracklist")
# An import's text output shows this many tracks and disagreements; --json has all of them.
SHOWN_TRACKS = 20
SHOWN_DISAGREEMENTS = 50


def _stub(args):
    from stemlab.v1 import ingestion_pb2_grpc

    return stub(args, SERVICE, ingestion_pb2_grpc.DatasetServiceStub)


def _abs(path: str) -> str:
    # The service may run elsewhere in the file system's view (cwd): send absolute paths.
    return str(Path(path).expanduser().resolve())


def _track_line(t) -> str:
    classes = ",".join(t.classes) or "-"
    marks = ",".join(f"{m.instrument}:{m.mark}" for m in t.marks) or "-"
    return f"{t.id:<32} {t.source:<9} {t.duration_seconds:7.1f}s  classes={classes}  marks={marks}"


def _track_text(t) -> str:
    lines = [f"{t.id}  ({t.source})  {t.title}" + (f" — {t.artist}" if t.artist else ""),
             f"  {t.rate} Hz, {t.channels} ch, {t.duration_seconds:.1f} s   origin: {t.origin}"]
    for s in t.stems:
        flag = " (suggested)" if s.suggested else ""
        lines.append(f"  stem {s.file:<36} {s.class_name or 'UNMAPPED'}{flag}   [{s.raw_instrument}]")
    for m in t.marks:
        lines.append(f"  mark {m.instrument}:{m.mark}  {m.set_at}")
    for s in t.suggestions:
        ev = message_to_dict(s).get("evidence", {})
        lines.append(f"  suggests {s.instrument}:{s.mark} ({s.check}) on {s.stem or 'track'}  {ev}")
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------------

def cmd_import(args) -> int:
    from stemlab.v1 import ingestion_pb2

    req = ingestion_pb2.ImportRequest(format=args.format, limit=args.limit or 0, copy=args.copy,
                                      instrument=args.instrument or "", root_map=args.root_map,
                                      source=args.source or "", title=args.title or "",
                                      piece_seconds=args.piece_seconds, min_piece_seconds=args.min_piece_seconds)
    if args.format == "solo" and "://" in args.target:
        req.url = args.target
    else:
        req.path = _abs(args.target)
    if args.search:
        req.search_root = _abs(args.search)
    if args.format == "solo" and not args.instrument:
        raise CliError("a solo import needs --instrument (e.g. --instrument guitar)")
    job = _stub(args).StartImport(req, timeout=30)
    return start_and_follow(args, SERVICE, job,
                            summary=lambda job_id, result: _import_text(job_id, result, _stub(args)))


def _import_text(job_id: str, result: dict, dataset_stub) -> str:
    """What an import did: counts, each track's stems, disagreements, skipped tracks, errors."""
    from stemlab.v1 import ingestion_pb2

    counts = result.get("counts", {})
    unmapped = result.get("unmapped", {})
    summary = ", ".join(f"{int(counts.get(k, 0))} {k}" for k in ("added", "updated", "unchanged", "errors"))
    summary += (f", {int(counts.get('disagreements', 0))} metadata/file disagreements"
                f", {int(counts.get('skipped', 0))} tracks skipped, {len(unmapped)} unmapped names")
    lines = [f"{job_id} SUCCEEDED: {summary}" + (" (stopped before the end)" if result.get("stopped") else "")]
    tracks = [(i, how) for how in ("added", "updated", "unchanged") for i in result.get(how, [])]
    for track_id, how in tracks[:SHOWN_TRACKS]:
        t = dataset_stub.GetTrack(ingestion_pb2.GetTrackRequest(id=track_id), timeout=30)
        lines.append(f"{t.id} ({how}): {len(t.stems)} stems, {t.rate} Hz, {t.duration_seconds:.1f} s")
        for st in t.stems:
            flag = " (suggested)" if st.suggested else ""
            lines.append(f"  {st.file:<28} {(st.class_name or 'UNMAPPED') + flag:<20} {st.raw_instrument}")
    if len(tracks) > SHOWN_TRACKS:
        lines.append(f"... and {len(tracks) - SHOWN_TRACKS} more tracks (stemlab dataset show TRACK)")
    disagreements = result.get("disagreements", [])
    if disagreements:
        lines.append(f"metadata and files disagree ({len(disagreements)}); the files were followed:")
        for d in disagreements[:SHOWN_DISAGREEMENTS]:
            what = d.get("instrument", "") + (f" -> {d['class']}" if d.get("class") else "")
            lines.append(f"  {d['track']} {d['stem']} [{what}] {d['action']}: {d['file']}: {d['reason']}")
        if len(disagreements) > SHOWN_DISAGREEMENTS:
            lines.append(f"  ... and {len(disagreements) - SHOWN_DISAGREEMENTS} more (all of them with --json)")
    for title, key in (("tracks skipped", "skipped"), ("errors", "errors")):
        items = result.get(key, [])
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {e['track']}" + (f" {e['stem']}" if e.get("stem") else "") + f": {e['reason']}"
                      for e in items]
    duplicates = result.get("duplicates", [])
    if duplicates:
        lines.append(f"the same audio as a track already in the library ({len(duplicates)}): check only one of "
                     "each pair, or both may feed one dataset (training and validation alike):")
        lines += [f"  {d['track']}: same stems as {d['same_as']}" for d in duplicates[:SHOWN_DISAGREEMENTS]]
        if len(duplicates) > SHOWN_DISAGREEMENTS:
            lines.append(f"  ... and {len(duplicates) - SHOWN_DISAGREEMENTS} more (all of them with --json)")
    ignored = result.get("ignored", [])
    if ignored:
        shown = ", ".join(f"{i['track']}/{i['file']}" for i in ignored[:SHOWN_DISAGREEMENTS])
        more = f" and {len(ignored) - SHOWN_DISAGREEMENTS} more" if len(ignored) > SHOWN_DISAGREEMENTS else ""
        lines.append(f"files left out, not audio by their name ({len(ignored)}): {shown}{more}")
    if unmapped:
        lines.append("unmapped instrument names (stemlab dataset mapping set NAME=CLASS): "
                     + ", ".join(f"{name!r} ({int(n)} stems)" for name, n in sorted(unmapped.items())))
    return "\n".join(lines)


def cmd_list(args) -> int:
    from stemlab.v1 import ingestion_pb2

    req = ingestion_pb2.ListTracksRequest(has_class=args.cls or "", instrument=args.instrument or "",
                                          mark=args.mark or "", without_mark=args.without, source=args.source or "",
                                          unmapped=args.unmapped, page_size=args.page_size)
    tracks, total = [], 0
    while True:
        resp = _stub(args).ListTracks(req, timeout=30)
        tracks.extend(resp.tracks)
        total = resp.total
        if not resp.next_page_token or not args.all:
            break
        req.page_token = resp.next_page_token
    if args.json:
        print_result(args, {"tracks": [message_to_dict(t) for t in tracks], "total": total,
                            "next_page_token": "" if args.all else resp.next_page_token})
    else:
        for t in tracks:
            print(_track_line(t))
        more = " (more: --all or --page-size)" if len(tracks) < total else ""
        print(f"{len(tracks)} of {total} tracks{more}", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    from stemlab.v1 import ingestion_pb2

    t = _stub(args).GetTrack(ingestion_pb2.GetTrackRequest(id=args.track), timeout=30)
    print_result(args, t, text=_track_text(t))
    return 0


def cmd_mark(args) -> int:
    from stemlab.v1 import ingestion_pb2

    req = ingestion_pb2.QualityMarkRequest(track_id=args.track, instrument=args.instrument, mark=args.mark)
    s = _stub(args)
    t = s.ClearQualityMark(req, timeout=30) if args.clear else s.SetQualityMark(req, timeout=30)
    print_result(args, t, text=_track_text(t))
    return 0


def cmd_set_class(args) -> int:
    from stemlab.v1 import ingestion_pb2

    cls = "" if args.cls == "none" else args.cls
    t = _stub(args).SetStemClass(ingestion_pb2.SetStemClassRequest(track_id=args.track, stem=args.stem,
                                                                   class_name=cls), timeout=30)
    print_result(args, t, text=_track_text(t))
    return 0


def cmd_check(args) -> int:
    from stemlab.v1 import ingestion_pb2

    job = _stub(args).StartQualityCheck(ingestion_pb2.QualityCheckRequest(track_id=args.track or ""), timeout=30)
    return start_and_follow(args, SERVICE, job)


def cmd_marks_export(args) -> int:
    from stemlab.v1 import ingestion_pb2

    resp = _stub(args).ExportMarks(ingestion_pb2.ExportMarksRequest(instrument=args.instrument,
                                                                    format=args.format), timeout=60)
    if args.output:
        tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp")
        tmp.write_text(resp.content, encoding="utf-8")
        os.replace(tmp, args.output)
        print_result(args, {"file": args.output, "bytes": len(resp.content.encode())}, text=f"wrote {args.output}")
    elif args.json:
        print_result(args, resp)
    else:
        sys.stdout.write(resp.content)
    return 0


def cmd_marks_import(args) -> int:
    from stemlab.v1 import ingestion_pb2

    try:
        content = Path(args.file).read_text(encoding="utf-8-sig")  # a spreadsheet's "CSV UTF-8" has a BOM
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror}") from e
    fmt = args.format or ("csv" if args.file.lower().endswith(".csv") else "yaml")
    if fmt == "yaml" and not args.instrument:
        raise CliError("a YAML marks file is per instrument: give --instrument")
    resp = _stub(args).ImportMarks(ingestion_pb2.ImportMarksRequest(instrument=args.instrument or "", format=fmt,
                                                                    content=content), timeout=60)
    text = "\n".join([f"updated {len(resp.updated)}, unchanged {len(resp.unchanged)}, unmatched {len(resp.unmatched)}"
                      + (f": {', '.join(resp.unmatched)}" if resp.unmatched else ""),
                      *(f"  {change}" for change in resp.changes),
                      *([f"left alone (not marks): {', '.join(resp.ignored)}"] if resp.ignored else [])])
    print_result(args, resp, text=text)
    return 0


def cmd_mapping_show(args) -> int:
    from stemlab.v1 import ingestion_pb2

    resp = _stub(args).GetMapping(ingestion_pb2.GetMappingRequest(), timeout=30)
    if args.json:
        print_result(args, resp)
        return 0
    if not args.unmapped:
        for name in sorted(resp.entries):
            mark = " *" if name in resp.user_entries else ""
            print(f"{name}: {resp.entries[name]}{mark}")
    for name, n in sorted(resp.unmapped.items()):
        print(f"UNMAPPED {name!r} ({n} stems)")
    return 0


def _pair(text: str) -> tuple[str, str]:
    name, sep, cls = text.rpartition("=")
    if not sep or not name.strip() or cls not in CLASSES:
        raise argparse.ArgumentTypeError(f"use NAME=CLASS with CLASS one of {', '.join(CLASSES)}")
    return name.strip(), cls


def cmd_mapping_set(args) -> int:
    from stemlab.v1 import ingestion_pb2

    resp = _stub(args).SetMapping(ingestion_pb2.SetMappingRequest(entries=dict(args.entries), remove=args.remove),
                                  timeout=30)
    print_result(args, {"user_entries": dict(resp.user_entries), "unmapped": dict(resp.unmapped)},
                 text=f"{len(resp.user_entries)} user entries; {len(resp.unmapped)} names still unmapped "
                      f"(run `stemlab dataset mapping apply`)")
    return 0


def cmd_mapping_apply(args) -> int:
    from stemlab.v1 import ingestion_pb2

    job = _stub(args).StartApplyMapping(ingestion_pb2.ApplyMappingRequest(include_suggested=not args.keep_suggested),
                                        timeout=30)
    return start_and_follow(args, SERVICE, job)


def cmd_parts(args) -> int:
    from stemlab.v1 import ingestion_pb2

    req = ingestion_pb2.ListeningPartsRequest(track_id=args.track, instrument=args.instrument, parts=args.parts,
                                              rate=args.rate or 0, mono=args.mono)
    if args.part is not None:
        if not args.output:
            raise CliError("--part needs --output FILE.wav")
        req.include_audio, req.part_index = True, args.part
    resp = _stub(args).GetListeningParts(req, timeout=120)
    if args.output and resp.wav:
        tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp")
        tmp.write_bytes(resp.wav)
        os.replace(tmp, args.output)
    data = message_to_dict(resp)
    data.pop("wav", None)
    lines = [f"{resp.track_id} {resp.instrument}: audible {resp.start_seconds:.2f}-{resp.end_seconds:.2f} s"]
    lines += [f"  part {p.index}: {p.start_seconds:.2f}-{p.end_seconds:.2f} s" for p in resp.parts]
    if args.output and resp.wav:
        lines.append(f"wrote part {args.part} to {args.output}" + (" (truncated)" if resp.truncated else ""))
    print_result(args, data, text="\n".join(lines))
    return 0


def cmd_synth(args) -> int:
    from stemlab.v1 import ingestion_pb2

    req = ingestion_pb2.GenerateSyntheticRequest(out_dir=args.out, songs=args.songs, seconds=args.seconds,
                                                 seed=args.seed, layout=args.layout, soundfont=args.soundfont or "",
                                                 rate=args.rate, import_after=args.import_after,
                                                 start_index=args.start_index,
                                                 overlay_soundfonts=args.overlay_soundfont, timbre=args.timbre,
                                                 produce=args.produce)
    return start_and_follow(args, SERVICE, _stub(args).GenerateSynthetic(req, timeout=30))


# -- registration -------------------------------------------------------------------------------

def _register_marks_and_mapping(dataset) -> None:
    """`stemlab dataset marks export|import` and `stemlab dataset mapping show|set|apply`."""
    marks = dataset.add_parser("marks", help="export/import marks (thesis YAML or CSV)")
    msub = marks.add_subparsers(dest="marks_command", required=True)
    p = msub.add_parser("export", help="marks of one instrument")
    p.add_argument("--instrument", required=True, choices=CLASSES)
    p.add_argument("--format", choices=("yaml", "csv"), default="yaml")
    p.add_argument("--output", "-o", default=None, help="file to write (default: stdout)")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_marks_export)
    p = msub.add_parser("import", help="apply a marks file (true sets, false clears)")
    p.add_argument("file")
    p.add_argument("--instrument", choices=CLASSES, help="required for YAML; CSV rows name their own")
    p.add_argument("--format", choices=("yaml", "csv"), default=None, help="default: from the file suffix")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_marks_import)

    mapping = dataset.add_parser("mapping", help="the instrument name -> class mapping")
    gsub = mapping.add_subparsers(dest="mapping_command", required=True)
    p = gsub.add_parser("show", help="the effective mapping (* = your entries) and unmapped names")
    p.add_argument("--unmapped", action="store_true", help="only the unmapped names")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_mapping_show)
    p = gsub.add_parser("set", help="add or change entries: NAME=CLASS ...")
    p.add_argument("entries", nargs="*", type=_pair)
    p.add_argument("--remove", action="append", default=[], metavar="NAME", help="drop a user entry")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_mapping_set)
    p = gsub.add_parser("apply", help="re-classify unmapped (and suggested) stems with the mapping")
    p.add_argument("--keep-suggested", action="store_true", help="leave file-name suggestions alone")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_mapping_apply)


def register(subparsers, groups: dict | None = None) -> None:
    groups = groups if groups is not None else {}
    dataset = get_group(subparsers, groups, "dataset", "track library and datasets")

    p = dataset.add_parser("import", help="import MedleyDB, Slakh, stem folders, solo audio or a track list")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("target", help="folder (medleydb/slakh/stems), file/folder/URL (solo), tracks-<source>.yaml")
    p.add_argument("--instrument", choices=CLASSES, help="solo: the instrument playing")
    p.add_argument("--limit", type=int, default=0, help="slakh: at most this many tracks")
    p.add_argument("--piece-seconds", type=float, default=None, help="solo: piece length (180)")
    p.add_argument("--min-piece-seconds", type=float, default=None, help="solo: drop a shorter last piece (30)")
    p.add_argument("--copy", action="store_true", help="copy stems instead of hard-linking")
    p.add_argument("--root-map", action="append", default=[], metavar="OLD=NEW",
                   help="tracklist: re-root stem paths (repeatable)")
    p.add_argument("--search", default=None, metavar="DIR", help="tracklist: find stems by file name under DIR")
    p.add_argument("--source", default=None, help="tracklist: source of the tracks (default from the file name)")
    p.add_argument("--title", default=None, help="solo: title of the pieces")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_import)

    p = dataset.add_parser("list", help="tracks in the library")
    p.add_argument("--class", dest="cls", choices=CLASSES, help="only tracks with a stem of this class")
    p.add_argument("--instrument", choices=CLASSES, help="with --mark: the instrument the mark is for")
    p.add_argument("--mark", choices=MARKS, help="only tracks with this mark")
    p.add_argument("--without", action="store_true", help="with --mark: only tracks WITHOUT it")
    p.add_argument("--source", default=None)
    p.add_argument("--unmapped", action="store_true", help="only tracks with unmapped/suggested classes")
    p.add_argument("--page-size", type=int, default=200)
    p.add_argument("--all", action="store_true", help="fetch every page")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_list)

    p = dataset.add_parser("show", help="one track: stems, classes, marks, suggestions")
    p.add_argument("track")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_show)

    p = dataset.add_parser("mark", help="set (or --clear) a quality mark")
    p.add_argument("track")
    p.add_argument("--instrument", required=True, choices=CLASSES)
    p.add_argument("--mark", required=True, choices=MARKS)
    p.add_argument("--clear", action="store_true")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_mark)

    p = dataset.add_parser("set-class", help="confirm or change a stem's class ('none': unmapped)")
    p.add_argument("track")
    p.add_argument("stem", help="stem file, e.g. stems/S01.wav")
    p.add_argument("cls", metavar="CLASS", choices=(*CLASSES, "none"))
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_set_class)

    p = dataset.add_parser("check", help="automatic quality checks (suggest marks with evidence)")
    p.add_argument("track", nargs="?", default="", help="one track (default: all)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_check)

    p = dataset.add_parser("parts", help="an instrument's stems in equal parts for listening")
    p.add_argument("track")
    p.add_argument("--instrument", required=True, choices=CLASSES)
    p.add_argument("--parts", type=int, default=5)
    p.add_argument("--part", type=int, default=None, help="write this part's audio (with --output)")
    p.add_argument("--output", "-o", default=None, help="WAV file for --part")
    p.add_argument("--rate", type=int, default=0)
    p.add_argument("--mono", action="store_true")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_parts)

    _register_marks_and_mapping(dataset)

    p = subparsers.add_parser("synth", help="generate synthetic multitracks (FluidSynth) under the data root")
    p.add_argument("out", help="folder relative to the data root, e.g. synthetic/set1")
    p.add_argument("--songs", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("medleydb", "slakh"), default="medleydb")
    p.add_argument("--soundfont", default=None)
    p.add_argument("--overlay-soundfont", action="append", default=[], metavar="SF2",
                   help="a soundfont loaded on top of --soundfont: its presets replace the base font's "
                        "(repeatable; the last wins)")
    p.add_argument("--timbre", type=float, default=0.0, metavar="STRENGTH",
                   help="0 to 1: random filter, envelope, vibrato and tuning offsets per part, so each "
                        "preset sounds a little different in every song (default 0: the font as it is)")
    p.add_argument("--produce", type=float, default=0.0, metavar="STRENGTH",
                   help="0 to 1: random production per stem (amp and cabinet for electric guitars, EQ, "
                        "compression, chorus, delay, reverb) and bus compression and limiting shared by "
                        "every stem; the processed stems are the references (default 0: as rendered)")
    p.add_argument("--rate", type=int, default=44100)
    p.add_argument("--start-index", type=int, default=0,
                   help="0-based number of the first song, to add songs to a set (default 0)")
    p.add_argument("--import", dest="import_after", action="store_true", help="import the songs afterwards")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_common_args(p, SERVICE)
    p.set_defaults(func=cmd_synth)

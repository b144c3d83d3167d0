"""The committed real-recordings set (realset/): importable, exact, split by recording, small."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from realset import build
from services.ingestion.importers import TrackSource, read_stem_folders
from services.ingestion.mapping import Mapping

REPO = Path(__file__).resolve().parent.parent
REALSET = REPO / "realset"
STEMS = REALSET / "stems"
INSTRUMENTS = ("guitar", "piano")
HALVES = ("val", "test")


def lists() -> dict[tuple[str, str], list[str]]:
    return {(i, h): (REALSET / "lists" / f"{i}-{h}.txt").read_text().split() for i in INSTRUMENTS for h in HALVES}


def provenance_tracks() -> dict[str, list[str]]:
    """track -> the cells of its row in PROVENANCE.md's track table (track, half, for, level, stems)."""
    rows = {}
    for line in (REALSET / "PROVENANCE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and re.match(r"^(val|test)-", cells[0]):
            rows[cells[0]] = cells
    return rows


def provenance_rows() -> dict[str, dict[str, str]]:
    """track -> {stem file: recording key or "silent"} from PROVENANCE.md's track table."""
    return {name: dict(re.findall(r"([\w.-]+\.flac) \(([\w]+),", cells[4]))
            for name, cells in provenance_tracks().items()}


def read_track(name: str) -> dict[str, np.ndarray]:
    return {p.name: sf.read(p, dtype="float64")[0] for p in sorted((STEMS / name).glob("*.flac"))}


def test_every_listed_track_is_a_stem_folder_the_importer_reads_with_mapped_classes():
    found = {t.name: t for t in read_stem_folders(STEMS, Mapping.defaults()) if isinstance(t, TrackSource)}
    listed = {name for names in lists().values() for name in names}
    assert listed == set(found) and len(listed) == 158
    for (instrument, _), names in lists().items():
        for name in names:
            classes = [s.cls for s in found[name].stems]
            assert None not in classes, name
            assert classes.count(instrument) == 1, (name, classes)
            assert len(classes) >= 2, name


def test_halves_never_share_a_recording():
    rows = provenance_rows()
    assert set(rows) == {n for names in lists().values() for n in names}
    halves: dict[str, set[str]] = {}
    for track, stems in rows.items():
        for key in stems.values():
            halves.setdefault(key, set()).add(track.split("-")[0])
    shared = {k: h for k, h in halves.items() if k != "silent" and len(h) > 1}
    assert not shared
    for (_, half), names in lists().items():
        assert all(n.startswith(f"{half}-") for n in names)


@pytest.mark.parametrize("key", [(i, h) for i in INSTRUMENTS for h in HALVES])
def test_levels_are_as_named_and_absent_tracks_have_a_silent_instrument(key):
    instrument, _ = key
    classes = Mapping.defaults()
    names = lists()[key]
    recorded = provenance_tracks()
    assert any("-no" in n for n in names) and any("db" in n for n in names)
    for name in names:
        stems = read_track(name)
        is_instrument = {f: classes.suggest_from_filename(f).cls == instrument for f in stems}
        inst = sum(a for f, a in stems.items() if is_instrument[f])
        rest = sum(a for f, a in stems.items() if not is_instrument[f])
        mix = inst + rest
        assert np.max(np.abs(mix)) < 0.9, name  # the mixture itself does not clip
        if "-no" in name:
            assert not np.any(inst) and np.sqrt(np.mean(rest**2)) > 0.01, name
            continue
        if name.endswith("-mix"):  # a band's own mix: the level PROVENANCE.md records, measured when built
            level = float(recorded[name][3].removesuffix(", as mixed"))
        else:
            level = int(re.search(r"-(minus|plus)?(\d+)db$", name).group(2))
            level *= -1 if "-minus" in name else 1
        measured = 20 * np.log10(np.sqrt(np.mean(inst**2)) / np.sqrt(np.mean(rest**2)))
        assert measured == pytest.approx(level, abs=0.02), name


def test_the_set_is_small_and_every_guitar_model_check_has_solo_piano_and_speech():
    files = list(STEMS.rglob("*.flac"))
    assert sum(f.stat().st_size for f in files) < 95e6 and max(f.stat().st_size for f in files) < 5e6
    for half in HALVES:
        names = lists()[("guitar", half)]
        assert any("noguitar-solopiano" in n for n in names) and any("noguitar-speech" in n for n in names)
        names = lists()[("piano", half)]
        assert any("nopiano-sologuitar" in n for n in names) and any("nopiano-speech" in n for n in names)


def test_the_evaluation_stack_lets_its_services_read_the_set_and_the_models(tmp_path, monkeypatch):
    """realset/evaluate.py's services refuse paths outside their data root unless they are import roots."""
    import importlib.util

    from services.common.config import load_config
    from services.common.paths import resolve_allowed

    spec = importlib.util.spec_from_file_location("realset_evaluate", REALSET / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    model = tmp_path / "models" / "guitar" / "11"
    model.mkdir(parents=True)
    monkeypatch.setenv("STEMLAB_IMPORT_ROOTS", str(tmp_path / "mine"))  # a root the user had kept
    env = evaluate.Stack(tmp_path / "data", (REALSET / "stems", model)).env()
    for key, value in env.items():
        if key.startswith("STEMLAB_"):
            monkeypatch.setenv(key, value)
    config = load_config()
    assert config.data_root == (tmp_path / "data").resolve()
    for path in (REALSET / "stems", model, tmp_path / "mine" / "x"):
        resolve_allowed(str(path), config.data_root, config.import_roots)
    with pytest.raises(Exception, match="outside the folders"):
        resolve_allowed(str(tmp_path / "elsewhere"), config.data_root, config.import_roots)


def load_evaluate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("realset_evaluate", REALSET / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    return evaluate


def test_a_tracks_fingerprint_follows_its_audio(tmp_path):
    evaluate = load_evaluate()
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "guitar.flac").write_bytes(b"one")
    (tmp_path / "t1" / "drums.flac").write_bytes(b"two")
    first = evaluate.fingerprints(["t1"], tmp_path)["t1"]
    (tmp_path / "t1" / "drums.flac").write_bytes(b"twO")
    assert evaluate.fingerprints(["t1"], tmp_path)["t1"] != first


def test_the_committed_reports_scored_the_set_as_it_is():
    """The shipped models' real reports hold each track's audio hash: a set rebuilt differently
    without scoring again fails here."""
    evaluate = load_evaluate()
    for folder in sorted((REPO / "model/pretrained/reports/real").glob("*-*/")):
        prints = json.loads((folder / "tracks.json").read_text())["tracks"]
        instrument, half = folder.name.split("-")
        assert sorted(prints) == sorted(evaluate.half_tracks(instrument, half))
        assert prints == evaluate.fingerprints(list(prints)), folder.name


def test_a_recording_is_read_out_of_a_debian_package(tmp_path):
    tone = 0.5 * np.sin(2 * np.pi * 220 * np.arange(44100) / 44100)
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: songs\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: t\n")
    (root / "usr" / "share" / "songs").mkdir(parents=True)
    sf.write(root / "usr" / "share" / "songs" / "guitar.ogg", np.stack([tone, tone], axis=1), 44100, format="OGG")
    (tmp_path / "debian").mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(tmp_path / "debian" / "songs_1.0-1_all.deb")],
                   check=True, capture_output=True)
    r = build.rec("t", ("debian:songs", "1.0-1"), "usr/share/songs/guitar.ogg", "MIT", "a tone", "guitar.flac", "val")
    audio = build.read_recording(tmp_path, r)
    assert len(audio) == build.RATE and abs(build.rms(audio) - 0.5 / np.sqrt(2)) < 0.02
    missing = build.rec("t", ("debian:songs", "1.0-1"), "usr/share/songs/none.ogg", "MIT", "", "guitar.flac", "val")
    with pytest.raises(SystemExit, match="none.ogg of debian:songs at 1.0-1"):
        build.read_recording(tmp_path, missing)
    with pytest.raises(SystemExit, match="apt-get download songs=1.0-1"):
        build.read_recording(tmp_path / "elsewhere", r)


def test_a_band_song_gives_the_pieces_where_its_guitar_plays():
    piece = int(build.PIECE_SECONDS * build.RATE)
    rng = np.random.default_rng(0)
    loud, quiet = rng.normal(0, 0.1, piece), rng.normal(0, 0.001, piece)
    guitar = np.concatenate([quiet, loud, quiet, loud, loud, loud])  # an intro, a break, then playing
    band = np.arange(len(guitar), dtype=np.float64)
    found = build.band_pieces(guitar, band)
    assert len(found) == build.BAND_PIECES
    assert [int(b[0]) // piece for _, b in found] == [1, 3, 4]  # the band cut where the guitar was

"""Marks in the thesis' YAML form and as CSV; the thesis' track lists re-rooted."""

from __future__ import annotations

import pytest
import yaml

from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.importers import import_tracks, read_medleydb
from services.ingestion.mapping import Mapping
from services.ingestion.marks import MarksError, export_marks, import_marks, read_track_list
from tests.ingestion_data import tone, write


def test_marks_round_trip_through_the_thesis_yaml(two_song_library, tmp_path):
    t = two_song_library.load("Artist1_Song1")
    t.set_mark("guitar", "checked")
    t.set_mark("guitar", "bleed")
    two_song_library.save(t)
    text = export_marks(two_song_library, "guitar", "yaml")
    data = yaml.safe_load(text)
    assert data["Artist1_Song1"] == {"audible": False, "bad_quality": False, "bleed": True, "checked": True,
                                     "detailed": False, "inaudible": False, "mislabeled": False, "missing": False}
    assert data["Artist2_Song2"]["checked"] is False
    # Into a fresh library with the same tracks: the same marks come back.
    other = Library(DataRoot(tmp_path / "other").ensure())
    import_tracks(other, read_medleydb(tmp_path / "mdb", Mapping.defaults()))
    result = import_marks(other, text, "guitar", "yaml")
    assert result["updated"] == ["Artist1_Song1"] and result["ignored"] == ["audible"]
    assert set(other.load("Artist1_Song1").marks["guitar"]) == {"checked", "bleed"}
    assert export_marks(other, "guitar", "yaml") == text
    # False clears a mark.
    data["Artist1_Song1"]["bleed"] = False
    import_marks(other, yaml.safe_dump(data), "guitar")
    assert set(other.load("Artist1_Song1").marks["guitar"]) == {"checked"}
    assert other.load("Artist1_Song1").usable_for("guitar")


def test_marks_round_trip_through_csv_and_thesis_names(two_song_library, tmp_path):
    t = two_song_library.load("Artist2_Song2")
    t.set_mark("piano", "missing")
    two_song_library.save(t)
    csv_text = export_marks(two_song_library, "piano", "csv")
    assert csv_text.splitlines()[0] == "track,instrument,missing,bleed,bad_quality,inaudible,mislabeled,detailed,checked"
    assert "Artist2_Song2,piano,1,0,0,0,0,0,0" in csv_text
    t.clear_mark("piano", "missing")
    two_song_library.save(t)
    assert not two_song_library.load("Artist2_Song2").marks
    result = import_marks(two_song_library, csv_text, "piano", "csv")
    assert result["updated"] == ["Artist2_Song2"]
    assert two_song_library.load("Artist2_Song2").has_mark("piano", "missing")
    # Unknown tracks are reported, not guessed; titles match too.
    res = import_marks(two_song_library, yaml.safe_dump({"Song 1": {"checked": True}, "NoSuchSong": {"checked": True}}),
                       "drums")
    assert res == {"updated": ["Artist1_Song1"], "unchanged": [], "unmatched": ["NoSuchSong"], "ignored": [],
                   "changes": ["Artist1_Song1 drums +checked"]}


def test_bad_marks_files_are_refused_before_anything_changes(two_song_library):
    with pytest.raises(MarksError):
        import_marks(two_song_library, "Artist1_Song1: {checked: maybe}", "guitar")
    with pytest.raises(MarksError):
        import_marks(two_song_library, "Artist1_Song1: {checked: true}", "kazoo")
    # A misspelt mark used to be dropped without a word ("updated 0").
    with pytest.raises(MarksError, match="'chekced' is not a mark"):
        import_marks(two_song_library, "Artist1_Song1: {chekced: true, bleed: true}", "guitar")
    with pytest.raises(MarksError, match="'chekced' is not a mark"):
        import_marks(two_song_library, "track,instrument,chekced\nArtist1_Song1,guitar,1\n", "", "csv")
    assert not two_song_library.load("Artist1_Song1").marks


def test_a_spreadsheet_csv_is_read_as_written(two_song_library):
    # Excel's "CSV UTF-8": a byte order mark, Windows line ends, headers in any case with spaces,
    # and a notes column beside the marks.
    text = "\ufeffTrack, Instrument, Checked, Notes\r\nArtist1_Song1,guitar,1,sounds great\r\n\r\n"
    result = import_marks(two_song_library, text, "", "csv")
    assert result["changes"] == ["Artist1_Song1 guitar +checked"] and result["ignored"] == ["notes"]
    assert two_song_library.load("Artist1_Song1").has_mark("guitar", "checked")


def test_a_title_two_tracks_share_is_refused_and_an_id_wins(two_song_library):
    # Song 1 imported twice (from two places): Artist1_Song1 and Copy, both titled "Song 1".
    copy = two_song_library.load("Artist1_Song1")
    copy.id = "Copy"
    two_song_library.save(copy)
    with pytest.raises(MarksError, match="'Song 1' is the title of several tracks"):
        import_marks(two_song_library, "Song 1: {checked: true}", "guitar")
    result = import_marks(two_song_library, "Artist1_Song1: {checked: true}", "guitar")
    assert result["changes"] == ["Artist1_Song1 guitar +checked"]
    assert not two_song_library.load("Copy").marks


def _thesis_list(tmp_path, audio_root):
    entries = [{"name": "SongX", "instruments": ["guitar", "drums"], "stems": {
        "SongX_guitar.wav": {"instrument": "distorted_guitar", "path": "/mnt/data/multitracks/SongX/SongX_guitar.wav"},
        "SongX_drums.wav": {"instrument": "drums", "path": "/mnt/data/multitracks/SongX/SongX_drums.wav"},
    }}]
    write(audio_root / "SongX" / "SongX_guitar.wav", tone(1.0, 200))
    write(audio_root / "SongX" / "SongX_drums.wav", tone(1.0, 100))
    path = tmp_path / "tracks-stems.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def test_track_list_rerooted_by_prefix_and_by_search(tmp_path):
    audio = tmp_path / "my audio"
    lst = _thesis_list(tmp_path, audio)
    mapping = Mapping.defaults()
    lib = Library(DataRoot(tmp_path / "d1").ensure())
    rep = import_tracks(lib, read_track_list(lst, mapping, root_map=[f"/mnt/data/multitracks={audio}"]))
    assert rep.added == ["SongX"] and not rep.errors
    t = lib.load("SongX")
    assert t.source == "stems"
    assert {s.file: s.cls for s in t.stems} == {"stems/SongX_guitar.wav": "guitar", "stems/SongX_drums.wav": "drums"}
    lib2 = Library(DataRoot(tmp_path / "d2").ensure())
    rep2 = import_tracks(lib2, read_track_list(lst, mapping, search_root=audio))
    assert rep2.added == ["SongX"]
    assert import_tracks(lib2, read_track_list(lst, mapping, search_root=audio)).unchanged == ["SongX"]


def test_track_list_paths_cannot_escape_the_new_root(tmp_path):
    audio = tmp_path / "audio"
    write(tmp_path / "secret.wav", tone(1.0, 100))
    audio.mkdir()
    lst = tmp_path / "tracks-stems.yaml"
    lst.write_text(yaml.safe_dump([{"name": "Evil", "stems": {
        "secret.wav": {"instrument": "guitar", "path": "/mnt/data/../../secret.wav"}}}]))
    lib = Library(DataRoot(tmp_path / "d").ensure())
    rep = import_tracks(lib, read_track_list(lst, Mapping.defaults(), root_map=[f"/mnt/data={audio}"]))
    assert rep.added == [] and "may not contain '..'" in rep.errors[0]["reason"]

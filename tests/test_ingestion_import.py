"""Importing MedleyDB, Slakh and stem folders into the library."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.ingestion.importers import import_tracks, read_medleydb, read_slakh, read_stem_folders
from tests.ingestion_data import drums, make_medleydb, make_slakh, tone, write


def test_medleydb_import_classes_mix_and_metadata(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=2)
    report = import_tracks(library, read_medleydb(root, mapping))
    assert report.added == ["Artist1_Song1", "Artist2_Song2"]
    t = library.load("Artist1_Song1")
    assert (t.source, t.title, t.artist, t.genre) == ("medleydb", "Song 1", "Artist1", "Rock")
    assert (t.rate, t.channels, t.duration_seconds) == (8000, 2, 2.0)
    classes = {s.file: s.cls for s in t.stems}
    assert classes == {"stems/Artist1_Song1_STEM_01.wav": "guitar", "stems/Artist1_Song1_STEM_02.wav": "bass",
                       "stems/Artist1_Song1_STEM_03.wav": "drums", "stems/Artist1_Song1_STEM_04.wav": "piano",
                       "stems/Artist1_Song1_MIX.wav": "mix"}
    for s in t.stems:
        assert library.stem_path(t, s).is_file()
    # A stem with two instruments of different classes ("piano" and "tack piano") is not guessed.
    t2 = library.load("Artist2_Song2")
    multi = [s for s in t2.stems if s.file.endswith("STEM_04.wav")][0]
    assert multi.raw_instrument == "piano; tack piano" and multi.cls is None
    assert report.unmapped == {"piano; tack piano": 1}


def test_medleydb_separate_metadata_folder(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=1, separate_metadata=True)
    report = import_tracks(library, read_medleydb(root, mapping))
    assert report.added == ["Artist1_Song1"] and not report.errors


def test_reimport_is_idempotent_and_detects_changed_content(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=2)
    import_tracks(library, read_medleydb(root, mapping))
    t = library.load("Artist1_Song1")
    t.set_mark("guitar", "checked")
    library.save(t)
    before = sorted(p.name for p in library.root.iterdir())
    again = import_tracks(library, read_medleydb(root, mapping))
    assert again.added == [] and again.updated == []
    assert again.unchanged == ["Artist1_Song1", "Artist2_Song2"]
    assert sorted(p.name for p in library.root.iterdir()) == before
    # A re-rendered stem (different content) replaces the old one; the marks stay.
    stem = root / "Artist1_Song1" / "Artist1_Song1_STEMS" / "Artist1_Song1_STEM_01.wav"
    stem.unlink()  # break the hard link so the library copy keeps the old audio
    write(stem, tone(3.0, 330))
    third = import_tracks(library, read_medleydb(root, mapping))
    assert third.updated == ["Artist1_Song1"] and third.unchanged == ["Artist2_Song2"]
    t = library.load("Artist1_Song1")
    assert t.has_mark("guitar", "checked") and t.duration_seconds == 3.0


def test_corrupt_stem_is_reported_and_the_rest_imports(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=2)
    bad = root / "Artist2_Song2" / "Artist2_Song2_STEMS" / "Artist2_Song2_STEM_03.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    report = import_tracks(library, read_medleydb(root, mapping))
    assert report.added == ["Artist1_Song1", "Artist2_Song2"]
    assert [(e["track"], e["stem"]) for e in report.errors] == [("Artist2_Song2", "Artist2_Song2_STEM_03.wav")]
    t = library.load("Artist2_Song2")
    assert "stems/Artist2_Song2_STEM_03.wav" not in [s.file for s in t.stems]
    assert len(t.stems) == 4


def test_metadata_path_traversal_is_refused(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=1)
    secret = tmp_path / "secret.wav"
    write(secret, tone(1.0, 100))
    meta_path = root / "Artist1_Song1" / "Artist1_Song1_METADATA.yaml"
    text = meta_path.read_text().replace("Artist1_Song1_STEM_01.wav", "../../../secret.wav", 1)
    meta_path.write_text(text)
    report = import_tracks(library, read_medleydb(root, mapping))
    assert report.added == []
    assert "may not contain '..'" in report.errors[0]["reason"]


def test_symlink_out_of_the_stem_folder_is_refused(tmp_path, library, mapping):
    song = tmp_path / "stems" / "SongA"
    write(song / "guitar.wav", tone(1.0, 200))
    outside = write(tmp_path / "elsewhere" / "private.wav", tone(1.0, 300))
    os.symlink(outside, song / "vocals.wav")
    report = import_tracks(library, read_stem_folders(tmp_path / "stems", mapping))
    assert report.added == []
    assert "outside" in report.errors[0]["reason"]


def test_slakh_import_skips_unrendered_and_limits(tmp_path, library, mapping):
    root = make_slakh(tmp_path / "slakh", tracks=3)
    report = import_tracks(library, read_slakh(root, mapping, limit=2))
    assert report.added == ["Track00001", "Track00002"]
    t = library.load("Track00001")
    assert {s.file: (s.raw_instrument, s.cls) for s in t.stems} == {
        "stems/S00.flac": ("Acoustic Grand Piano", "piano"),
        "stems/S01.flac": ("Overdriven Guitar", "guitar"),
        "stems/S02.flac": ("Acoustic Grand Piano", "drums"),  # is_drum wins over the program
        "stems/mix.flac": ("mix", "mix"),
    }
    # S03 is not rendered and has no file: metadata and files agree, nothing to report.
    assert report.disagreements == [] and report.skipped == []


def test_medleydb_files_win_over_metadata_and_each_disagreement_is_reported(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=1)
    song = root / "Artist1_Song1"
    (song / "Artist1_Song1_STEMS" / "Artist1_Song1_STEM_02.wav").unlink()   # listed, missing
    write(song / "Artist1_Song1_STEMS" / "Artist1_Song1_STEM_05.wav", tone(2.0, 330))  # there, not listed
    write(song / "Artist1_Song1_STEMS" / "Lead Guitar.wav", tone(2.0, 247))  # there, not listed
    (song / "Artist1_Song1_MIX.wav").unlink()  # named by mix_filename, missing
    report = import_tracks(library, read_medleydb(root, mapping))
    assert report.added == ["Artist1_Song1"] and not report.errors
    t = library.load("Artist1_Song1")
    assert {s.file: (s.cls, s.suggested) for s in t.stems} == {
        "stems/Artist1_Song1_STEM_01.wav": ("guitar", False), "stems/Artist1_Song1_STEM_03.wav": ("drums", False),
        "stems/Artist1_Song1_STEM_04.wav": ("piano", False), "stems/Artist1_Song1_STEM_05.wav": (None, False),
        "stems/Lead_Guitar.wav": ("guitar", True)}
    assert [(d["track"], d["stem"], d["file"], d["action"], d["class"]) for d in report.disagreements] == [
        ("Artist1_Song1", "S02", "Artist1_Song1_STEMS/Artist1_Song1_STEM_02.wav", "skipped", "bass"),
        ("Artist1_Song1", "Artist1_Song1_STEM_05", "Artist1_Song1_STEMS/Artist1_Song1_STEM_05.wav", "imported", ""),
        ("Artist1_Song1", "Lead Guitar", "Artist1_Song1_STEMS/Lead Guitar.wav", "imported", "guitar"),
        ("Artist1_Song1", "mix", "Artist1_Song1_MIX.wav", "skipped", "mix"),
    ]
    assert report.disagreements[0]["reason"] == "listed in Artist1_Song1_METADATA.yaml but the file is missing"
    assert report.disagreements[2]["reason"] == ("not listed in Artist1_Song1_METADATA.yaml: imported with the "
                                                 "class guitar suggested by its name")
    assert report.to_dict()["counts"]["disagreements"] == 4


def test_stem_folder_names_are_matched_as_whole_words(tmp_path, library, mapping):
    song = tmp_path / "multitracks" / "Band - Song"
    for name in ("01_Kick.wav", "07_ElecGtr1.wav", "EGtr_DI.wav", "Bass Guitar.wav", "Pno.wav",
                 "Keys.wav", "LeadVox.wav", "Theremin.wav"):
        write(song / name, tone(1.0, 220))
    rb = tmp_path / "multitracks" / "RockBandSong"
    for name in ("guitar.ogg", "rhythm.ogg", "song.ogg", "drums_1.ogg"):
        write(rb / name, drums(1.0) if "drums" in name else tone(1.0, 330))
    report = import_tracks(library, read_stem_folders(tmp_path / "multitracks", mapping))
    assert report.added == ["Band_-_Song", "RockBandSong"]
    t = library.load(report.added[0])
    got = {Path(s.file).name: (s.cls, s.suggested) for s in t.stems}
    assert got == {
        "01_Kick.wav": ("drums", True), "07_ElecGtr1.wav": ("guitar", True), "EGtr_DI.wav": ("guitar", True),
        "Bass_Guitar.wav": ("bass", True), "Pno.wav": ("piano", True), "Keys.wav": ("piano", True),
        "LeadVox.wav": ("vocals", True), "Theremin.wav": (None, False),
    }
    assert report.unmapped == {"Theremin": 1}
    rock = library.load("RockBandSong")
    assert {Path(s.file).name: s.cls for s in rock.stems} == {
        "drums_1.ogg": "drums", "guitar.ogg": "guitar", "rhythm.ogg": "guitar", "song.ogg": "mix"}


def test_a_rhythm_game_song_folder_reads_song_ogg_as_the_rest_of_the_band(tmp_path, library, mapping):
    # Frets on Fire / Clone Hero: song.ini beside the parts; song.ogg is the band without them.
    game = tmp_path / "songs" / "Band - Song"
    for name in ("guitar.ogg", "song.ogg", "preview.ogg", "drums.ogg"):
        write(game / name, drums(1.0) if "drums" in name else tone(1.0, 330))
    (game / "song.ini").write_text("[song]\nname = Song\nartist = Band\n")
    report = import_tracks(library, read_stem_folders(tmp_path / "songs", mapping))
    track = library.load(report.added[0])
    assert {Path(s.file).name: (s.cls, s.suggested) for s in track.stems} == {
        "guitar.ogg": ("guitar", True), "song.ogg": ("other", True), "preview.ogg": ("excluded", True),
        "drums.ogg": ("drums", True)}


def test_import_reports_progress_and_stops_when_asked(tmp_path, library, mapping):
    root = make_medleydb(tmp_path / "mdb", songs=3, seconds=1.0)
    seen = []
    report = import_tracks(library, read_medleydb(root, mapping), total=3,
                           progress=lambda done, total, message="": seen.append((done, total)),
                           should_stop=lambda: len(seen) >= 1)
    assert report.stopped and report.added == ["Artist1_Song1"]
    assert seen == [(1, 3)]
    # The rest comes in on the next run; the first is recognised.
    report = import_tracks(library, read_medleydb(root, mapping))
    assert report.added == ["Artist2_Song2", "Artist3_Song3"] and report.unchanged == ["Artist1_Song1"]


def test_generated_medleydb_and_slakh_folders_import_completely(tmp_path, library, mapping):
    from services.ingestion.synth import generate_songs

    generate_songs(tmp_path / "gen-mdb", songs=2, seconds=3, seed=5, layout="medleydb", rate=22050)
    generate_songs(tmp_path / "gen-slakh", songs=2, seconds=3, seed=5, layout="slakh", rate=22050)
    mdb = import_tracks(library, read_medleydb(tmp_path / "gen-mdb", mapping))
    slakh = import_tracks(library, read_slakh(tmp_path / "gen-slakh", mapping))
    assert mdb.added == ["Synth_Song001", "Synth_Song002"] and not mdb.errors and not mdb.unmapped
    assert slakh.added == ["Track00001", "Track00002"] and not slakh.errors and not slakh.unmapped
    assert not mdb.disagreements and not slakh.disagreements
    for track_id in mdb.added + slakh.added:
        t = library.load(track_id)
        assert t.rate == 22050 and t.duration_seconds == pytest.approx(3.0, abs=0.01)
        assert "mix" in t.classes() and {"guitar", "piano"} & t.classes()
        assert all(s.cls is not None and not s.suggested for s in t.stems)


def test_names_in_other_scripts_get_readable_ids_and_every_song_is_imported(tmp_path, library, mapping):
    # Before, a folder named in Japanese stopped the whole import with "cannot make a track id".
    root = tmp_path / "songs"
    write(root / "日本の歌" / "ギター.wav", tone(1.0, 220))
    write(root / "日本の歌" / "Drums.wav", drums(1.0))
    write(root / "Песня" / "Guitar.wav", tone(1.0, 330))
    write(root / "Zebra" / "Guitar.wav", tone(1.0, 440))
    report = import_tracks(library, read_stem_folders(root, mapping))
    assert sorted(report.added) == ["Pesnya", "RiBennoGe", "Zebra"] and not report.errors
    track = library.load("RiBennoGe")
    assert track.title == "日本の歌"
    assert {Path(s.file).name: s.raw_instrument for s in track.stems} == {"gita.wav": "ギター", "Drums.wav": "Drums"}


def test_every_audio_format_ffmpeg_reads_is_a_stem_and_other_files_are_reported(tmp_path, library, mapping):
    song = tmp_path / "extra" / "Song9"
    write(song / "GUITAR.WAV", tone(1.0, 220))
    write(song / "Perc.w64", drums(1.0))
    write(song / "Vocals.caf", tone(1.0, 440))
    (song / "notes.txt").write_text("take 3")
    (song / "Session.cpr").write_bytes(b"\0" * 10)
    report = import_tracks(library, read_stem_folders(tmp_path / "extra", mapping))
    track = library.load(report.added[0])
    assert {Path(s.file).name: s.cls for s in track.stems} == {
        "GUITAR.wav": "guitar", "Perc.w64": "percussion", "Vocals.caf": "vocals"}
    assert report.ignored == [{"track": "Song9", "file": "Session.cpr"}, {"track": "Song9", "file": "notes.txt"}]
    assert report.to_dict()["counts"]["ignored"] == 2


def test_a_songs_stems_in_subfolders_are_one_song(tmp_path, library, mapping):
    root = tmp_path / "sessions"
    # The mix beside a Stems/ folder ...
    write(root / "Song Six" / "Song Six (final mix).wav", tone(1.0, 220) + drums(1.0))
    write(root / "Song Six" / "Stems" / "Guitar.wav", tone(1.0, 220))
    write(root / "Song Six" / "Stems" / "Drums.wav", drums(1.0))
    # ... stems grouped by instrument ...
    write(root / "Song Seven" / "Guitars" / "DI.wav", tone(1.0, 220))
    write(root / "Song Seven" / "Guitars" / "Amp.wav", tone(1.0, 221))
    write(root / "Song Seven" / "Drums" / "Kick.wav", drums(1.0))
    # ... while an album's songs stay songs of their own.
    write(root / "Album" / "Song1" / "Guitar.wav", tone(1.0, 330))
    write(root / "Album" / "Song2" / "Guitar.wav", tone(1.0, 340))
    report = import_tracks(library, read_stem_folders(root, mapping))
    assert sorted(report.added) == ["Album_Song1", "Album_Song2", "Song_Seven", "Song_Six"]
    six = library.load("Song_Six")
    assert {Path(s.file).name: s.cls for s in six.stems} == {
        "Song_Six_final_mix.wav": "mix", "Stems_Guitar.wav": "guitar", "Stems_Drums.wav": "drums"}
    seven = library.load("Song_Seven")
    assert {Path(s.file).name: s.cls for s in seven.stems} == {
        "Guitars_DI.wav": "guitar", "Guitars_Amp.wav": "guitar", "Drums_Kick.wav": "drums"}


def test_the_same_song_from_a_second_place_is_reported(tmp_path, library, mapping):
    write(tmp_path / "a" / "Song One" / "Guitar.wav", tone(1.0, 220))
    write(tmp_path / "a" / "Song One" / "Drums.wav", drums(1.0))
    assert import_tracks(library, read_stem_folders(tmp_path / "a", mapping)).added == ["Song_One"]
    import shutil
    shutil.copytree(tmp_path / "a" / "Song One", tmp_path / "moved" / "Song One")
    write(tmp_path / "moved" / "Song Two" / "Guitar.wav", tone(1.0, 230))
    report = import_tracks(library, read_stem_folders(tmp_path / "moved", mapping))
    # Added (a set may file one recording under two names on purpose), and said.
    assert report.added == ["Song_One_2", "Song_Two"]
    assert report.duplicates == [{"track": "Song_One_2", "same_as": "Song_One",
                                  "origin": str(tmp_path / "a" / "Song One")}]
    assert report.to_dict()["counts"]["duplicates"] == 1


def test_a_collection_of_songs_named_for_instruments_is_not_one_song(tmp_path, library, mapping):
    # Song folders whose names hold an instrument word, and a stray mix beside them, stay songs.
    root = tmp_path / "collection"
    write(root / "Playlist mix.wav", tone(1.0, 110))
    write(root / "Guitar Song" / "Guitar.wav", tone(1.0, 220))
    write(root / "Guitar Song" / "Drums.wav", drums(1.0))
    write(root / "Piano Ballad" / "Piano.wav", tone(1.0, 330))
    write(root / "Piano Ballad" / "Vocals.wav", tone(1.0, 440))
    report = import_tracks(library, read_stem_folders(root, mapping))
    assert sorted(report.added) == ["Guitar_Song", "Piano_Ballad", "collection"]
    assert [s.file for s in library.load("collection").stems] == ["stems/Playlist_mix.wav"]

"""Labelling (classes, marks, listing, mapping) and the listening parts of the review page."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.importers import import_tracks, read_stem_folders
from services.ingestion.labels import (
    TrackFilter,
    apply_mapping,
    list_tracks,
    set_mark,
    set_stem_class,
    unmapped_names,
)
from services.ingestion.listening import audible_bounds, listening_parts, split_parts
from services.ingestion.mapping import Mapping, update_user_mapping
from tests.ingestion_data import RATE, tone, write


def test_list_filters_and_pages(two_song_library):
    set_mark(two_song_library, "Artist1_Song1", "guitar", "checked")
    page, token, total = list_tracks(two_song_library, TrackFilter(mark="checked", instrument="guitar"))
    assert [t.id for t in page] == ["Artist1_Song1"] and token == "" and total == 1
    page, token, total = list_tracks(two_song_library, TrackFilter(mark="checked", instrument="guitar", without_mark=True))
    assert [t.id for t in page] == ["Artist2_Song2"]
    page, token, total = list_tracks(two_song_library, TrackFilter(has_class="piano"), page_size=1)
    assert [t.id for t in page] == ["Artist1_Song1"] and token == "" and total == 1
    page, token, total = list_tracks(two_song_library, page_size=1)
    assert total == 2 and token == "Artist1_Song1"
    page2, token2, _ = list_tracks(two_song_library, page_size=1, page_token=token)
    assert [t.id for t in page2] == ["Artist2_Song2"] and token2 == ""
    assert [t.id for t in list_tracks(two_song_library, TrackFilter(unmapped=True))[0]] == ["Artist2_Song2"]
    with pytest.raises(InvalidArgumentError):
        list_tracks(two_song_library, TrackFilter(mark="sparkly"))


def test_marks_record_when_and_clear(two_song_library):
    t = set_mark(two_song_library, "Artist1_Song1", "guitar", "bleed")
    when = t.marks["guitar"]["bleed"]
    assert when.endswith("Z")
    assert set_mark(two_song_library, "Artist1_Song1", "guitar", "bleed").marks["guitar"]["bleed"] == when
    assert not set_mark(two_song_library, "Artist1_Song1", "guitar", "bleed", on=False).marks
    with pytest.raises(NotFoundError):
        set_mark(two_song_library, "Nope", "guitar", "bleed")
    with pytest.raises(InvalidArgumentError):
        set_mark(two_song_library, "Artist1_Song1", "guitar", "shiny")
    # A mark for an instrument the track has no stem of is used by nothing: refused, saying why.
    from services.common.errors import FailedPreconditionError

    with pytest.raises(FailedPreconditionError, match="has no vocals stem .*give a stem that class first"):
        set_mark(two_song_library, "Artist1_Song1", "vocals", "checked")
    assert "vocals" not in two_song_library.load("Artist1_Song1").marks


def test_unmapped_names_are_fixed_by_mapping_and_reapply(two_song_library):
    assert unmapped_names(two_song_library) == {"piano; tack piano": 1}
    entries = update_user_mapping(two_song_library.data, {"Tack Piano": "piano"})
    assert entries == {"tack piano": "piano"}
    result = apply_mapping(two_song_library, Mapping.load(two_song_library.data))
    assert result == {"tracks_changed": ["Artist2_Song2"], "still_unmapped": {}}
    assert unmapped_names(two_song_library) == {}
    stem = [s for s in two_song_library.load("Artist2_Song2").stems if "STEM_04" in s.file][0]
    assert stem.cls == "piano" and not stem.suggested
    with pytest.raises(InvalidArgumentError):
        update_user_mapping(two_song_library.data, {"kazoo": "kazoos"})


def test_confirmed_class_survives_reapply(tmp_path):
    lib = Library(DataRoot(tmp_path / "d").ensure())
    write(tmp_path / "s" / "Song" / "Gtr1.wav", tone(1.0, 200))
    write(tmp_path / "s" / "Song" / "Thing.wav", tone(1.0, 300))
    import_tracks(lib, read_stem_folders(tmp_path / "s", Mapping.defaults()))
    t = set_stem_class(lib, "Song", "Gtr1.wav", "bass")  # a person knows better
    assert [(s.cls, s.suggested) for s in t.stems if s.file == "stems/Gtr1.wav"] == [("bass", False)]
    update_user_mapping(lib.data, {"thing": "other"})
    apply_mapping(lib, Mapping.load(lib.data))
    got = {s.file: (s.cls, s.suggested) for s in lib.load("Song").stems}
    assert got == {"stems/Gtr1.wav": ("bass", False), "stems/Thing.wav": ("other", True)}
    with pytest.raises(NotFoundError):
        set_stem_class(lib, "Song", "nope.wav", "bass")


def test_listening_parts_trim_silence_and_return_bounded_wav(tmp_path):
    lib = Library(DataRoot(tmp_path / "d").ensure())
    audio = np.zeros((2, 10 * RATE), np.float32)
    audio[:, 2 * RATE: 7 * RATE] = tone(5.0, 220)  # audible from 2 s to 7 s
    write(tmp_path / "s" / "Song" / "guitar.wav", audio)
    write(tmp_path / "s" / "Song" / "drums.wav", tone(10.0, 100))
    import_tracks(lib, read_stem_folders(tmp_path / "s", Mapping.defaults()))
    p = listening_parts(lib, "Song", "guitar", parts=5)
    assert p.start_seconds == pytest.approx(2.0, abs=0.06) and p.end_seconds == pytest.approx(7.0, abs=0.3)
    assert len(p.parts) == 5 and p.parts[0][0] == p.start_seconds and p.parts[-1][1] == p.end_seconds
    assert p.wav == b""
    p = listening_parts(lib, "Song", "guitar", parts=5, part_index=2, mono=True, rate=4000)
    data, rate = sf.read(io.BytesIO(p.wav))
    assert rate == 4000 and data.ndim == 1
    assert len(data) / rate == pytest.approx(p.parts[2][1] - p.parts[2][0], abs=0.01)
    assert not p.truncated
    small = listening_parts(lib, "Song", "guitar", parts=1, part_index=0, max_bytes=4096)
    assert small.truncated and len(small.wav) <= 4096
    # A part too long for the byte bound at the file's rate comes whole at a lower one (the review
    # page heard only the first 33 s of an 84 s part).
    write(tmp_path / "s2" / "Hi" / "guitar.wav", tone(6.0, 220, rate=22050), rate=22050)
    import_tracks(lib, read_stem_folders(tmp_path / "s2", Mapping.defaults()))
    lower = listening_parts(lib, "Hi", "guitar", parts=1, part_index=0, mono=True, max_bytes=150_000)
    data, rate = sf.read(io.BytesIO(lower.wav))
    assert not lower.truncated and 8000 <= rate < 22050 and len(lower.wav) <= 150_000
    assert len(data) / rate == pytest.approx(lower.parts[0][1] - lower.parts[0][0], abs=0.02)
    with pytest.raises(NotFoundError):
        listening_parts(lib, "Song", "piano")
    with pytest.raises(InvalidArgumentError):
        listening_parts(lib, "Song", "guitar", parts=5, part_index=5)


def test_pure_helpers():
    assert split_parts(1.0, 6.0, 5) == [(1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 5.0), (5.0, 6.0)]
    assert audible_bounds(np.zeros((1, 800), np.float32), 8000) is None

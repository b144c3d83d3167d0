"""Fixtures several test files share: a fresh data root, the track library on it, the instrument
mapping. Every test gets its own folders under pytest's tmp_path, and services get free ports
(tests/servicetools.py), so the suite runs in parallel (`make test`: pytest-xdist, one file per
worker at a time)."""

from __future__ import annotations

import pytest

from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.importers import import_tracks, read_medleydb
from services.ingestion.mapping import Mapping
from tests.ingestion_data import make_medleydb


@pytest.fixture(scope="session")
def mapping() -> Mapping:
    """The shipped instrument-class mapping (read-only)."""
    return Mapping.defaults()


@pytest.fixture
def data_root(tmp_path) -> DataRoot:
    """An empty data root with its folders made."""
    return DataRoot(tmp_path / "data").ensure()


@pytest.fixture
def library(data_root) -> Library:
    """An empty track library."""
    return Library(data_root)


@pytest.fixture
def two_song_library(library, tmp_path, mapping) -> Library:
    """A library holding two one-second MedleyDB songs (Artist1_Song1, Artist2_Song2)."""
    import_tracks(library, read_medleydb(make_medleydb(tmp_path / "mdb", songs=2, seconds=1.0), mapping))
    return library


def pytest_collection_modifyitems(items):
    """Files that hold slow tests (training, end to end, browser) first, each file's order kept:
    with one file per worker (`make test`), the longest files then start at once instead of last."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort

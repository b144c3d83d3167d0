"""Fixtures several test files share: a fresh data root, the track library on it, the instrument
mapping. Every test gets its own folders under pytest's tmp_path, and services get free ports
(tests/servicetools.py), so the suite runs in parallel (`make test`: pytest-xdist, one file per
worker at a time). Every test process and the services it starts share one token, as a stack
shares its data root's."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile

import pytest

from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.importers import import_tracks, read_medleydb
from services.ingestion.mapping import Mapping
from tests.ingestion_data import make_medleydb

# Set before any test starts a service: servers check it, clients send it.
os.environ.setdefault("STEMLAB_TOKEN", "test-" + secrets.token_urlsafe(24))
# Tests import from folders they make under the temporary directory (pytest's tmp_path): the
# services may read there, as an operator's STEMLAB_IMPORT_ROOTS lets them read a music folder.
os.environ.setdefault("STEMLAB_IMPORT_ROOTS", tempfile.gettempdir())


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


def _hostile_inputs_tried() -> int:
    hostile = sys.modules.get("tests.test_hostile")
    return len(hostile.TRIED) if hostile is not None else 0


def pytest_sessionfinish(session):
    """In an xdist worker: hand this process's count of hostile inputs to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["hostile_inputs"] = _hostile_inputs_tried()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """In the xdist controller: add up the workers' counts."""
    config = node.config
    config.stash[_HOSTILE] = config.stash.get(_HOSTILE, 0) + node.workeroutput.get("hostile_inputs", 0)


_HOSTILE = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config):
    """The hostile-input suite's count: how many attacks were tried (each test asserts its refusal)."""
    tried = config.stash.get(_HOSTILE, 0) + _hostile_inputs_tried()
    if tried:
        terminalreporter.write_line(f"hostile inputs tried: {tried} "
                                    f"(each refused with a clear error; see tests/test_hostile.py)")

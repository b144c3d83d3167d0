"""Solo-instrument audio: downloaded through yt-dlp from a local HTTP server, or local files."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from services.common.library import Library
from services.common.paths import DataRoot
from services.ingestion.solo import SoloImportError, import_solo
from tests.ingestion_data import tone, write


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        _Handler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    write(root / "solo guitar.wav", tone(70.0, 196, channels=1))
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_is_downloaded_cut_into_pieces_and_not_fetched_twice(tmp_path, server):
    lib = Library(DataRoot(tmp_path / "data").ensure())
    url = f"{server}/solo%20guitar.wav"
    report = import_solo(lib, url, "guitar", piece_seconds=30, min_piece_seconds=15, allow_hosts=["127.0.0.1"])
    # 70 s -> 30 + 30 + 10; the 10 s rest is shorter than the minimum and dropped.
    assert report.added == ["solo_guitar_001", "solo_guitar_002"], report.to_dict()
    assert report.skipped == [{"track": "solo guitar", "reason": "its last 10.0 s are left out "
                                                                 "(shorter than 15 s, --min-piece-seconds)"}]
    t = lib.load("solo_guitar_001")
    assert t.source == "solo" and t.duration_seconds == pytest.approx(30.0, abs=0.05)
    assert [(s.file, s.cls) for s in t.stems] == [("stems/guitar.wav", "guitar")]
    assert t.origin.startswith(url + "#piece=001")
    fetched = len(_Handler.requests)
    again = import_solo(lib, url, "guitar", piece_seconds=30, min_piece_seconds=15, allow_hosts=["127.0.0.1"])
    assert again.unchanged == ["solo_guitar_001", "solo_guitar_002"] and not again.added
    assert len(_Handler.requests) == fetched  # recognised without downloading again
    assert not any(p.name.startswith(".solo-") for p in lib.data.downloads.iterdir())


def test_local_file_pieces_and_idempotence(tmp_path):
    lib = Library(DataRoot(tmp_path / "data").ensure())
    src = write(tmp_path / "in" / "Piano Medley.wav", tone(75.0, 440))
    report = import_solo(lib, str(src), "piano", piece_seconds=30, min_piece_seconds=10)
    assert report.added == ["Piano_Medley_001", "Piano_Medley_002", "Piano_Medley_003"]
    assert lib.load("Piano_Medley_003").duration_seconds == pytest.approx(15.0, abs=0.05)
    assert import_solo(lib, str(src), "piano", piece_seconds=30, min_piece_seconds=10).unchanged == report.added


def test_only_http_urls_and_instrument_classes(tmp_path):
    lib = Library(DataRoot(tmp_path / "data").ensure())
    for bad in ("file:///etc/passwd", "ftp://example.org/a.mp3", "javascript://x"):
        with pytest.raises(SoloImportError):
            import_solo(lib, bad, "guitar")
    with pytest.raises(SoloImportError):
        import_solo(lib, "http://127.0.0.1:9/a.wav", "mix")


def test_a_title_given_for_a_folder_names_each_recording(tmp_path):
    lib = Library(DataRoot(tmp_path / "data").ensure())
    write(tmp_path / "takes" / "take one.wav", tone(12.0, 220))
    write(tmp_path / "takes" / "take two.wav", tone(12.0, 330))
    report = import_solo(lib, str(tmp_path / "takes"), "guitar", piece_seconds=30, min_piece_seconds=5,
                         title="My Take")
    assert report.added == ["My_Take_take_one_001", "My_Take_take_two_001"]
    assert lib.load("My_Take_take_two_001").title == "My Take take two (1/1)"


def test_a_minimum_longer_than_a_piece_is_refused_before_the_job():
    from services.common.errors import InvalidArgumentError
    from services.ingestion.jobs import validate_import

    with pytest.raises(InvalidArgumentError, match="nothing could be kept"):
        validate_import({"format": "solo", "path": "x.wav", "instrument": "guitar", "piece_seconds": 60,
                         "min_piece_seconds": 100})
    # 0 is a value, not "the default": --min-piece-seconds 0 keeps every piece; --piece-seconds 0 is refused.
    from services.ingestion.jobs import _piece_lengths

    assert _piece_lengths({"min_piece_seconds": 0.0}) == (180.0, 0.0)
    with pytest.raises(InvalidArgumentError, match="--piece-seconds must be above 0"):
        validate_import({"format": "solo", "path": "x.wav", "instrument": "guitar", "piece_seconds": 0.0})

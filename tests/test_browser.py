"""The web demo in a real browser: headless Chromium driven by Playwright, against the app served
by a real HTTP server and a real compatible serving process.

Screenshots of the home, progress and result pages go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import soundfile as sf
from werkzeug.serving import make_server

from services.frontend.app import create_app
from tests.frontendtools import ServingProcess, build_models, song
from tests.servicetools import ServiceProcess

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]
SONG_SECONDS = 4.0


def make_library(data: Path):
    """One track with a guitar stem (and a suggestion from the checks) in a fresh library."""
    from services.common.library import Library, Stem, Track

    library = Library(data)
    track = Track(id="Review_Song", source="synthetic", title="Review Song", rate=22050, channels=1,
                  duration_seconds=5.0, stems=[Stem("stems/S01.wav", "acoustic guitar", "guitar"),
                                               Stem("stems/Keys.wav", "Keys", "piano", suggested=True)],
                  suggestions=[{"check": "inaudible", "instrument": "guitar", "mark": "inaudible",
                                "stem": "stems/S01.wav", "evidence": {"peak_dbfs": -41.5}}])
    folder = library.track_dir(track.id) / "stems"
    folder.mkdir(parents=True)
    sf.write(folder / "S01.wav", song(5.0, rate=22050, channels=1)[0], 22050)
    sf.write(folder / "Keys.wav", 0.5 * song(5.0, rate=22050, channels=1, seed=2)[0], 22050)
    library.save(track)
    second = Track(id="Second_Song", source="synthetic", title="Second Song", rate=22050, channels=1,
                   duration_seconds=5.0, stems=[Stem("stems/G.wav", "guitar", "guitar")])
    (library.track_dir(second.id) / "stems").mkdir(parents=True)
    sf.write(library.track_dir(second.id) / "stems" / "G.wav", song(5.0, rate=22050, channels=1, seed=3)[0], 22050)
    library.save(second)
    return library


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The app on a free port (werkzeug in a thread), a serving process, and a static file server."""
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed at /usr/bin/chromium")
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("browser")
    www = root / "www"
    www.mkdir()
    sf.write(www / "linked.flac", song(3.0, rate=48000, channels=2, seed=3).T, 48000)
    files = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    library = make_library(root / "ingestion-data")
    with ServingProcess(build_models(root), root / "serving.log") as serving, \
            ServiceProcess("ingestion", root / "ingestion-data") as ingestion:
        app = create_app({"data_root": str(root / "data"), "serving_address": serving.grpc_address,
                          "serving_rest_address": serving.rest_address, "allow_hosts": ["127.0.0.1"],
                          "workers": 1, "ingestion_address": ingestion.address})
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield {"url": f"http://127.0.0.1:{server.server_port}", "files": f"http://127.0.0.1:{files.server_port}",
                   "app": app, "root": root, "library": library}
        finally:
            server.shutdown()
            files.shutdown()
            app.extensions["stemlab_queue"].stop(2)


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def audio_state(page, element_id: str) -> dict:
    return page.evaluate("""id => { const a = document.getElementById(id);
        return {duration: a.duration, readyState: a.readyState, error: a.error && a.error.code,
                volume: a.volume, currentTime: a.currentTime, paused: a.paused}; }""", element_id)


def wait_players(page, seconds: float) -> None:
    page.wait_for_selector("#player-instrument", timeout=60_000)
    page.wait_for_function("""() => ['player-instrument', 'player-rest'].every(id => {
        const a = document.getElementById(id); return a.readyState >= 2 || a.error; })""", timeout=30_000)
    for stem in ("instrument", "rest"):
        state = audio_state(page, f"player-{stem}")
        assert state["error"] is None, state
        assert state["duration"] == pytest.approx(seconds, abs=0.05), state


def test_upload_progress_result_and_mixer(site, page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    song_path = tmp_path / "browser song.wav"
    sf.write(song_path, song(SONG_SECONDS, rate=44100, channels=2).T, 44100, subtype="PCM_16")
    # A longer separation queued first keeps the browser's job on its progress page for a while.
    blocker = tmp_path / "blocker.flac"
    sf.write(blocker, song(300.0, rate=44100, channels=2).T, 44100, subtype="PCM_16")
    client = site["app"].test_client()
    with open(blocker, "rb") as handle:
        reply = client.post("/api/separations", data={"model": "guitar", "file": (handle, "blocker.flac")},
                            content_type="multipart/form-data")
    assert reply.status_code == 202
    blocker_page = site["url"] + reply.get_json()["links"]["page"]

    page.goto(site["url"] + "/")
    assert page.locator('input[name=model][value=guitar]').is_checked()
    assert page.locator('input[name=model][value=piano]').is_disabled()
    page.screenshot(path=str(ARTIFACTS / "home.png"), full_page=True)

    # The progress bar moves while the long song is separated.
    page.goto(blocker_page)
    page.wait_for_function("(document.getElementById('progress') || {}).value > 0", timeout=30_000)
    assert page.inner_text("#progress-message")
    page.screenshot(path=str(ARTIFACTS / "progress.png"), full_page=True)

    page.goto(site["url"] + "/")
    page.set_input_files("#file", str(song_path))
    page.click("#submit")
    page.wait_for_url("**/separations/web-*", timeout=30_000)
    page.wait_for_selector("#progress, #player-instrument")
    page.screenshot(path=str(ARTIFACTS / "queued.png"), full_page=True)
    job_url = page.url

    wait_players(page, SONG_SECONDS)
    assert page.locator("img.waveforms").evaluate("img => img.complete && img.naturalWidth > 0")
    page.screenshot(path=str(ARTIFACTS / "result.png"), full_page=True)

    # Both stems really hold audio: fetch them as the browser does and count the bytes.
    sizes = page.evaluate("""() => Promise.all(['player-instrument', 'player-rest'].map(id =>
        fetch(document.getElementById(id).src).then(r => r.arrayBuffer()).then(b => b.byteLength)))""")
    assert min(sizes) > 10_000

    # The mixer: a volume slider, mute and solo act on the players.
    page.locator("#volume-rest").fill("0.25")
    assert audio_state(page, "player-rest")["volume"] == pytest.approx(0.25)
    page.click("#mute-instrument")
    assert audio_state(page, "player-instrument")["volume"] == 0
    page.click("#mute-instrument")
    page.click("#solo-rest")
    assert audio_state(page, "player-instrument")["volume"] == 0
    assert audio_state(page, "player-rest")["volume"] == pytest.approx(0.25)
    page.click("#solo-rest")
    assert audio_state(page, "player-instrument")["volume"] == 1

    # One transport plays both players, in step.
    page.click("#play")
    page.wait_for_function("document.getElementById('player-instrument').currentTime > 0.5", timeout=10_000)
    instrument, rest = audio_state(page, "player-instrument"), audio_state(page, "player-rest")
    assert not instrument["paused"] and not rest["paused"]
    assert abs(instrument["currentTime"] - rest["currentTime"]) < 0.25
    page.click("#play")
    assert audio_state(page, "player-rest")["paused"]

    # Leaving and coming back finds the same result.
    page.goto(site["url"] + "/")
    page.goto(job_url)
    wait_players(page, SONG_SECONDS)


def test_link_is_separated_in_the_browser(site, page):
    page.goto(site["url"] + "/")
    page.fill("#url", site["files"] + "/linked.flac")
    page.click("#submit")
    page.wait_for_url("**/separations/web-*", timeout=30_000)
    wait_players(page, 3.0)
    assert "48000 Hz" in page.inner_text("#result")


def test_refusal_is_shown_on_the_page(site, page):
    page.goto(site["url"] + "/")
    page.fill("#url", "ftp://example.com/song.mp3")
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "only http and https" in page.inner_text("#form-error")
    page.goto(site["url"] + "/separations/web-000000000000")
    assert "no separation" in page.inner_text("main")


def test_review_page_plays_parts_and_sets_marks_by_key(site, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(site["url"] + "/review?instrument=guitar")
    page.fill("input[name=token]", os.environ["STEMLAB_TOKEN"])  # reviewing needs the stack's token
    page.click("button[type=submit]")
    page.wait_for_selector("#review-panel:not([hidden])")
    assert page.inner_text("#review-title") == "Review Song"
    assert "inaudible" in page.inner_text("#suggestions")
    page.wait_for_function("document.getElementById('part-player').readyState >= 1", timeout=20_000)
    assert page.evaluate("document.getElementById('part-player').duration") == pytest.approx(1.0, abs=0.1)
    page.keyboard.press("c")
    page.wait_for_selector('button.mark[data-mark=checked][aria-pressed=true]')
    assert site["library"].load("Review_Song").has_mark("guitar", "checked")
    page.click('button.mark[data-mark=bleed]')
    page.wait_for_selector('button.mark[data-mark=bleed][aria-pressed=true]')
    page.screenshot(path=str(ARTIFACTS / "review.png"), full_page=True)
    page.keyboard.press("b")
    page.wait_for_selector('button.mark[data-mark=bleed][aria-pressed=false]')
    assert not site["library"].load("Review_Song").has_mark("guitar", "bleed")
    # A class guessed from a file name is confirmed on the page (it needed the command line).
    assert page.locator("#stem-classes select").count() == 2
    page.click("button.confirm-class")
    page.wait_for_function("!document.querySelector('button.confirm-class')")
    keys = next(s for s in site["library"].load("Review_Song").stems if s.file == "stems/Keys.wav")
    assert (keys.cls, keys.suggested) == ("piano", False)
    # The open track is in the address: a reload (or a shared link) comes back to it.
    page.keyboard.press("j")
    page.wait_for_function("document.getElementById('review-title').textContent === 'Second Song'")
    assert page.url.endswith("#Second_Song")
    page.reload()
    page.wait_for_function("document.getElementById('review-title').textContent === 'Second Song'")
    page.evaluate("window.location.hash = '#Review_Song'")  # a link within the page
    page.wait_for_function("document.getElementById('review-title').textContent === 'Review Song'")

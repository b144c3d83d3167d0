"""The web demo through Flask's test client, against a real compatible serving process.

The served model is a fixed-gain "separator" (instrument = 0.5 x mix at 22050 Hz), so every
result can be checked exactly: instrument is half the song, rest the other half, at the
song's own rate and channel count.
"""

from __future__ import annotations

import functools
import http.server
import io
import ipaddress
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.common import egress
from services.common import jobs as jobstore
from services.common.audio import read_audio
from services.frontend import links
from services.frontend.app import create_app
from services.frontend.pictures import envelope
from tests.frontendtools import GAIN, ServingProcess, build_models, song
from tests.polling import wait_until


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    with ServingProcess(build_models(root), root / "serving.log") as process:
        yield process


@pytest.fixture
def make_app(tmp_path, serving):
    apps = []

    def make(**overrides):
        config = {"data_root": str(tmp_path / "data"), "serving_address": serving.grpc_address,
                  "serving_rest_address": serving.rest_address, "model_status_cache_seconds": 0,
                  "max_song_seconds": 20, "allow_hosts": ["127.0.0.1"], **overrides}
        app = create_app(config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["stemlab_queue"].stop(2)


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def wav_bytes(audio: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, rate, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)
    return buffer.getvalue()


def upload(client, data: bytes, name: str = "song.wav", model: str = "guitar", **extra):
    return client.post("/api/separations", data={"model": model, "file": (io.BytesIO(data), name), **extra},
                       content_type="multipart/form-data")


def wait_done(client, job_id: str, timeout: float = 60.0) -> dict:
    """The separation's record once it has ended."""
    def ended():
        job = client.get(f"/api/separations/{job_id}").get_json()
        return job if job["state"] not in ("queued", "running") else None

    return wait_until(ended, timeout, message=f"separation {job_id} did not finish")


def decode(client, url: str, tmp_path: Path) -> tuple[np.ndarray, int]:
    reply = client.get(url)
    assert reply.status_code == 200, reply.get_json()
    path = tmp_path / Path(url).name
    path.write_bytes(reply.data)
    return read_audio(path)


# -- the happy path -------------------------------------------------------------------------


def test_models_lists_what_serving_has_available(client):
    reply = client.get("/api/models")
    assert reply.status_code == 200
    models = {m["name"]: m for m in reply.get_json()["models"]}
    assert models["guitar"]["available"] and models["guitar"]["versions"] == [1]
    assert not models["piano"]["available"]  # configured, but no version folder


def test_home_page_offers_only_available_models(client):
    page = client.get("/").get_data(as_text=True)
    assert 'value="guitar"' in page
    guitar = page[page.index('value="guitar"') - 80:page.index('value="guitar"') + 120]
    piano = page[page.index('value="piano"'):page.index('value="piano"') + 120]
    assert "disabled" not in guitar and "disabled" in piano


def test_uploaded_stereo_song_is_separated_at_its_own_rate(client, tmp_path):
    mix = song(3.0, rate=44100, channels=2, noise=0.0)
    reply = upload(client, wav_bytes(mix, 44100), "My Song.wav")
    assert reply.status_code == 202, reply.get_json()
    body = reply.get_json()
    assert body["state"] in ("queued", "running") and body["links"]["page"] == f"/separations/{body['id']}"
    assert reply.headers["Location"] == body["links"]["self"]

    job = wait_done(client, body["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0
    assert job["result"]["rate"] == 44100 and job["result"]["channels"] == 2
    assert job["result"]["seconds"] == pytest.approx(3.0)

    instrument, rate = decode(client, job["links"]["instrument"]["wav"], tmp_path)
    rest, _ = decode(client, job["links"]["rest"]["wav"], tmp_path)
    assert rate == 44100 and instrument.shape == mix.shape
    # The gain model keeps half of the chord (all below the 11 kHz the model's rate can carry).
    inner = slice(2205, -2205)  # the resampler's edges ring a little
    assert np.abs(instrument - GAIN * mix)[:, inner].max() < 0.01
    np.testing.assert_allclose(instrument + rest, mix, atol=1e-6)
    for stem in ("instrument", "rest"):
        flac, flac_rate = decode(client, job["links"][stem]["flac"], tmp_path)
        mp3, mp3_rate = decode(client, job["links"][stem]["mp3"], tmp_path)
        assert flac_rate == mp3_rate == 44100 and flac.shape == mix.shape and mp3.shape[0] == 2
    picture = client.get(job["links"]["picture"])
    assert picture.status_code == 200 and picture.data.startswith(b"\x89PNG")


def test_mono_song_at_an_odd_rate_stays_mono_and_mp3_still_works(client, tmp_path):
    mix = song(2.0, rate=37800, channels=1)
    job = wait_done(client, upload(client, wav_bytes(mix, 37800, "FLAC"), "mono.flac").get_json()["id"])
    assert job["state"] == "succeeded", job
    instrument, rate = decode(client, job["links"]["instrument"]["flac"], tmp_path)
    assert rate == 37800 and instrument.shape == (1, mix.shape[1])
    mp3, mp3_rate = decode(client, job["links"]["instrument"]["mp3"], tmp_path)
    assert mp3_rate == 44100 and mp3.shape[0] == 1  # MP3 has no 37.8 kHz


def test_stems_answer_range_requests_and_downloads(client):
    job = wait_done(client, upload(client, wav_bytes(song(1.0), 44100)).get_json()["id"])
    url = job["links"]["instrument"]["wav"]
    whole = client.get(url)
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.data == whole.data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(whole.data)}"
    download = client.get(url + "?download=1")
    assert "attachment" in download.headers["Content-Disposition"]
    assert "guitar-instrument.wav" in download.headers["Content-Disposition"]
    assert client.get(job["links"]["rest"]["mp3"]).mimetype == "audio/mpeg"


def test_result_page_has_players_mixer_picture_and_downloads(client):
    job = wait_done(client, upload(client, wav_bytes(song(1.0), 44100)).get_json()["id"])
    page = client.get(job["links"]["page"]).get_data(as_text=True)
    for needle in ('id="player-instrument"', 'id="player-rest"', 'id="volume-instrument"', 'id="solo-rest"',
                   job["links"]["picture"], job["links"]["rest"]["flac"], job["links"]["instrument"]["mp3"],
                   'id="another"'):
        assert needle in page


def test_progress_page_while_queued_and_cancel(make_app):
    client = make_app(start_workers=False).test_client()
    job = upload(client, wav_bytes(song(1.0), 44100)).get_json()
    page = client.get(job["links"]["page"]).get_data(as_text=True)
    assert 'id="progress"' in page and "waiting for a free worker" in page
    cancelled = client.post(job["links"]["cancel"]).get_json()
    assert cancelled["state"] == "cancelled" and cancelled["error"]


def test_link_is_downloaded_with_yt_dlp_and_separated(client, make_app, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    (served / "song.wav").write_bytes(wav_bytes(song(2.0, rate=22050, channels=2), 22050))
    (served / "a song é.wav").write_bytes((served / "song.wav").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        reply = client.post("/api/separations", json={"url": f"http://127.0.0.1:{port}/song.wav", "model": "guitar"})
        assert reply.status_code == 202, reply.get_json()
        job = wait_done(client, reply.get_json()["id"])
        assert job["state"] == "succeeded", job
        assert job["result"]["rate"] == 22050 and job["result"]["seconds"] == pytest.approx(2.0)
        # A link that leads nowhere fails with a message, and the worker lives on.
        missing = client.post("/api/separations", data={"url": f"http://127.0.0.1:{port}/nothing.mp3", "model": "guitar"})
        failed = wait_done(client, missing.get_json()["id"])
        assert failed["state"] == "failed" and failed["error"] == (
            "the link could not be downloaded: the server answered 404 File not found"), failed
        # A link's song is named by its file, not by the percent-encoded link.
        named = client.post("/api/separations", data={"url": f"http://127.0.0.1:{port}/a%20song%20%C3%A9.wav",
                                                      "model": "guitar"}).get_json()
        assert named["title"] == "a song é"
        done = wait_done(client, named["id"])
        assert done["title"] == "a song é", done
        download = client.get(done["links"]["rest"]["wav"] + "?download=1")
        assert "filename*=UTF-8''a_song_%C3%A9-guitar-rest.wav" in download.headers["Content-Disposition"]
        again = client.post("/api/separations", data={"url": f"http://127.0.0.1:{port}/song.wav", "model": "guitar"})
        assert wait_done(client, again.get_json()["id"])["state"] == "succeeded"
        # Downloads obey their own limits: size, and the song length once decoded.
        for limits, words in (({"download_max_mb": 0.05}, "larger than the 0 MB accepted"),
                              ({"max_song_seconds": 1.0}, "at most 1 s")):
            # A server of its own: one data root runs one web server's queue.
            limited = make_app(data_root=str(tmp_path / f"data-{next(iter(limits))}"), **limits).test_client()
            reply = limited.post("/api/separations", data={"url": f"http://127.0.0.1:{port}/song.wav", "model": "guitar"})
            refused = wait_done(limited, reply.get_json()["id"])
            assert refused["state"] == "failed" and words in refused["error"], refused
    finally:
        server.shutdown()


def test_job_survives_a_restart_of_the_web_process(make_app):
    first = make_app()
    job = wait_done(first.test_client(), upload(first.test_client(), wav_bytes(song(1.0), 44100)).get_json()["id"])
    first.extensions["stemlab_queue"].stop(1)
    later = make_app().test_client()
    again = later.get(f"/api/separations/{job['id']}").get_json()
    assert again["state"] == "succeeded" and again["links"]["instrument"] == job["links"]["instrument"]
    assert later.get(job["links"]["rest"]["wav"]).status_code == 200


def _running_job(store, job_id: str, params: dict, attempts: int) -> None:
    store.create(job_id, "web.separate", params)
    store.update(job_id, state=jobstore.RUNNING, started=time.time(), attempts=attempts)


def test_separation_running_when_the_server_died_runs_again_after_the_restart(make_app, tmp_path):
    folder = tmp_path / "data" / "web" / "separations" / ("a" * 32)
    folder.mkdir(parents=True)
    (folder / "input.wav").write_bytes(wav_bytes(song(1.0), 44100))
    store = jobstore.JobStore(tmp_path / "data" / "web" / "separations.sqlite")
    _running_job(store, "web-0123456789ab", {"folder": "a" * 32, "model": "guitar", "input": "input.wav"}, 1)
    # One that took its process down three times is not tried a fourth.
    _running_job(store, "web-0123456789ac", {"folder": "b" * 32, "model": "guitar", "input": "input.wav"}, 3)
    store.close()
    client = make_app().test_client()
    assert wait_done(client, "web-0123456789ab")["state"] == "succeeded"
    job = client.get("/api/separations/web-0123456789ac").get_json()
    assert job["state"] == "failed" and "restarted" in job["error"]


def test_a_separation_cut_short_by_a_shutdown_keeps_its_song_and_runs_when_the_server_is_back(make_app, tmp_path):
    first = make_app(segment_seconds=0.25, max_song_seconds=600)
    client = first.test_client()
    job_id = upload(client, wav_bytes(song(240.0, rate=22050, channels=1), 22050, "FLAC"), "long.flac"
                    ).get_json()["id"]
    wait_until(lambda: client.get(f"/api/separations/{job_id}").get_json()["progress"] > 0.2, 60)
    assert client.get(f"/api/separations/{job_id}").get_json()["state"] == "running"
    first.extensions["stemlab_queue"].stop(5)
    store = first.extensions["stemlab_queue"].store
    assert store.get(job_id).state == jobstore.QUEUED and store.get(job_id).error == ""
    assert [p.name for p in (tmp_path / "data" / "web" / "separations").glob("*/input.flac")] == ["input.flac"]
    later = make_app(max_song_seconds=600).test_client()
    done = wait_done(later, job_id)
    assert done["state"] == "succeeded" and later.get(done["links"]["instrument"]["wav"]).status_code == 200
    assert list((tmp_path / "data" / "web" / "separations").glob("*/input.*")) == []


def test_a_queued_separation_waits_while_serving_loads_its_model(tmp_path):
    # After a restart of the stack the queue runs before serving has loaded the models.
    from services.serving.reference_models import save_gain_model

    models = build_models(tmp_path / "serving")
    with ServingProcess(models, tmp_path / "serving.log") as serving:
        app = create_app({"data_root": str(tmp_path / "data"), "serving_address": serving.grpc_address,
                          "serving_rest_address": serving.rest_address, "model_status_cache_seconds": 0})
        try:
            queue = app.extensions["stemlab_queue"]
            name, folder = queue.new_folder()
            (folder / "input.wav").write_bytes(wav_bytes(song(1.0), 44100))
            job = queue.submit({"folder": name, "model": "piano", "input": "input.wav"})
            client = app.test_client()
            wait_until(lambda: "waiting for the model piano" in client.get(f"/api/separations/{job.id}")
                       .get_json()["message"], 30)
            save_gain_model(tmp_path / "serving" / "models" / "piano" / "1", gain=GAIN, sample_rate_hz=22050)
            assert wait_done(client, job.id)["state"] == "succeeded"
        finally:
            app.extensions["stemlab_queue"].stop(2)


def test_a_second_web_server_on_the_same_data_root_is_refused_and_leaves_the_first_ones_jobs(make_app, tmp_path):
    """Two servers on one queue would each take the other's running separations for a dead
    process's (marking them failed) and run queued ones twice."""
    import json
    import subprocess
    import sys

    first = make_app()
    store = first.extensions["stemlab_queue"].store
    store.create("web-0123456789ab", "web.separate", {"folder": "a" * 32, "model": "guitar"})
    store.update("web-0123456789ab", state=jobstore.RUNNING, started=time.time())
    config = {"data_root": str(tmp_path / "data"), "serving_rest_address": "127.0.0.1:9"}
    second = subprocess.run([sys.executable, "-c", "import json, sys\n"
                             "from services.frontend.app import create_app\n"
                             "create_app(json.loads(sys.argv[1]))", json.dumps(config)],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert second.returncode != 0
    assert "StoreInUseError" in second.stderr and "already running on this data root" in second.stderr
    assert store.get("web-0123456789ab").state == jobstore.RUNNING
    # Once the first has stopped, a server starts on the same root (a restart).
    first.extensions["stemlab_queue"].stop(1)
    restarted = make_app().test_client()
    # Taken up again (it has no song to separate here, so it fails; it is not left "running").
    assert wait_done(restarted, "web-0123456789ab")["state"] == "failed"


def test_cleanup_sweep_deletes_old_results(make_app):
    app = make_app(result_ttl_hours=1)
    client = app.test_client()
    job = wait_done(client, upload(client, wav_bytes(song(1.0), 44100)).get_json()["id"])
    queue = app.extensions["stemlab_queue"]
    assert queue.sweep() == []  # young results stay
    assert len(queue.sweep(now=time.time() + 3601)) == 1
    after = client.get(f"/api/separations/{job['id']}").get_json()
    assert after["expired"] and "deleted" in after["error"] and "instrument" not in after["links"]
    gone = client.get(job["links"]["instrument"]["wav"])
    assert gone.status_code == 410 and "deleted" in gone.get_json()["error"]


def test_form_without_javascript_redirects_to_the_job_page(client):
    reply = client.post("/", data={"model": "guitar", "file": (io.BytesIO(wav_bytes(song(1.0), 44100)), "a.wav")},
                        content_type="multipart/form-data")
    assert reply.status_code == 303 and reply.headers["Location"].startswith("/separations/web-")
    refused = client.post("/", data={"model": "guitar"}, content_type="multipart/form-data")
    assert refused.status_code == 400
    assert "give a file to upload or a link" in refused.get_data(as_text=True)


def test_healthz(client):
    reply = client.get("/healthz")
    assert reply.status_code == 200 and reply.get_json()["status"] == "ok"


# -- refusals -------------------------------------------------------------------------------


def assert_refused(reply, status: int, words: str):
    assert reply.status_code == status, (reply.status_code, reply.get_data(as_text=True)[:300])
    body = reply.get_json()
    assert words in body["error"], body
    assert "Traceback" not in reply.get_data(as_text=True)


def test_upload_too_big_is_refused(make_app):
    client = make_app(max_upload_mb=0.1).test_client()
    assert_refused(upload(client, wav_bytes(song(2.0), 44100)), 413, "larger than 0.1 MB")


def test_song_too_long_is_refused(make_app):
    client = make_app(max_song_seconds=1.5).test_client()
    assert_refused(upload(client, wav_bytes(song(3.0), 44100)), 400, "at most 2 s")


def test_file_that_does_not_decode_is_refused_whatever_its_name(client, tmp_path):
    assert_refused(upload(client, b"this is not audio at all" * 100, "song.mp3"), 400, "cannot be read as audio")
    assert_refused(upload(client, b"RIFF\x00\x00\x00\x00WAVEjunk" * 10, "song.wav"), 400, "cannot be read as audio")
    # Refused uploads leave nothing behind.
    assert list((tmp_path / "data" / "web" / "separations").iterdir()) == []


def test_ogg_upload_is_accepted_by_content_not_name(client):
    reply = upload(client, wav_bytes(song(1.0), 44100, "OGG"), "no-extension")
    assert reply.status_code == 202, reply.get_json()
    assert wait_done(client, reply.get_json()["id"])["state"] == "succeeded"


def test_both_or_neither_file_and_link_are_refused(client):
    assert_refused(upload(client, wav_bytes(song(1.0), 44100), url="http://127.0.0.1/a.mp3"), 400, "not both")
    assert_refused(client.post("/api/separations", data={"model": "guitar"}), 400, "give a file")
    assert_refused(client.post("/api/separations", json={"model": "guitar", "url": "  "}), 400, "give a file")


@pytest.mark.parametrize("url", ["ftp://example.com/song.mp3", "file:///etc/passwd", "javascript:alert(1)", "example.com/a.mp3"])
def test_links_other_than_http_are_refused(client, url):
    assert_refused(client.post("/api/separations", json={"model": "guitar", "url": url}), 400, "only http and https")


@pytest.mark.parametrize("url", ["http://10.1.2.3/song.mp3", "http://192.168.0.7:8080/a", "http://[::1]/a",
                                 "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/a"])
def test_private_addresses_are_refused(client, url):
    assert_refused(client.post("/api/separations", json={"model": "guitar", "url": url}), 400, "private or local")


def test_loopback_is_refused_unless_allowed(make_app):
    client = make_app(allow_hosts=[]).test_client()
    assert_refused(client.post("/api/separations", data={"model": "guitar", "url": "http://localhost:9/a.mp3"}),
                   400, "private or local address (127.0.0.1)")


def test_public_address_passes_the_link_check():
    public = lambda host: [ipaddress.ip_address("93.184.216.34")]  # noqa: E731
    assert links.check_url(" https://example.com/watch?v=1 ", resolve=public) == "https://example.com/watch?v=1"
    with pytest.raises(links.LinkError, match="user name"):
        links.check_url("https://user:pw@example.com/", resolve=public)


class _Redirect(http.server.BaseHTTPRequestHandler):
    """Serves `body` to the first request (what yt-dlp inspects) and redirects every later one
    (the download) to `target`: the redirect the link check cannot see."""

    target, body, seen = "", b"", [0]

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.seen[0] += 1
        if self.seen[0] == 1:
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
            return
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(handler, host="127.0.0.1"):
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_redirect_from_an_allowed_host_to_an_internal_one_is_refused(tmp_path):
    """127.0.0.2 stands for a public host (allowed); at download time it redirects to 127.0.0.1,
    which is not allowed."""
    served = tmp_path / "www"
    served.mkdir()
    (served / "song.wav").write_bytes(wav_bytes(song(1.0, rate=22050), 22050))
    inside = _serve(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served)))
    target = f"http://127.0.0.1:{inside.server_address[1]}/song.wav"
    seen = [0]
    handler = type("R", (_Redirect,), {"target": target, "body": b"RIFF-not-the-song", "seen": seen})
    outside = _serve(handler, "127.0.0.2")
    try:
        url = f"http://127.0.0.2:{outside.server_address[1]}/song.wav"
        with pytest.raises(links.LinkError, match=r"private or local address \(127\.0\.0\.1\)"):
            links.download(url, tmp_path / "dl", 10_000_000, 60, 30, allow_hosts=["127.0.0.2"])
        assert seen[0] >= 2 and not list((tmp_path / "dl").glob("download.*"))
        # The same redirect is followed when its target is allowed too.
        seen[0] = 0
        got = links.download(url, tmp_path / "ok", 10_000_000, 60, 30, allow_hosts=["127.0.0.0/8"])
        assert got.read_bytes() == (served / "song.wav").read_bytes()
    finally:
        inside.shutdown()
        outside.shutdown()


def test_the_guard_checks_the_address_it_connects_to(monkeypatch):
    """A host that resolves to a public address when the link is checked and to an internal one
    when the download connects (DNS rebinding) is refused at connect time; CONNECT is guarded too."""
    import socket
    import urllib.error
    import urllib.request

    answers = iter([[ipaddress.ip_address("93.184.216.34")]])
    monkeypatch.setattr(egress, "resolve_host", lambda host: next(answers, [ipaddress.ip_address("127.0.0.1")]))
    assert links.check_url("http://rebind.example/a.mp3", resolve=egress.resolve_host) == "http://rebind.example/a.mp3"
    with links.EgressGuard() as guard:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": guard.url}))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open("http://rebind.example/a.mp3", timeout=10)
        assert refused.value.code == 403 and "private or local address (127.0.0.1)" in guard.refusals[0]
        with socket.create_connection(("127.0.0.1", int(guard.url.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(b"CONNECT rebind.example:443 HTTP/1.1\r\nHost: rebind.example:443\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 403")
    # An allowed address is proxied, CONNECT included (bytes relayed both ways).
    echo = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: (lambda c: c[0].sendall(c[0].recv(5)))(echo.accept()), daemon=True).start()
    monkeypatch.setattr(egress, "resolve_host", lambda host: [ipaddress.ip_address("127.0.0.1")])
    with links.EgressGuard(["127.0.0.1"]) as guard:
        with socket.create_connection(("127.0.0.1", int(guard.url.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(f"CONNECT echo.test:{echo.getsockname()[1]} HTTP/1.1\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
    echo.close()


def test_the_page_offers_the_names_the_serving_config_lists(make_app, tmp_path):
    """A model exported under a name of its own is added to DATA/serving/models.config: the page
    offers it without a restart (unavailable until serving has it); STEMLAB_WEB_MODELS pins the list."""
    from services.common import models_config

    client = make_app().test_client()
    path = models_config.config_path(tmp_path / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(models_config.render({n: tmp_path / "models" / n for n in ("guitar", "piano", "bass")}))
    models = {m["name"]: m for m in client.get("/api/models").get_json()["models"]}
    assert list(models) == ["guitar", "piano", "bass"] and models["guitar"]["available"]
    assert not models["bass"]["available"]
    assert_refused(upload(client, wav_bytes(song(1.0), 44100), model="bass"), 400, "not available")
    pinned = make_app(models=["guitar"], data_root=str(tmp_path / "pinned")).test_client()
    assert [m["name"] for m in pinned.get("/api/models").get_json()["models"]] == ["guitar"]


def test_unknown_and_unavailable_models_are_refused(client):
    data = wav_bytes(song(1.0), 44100)
    assert_refused(upload(client, data, model="drums"), 400, "unknown model 'drums'")
    assert_refused(upload(client, data, model="piano"), 400, "not available")
    assert_refused(upload(client, data, model=""), 400, "choose a model")


def test_unknown_ids_and_files_are_404(client):
    assert_refused(client.get("/api/separations/web-000000000000"), 404, "no separation")
    assert_refused(client.get("/api/separations/../../etc"), 404, "")
    assert_refused(client.get("/api/separations/web-000000000000/instrument.wav"), 404, "no separation")
    assert client.get("/api/separations/web-000000000000/instrument.exe").status_code == 404
    assert client.get("/separations/nope").status_code == 404
    assert "no separation" in client.get("/separations/nope").get_data(as_text=True)


def test_results_of_an_unfinished_job_are_409(make_app):
    client = make_app(start_workers=False).test_client()
    job = upload(client, wav_bytes(song(1.0), 44100)).get_json()
    assert_refused(client.get(f"/api/separations/{job['id']}/instrument.wav"), 409, "is queued")


def test_full_queue_is_refused_until_a_place_frees(make_app):
    client = make_app(start_workers=False, max_queued=2).test_client()
    data = wav_bytes(song(1.0), 44100)
    first = upload(client, data).get_json()
    assert upload(client, data).status_code == 202
    full = upload(client, data)
    assert_refused(full, 503, "try again")
    assert full.headers["Retry-After"] == "60"  # what a client program waits before trying again
    client.post(first["links"]["cancel"])
    assert upload(client, data).status_code == 202


def test_serving_down_is_a_message_not_a_crash(make_app):
    client = make_app(serving_rest_address="127.0.0.1:9", serving_address="127.0.0.1:9").test_client()
    assert_refused(client.get("/api/models"), 503, "serving is not reachable")
    assert_refused(upload(client, wav_bytes(song(1.0), 44100)), 503, "serving is not reachable")
    page = client.get("/")
    assert page.status_code == 200 and "No model can be used right now" in page.get_data(as_text=True)


def test_wrong_method_and_unknown_route_are_json_errors(client):
    assert_refused(client.delete("/api/models"), 405, "")
    assert_refused(client.get("/api/nothing"), 404, "")


def test_settings_come_from_the_environment_and_are_validated(monkeypatch, tmp_path):
    from services.common.config import ConfigError
    from services.frontend.settings import load_settings

    monkeypatch.setenv("STEMLAB_DATA", str(tmp_path))
    monkeypatch.setenv("STEMLAB_WEB_MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("STEMLAB_WEB_ALLOW_HOSTS", "127.0.0.1, 10.0.0.0/8")
    monkeypatch.setenv("STEMLAB_WEB_WORKERS", "3")
    monkeypatch.setenv("STEMLAB_SERVING_ADDRESS", "serving.example:9000")
    settings = load_settings({"max_song_seconds": 30})
    assert settings.max_upload_bytes == 3 * 1024 * 1024 and settings.max_song_seconds == 30
    assert settings.allow_hosts == ["127.0.0.1", "10.0.0.0/8"] and settings.workers == 3
    assert settings.serving_address == "serving.example:9000" and settings.web_root == tmp_path.resolve() / "web"
    monkeypatch.setenv("STEMLAB_WEB_MAX_UPLOAD_MB", "lots")
    with pytest.raises(ConfigError, match="max_upload_mb"):
        load_settings()
    monkeypatch.setenv("STEMLAB_WEB_MAX_UPLOAD_MB", "3")
    with pytest.raises(ConfigError, match="allow_hosts"):
        load_settings({"allow_hosts": "intranet.local"})


# -- pure parts -----------------------------------------------------------------------------


def test_envelope_keeps_peaks_of_every_stretch():
    audio = np.zeros((2, 1000), np.float32)
    audio[0, 10] = 0.9
    audio[1, 990] = -0.7
    lows, highs = envelope(audio, 10)
    assert lows.shape == highs.shape == (10,)
    assert highs[0] == pytest.approx(0.9) and lows[-1] == pytest.approx(-0.7)
    assert highs[1:].max() == 0 and lows[:-1].min() == 0


# -- the review page, against a real ingestion service ------------------------------------


@pytest.fixture(scope="module")
def ingestion(tmp_path_factory):
    from services.common.library import Library, Stem, Track
    from tests.servicetools import ServiceProcess

    data = tmp_path_factory.mktemp("ingestion-data")
    library = Library(data)
    rate = 22050
    for index in (1, 2):
        track = Track(id=f"Synth_Song00{index}", source="synthetic", title=f"Synth Song 00{index}", rate=rate,
                      channels=1, duration_seconds=6.0)
        folder = library.track_dir(track.id) / "stems"
        folder.mkdir(parents=True)
        audio = np.zeros(6 * rate, np.float32)
        audio[rate:5 * rate] = song(4.0, rate=rate, channels=1, seed=index)[0]  # 1 s of silence each side
        sf.write(folder / "S01.wav", audio, rate)
        sf.write(folder / "S02.wav", 0.5 * audio, rate)
        track.stems = [Stem("stems/S01.wav", "clean electric guitar", "guitar"),
                       Stem("stems/S02.wav", "electric bass", "bass")]
        if index == 2:
            track.suggestions = [{"check": "bleed", "instrument": "guitar", "mark": "bleed", "stem": "stems/S01.wav",
                                  "evidence": {"correlation": 0.91}}]
        library.save(track)
    with ServiceProcess("ingestion", data) as process:
        yield process, library


def authorized(client):
    """A test client that sends the stack's token, as a reviewer's script would."""
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {os.environ['STEMLAB_TOKEN']}"
    return client


@pytest.fixture
def review_client(tmp_path, ingestion):
    process, _ = ingestion
    app = create_app({"data_root": str(tmp_path / "data"), "ingestion_address": process.address,
                      "start_workers": False})
    return authorized(app.test_client())


def test_review_page_lists_tracks_with_their_suggestions(review_client):
    page = review_client.get("/review?instrument=guitar").get_data(as_text=True)
    assert "Synth Song 001" in page and "Synth Song 002" in page
    assert "bleed (stems/S01.wav)" in page  # the check's suggestion beside the track
    for mark in ("missing", "bleed", "bad_quality", "inaudible", "mislabeled", "detailed", "checked"):
        assert f'data-mark="{mark}"' in page
    assert "Synth Song" not in review_client.get("/review?instrument=piano").get_data(as_text=True)


def test_review_track_has_five_parts_of_the_trimmed_stem(review_client):
    track = review_client.get("/api/review/tracks/Synth_Song001?instrument=guitar").get_json()
    assert track["stems"] == ["stems/S01.wav"]
    assert len(track["parts"]) == 5
    # The silence at both ends is trimmed: the parts cover about 1 s .. 5 s.
    assert track["parts"][0]["start_seconds"] == pytest.approx(1.0, abs=0.15)
    assert track["parts"][-1]["end_seconds"] == pytest.approx(5.0, abs=0.15)
    reply = review_client.get("/api/review/tracks/Synth_Song001/parts/2.wav?instrument=guitar")
    assert reply.status_code == 200 and reply.mimetype == "audio/wav"
    audio, rate = sf.read(io.BytesIO(reply.data))
    assert rate == 22050 and len(audio) / rate == pytest.approx(0.8, abs=0.1)
    assert np.abs(audio).max() > 0.1


def test_marks_are_saved_through_the_ingestion_service(review_client, ingestion):
    _, library = ingestion
    reply = review_client.put("/api/review/tracks/Synth_Song002/marks/bleed?instrument=guitar")
    assert reply.status_code == 200 and reply.get_json()["marks"] == ["bleed"]
    assert library.load("Synth_Song002").has_mark("guitar", "bleed")
    reply = review_client.delete("/api/review/tracks/Synth_Song002/marks/bleed?instrument=guitar")
    assert reply.get_json()["marks"] == []
    assert not library.load("Synth_Song002").has_mark("guitar", "bleed")


def test_the_review_list_shows_what_is_left_to_check(review_client, ingestion):
    _, library = ingestion
    review_client.put("/api/review/tracks/Synth_Song001/marks/checked?instrument=guitar")
    try:
        left = review_client.get("/api/review/tracks?instrument=guitar&unchecked=1").get_json()["tracks"]
        assert [t["id"] for t in left] == ["Synth_Song002"]
        page = review_client.get("/review?instrument=guitar&unchecked=1").get_data(as_text=True)
        assert "Synth Song 002" in page and "Synth Song 001" not in page and "<strong>not yet checked</strong>" in page
        assert len(review_client.get("/api/review/tracks?instrument=guitar").get_json()["tracks"]) == 2
    finally:
        review_client.delete("/api/review/tracks/Synth_Song001/marks/checked?instrument=guitar")


def test_a_reviewer_confirms_or_changes_a_stems_class(review_client, ingestion):
    _, library = ingestion
    track = review_client.get("/api/review/tracks/Synth_Song001?instrument=guitar").get_json()
    assert {s["file"]: (s["class"], s["suggested"]) for s in track["all_stems"]} == {
        "stems/S01.wav": ("guitar", False), "stems/S02.wav": ("bass", False)}
    url = "/api/review/tracks/Synth_Song001/stems/stems/S02.wav/class?instrument=guitar"
    try:
        changed = review_client.put(url, json={"class": None}).get_json()
        assert [s["class"] for s in changed["all_stems"]] == ["guitar", None]
        assert library.load("Synth_Song001").stems[1].cls is None
        assert_refused(review_client.put(url, json={"class": "kazoo"}), 400, "unknown class 'kazoo'")
        assert_refused(review_client.put(url, data="bass"), 400, 'send JSON {"class": CLASS}')
    finally:
        assert review_client.put(url, json={"class": "bass"}).status_code == 200
    assert library.load("Synth_Song001").stems[1].cls == "bass"
    page = review_client.get("/review?instrument=guitar").get_data(as_text=True)
    assert 'id="stem-classes"' in page and "guitar,bass,drums" in page


def test_review_refusals(review_client):
    assert_refused(review_client.put("/api/review/tracks/Synth_Song001/marks/audible?instrument=guitar"), 400, "unknown mark")
    assert_refused(review_client.put("/api/review/tracks/Nope/marks/checked?instrument=guitar"), 404, "Nope")
    assert_refused(review_client.get("/api/review/tracks?instrument=kazoo"), 400, "unknown instrument")
    assert_refused(review_client.get("/api/review/tracks/Synth_Song001/parts/7.wav?instrument=guitar"), 400, "part")
    assert_refused(review_client.get("/api/review/tracks/Synth_Song001?instrument=piano"), 404, "no piano stems")
    assert_refused(review_client.put("/api/review/tracks/Synth_Song001/marks/checked?instrument=vocals"), 409,
                   "has no vocals stem")


def test_review_page_says_when_ingestion_is_down(tmp_path):
    app = create_app({"data_root": str(tmp_path / "data"), "ingestion_address": "127.0.0.1:9", "start_workers": False})
    page = authorized(app.test_client()).get("/review")
    assert page.status_code == 200 and "not reachable" in page.get_data(as_text=True)
    assert_refused(authorized(app.test_client()).get("/api/review/tracks"), 503, "not reachable")


def _ffmpeg(*args: str, out: Path) -> bytes:
    import subprocess

    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, str(out)], check=True, timeout=120)
    return out.read_bytes()


def test_a_vbr_mp3_without_its_length_header_is_judged_by_its_samples(client, tmp_path):
    # A quiet start (low bitrate frames) makes the header estimate the 15 s song at about 34 s:
    # refused before, although it fits the 20 s limit.
    quiet_then_loud = _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo:d=3", "-f", "lavfi", "-i",
                              "anoisesrc=d=12:c=white:r=44100:a=0.5", "-filter_complex", "[0][1]concat=n=2:v=0:a=1",
                              "-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0", out=tmp_path / "long.mp3")
    job = wait_done(client, upload(client, quiet_then_loud, "vbr.mp3").get_json()["id"])
    assert job["state"] == "succeeded" and abs(job["result"]["seconds"] - 15.0) < 0.2, job
    # The other way (loud first, a long quiet end: 43 s, estimated at 13): the header says short, the worker counts
    # the samples before it separates and refuses at once, not after separating everything.
    loud_then_quiet = _ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=3:c=white:r=44100:a=0.5", "-f", "lavfi", "-i",
                              "anullsrc=r=44100:cl=mono:d=40", "-filter_complex", "[0][1]concat=n=2:v=0:a=1",
                              "-c:a", "libmp3lame", "-q:a", "0", "-write_xing", "0", out=tmp_path / "short.mp3")
    reply = upload(client, loud_then_quiet, "vbr2.mp3")
    assert reply.status_code == 202, reply.get_json()
    job = wait_done(client, reply.get_json()["id"])
    assert job["state"] == "failed" and "the song is longer than 20 s; at most 20 s" in job["error"], job
    assert job["progress"] < 0.05  # refused while reading, before any separating


def test_the_sound_of_common_video_files_is_separated(client, tmp_path):
    for suffix in (".avi", ".mpg", ".flv"):
        video = _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-ac", "2", out=tmp_path / f"v{suffix}")
        job = wait_done(client, upload(client, video, f"clip{suffix}").get_json()["id"])
        assert job["state"] == "succeeded" and abs(job["result"]["seconds"] - 2.0) < 0.1, (suffix, job)
    reply = upload(client, b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(4000), "broken.avi")
    assert reply.status_code == 400 and "Invalid argument" not in reply.get_json()["error"]


def test_a_song_above_full_scale_gives_stems_that_do_not_clip_and_still_add_up(client, tmp_path):
    hot = song(2.0, rate=44100, channels=2, noise=0.0)
    hot = 4.0 * hot / np.abs(hot).max()  # a float WAV peaking 12 dB over full scale
    job = wait_done(client, upload(client, wav_bytes(hot, 44100), "hot.wav").get_json()["id"])
    assert job["state"] == "succeeded", job
    gain = 10 ** (job["result"]["gain_db"] / 20)
    assert -12.1 < job["result"]["gain_db"] < -3.0
    for fmt, tolerance in (("wav", 1e-6), ("flac", 1e-4)):
        instrument, _ = decode(client, job["links"]["instrument"][fmt], tmp_path)
        rest, _ = decode(client, job["links"]["rest"][fmt], tmp_path)
        assert max(np.abs(instrument).max(), np.abs(rest).max()) <= 1.0
        fitted = float(np.sum((instrument + rest) * hot) / np.sum(hot * hot))  # one gain for the whole song
        assert fitted == pytest.approx(gain, rel=1e-3)
        np.testing.assert_allclose(instrument + rest, fitted * hot, atol=tolerance)
    page = client.get(job["links"]["page"]).get_data(as_text=True)
    assert "The song went above full scale" in page


def test_a_separation_starts_again_when_serving_restarts_under_it(tmp_path, caplog):
    models = build_models(tmp_path / "serving")
    first = ServingProcess(models, tmp_path / "serving.log").__enter__()
    app = create_app({"data_root": str(tmp_path / "data"), "serving_address": first.grpc_address,
                      "serving_rest_address": first.rest_address, "model_status_cache_seconds": 0,
                      "segment_seconds": 0.25})
    second = None
    caplog.set_level("WARNING", logger="services.frontend.separations")
    try:
        client = app.test_client()
        job_id = upload(client, wav_bytes(song(240.0, rate=22050, channels=1), 22050, "FLAC"), "long.flac"
                        ).get_json()["id"]
        wait_until(lambda: client.get(f"/api/separations/{job_id}").get_json()["progress"] > 0.2, 60)
        assert client.get(f"/api/separations/{job_id}").get_json()["state"] == "running"
        first.__exit__()  # serving goes away mid-song (a restart of the stack) ...
        second = ServingProcess(models, tmp_path / "serving2.log")
        second.grpc_port, second.rest_port = first.grpc_port, first.rest_port
        second.__enter__()  # ... and comes back on the same ports
        done = wait_done(client, job_id, timeout=120)
        assert done["state"] == "succeeded", done
        assert "serving went away during a separation" in caplog.text
    finally:
        app.extensions["stemlab_queue"].stop(2)
        for process in (first, second):
            if process is not None:
                process.__exit__()

"""Hostile inputs: what an attacker on the same network (or a careless upload) sends, each refused
with a clear error while the service stays up and nothing is lost. See docs/security.md.

Every case calls `tried(...)`; the count is printed in the pytest summary (tests/conftest.py).
"""

from __future__ import annotations

import os
import stat
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth
from stemlab.v1 import ingestion_pb2, ingestion_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.servicetools import ServiceProcess

TRIED: list[str] = []


def tried(what: str) -> None:
    """Count one hostile input (the summary prints how many were tried, all of them refused)."""
    TRIED.append(what)


def refused(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, (error.value.code(), error.value.details())
    for word in words:
        assert word in error.value.details(), error.value.details()
    return error.value.details()


# -- 1. authentication ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_token_service(tmp_path_factory):
    """An ingestion service whose token is the one it creates in its data root (no override)."""
    data = tmp_path_factory.mktemp("auth") / "data"
    with ServiceProcess("ingestion", data, env={"STEMLAB_TOKEN": ""}) as svc:
        yield svc, data


def test_a_service_creates_a_private_token_and_never_overwrites_it(own_token_service, monkeypatch):
    svc, data = own_token_service
    path = auth.token_path(data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = path.read_text()
    monkeypatch.delenv("STEMLAB_TOKEN")
    assert auth.ensure_token(data) == first.strip()  # a second start reads it, never replaces it
    assert path.read_text() == first


def test_concurrent_token_creation_agrees(tmp_path, monkeypatch):
    monkeypatch.delenv("STEMLAB_TOKEN")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(auth.ensure_token(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert [p.name for p in auth.token_path(tmp_path).parent.iterdir()] == ["token"]  # no temporary left


def test_unauthenticated_grpc_calls_are_refused(own_token_service):
    svc, data = own_token_service
    anonymous = grpc.insecure_channel(svc.address)
    wrong = auth.open_channel(svc.address, token="not-the-token-of-this-stack")
    dataset = ingestion_pb2_grpc.DatasetServiceStub(anonymous)
    jobs = jobs_pb2_grpc.JobsStub(anonymous)
    tried("ListTracks without a token")
    refused(lambda: dataset.ListTracks(ingestion_pb2.ListTracksRequest(), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED, "needs the stack's token", "no token")
    tried("ListTracks with a wrong token")
    refused(lambda: ingestion_pb2_grpc.DatasetServiceStub(wrong).ListTracks(ingestion_pb2.ListTracksRequest(), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED, "wrong token")
    tried("StartImport of a server path without a token")
    refused(lambda: dataset.StartImport(ingestion_pb2.ImportRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED)
    tried("CancelJob without a token")
    refused(lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(id="ingestion-x"), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED)
    tried("WatchJob (a stream) without a token")
    refused(lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(id="ingestion-x"), timeout=10)),
            grpc.StatusCode.UNAUTHENTICATED)
    tried("server reflection without a token")
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    refused(lambda: list(reflection_pb2_grpc.ServerReflectionStub(anonymous).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)),
            grpc.StatusCode.UNAUTHENTICATED)
    # Probes need no secret; the token of the data root opens everything else.
    status = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    owner = auth.open_channel(svc.address, token=auth.token_path(data).read_text().strip())
    assert ingestion_pb2_grpc.DatasetServiceStub(owner).ListTracks(ingestion_pb2.ListTracksRequest(), timeout=10).total == 0
    assert svc.proc.poll() is None


def test_the_review_pages_need_the_token(tmp_path):
    from services.frontend.app import create_app

    app = create_app({"data_root": str(tmp_path / "data"), "ingestion_address": "127.0.0.1:9", "start_workers": False})
    client = app.test_client()
    tried("review API without a token")
    reply = client.put("/api/review/tracks/Any/marks/bleed?instrument=guitar")
    assert reply.status_code == 401 and "needs the stack's token" in reply.get_json()["error"]
    tried("review page without a token")
    page = client.get("/review")
    assert page.status_code == 401 and "Log in" in page.get_data(as_text=True)
    tried("review API with a wrong bearer token")
    assert client.get("/api/review/tracks", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    tried("review login with a wrong token")
    assert client.post("/login", data={"token": "wrong-token-0123456789"}).status_code == 401
    tried("login redirect to another site")
    # Browsers drop a tab or newline and read a backslash as a slash: each of these led off-site.
    for target in ("//evil.example/", "/\t/evil.example/phish", "/\n/evil.example", "/\\evil.example",
                   "https://evil.example/"):
        reply = client.post("/login", data={"token": os.environ["STEMLAB_TOKEN"], "next": target})
        assert reply.status_code == 302 and reply.headers["Location"] == "/review", (target, reply.headers)
    reply = client.post("/login", data={"token": os.environ["STEMLAB_TOKEN"], "next": "/review?track=A"})
    assert reply.headers["Location"] == "/review?track=A"
    # Logged in: the session cookie opens the review API (503 here: no ingestion behind it).
    assert client.get("/api/review/tracks").status_code == 503
    # The separation API stays public.
    assert app.test_client().get("/api/models").status_code in (200, 503)


# -- 3. paths ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked_ingestion(tmp_path_factory):
    """An ingestion service with no import roots: only its data root may be read."""
    root = tmp_path_factory.mktemp("paths")
    with ServiceProcess("ingestion", root / "data", env={"STEMLAB_IMPORT_ROOTS": ""}) as svc:
        yield svc, root


def test_paths_outside_the_data_root_are_refused(locked_ingestion):
    svc, root = locked_ingestion
    stub = ingestion_pb2_grpc.DatasetServiceStub(svc.channel())
    (root / "data" / "escape").symlink_to("/etc")
    outside = root / "music"
    outside.mkdir()
    cases = {
        "an absolute server path": ingestion_pb2.ImportRequest(format="stems", path="/etc"),
        "a path that does not exist (no existence oracle)": ingestion_pb2.ImportRequest(format="stems", path="/nonexistent-stemlab"),
        "a symlink in the data root leading out": ingestion_pb2.ImportRequest(format="stems", path="escape"),
        "a folder outside the import roots": ingestion_pb2.ImportRequest(format="stems", path=str(outside)),
        "a local solo file outside": ingestion_pb2.ImportRequest(format="solo", path="/etc/hostname", instrument="guitar"),
        "a track list's root map to /etc": ingestion_pb2.ImportRequest(format="tracklist", path="escape",
                                                                       root_map=["/old=/etc"]),
    }
    for what, request in cases.items():
        tried(f"import: {what}")
        refused(lambda request=request: stub.StartImport(request, timeout=10), grpc.StatusCode.PERMISSION_DENIED,
                "outside the folders this service may read")
    tried("a relative path with ..")
    refused(lambda: stub.StartImport(ingestion_pb2.ImportRequest(format="stems", path="../x"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "'..'")
    tried("synth: a soundfont at a server path")
    refused(lambda: stub.GenerateSynthetic(ingestion_pb2.GenerateSyntheticRequest(
        out_dir="synthetic/x", songs=1, seconds=5, soundfont="/etc/passwd"), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED, "soundfont")
    tried("solo import of a link to a carrier-grade NAT address")
    refused(lambda: stub.StartImport(ingestion_pb2.ImportRequest(format="solo", url="http://100.64.0.1/a.mp3",
                                                                 instrument="guitar"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "private or local address")
    assert svc.proc.poll() is None


def test_evaluation_talks_only_to_configured_serving_and_reads_only_allowed_folders(tmp_path):
    from stemlab.v1 import evaluation_pb2, evaluation_pb2_grpc

    with ServiceProcess("evaluation", tmp_path / "data", env={"STEMLAB_IMPORT_ROOTS": ""}) as svc:
        stub = evaluation_pb2_grpc.EvaluationServiceStub(svc.channel())
        tried("evaluation: validation audio to an address the request names")
        refused(lambda: stub.StartEvaluation(evaluation_pb2.StartEvaluationRequest(
            model="guitar", dataset="any", serving_address="attacker.example:8500"), timeout=30),
            grpc.StatusCode.PERMISSION_DENIED, "not configured")
        for field in ("estimates_dir", "saved_model_dir"):
            tried(f"evaluation: {field} at a server path")
            refused(lambda field=field: stub.StartEvaluation(evaluation_pb2.StartEvaluationRequest(
                dataset="any", **{field: "/etc"}), timeout=30), grpc.StatusCode.PERMISSION_DENIED, field)


# -- 5. the link guard -------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["100.64.0.1", "100.100.100.200", "2002:c0a8:0101::1", "2001:0:4136:e378::1",
                                     "64:ff9b::a00:1", "::ffff:10.0.0.1", "192.0.0.1", "198.18.0.1", "fd00::1"])
def test_the_link_guard_refuses_every_address_that_is_not_global(address):
    import ipaddress

    from services.common import egress

    tried(f"link to {address}")
    with pytest.raises(egress.LinkError, match="private or local address"):
        egress.check_url("https://songs.example/a.mp3", resolve=lambda host: [ipaddress.ip_address(address)])


def test_the_link_guard_has_a_port_policy():
    import ipaddress

    from services.common import egress

    public = lambda host: [ipaddress.ip_address("93.184.216.34")]  # noqa: E731
    assert egress.check_url("https://songs.example/a.mp3", resolve=public)
    assert egress.check_url("http://songs.example:80/a.mp3", resolve=public)
    for url in ("http://songs.example:22/", "https://songs.example:6379/", "http://songs.example:8500/"):
        tried(f"link on a refused port: {url}")
        with pytest.raises(egress.LinkError, match="only ports 80, 443"):
            egress.check_url(url, resolve=public)


class _Drip:
    """A local web server that answers with a page dripping one byte at a time, or endless bytes."""

    def __init__(self, mode: str):
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                try:
                    while not outer.stop.is_set():
                        if mode == "drip":
                            self.wfile.write(b"<")
                            self.wfile.flush()
                            outer.stop.wait(1.0)
                        else:
                            self.wfile.write(b"<p>" * 20000)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.stop = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/song"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_dripping_page_is_cut_off_at_the_total_time_limit(tmp_path):
    import time

    from services.common import egress

    tried("a page that drips one byte a second")
    with _Drip("drip") as drip:
        started = time.monotonic()
        with pytest.raises(egress.LinkError, match="longer than 3 s"):
            egress.fetch(drip.url, tmp_path, 10_000_000, 600, 3.0, allow_hosts=["127.0.0.1"])
        assert time.monotonic() - started < 15


def test_an_endless_page_is_cut_off_at_the_byte_budget(tmp_path):
    from services.common import egress

    tried("a page that never ends")
    with _Drip("flood") as flood:
        with pytest.raises(egress.LinkError, match="more than"):
            egress.fetch(flood.url, tmp_path, 1_000_000, 600, 60.0, allow_hosts=["127.0.0.1"])


def test_solo_imports_of_links_go_through_the_guard(tmp_path):
    from services.common.library import Library
    from services.common.paths import DataRoot
    from services.ingestion.solo import SoloImportError, import_solo

    library = Library(DataRoot(tmp_path / "data").ensure())
    with _Drip("drip") as drip:
        tried("solo import of a link to this machine")
        with pytest.raises(SoloImportError, match="private or local address"):
            import_solo(library, drip.url, "guitar")


# -- 7. serving's input limits and its admin RPC ------------------------------------------------
@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    from services.serving.local import running_server, write_config
    from services.serving.reference_models import save_gain_model

    root = tmp_path_factory.mktemp("serving")
    save_gain_model(root / "models" / "guitar" / "1", gain=0.5)
    config = write_config(root / "models.config", {"guitar": root / "models" / "guitar"})
    with running_server(config, root / "server.log", ready_model="guitar",
                        extra_args=("--rest_api_max_request_mb", "1")) as server:
        yield server, root


def _rss_peak_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_serving_checks_size_dtype_shape_and_values_before_allocating(serving):
    import numpy as np
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    server, _ = serving
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc_address))

    def request(tensor):
        message = predict_pb2.PredictRequest()
        message.model_spec.name = "guitar"
        message.inputs["waveform"].CopyFrom(tensor)
        return message

    def tensor(shape, dtype=types_pb2.DT_FLOAT, **values):
        return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in shape]), **values)

    before = _rss_peak_mb(server.process.pid)
    bomb = request(tensor([1, 200_000_000], float_val=[1.0]))
    assert bomb.ByteSize() < 64  # the 45-byte request
    tried("Predict: 45 bytes claiming shape [1, 2e8]")
    refused(lambda: stub.Predict(bomb, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "values")
    tried("Predict: shape beyond the element limit with matching content claim")
    refused(lambda: stub.Predict(request(tensor([1 << 20, 1 << 20], float_val=[1.0])), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "more than the limit")
    tried("Predict: a negative dimension")
    refused(lambda: stub.Predict(request(tensor([1, -5], float_val=[1.0])), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT, "negative")
    tried("Predict: float64 where the signature takes float32")
    refused(lambda: stub.Predict(request(tensor([1, 2], dtype=types_pb2.DT_DOUBLE, double_val=[1.0, 2.0])),
                                 timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "float32")
    tried("Predict: content shorter than the shape")
    refused(lambda: stub.Predict(request(tensor([1, 4], tensor_content=np.zeros(2, np.float32).tobytes())),
                                 timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "holds 2")
    for value in (float("nan"), float("inf")):
        tried(f"Predict: a {value} sample")
        refused(lambda value=value: stub.Predict(request(tensor([1, 2], float_val=[0.1, value])), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite")
    assert _rss_peak_mb(server.process.pid) - before < 100  # nothing near 763 MB was allocated
    good = stub.Predict(request(tensor([1, 2], float_val=[0.5, 1.0])), timeout=30)
    assert list(good.outputs["instrument"].float_val or np.frombuffer(good.outputs["instrument"].tensor_content,
                                                                         np.float32)) == [0.25, 0.5]


def test_serving_rest_caps_the_body_and_refuses_non_finite_samples(serving):
    import json
    import urllib.error
    import urllib.request

    server, _ = serving

    def post(body: bytes):
        req = urllib.request.Request(f"http://{server.rest_address}/v1/models/guitar:predict", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    tried("REST: a 2 MB body (limit 1 MB)")
    status, body = post(json.dumps({"instances": [[0.0] * 400_000]}).encode())
    assert status == 413 and "larger than the limit" in body["error"]
    for value in ("NaN", "Infinity", "-Infinity"):
        tried(f"REST: a {value} sample")
        status, body = post(f'{{"instances": [[0.1, {value}]]}}'.encode())
        assert status == 400 and "NaN or infinite" in body["error"]
    assert post(b'{"instances": [[0.5, 1.0]]}')[1]["predictions"][0]["instrument"] == [0.25, 0.5]


def test_serving_admin_rpc_needs_the_token_and_stays_under_the_model_folders(serving):
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    server, root = serving

    def reload(base_path: str):
        config = model_server_config_pb2.ModelServerConfig()
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = "guitar", base_path, "tensorflow"
        return model_management_pb2.ReloadConfigRequest(config=config)

    anonymous = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.grpc_address))
    owner = model_service_pb2_grpc.ModelServiceStub(auth.open_channel(server.grpc_address, token=auth.client_token()))
    tried("HandleReloadConfigRequest without a token (unload every model)")
    refused(lambda: anonymous.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED)
    for where in ("/etc", str(root / "models" / ".." / ".."), str(root)):
        tried(f"HandleReloadConfigRequest pointing a model at {where}")
        refused(lambda where=where: owner.HandleReloadConfigRequest(reload(where), timeout=30),
                grpc.StatusCode.PERMISSION_DENIED, "outside the model folders")
    # The served model is untouched, and a reload inside the folders works.
    assert owner.HandleReloadConfigRequest(reload(str(root / "models" / "guitar")), timeout=60).status.error_code == 0


# -- 4. bounded decoding -----------------------------------------------------------------------
def _peak_mb(fn) -> tuple[object, float]:
    """fn()'s result (or exception) and the peak of Python-side allocations (numpy included) in MB."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = fn()
        except Exception as error:  # noqa: BLE001 - returned to the test
            result = error
        return result, tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def flac_bomb(tmp_path_factory):
    """30 s of silence, 8 channels at 655,340 Hz: a few hundred KB that decode to 629 MB of float32."""
    import numpy as np
    import soundfile as sf

    path = tmp_path_factory.mktemp("bomb") / "bomb.flac"
    with sf.SoundFile(path, "w", samplerate=655_340, channels=8, subtype="PCM_16", format="FLAC") as handle:
        block = np.zeros((655_340, 8), np.int16)
        for _ in range(30):
            handle.write(block)
    assert path.stat().st_size < 400_000
    return path


def test_a_decoding_bomb_stops_at_the_byte_cap(flac_bomb):
    from services.common.audio import AudioError, DecodeLimits, read_audio

    tried("FLAC bomb: 8 channels at 655 kHz, decoded as is")
    error, peak = _peak_mb(lambda: read_audio(flac_bomb, limits=DecodeLimits(max_bytes=64 << 20)))
    assert isinstance(error, AudioError) and "decodes to more than 64 MiB" in str(error), error
    assert peak < 3 * 64 + 20, peak  # blocks read before the cap, nothing near 629 MB


def test_a_decoding_bomb_is_converted_while_decoding_for_the_web(flac_bomb, tmp_path):
    import time

    from services.common.audio import read_audio
    from services.frontend.settings import load_settings

    limits = load_settings({"data_root": str(tmp_path)}).decode_limits
    tried("FLAC bomb through the web's limits")
    started = time.monotonic()
    (audio, rate), peak = _peak_mb(lambda: read_audio(flac_bomb, limits=limits))
    assert (rate, audio.shape) == (48_000, (2, 30 * 48_000))  # stems at <= 48 kHz, <= 2 channels
    assert peak < 3 * audio.nbytes / 1e6 + 20, peak
    assert time.monotonic() - started < 60


def test_a_length_the_header_hides_is_counted(tmp_path):
    import numpy as np
    import soundfile as sf

    from services.common.audio import AudioError, DecodeLimits, audio_info, read_audio

    flac = tmp_path / "long.flac"
    sf.write(flac, np.random.default_rng(0).normal(0, 0.01, (8000 * 120, 1)).astype(np.float32), 8000,
             subtype="PCM_16")
    data = bytearray(flac.read_bytes())
    fields = int.from_bytes(data[18:26], "big")  # STREAMINFO: rate, channels, bits, total samples (36 bits)
    data[18:26] = ((fields >> 36 << 36) | 8000).to_bytes(8, "big")  # claims 1 s
    upload = tmp_path / "input.bin"  # an upload's name picks the decoder: ffmpeg here
    upload.write_bytes(bytes(data))
    assert audio_info(upload)[2] == 8000  # the header says 1 s
    tried("FLAC whose header claims 1 s but holds 120 s")
    with pytest.raises(AudioError, match="longer than 60 s"):
        read_audio(upload, limits=DecodeLimits(max_seconds=60))


@pytest.mark.parametrize("name, text", [
    ("song.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{target}\n#EXT-X-ENDLIST\n"),
    ("input.m3u", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{target}\n#EXT-X-ENDLIST\n"),
    ("input.bin", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\nfile:{target}\n#EXT-X-ENDLIST\n"),
    ("input.txt", "ffconcat version 1.0\nfile '{target}'\n"),
])
def test_playlists_never_read_local_files(tmp_path, name, text):
    import numpy as np

    from services.common.audio import AudioError, audio_info, read_audio, write_audio

    secret = write_audio(tmp_path / "dataset_stem.wav", np.full((1, 44100), 0.5, np.float32), 44100)
    playlist = tmp_path / name
    playlist.write_text(text.format(target=secret))
    tried(f"a playlist upload {name} naming a local file")
    with pytest.raises(AudioError):
        read_audio(playlist)
    with pytest.raises(AudioError):
        audio_info(playlist)
    tried(f"a playlist upload {name} streamed as the web and the CLI separate it")
    with pytest.raises(AudioError):
        _stream_all(playlist)


def _stream_all(path, limits=None):
    """Every block of `path` as the separation client reads a song (services/serving/audio_stream.py)."""
    import numpy as np

    from services.common.audio import AudioReader

    with AudioReader(path, limits=limits) as reader:
        return np.concatenate(list(reader.blocks()), axis=1), reader.rate


def test_a_decoding_bomb_streamed_for_the_web_is_converted_and_counted(flac_bomb, tmp_path):
    from dataclasses import replace

    from services.common.audio import AudioError
    from services.frontend.settings import load_settings

    limits = load_settings({"data_root": str(tmp_path)}).decode_limits
    tried("FLAC bomb streamed through the web's limits")
    audio, rate = _stream_all(flac_bomb, replace(limits, max_seconds=None))
    assert (rate, audio.shape) == (48_000, (2, 30 * 48_000))  # stems at <= 48 kHz, <= 2 channels
    tried("FLAC bomb streamed past a byte cap")
    with pytest.raises(AudioError, match="decodes to more than 4 MiB"):
        _stream_all(flac_bomb, replace(limits, max_seconds=None, max_bytes=4 << 20))


def test_solo_cutting_refuses_playlists(tmp_path):
    import numpy as np

    from services.common.audio import write_audio
    from services.ingestion.solo import SoloImportError, cut_pieces

    secret = write_audio(tmp_path / "stem.wav", np.full((1, 44100 * 40), 0.5, np.float32), 44100)
    playlist = tmp_path / "download.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:60\n#EXTINF:40,\n{secret}\n#EXT-X-ENDLIST\n")
    tried("a solo download that is a playlist")
    with pytest.raises(SoloImportError):
        cut_pieces(playlist, tmp_path / "pieces", 30, 10)


# -- 6. data integrity -------------------------------------------------------------------------
def test_concurrent_marks_through_the_service_are_never_lost(tmp_path):
    """The issue's case: 4 concurrent set_mark calls on one track lost a mark in 30 of 30 tries.
    Here all seven marks at once (7 concurrent calls), 20 tries, then seven concurrent clears."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import soundfile as sf

    from services.common.library import MARKS, Library, Stem, Track

    library = Library(tmp_path / "data")
    track = Track(id="Song", source="synthetic", title="Song", rate=8000, channels=1, duration_seconds=1.0,
                  stems=[Stem("stems/S01.wav", "guitar", "guitar")])
    (library.track_dir("Song") / "stems").mkdir(parents=True)
    sf.write(library.track_dir("Song") / "stems" / "S01.wav", np.zeros(8000, np.float32), 8000)
    library.save(track)
    with ServiceProcess("ingestion", tmp_path / "data") as svc:
        stub = ingestion_pb2_grpc.DatasetServiceStub(svc.channel())

        def call(method: str, mark: str):
            return getattr(stub, method)(ingestion_pb2.QualityMarkRequest(track_id="Song", instrument="guitar",
                                                                         mark=mark), timeout=30)

        with ThreadPoolExecutor(len(MARKS)) as pool:
            for attempt in range(20):
                tried(f"{len(MARKS)} concurrent marks on one track (try {attempt + 1})")
                list(pool.map(lambda mark: call("SetQualityMark", mark), MARKS))
                assert sorted(library.load("Song").marks.get("guitar", {})) == sorted(MARKS), attempt
                list(pool.map(lambda mark: call("ClearQualityMark", mark), MARKS))
                assert not library.load("Song").marks.get("guitar"), attempt


def _mixed_library(root):
    import numpy as np

    from services.processing.mixing import mix
    from tests.test_processing_support import make_track

    for i in range(3):
        noise = (0.2 * np.random.default_rng(i).standard_normal(6615)).astype(np.float32)
        make_track(root, f"Song{i}", {"g.wav": ("guitar", noise), "d.wav": ("drums", noise[::-1].copy())},
                   source="synthetic", marks={"guitar": ["checked"]})
    mix(root, "guitar", rates_hz=[22050], workers=1)


def test_a_remix_never_rewrites_what_a_published_version_points_at(tmp_path):
    import numpy as np

    from services.common.library import Library
    from services.common.manifest import find_manifest, load_manifest, verify_files
    from services.processing.datasets import build_dataset
    from services.processing.mixing import mix

    _mixed_library(tmp_path)
    build_dataset(tmp_path, "g", "guitar", 22050, workers=1)
    v1 = load_manifest(find_manifest(tmp_path, "g", 1))
    before = {p.track: v1.path_of(p.instrument, tmp_path).read_bytes() for p in v1.pairs}
    # The stems change and everything is mixed again (a person fixed a stem, a mix set was redone).
    library = Library(tmp_path)
    stem = library.stem_path(library.load("Song0"), library.load("Song0").stems[0])
    import soundfile as sf
    sf.write(stem, np.full(6615, 0.3, np.float32), 22050)
    tried("a re-mix after a version was published")
    mix(tmp_path, "guitar", rates_hz=[22050], workers=1, force=True)
    assert {p.track: v1.path_of(p.instrument, tmp_path).read_bytes() for p in v1.pairs} == before
    verify_files(v1, tmp_path)  # version 1 still reads what it recorded
    assert build_dataset(tmp_path, "g", "guitar", 22050, workers=1)["version"] == 2


def test_a_changed_file_of_a_version_is_refused_when_read(tmp_path):
    from services.common.manifest import DatasetChangedError, find_manifest, load_manifest, verify_files
    from services.common.paths import DataRoot
    from services.evaluation.evaluate import EvaluationSettings, evaluate_dataset
    from services.processing.datasets import build_dataset

    _mixed_library(tmp_path)
    build_dataset(tmp_path, "g", "guitar", 22050, workers=1)
    manifest = load_manifest(find_manifest(tmp_path, "g", 1))
    target = manifest.path_of(manifest.pairs[0].rest, tmp_path)
    data = bytearray(target.read_bytes())
    data[-8:] = b"\x00\x00\x80\x3f" * 2  # two samples edited in place
    target.write_bytes(bytes(data))
    tried("a mix file of a published version edited in place")
    with pytest.raises(DatasetChangedError, match="changed since the version was published"):
        verify_files(manifest, tmp_path)
    tried("an evaluation of a version whose file changed")
    with pytest.raises(DatasetChangedError, match="changed since the version was published"):
        evaluate_dataset(DataRoot(tmp_path), None, "g", 1, EvaluationSettings(split=manifest.pairs[0].split, baselines=("mixture",)))
    target.unlink()
    tried("a mix file of a published version deleted")
    with pytest.raises(DatasetChangedError, match="is gone"):
        verify_files(manifest, tmp_path)


def test_two_builds_cannot_publish_the_same_version(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from services.common.manifest import find_manifest, load_manifest, versions
    from services.processing.datasets import build_dataset

    _mixed_library(tmp_path)
    ratios = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    tried(f"{len(ratios)} concurrent builds of different versions")
    with ThreadPoolExecutor(len(ratios)) as pool:
        results = list(pool.map(lambda r: build_dataset(tmp_path, "g", "guitar", 22050, validation_ratio=r,
                                                        workers=1), ratios))
    assert sorted(r["version"] for r in results) == [1, 2, 3, 4, 5, 6]
    assert versions(tmp_path, "g") == [1, 2, 3, 4, 5, 6]
    for result in results:  # each version holds the build that got its number
        manifest = load_manifest(find_manifest(tmp_path, "g", result["version"]))
        assert manifest.params["validation"]["ratio"] in ratios
    assert sorted(load_manifest(find_manifest(tmp_path, "g", v)).params["validation"]["ratio"]
                  for v in range(1, 7)) == ratios


def test_optional_tls_refuses_plaintext_and_serves_the_token_holder(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from services.common.config import load_config
    from services.common.server import Service

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("STEMLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("STEMLAB_TLS_CERT", str(cert))
    monkeypatch.setenv("STEMLAB_TLS_KEY", str(key))
    service = Service("processing", load_config())
    port = service.start(port=0)
    try:
        tried("a plaintext call to a TLS service")
        plain = jobs_pb2_grpc.JobsStub(grpc.insecure_channel(f"localhost:{port}"))
        refused(lambda: plain.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5), grpc.StatusCode.UNAVAILABLE)
        tried("a TLS call without the token")
        anonymous = jobs_pb2_grpc.JobsStub(auth.open_channel(f"localhost:{port}", ca_file=cert))
        refused(lambda: anonymous.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5), grpc.StatusCode.UNAUTHENTICATED)
        owner = jobs_pb2_grpc.JobsStub(auth.stack_channel(f"localhost:{port}"))  # TLS and token from the config
        assert list(owner.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5).jobs) == []
    finally:
        service.stop()


def test_reload_under_a_prefix_refuses_paths_the_prefix_would_re_root(tmp_path):
    """With --model_base_path_prefix (the local stack) "/etc" would be re-rooted to PREFIX/etc and
    replace the served model: a base_path must already lie under the prefix."""
    from tensorflow_serving.apis import model_management_pb2

    from services.serving.grpc_api import ModelServicer

    class Context:
        def abort(self, code, message):
            raise grpc.RpcError(code, message)

    servicer = ModelServicer(registry=None, base_path_prefix=str(tmp_path / "models"),
                             allowed_roots=[tmp_path / "models"])
    for where in ("/etc", "/models/../etc", str(tmp_path / "models" / ".." / "secrets")):
        request = model_management_pb2.ReloadConfigRequest()
        entry = request.config.model_config_list.config.add()
        entry.name, entry.base_path = "guitar", where
        tried(f"reload under a prefix naming {where}")
        with pytest.raises(grpc.RpcError) as error:
            servicer.HandleReloadConfigRequest(request, Context())
        assert error.value.args[0] == grpc.StatusCode.PERMISSION_DENIED and "outside the model folders" in error.value.args[1]


def test_a_decode_past_its_time_limit_is_stopped(tmp_path):
    import numpy as np

    from services.common.audio import AudioError, DecodeLimits, read_audio, write_audio

    song = write_audio(tmp_path / "song.mp3", np.zeros((2, 44100 * 20), np.float32), 44100)  # ffmpeg decodes it
    tried("a decode that outlasts its time limit")
    with pytest.raises(AudioError, match="took longer than"):
        read_audio(song, limits=DecodeLimits(timeout_seconds=0.001))
    assert read_audio(song)[0].shape == (2, 44100 * 20)  # the same file within the default limit

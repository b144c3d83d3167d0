"""The separation client against the compatible server: long stereo audio comes back whole, the
segment borders leave no trace, the stems add up to the mix, and failures say what went wrong."""

import json

import numpy as np
import pytest
import soundfile as sf
import soxr

from services.serving.client import (
    OverlapAdd,
    SeparationCancelled,
    ServedModel,
    ServingError,
    _segments,
    segment_window,
    separate_array,
    separate_file,
)
from services.serving.local import free_port, running_server, write_config
from services.serving.reference_models import save_gain_model


def export_tiny_network(model_dir):
    """Export model/'s untrained 'tiny' network the way training does; False when model/ is not there."""
    try:
        from model.config import make_config
        from model.export import export_saved_model
        from model.network import build_network
    except ImportError:
        return False
    config = make_config("tiny")
    export_saved_model(build_network(config), config, model_dir)
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_gain_model(root / "identity" / "1", gain=1.0)
    save_gain_model(root / "half" / "1", gain=0.5)
    models = {"identity": root / "identity", "half": root / "half"}
    if export_tiny_network(root / "tiny"):
        models["tiny"] = root / "tiny"
    config = write_config(root / "models.config", models)
    with running_server(config, root / "server.log", ready_model="identity", poll_seconds=5) as running:
        yield running


def band_limited_song(seconds: float, rate: int = 44100, channels: int = 2, seed: int = 0) -> np.ndarray:
    """Noise and tones below 7 kHz with raised-cosine fades: content that survives the trip to
    22050 Hz and back, so any difference is the client's doing. (channels, samples) float32."""
    rng = np.random.default_rng(seed)
    samples = int(seconds * rate)
    noise = soxr.resample(rng.standard_normal((int(seconds * 16000) + 16, channels)).astype(np.float32), 16000, rate)
    noise = noise[:samples].T * 0.1
    t = np.arange(samples) / rate
    tones = np.stack([0.3 * np.sin(2 * np.pi * (220 * (c + 1)) * t) + 0.1 * np.sin(2 * np.pi * 5000 * t + c)
                      for c in range(channels)])
    fade_samples = int(0.2 * rate)
    fade = np.ones(samples)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade_samples))
    fade[:fade_samples], fade[-fade_samples:] = ramp, ramp[::-1]
    return ((noise + tones) * fade).astype(np.float32)


def assert_adds_up(instrument, rest, mix):
    """instrument + rest == mix up to the float32 rounding of the one subtraction (one ulp)."""
    ulp = np.spacing(np.maximum(np.abs(mix), np.abs(instrument)))
    assert np.all(np.abs((instrument + rest) - mix) <= ulp)


# ----- pure segment arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize("samples,length,hop", [(1000, 100, 75), (1000, 100, 100), (99, 100, 75), (1, 10, 3),
                                                (1075, 100, 75)])
def test_overlap_add_of_unchanged_segments_gives_back_the_signal_exactly(samples, length, hop):
    signal = np.random.default_rng(1).standard_normal((2, samples)).astype(np.float32)
    blocks = (signal[:, i:i + 37] for i in range(0, samples, 37))
    overlap_add = OverlapAdd(2, length, segment_window(length))
    pieces, starts = [], []
    for start, segment, _ in _segments(blocks, 2, length, hop):
        starts.append(start)
        assert segment.shape == (2, length)
        pieces.append(overlap_add.add(start, segment))
    pieces.append(overlap_add.finish(samples))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), signal, atol=1e-6)
    assert starts == list(range(0, starts[-1] + 1, hop))
    assert starts[-1] + length >= samples and (len(starts) == 1 or starts[-2] + length < samples)


def test_window_is_positive_and_symmetric():
    window = segment_window(1000)
    assert window.min() > 0 and np.allclose(window, window[::-1])


# ----- against the server -------------------------------------------------------------------------


def test_identity_model_gives_back_a_three_minute_stereo_44100_song(server):
    song = band_limited_song(180.0)
    reports = []
    instrument, rest = separate_array(song, 44100, "identity", address=server.grpc_address,
                                      progress=lambda done, total, message: reports.append((done, total)))
    assert instrument.shape == song.shape and instrument.dtype == np.float32
    assert np.abs(instrument - song).max() < 1e-4
    assert np.abs(rest).max() < 1e-4
    assert reports[-1] == (pytest.approx(180.0), pytest.approx(180.0))
    assert all(a[0] <= b[0] for a, b in zip(reports, reports[1:], strict=False))


def test_identity_at_the_model_rate_is_exact_across_segment_borders(server):
    song = np.random.default_rng(2).uniform(-1, 1, (2, 22050 * 25 + 123)).astype(np.float32)
    instrument, _ = separate_array(song, 22050, "identity", address=server.grpc_address,
                                   segment_seconds=2.0, overlap=0.25, batch_segments=3)
    np.testing.assert_allclose(instrument, song, atol=1e-6)


def test_instrument_plus_rest_is_the_mix_for_the_gain_model(server):
    song = band_limited_song(20.0, rate=48000, channels=2, seed=3)
    instrument, rest = separate_array(song, 48000, "half", address=server.grpc_address, segment_seconds=4.0)
    assert_adds_up(instrument, rest, song)
    np.testing.assert_allclose(instrument, 0.5 * song, atol=1e-4)


def test_the_exported_network_of_model_is_served_and_its_stems_add_up(server):
    if not (server.log_path.parent / "tiny").is_dir():  # the fixture exports it next to the log
        pytest.skip("model/export.py is not available")
    song = band_limited_song(5.0, rate=44100, channels=2, seed=6)
    with ServedModel("tiny", server.grpc_address) as served:
        assert served.sample_rate_hz == 22050
        instrument, rest = separate_array(song, 44100, "tiny", segment_seconds=2.0, served_model=served)
        assert served.served_version == 1
    assert instrument.shape == song.shape and np.isfinite(instrument).all()
    assert np.abs(instrument).max() > 0  # an untrained mask is not all zeros
    assert_adds_up(instrument, rest, song)


def test_rest_protocol_gives_the_same_stems(server):
    song = np.random.default_rng(4).uniform(-1, 1, (1, 22050 * 3)).astype(np.float32)
    via_grpc, _ = separate_array(song, 22050, "half", address=server.grpc_address, segment_seconds=1.0)
    via_rest, _ = separate_array(song, 22050, "half", address=server.rest_address, protocol="rest", segment_seconds=1.0)
    np.testing.assert_allclose(via_rest, via_grpc, atol=1e-6)
    np.testing.assert_allclose(via_grpc, 0.5 * song, atol=1e-6)


def test_mono_one_dimensional_input_keeps_its_shape(server):
    song = np.linspace(-0.5, 0.5, 5000, dtype=np.float32)
    instrument, rest = separate_array(song, 22050, "half", address=server.grpc_address)
    assert instrument.shape == rest.shape == (5000,)
    np.testing.assert_allclose(instrument, 0.5 * song, atol=1e-6)


def test_requests_respect_the_message_limit(server):
    with ServedModel("identity", server.grpc_address, max_message_bytes=1 << 20) as served:
        sizes = []
        original = served.separate
        served.separate = lambda rows: sizes.append(rows.nbytes) or original(rows)
        song = np.zeros((2, 22050 * 20), np.float32)
        separate_array(song, 22050, "identity", segment_seconds=2.0, batch_segments=16, served_model=served)
    assert max(sizes) < 1 << 20 and len(sizes) > 1


def test_a_segment_larger_than_the_message_limit_is_a_clear_error(server):
    with pytest.raises(ServingError, match="max_message_bytes"):
        separate_array(np.zeros((2, 1000), np.float32), 22050, "identity", address=server.grpc_address,
                       segment_seconds=60.0, max_message_bytes=1 << 20)


def test_should_stop_cancels_between_requests(server):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(SeparationCancelled):
        separate_array(np.zeros((1, 22050 * 30), np.float32), 22050, "identity", address=server.grpc_address,
                       segment_seconds=2.0, batch_segments=1, should_stop=should_stop)
    assert len(calls) == 3


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unknown_model_is_a_serving_error_naming_it(server, protocol):
    address = server.grpc_address if protocol == "grpc" else server.rest_address
    with pytest.raises(ServingError, match="model 'nope' is not served"):
        separate_array(np.zeros((1, 100), np.float32), 22050, "nope", address=address, protocol=protocol)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unreachable_server_is_a_serving_error(protocol):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServingError, match="not reachable"):
        separate_array(np.zeros((1, 100), np.float32), 22050, "identity", address=address, protocol=protocol,
                       timeout_seconds=5)


def test_separate_file_writes_stems_at_the_song_rate_and_channels(server, tmp_path):
    song = band_limited_song(6.0, rate=44100, channels=2, seed=5)
    sf.write(tmp_path / "song.flac", song.T, 44100, subtype="PCM_24")
    mix, _ = sf.read(tmp_path / "song.flac", dtype="float32", always_2d=True)
    result = separate_file(tmp_path / "song.flac", tmp_path / "out", "half", address=server.grpc_address,
                           formats=("wav", "mp3"))
    assert (result["rate"], result["channels"], result["model"], result["version"]) == (44100, 2, "half", 1)
    assert result["seconds"] == pytest.approx(6.0)
    instrument, rate = sf.read(result["paths"]["instrument"]["wav"], dtype="float32", always_2d=True)
    rest, _ = sf.read(result["paths"]["rest"]["wav"], dtype="float32", always_2d=True)
    assert rate == 44100 and instrument.shape == mix.shape
    assert_adds_up(instrument.T, rest.T, mix.T)
    assert (tmp_path / "out" / "instrument.mp3").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "instrument.mp3", "instrument.wav", "rest.mp3", "rest.wav"]


def test_separate_file_refuses_unknown_formats_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        separate_file(tmp_path / "missing.wav", tmp_path / "out", "identity", formats=("ogg",))


# ----- stemlab separate ---------------------------------------------------------------------------


def test_cli_separate_writes_the_stems_and_prints_json(server, tmp_path, capsys):
    from services.serving import cli

    sf.write(tmp_path / "song.wav", band_limited_song(3.0, channels=1).T, 44100)
    code = cli.main([str(tmp_path / "song.wav"), "--model", "half", "--address", server.grpc_address,
                     "--out", str(tmp_path / "out"), "--format", "flac", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["paths"]["instrument"]["flac"] == str(tmp_path / "out" / "instrument.flac")
    assert sf.info(result["paths"]["rest"]["flac"]).samplerate == 44100
    assert sf.info(result["paths"]["rest"]["flac"]).channels == 1


def test_cli_separate_reports_progress_lines_when_not_a_terminal(server, tmp_path, capsys):
    from services.serving import cli

    sf.write(tmp_path / "song.wav", np.zeros((22050 * 3, 2), np.float32), 22050)
    code = cli.main([str(tmp_path / "song.wav"), "--model", "identity", "--address", server.rest_address, "--rest",
                     "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert "100.0%" in captured.err and "\r" not in captured.err
    assert f"instrument: {tmp_path / 'out' / 'instrument.wav'}" in captured.out


def test_cli_separate_unknown_model_fails_with_one_line(server, tmp_path, capsys):
    from services.serving import cli

    sf.write(tmp_path / "song.wav", np.zeros((1000, 1), np.float32), 22050)
    code = cli.main([str(tmp_path / "song.wav"), "--model", "nope", "--address", server.grpc_address,
                     "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.err.count("\n") == 1 and "model 'nope' is not served" in captured.err
    assert not (tmp_path / "out").exists()


def test_progress_on_a_terminal_is_one_bar_redrawn_in_place():
    import io

    from services.serving.cli import _ProgressPrinter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    printer = _ProgressPrinter(out)
    for done in (10.0, 20.0, 40.0):
        printer(done, 40.0, f"separated {done:.1f} of 40.0 s")
    printer.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1
    assert "100.0%" in text.split("\r")[-1] and "#" * 10 in text.split("\r")[-1]


def test_cli_separate_over_rest_reports_the_version_that_answered(server, tmp_path, capsys):
    import json

    from services.serving import cli

    sf.write(tmp_path / "song.wav", np.zeros((22050, 1), np.float32), 22050)
    grpc_code = cli.main([str(tmp_path / "song.wav"), "--model", "identity", "--address", server.grpc_address,
                          "--out", str(tmp_path / "a"), "--json"])
    via_grpc = json.loads(capsys.readouterr().out)
    rest_code = cli.main([str(tmp_path / "song.wav"), "--model", "identity", "--address", server.rest_address, "--rest",
                          "--out", str(tmp_path / "b"), "--json"])
    via_rest = json.loads(capsys.readouterr().out)
    assert grpc_code == rest_code == 0
    assert via_rest["version"] == via_grpc["version"] is not None  # REST replies do not say; it used to be null


def test_arrays_in_the_layouts_and_kinds_programs_hold_are_taken_or_refused(server):
    song = band_limited_song(1.0, rate=22050)
    as_float, _ = separate_array(song, 22050, "half", address=server.grpc_address)
    # int16 PCM (soundfile's dtype="int16") is scaled, not sent at ±32767.
    pcm = np.round(song * 32767).astype(np.int16)
    as_pcm, _ = separate_array(pcm, 22050, "half", address=server.grpc_address)
    np.testing.assert_allclose(as_pcm, as_float, atol=1e-4)
    # soundfile.read's (samples, channels) used to come back as 22050 two-sample "channels".
    with pytest.raises(ValueError, match=r"22050 channels of 2 samples; pass \(channels, samples\).*audio.T"):
        separate_array(song.T, 22050, "half", address=server.grpc_address)
    for bad, said in (({"rate": 0}, "rate must be a whole number"), ({"segment_seconds": float("inf")}, "between"),
                      ({"segment_seconds": 0.0}, "between"), ({"overlap": 0.999}, "overlap must be between")):
        with pytest.raises(ValueError, match=said):
            separate_array(song, **{"rate": 22050, "model": "half", "address": server.grpc_address, **bad})
    with pytest.raises(ValueError, match="float or integer PCM"):
        separate_array(song > 0, 22050, "half", address=server.grpc_address)


def test_cli_separate_says_what_is_wrong_with_its_arguments(server, tmp_path, capsys):
    from services.serving import cli

    sf.write(tmp_path / "song.wav", np.zeros((2205, 1), np.float32), 22050)
    (tmp_path / "afile").write_text("x")
    for extra, said in ((["--out", str(tmp_path / "afile")], "is a file, not a folder"),
                        (["--segment-seconds", "inf"], "--segment-seconds must be between 0.1 and 600"),
                        (["--overlap", "1"], "--overlap must be between 0 and 0.95")):
        code = cli.main([str(tmp_path / "song.wav"), "--model", "identity", "--address", server.grpc_address,
                         "--out", str(tmp_path / "out"), *extra])
        assert code == 2 and said in capsys.readouterr().err, extra


def test_a_separation_stopped_by_sigterm_leaves_no_half_written_file(server, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.servicetools import REPO

    sf.write(tmp_path / "long.wav", band_limited_song(120.0, rate=22050, channels=1).T, 22050)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "services.serving.cli", str(tmp_path / "long.wav"), "--model",
                             "identity", "--address", server.grpc_address, "--out", str(out), "--format", "mp3",
                             "--segment-seconds", "0.1"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(out.glob(".*.partial")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(out.glob(".*.partial")), "the separation did not start writing"
    proc.send_signal(signal.SIGTERM)  # what kill, timeout and systemd send
    proc.wait(timeout=60)
    assert proc.returncode == 143
    assert list(out.iterdir()) == []


def test_a_96_khz_song_gets_its_mp3_stems_at_48_khz_and_the_others_at_its_own_rate(server, tmp_path):
    # MP3 has no 96 kHz: the whole command used to fail, WAV included.
    song = band_limited_song(2.0, rate=96000, channels=2)
    sf.write(tmp_path / "hi.wav", song.T, 96000, subtype="PCM_24")
    result = separate_file(tmp_path / "hi.wav", tmp_path / "out", "identity", address=server.grpc_address,
                           formats=("wav", "mp3"))
    wav, wav_rate = sf.read(result["paths"]["instrument"]["wav"])
    mp3, mp3_rate = sf.read(result["paths"]["instrument"]["mp3"])
    assert (wav_rate, mp3_rate) == (96000, 48000)
    assert abs(len(mp3) / mp3_rate - 2.0) < 0.06  # the whole song, the encoder's padding aside
    assert abs(np.sqrt(np.mean(mp3**2)) - np.sqrt(np.mean(wav**2))) < 0.01


def test_a_call_the_server_cancels_while_stopping_counts_as_serving_gone_away(server):
    # A server stopping mid-request answers CANCELLED, not UNAVAILABLE: the web's separation then
    # failed instead of starting again once serving was back.
    from services.serving.client import ServedModel, ServingUnavailable

    with ServedModel("identity", server.grpc_address) as served:
        assert isinstance(served._error("CANCELLED", "server shutting down"), ServingUnavailable)
        assert isinstance(served._error("UNAVAILABLE", "connection refused"), ServingUnavailable)
        assert not isinstance(served._error("INVALID_ARGUMENT", "bad shape"), ServingUnavailable)

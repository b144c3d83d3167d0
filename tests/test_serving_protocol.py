"""The separation path without TensorFlow: TF Serving's protocol from our own descriptors (the same
bytes on the wire as the official generated modules), the CLI separating a song with the shipped
guitar model exactly as the client did before it streamed (a reference stored from the old code),
without importing TensorFlow or printing anything but its own lines, and the streaming reader and
writer giving what the whole-file functions give."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.common.audio import AudioError, AudioReader, read_audio, write_audio
from services.serving import protocol
from services.serving.audio_stream import StemWriter
from services.serving.client import SeparationCancelled, SongTooLong, separate_array, separate_file
from services.serving.local import running_server, write_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).with_name("fixtures") / "guitar12_reference.npz"


def reference_clip() -> tuple[np.ndarray, int]:
    """The 18 s stereo 8 kHz clip whose guitar v12 separation by the pre-streaming client is stored
    in fixtures/guitar12_reference.npz (three segments: both kinds of border, resampling both ways)."""
    rate, seconds = 8000, 18
    rng = np.random.default_rng(39)
    t = np.arange(rate * seconds) / rate
    tones = np.stack([0.3 * np.sin(2 * np.pi * 196 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2,
                      0.25 * np.sin(2 * np.pi * 330 * t + 1.0)])
    noise = 0.05 * rng.standard_normal((2, t.size))
    return (tones + noise).astype(np.float32), rate


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    config = write_config(root / "models.config", {"guitar": ROOT / "model" / "pretrained" / "guitar"})
    with running_server(config, root / "server.log", ready_model="guitar", poll_seconds=5) as server:
        yield server


# ----- the protocol ------------------------------------------------------------------------------


def test_requests_and_replies_are_tf_servings_bytes():
    """Our PredictRequest serialises to the official module's bytes, and each parses the other's."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    messages = protocol.load()
    ours, theirs = messages.PredictRequest(), predict_pb2.PredictRequest()
    for request in (ours, theirs):
        request.model_spec.name = "guitar"
        request.model_spec.signature_name = "serving_default"
        request.model_spec.version.value = 11
        request.output_filter.append("instrument")
    samples = np.arange(6, dtype="<f4").reshape(2, 3)
    for request, dt_float in ((ours, messages.DT_FLOAT), (theirs, types_pb2.DT_FLOAT)):
        tensor = request.inputs["waveform"]
        tensor.dtype = dt_float
        for size in samples.shape:
            tensor.tensor_shape.dim.add().size = size
        tensor.tensor_content = samples.tobytes()
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    reply = predict_pb2.PredictResponse()
    reply.model_spec.version.value = 11
    reply.outputs["sample_rate"].dtype = types_pb2.DT_INT32
    reply.outputs["sample_rate"].int_val.append(22050)
    parsed = messages.PredictResponse.FromString(reply.SerializeToString())
    assert parsed.outputs["sample_rate"].int_val == [22050] and parsed.model_spec.version.value == 11
    assert messages.method_path("Predict") == "/tensorflow.serving.PredictionService/Predict"


def test_the_protocol_lives_in_a_pool_of_its_own():
    """TensorFlow's modules register the same names in protobuf's default pool; ours must not clash."""
    from google.protobuf import descriptor_pool

    messages = protocol.load()
    assert messages.pool is not descriptor_pool.Default()
    assert messages.PredictRequest.DESCRIPTOR.full_name == "tensorflow.serving.PredictRequest"


def test_a_missing_descriptor_set_says_to_run_make_protos(tmp_path):
    with pytest.raises(protocol.ProtocolNotBuilt, match="make protos"):
        protocol.load(tmp_path / "absent.binpb")


# ----- the separation, as it was -----------------------------------------------------------------


def cli_in_subprocess(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`stemlab` run as a user runs it; also returns the TensorFlow modules it had imported at exit."""
    script = (
        "import sys\n"
        "from stemlab.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving', 'keras'))\n"
        "open('modules.json', 'w').write(__import__('json').dumps(heavy))\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    return result, json.loads((cwd / "modules.json").read_text())


def test_cli_separates_as_the_old_client_did_without_tensorflow_or_foreign_output(shipped, tmp_path):
    audio, rate = reference_clip()
    write_audio(tmp_path / "clip.wav", audio, rate)
    result, heavy = cli_in_subprocess("separate", str(tmp_path / "clip.wav"), "--model", "guitar",
                                      "--address", shipped.grpc_address, "--out", str(tmp_path / "out"),
                                      "--format", "wav", "--format", "flac", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert heavy == []
    assert result.stdout.splitlines() == [f"instrument: {tmp_path / 'out' / 'instrument.wav'}",
                                          f"instrument: {tmp_path / 'out' / 'instrument.flac'}",
                                          f"rest: {tmp_path / 'out' / 'rest.wav'}",
                                          f"rest: {tmp_path / 'out' / 'rest.flac'}"]
    assert result.stderr.splitlines(), "progress lines expected on stderr"
    for line in result.stderr.splitlines():  # no TensorFlow or gRPC start-up noise
        assert re.fullmatch(r" *\d+\.\d% separated \d+\.\d of 18\.0 s", line), line
    instrument, instrument_rate = read_audio(tmp_path / "out" / "instrument.wav")
    rest, _ = read_audio(tmp_path / "out" / "rest.wav")
    reference = np.load(REFERENCE)["instrument"]
    assert instrument_rate == rate and instrument.shape == reference.shape
    assert np.max(np.abs(instrument - reference)) < 1e-5
    np.testing.assert_array_equal(rest, audio - instrument)
    flac, _ = read_audio(tmp_path / "out" / "instrument.flac")
    assert np.max(np.abs(flac - instrument)) < 2 ** -22


@pytest.mark.parametrize("requests_in_flight,batch_segments", [(1, 2), (3, 1)])
def test_array_separation_matches_the_old_client_however_requests_are_sent(shipped, requests_in_flight,
                                                                           batch_segments):
    audio, rate = reference_clip()
    instrument, rest = separate_array(audio, rate, "guitar", address=shipped.grpc_address,
                                      requests_in_flight=requests_in_flight, batch_segments=batch_segments)
    assert np.max(np.abs(instrument - np.load(REFERENCE)["instrument"])) < 1e-5
    np.testing.assert_array_equal(rest, audio - instrument)


def test_a_cancelled_file_separation_leaves_no_files(shipped, tmp_path):
    audio, rate = reference_clip()
    write_audio(tmp_path / "clip.wav", audio, rate)
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(SeparationCancelled):
        separate_file(tmp_path / "clip.wav", tmp_path / "out", "guitar", address=shipped.grpc_address,
                      segment_seconds=2.0, should_stop=should_stop)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_song_longer_than_allowed_is_refused_as_it_is_read(shipped, tmp_path):
    audio, rate = reference_clip()
    write_audio(tmp_path / "clip.wav", audio, rate)
    with pytest.raises(SongTooLong, match="longer than 10 s"):
        separate_file(tmp_path / "clip.wav", tmp_path / "out", "guitar", address=shipped.grpc_address,
                      max_seconds=10)
    assert list((tmp_path / "out").iterdir()) == []


# ----- streaming reader and writer ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".flac", ".mp3"])
def test_the_block_reader_gives_what_read_audio_gives(tmp_path, suffix):
    audio, rate = reference_clip()
    write_audio(tmp_path / f"clip{suffix}", audio, rate if suffix == ".flac" else 8000)
    whole, whole_rate = read_audio(tmp_path / f"clip{suffix}")
    with AudioReader(tmp_path / f"clip{suffix}", block_frames=5000) as reader:
        blocks = list(reader.blocks())
        assert (reader.rate, reader.channels) == (whole_rate, 2)
    assert all(block.shape[1] <= 5000 for block in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole)


def test_the_block_reader_names_an_undecodable_file(tmp_path):
    (tmp_path / "fake.mp3").write_bytes(b"not audio at all" * 100)
    with pytest.raises(AudioError, match="fake.mp3"):
        with AudioReader(tmp_path / "fake.mp3") as reader:
            list(reader.blocks())


def test_the_block_writer_writes_what_write_audio_writes(tmp_path):
    audio, rate = reference_clip()
    instrument = (0.7 * audio).astype(np.float32)
    with StemWriter(tmp_path / "blocks", ("wav", "flac", "mp3"), rate, 2) as writer:
        for start in range(0, audio.shape[1], 7777):
            writer.write(instrument[:, start:start + 7777], audio[:, start:start + 7777])
        assert not (tmp_path / "blocks" / "instrument.wav").exists()  # only once all are done
        writer.commit()
    for stem, data in (("instrument", instrument), ("rest", audio - instrument)):
        for fmt in ("wav", "flac"):
            write_audio(tmp_path / f"whole.{fmt}", data, rate)
            assert (tmp_path / "blocks" / f"{stem}.{fmt}").read_bytes() == (tmp_path / f"whole.{fmt}").read_bytes()
        mp3 = sf.info(str(tmp_path / "blocks" / f"{stem}.mp3"))
        assert mp3.samplerate == rate and mp3.channels == 2 and abs(mp3.duration - 18) < 0.2
    assert sorted(path.name for path in (tmp_path / "blocks").iterdir()) == [
        "instrument.flac", "instrument.mp3", "instrument.wav", "rest.flac", "rest.mp3", "rest.wav"]

"""The processing service as a real process, through gRPC and the stemlab command line."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from stemlab.v1 import jobs_pb2, processing_pb2, processing_pb2_grpc
from tests.servicetools import ServiceProcess, run_cli, wait_job
from tests.test_processing_support import make_track

RATE = 22050


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


@pytest.fixture
def service(tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        make_track(data, f"Song{i}", {"g.wav": ("guitar", _noise(0.5, i)), "d.wav": ("drums", _noise(0.5, 10 + i))},
                   marks={"guitar": ["checked"]})
    make_track(data, "Bleeds", {"g.wav": ("guitar", _noise(0.5, 20))}, marks={"guitar": ["checked", "bleed"]})
    make_track(data, "Broken", {"g.wav": ("guitar", _noise(0.5, 21))}, marks={"guitar": ["checked"]})
    (data / "library" / "Broken" / "stems" / "g.wav").write_bytes(b"garbage")
    with ServiceProcess("processing", data, env={"STEMLAB_GRACE_SECONDS": "5"}) as svc:
        yield svc


def test_mix_job_over_grpc_then_stats_and_dataset_through_the_cli(service):
    ch = service.channel()
    stub = processing_pb2_grpc.ProcessingServiceStub(ch)
    job = stub.StartMix(processing_pb2.MixRequest(instrument="guitar", rates_hz=[RATE]), timeout=10)
    assert job.id.startswith("processing-") and job.kind == "processing.mix"
    final = wait_job(ch, job.id, timeout=120)
    # One broken track is reported in the result and does not fail the job.
    assert final.state == jobs_pb2.SUCCEEDED, final.error
    rows = {r["track"]: r for r in final.result["tracks"]}
    assert set(rows) == {"Song0", "Song1", "Song2", "Broken"}
    assert rows["Broken"]["status"] == "failed" and all(rows[f"Song{i}"]["status"] == "mixed" for i in range(3))
    assert final.result["left_out"][0]["track"] == "Bleeds"
    assert final.progress.total == 4 and final.progress.done == 4
    assert (service.data_root / "mixes" / "guitar" / str(RATE) / "Song0" / "instrument.wav").is_file()

    env = {"STEMLAB_PROCESSING_ADDRESS": service.address}
    out = run_cli("silence", "stats", "--instrument", "guitar", "--rate", str(RATE), "--json", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["result"]
    assert sum(b["tracks"] for b in result["histogram"]) == 3
    assert all(r["audible_share"] == 1.0 for r in result["tracks"])

    out = run_cli("silence", "adjust", "--instrument", "guitar", "--rate", str(RATE), "--target", "0.8",
                  "--cutoff", "0.6", "--json", env=env)
    assert out.returncode == 0, out.stderr
    adjusted = json.loads(out.stdout)["result"]
    assert adjusted["counts"] == {"unchanged": 3} and adjusted["mix_set"] == f"mixes/guitar/{RATE}-silence-0.8-0.6"

    out = run_cli("dataset", "build", "g22", "--instrument", "guitar", "--rate", str(RATE), "--json", env=env)
    assert out.returncode == 0, out.stderr
    built = json.loads(out.stdout)["result"]
    assert built["pairs"] == 3 and built["version"] == 1 and built["created"]
    assert (service.data_root / "datasets" / "g22" / "v1" / "manifest.yaml").is_file()
    again = json.loads(run_cli("dataset", "build", "g22", "--instrument", "guitar", "--rate", str(RATE), "--json",
                               env=env).stdout)["result"]
    assert again["version"] == 1 and not again["created"]
    listed = service.data_root / "listed.txt"
    listed.write_text("# the songs of one soundfont\nSong0\nSong2  # a comment\n\nNoSuchSong\n")
    out = run_cli("dataset", "build", "g22-some", "--instrument", "guitar", "--rate", str(RATE), "--tracks",
                  str(listed), "--json", env=env)
    assert out.returncode == 0, out.stderr
    some = json.loads(out.stdout)["result"]
    assert some["pairs"] == 2 and some["unknown_tracks"] == ["NoSuchSong"]
    listed.write_text("# nothing\n")
    out = run_cli("dataset", "build", "g22-none", "--instrument", "guitar", "--rate", str(RATE), "--tracks",
                  str(listed), env=env)
    assert out.returncode == 2 and "names no track" in out.stderr


def test_bad_requests_get_clear_status_codes(service):
    stub = processing_pb2_grpc.ProcessingServiceStub(service.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.StartMix(processing_pb2.MixRequest(instrument="kazoo"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "instrument must be one of" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.StartSilenceAdjust(processing_pb2.SilenceAdjustRequest(
            mix_set=processing_pb2.MixSetRef(instrument="piano", rate_hz=RATE)), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "stemlab mix" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.StartSilenceAdjust(processing_pb2.SilenceAdjustRequest(
            mix_set=processing_pb2.MixSetRef(instrument="guitar", rate_hz=RATE), target=0.5, cutoff=0.9), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cutoff" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.StartDatasetBuild(processing_pb2.DatasetBuildRequest(
            name="x", mix_set=processing_pb2.MixSetRef(instrument="guitar", rate_hz=RATE), tracks=["Song0", " "]),
            timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "track id is empty" in e.value.details()
    out = run_cli("dataset", "build", "x", "--instrument", "guitar", "--json",
                  env={"STEMLAB_PROCESSING_ADDRESS": service.address})
    assert out.returncode == 2 and "stemlab mix" in out.stderr


def test_the_mix_command_prints_counts_and_names_what_failed_or_was_left_out(service):
    env = {"STEMLAB_PROCESSING_ADDRESS": service.address}
    out = run_cli("mix", "--instrument", "guitar", "--rate", str(RATE), env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].endswith(f"SUCCEEDED: 1 failed, 3 mixed; 1.5 s of audio mixed into mixes/guitar/{RATE}")
    assert lines[1] == "failed (1):" and lines[2].startswith("  Broken: ")
    assert lines[3:] == ["left out (1):", "  Bleeds: marked bleed"]
    # A build says what it made, and that a training on it would have no validation pairs.
    out = run_cli("dataset", "build", "allTrain", "--instrument", "guitar", "--rate", str(RATE),
                  "--validation-ratio", "0", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "dataset allTrain version 1 (a new version): 3 pairs, 3 training / 0 validation" in lines[0]
    assert lines[-1].startswith("note: no validation pairs, which `stemlab train` needs")
    # Nothing left to mix for piano: refused with why, before a job starts.
    out = run_cli("mix", "--instrument", "piano", "--rate", str(RATE), env=env)
    assert out.returncode == 2 and "no track in the library has a stem classed piano" in out.stderr

"""The ingestion service as a real process, driven through gRPC and the `stemlab` CLI."""

from __future__ import annotations

import io
import json
import shutil

import grpc
import pytest
import soundfile as sf

from services.common.library import Library
from stemlab.v1 import ingestion_pb2, ingestion_pb2_grpc, jobs_pb2
from tests.ingestion_data import make_medleydb
from tests.servicetools import ServiceProcess, run_cli, wait_job


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingestion")
    with ServiceProcess("ingestion", root / "data") as svc:
        yield svc, root


def test_cli_import_list_mark_and_grpc(service):
    svc, root = service
    env = {"STEMLAB_INGESTION_ADDRESS": svc.address}
    mdb = make_medleydb(root / "mdb", songs=2, seconds=2.0)

    r = run_cli("dataset", "import", "medleydb", str(mdb), "--json", env=env)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout.strip().splitlines()[-1])
    assert job["state"] == "SUCCEEDED"
    assert job["result"]["added"] == ["Artist1_Song1", "Artist2_Song2"]
    assert job["result"]["unmapped"] == {"piano; tack piano": 1.0}

    r = run_cli("dataset", "list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [t["id"] for t in listed["tracks"]] == ["Artist1_Song1", "Artist2_Song2"] and listed["total"] == 2

    r = run_cli("dataset", "mark", "Artist1_Song1", "--instrument", "guitar", "--mark", "checked", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [(m["instrument"], m["mark"]) for m in json.loads(r.stdout)["marks"]] == [("guitar", "checked")]
    assert Library(root / "data").load("Artist1_Song1").has_mark("guitar", "checked")

    r = run_cli("dataset", "list", "--instrument", "guitar", "--mark", "checked", "--json", env=env)
    assert [t["id"] for t in json.loads(r.stdout)["tracks"]] == ["Artist1_Song1"]

    # A second import of the same folder adds nothing.
    r = run_cli("dataset", "import", "medleydb", str(mdb), "--json", env=env)
    assert json.loads(r.stdout.strip().splitlines()[-1])["result"]["unchanged"] == ["Artist1_Song1", "Artist2_Song2"]

    # A bad request is a one-line error with exit code 2, and the service stays up.
    r = run_cli("dataset", "show", "NoSuchTrack", "--json", env=env)
    assert r.returncode == 2 and "not_found" in r.stderr

    stub = ingestion_pb2_grpc.DatasetServiceStub(svc.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.StartImport(ingestion_pb2.ImportRequest(format="stems", path="../../etc"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.StartImport(ingestion_pb2.ImportRequest(format="solo", url="file:///etc/passwd", instrument="guitar"),
                         timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A wrong path is the caller's mistake, said before any job starts: a file, a folder without audio.
    stem_file = next((mdb / "Artist1_Song1" / "Artist1_Song1_STEMS").iterdir())
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "sub" / "notes.txt").write_text("no audio here")
    for path, said in ((stem_file, "is a file: a stems import reads the folder"),
                       (root / "empty", "no audio files under")):
        r = run_cli("dataset", "import", "stems", str(path), env=env)
        assert r.returncode == 2 and "invalid_argument" in r.stderr and said in r.stderr, r.stderr
    # An import of which nothing could be read has failed, and says why.
    (root / "fake" / "Song").mkdir(parents=True)
    (root / "fake" / "Song" / "Guitar.wav").write_text("not audio")
    r = run_cli("dataset", "import", "stems", str(root / "fake"), env=env)
    assert r.returncode == 1 and "FAILED" in r.stdout and "nothing was imported: Song Guitar.wav:" in r.stdout, r.stdout
    with pytest.raises(grpc.RpcError) as e:
        stub.SetQualityMark(ingestion_pb2.QualityMarkRequest(track_id="Artist1_Song1", instrument="guitar",
                                                             mark="shiny"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTrack(ingestion_pb2.GetTrackRequest(id="../x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Quality check job, mapping, marks export and listening parts over gRPC.
    job = stub.StartQualityCheck(ingestion_pb2.QualityCheckRequest(), timeout=10)
    done = wait_job(svc.channel(), job.id, timeout=60)
    assert done.state == jobs_pb2.SUCCEEDED and done.result["tracks_checked"] == 2

    mapping = stub.SetMapping(ingestion_pb2.SetMappingRequest(entries={"tack piano": "piano"}), timeout=10)
    assert mapping.user_entries == {"tack piano": "piano"} and mapping.entries["gtr"] == "guitar"
    done = wait_job(svc.channel(), stub.StartApplyMapping(ingestion_pb2.ApplyMappingRequest(), timeout=10).id)
    assert done.state == jobs_pb2.SUCCEEDED and list(done.result["tracks_changed"]) == ["Artist2_Song2"]
    assert dict(stub.GetMapping(ingestion_pb2.GetMappingRequest(), timeout=10).unmapped) == {}

    exported = stub.ExportMarks(ingestion_pb2.ExportMarksRequest(instrument="guitar"), timeout=10)
    assert exported.file_name == "marks_guitar.yaml" and "Artist1_Song1:" in exported.content

    parts = stub.GetListeningParts(ingestion_pb2.ListeningPartsRequest(
        track_id="Artist1_Song1", instrument="guitar", parts=5, include_audio=True, part_index=1), timeout=30)
    assert len(parts.parts) == 5
    audio, rate = sf.read(io.BytesIO(parts.wav))
    assert rate == 8000 and len(audio) / rate == pytest.approx(parts.parts[1].end_seconds - parts.parts[1].start_seconds,
                                                              abs=0.01)


def test_cli_synth_generates_and_imports_under_the_data_root(service):
    svc, root = service
    env = {"STEMLAB_INGESTION_ADDRESS": svc.address}
    r = run_cli("synth", "synthetic/set1", "--songs", "1", "--seconds", "4", "--seed", "2", "--rate", "22050",
                "--import", "--json", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    job = json.loads(r.stdout.strip().splitlines()[-1])
    assert job["result"]["import"]["added"] == ["Synth_Song001"]
    assert Library(root / "data").load("Synth_Song001").source == "synthetic"
    assert (root / "data" / "synthetic" / "set1" / "Synth_Song001").is_dir()
    r = run_cli("synth", "../outside", "--songs", "1", "--seconds", "4", "--json", env=env)
    assert r.returncode == 2 and "invalid_argument" in r.stderr
    # A set grows with new names (another soundfont, another folder) and the first songs stay as they were.
    first = (root / "data" / "synthetic" / "set1" / "Synth_Song001").stat().st_mtime_ns
    r = run_cli("synth", "synthetic/set2", "--songs", "1", "--seconds", "4", "--seed", "2", "--rate", "22050",
                "--start-index", "1", "--soundfont", "/usr/share/sounds/sf2/FluidR3_GM.sf2", "--import", "--json", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["result"]["import"]["added"] == ["Synth_Song002"]
    assert (root / "data" / "synthetic" / "set1" / "Synth_Song001").stat().st_mtime_ns == first
    r = run_cli("synth", "synthetic/set3", "--songs", "1", "--seconds", "4", "--start-index", "-1", env=env)
    assert r.returncode == 2 and "start_index must not be negative" in r.stderr
    # A soundfont loaded on top of the base font (a renamed copy of FluidR3 stands in for one).
    overlay = root / "overlay.sf2"
    shutil.copy("/usr/share/sounds/sf2/FluidR3_GM.sf2", overlay)
    r = run_cli("synth", "synthetic/set4", "--songs", "1", "--seconds", "4", "--seed", "2", "--rate", "22050",
                "--start-index", "2", "--overlay-soundfont", str(overlay), "--json", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    generated = json.loads(r.stdout.strip().splitlines()[-1])["result"]["generated"]
    assert generated["overlay_soundfonts"] == [str(overlay)]
    # Random timbre per part: recorded in the result; a strength outside 0..1 is refused up front.
    r = run_cli("synth", "synthetic/set6", "--songs", "1", "--seconds", "4", "--seed", "2", "--rate", "22050",
                "--start-index", "3", "--timbre", "0.5", "--json", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["result"]["generated"]["timbre"] == 0.5
    r = run_cli("synth", "synthetic/set7", "--songs", "1", "--seconds", "4", "--timbre", "2", env=env)
    assert r.returncode == 2 and "timbre must be between 0 and 1" in r.stderr
    assert not (root / "data" / "synthetic" / "set7").exists()
    r = run_cli("synth", "synthetic/set5", "--songs", "1", "--seconds", "4", "--overlay-soundfont",
                str(root / "missing.sf2"), "--json", env=env)
    assert r.returncode != 0 and "missing.sf2" in r.stderr + r.stdout
    assert not (root / "data" / "synthetic" / "set5").exists()


def test_cli_labelling_commands(service, tmp_path):
    svc, root = service
    env = {"STEMLAB_INGESTION_ADDRESS": svc.address}
    mdb = make_medleydb(root / "mdb2", songs=1, seconds=2.0)
    r = run_cli("dataset", "import", "stems", str(mdb / "Artist1_Song1" / "Artist1_Song1_STEMS"), "--json", env=env)
    assert r.returncode == 0, r.stderr
    track_id = json.loads(r.stdout.strip().splitlines()[-1])["result"]["added"][0]

    r = run_cli("dataset", "set-class", track_id, "Artist1_Song1_STEM_01.wav", "guitar", "--json", env=env)
    assert r.returncode == 0, r.stderr
    stems = {s["file"]: s for s in json.loads(r.stdout)["stems"]}
    assert stems["stems/Artist1_Song1_STEM_01.wav"]["class_name"] == "guitar"
    assert not stems["stems/Artist1_Song1_STEM_01.wav"].get("suggested", False)

    r = run_cli("dataset", "mark", track_id, "--instrument", "guitar", "--mark", "bleed", env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "marks_guitar.yaml"
    r = run_cli("dataset", "marks", "export", "--instrument", "guitar", "-o", str(out), env=env)
    assert r.returncode == 0 and "bleed: true" in out.read_text()
    r = run_cli("dataset", "mark", track_id, "--instrument", "guitar", "--mark", "bleed", "--clear", env=env)
    assert r.returncode == 0
    r = run_cli("dataset", "marks", "import", str(out), "--instrument", "guitar", "--json", env=env)
    assert r.returncode == 0 and track_id in json.loads(r.stdout)["updated"]

    wav = tmp_path / "part.wav"
    r = run_cli("dataset", "parts", track_id, "--instrument", "guitar", "--part", "0", "-o", str(wav), "--json",
                env=env)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["parts"]) == 5 and sf.info(str(wav)).frames > 0

    r = run_cli("dataset", "check", track_id, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["result"]["tracks_checked"] == 1


def test_ctrl_c_while_following_a_job_says_the_job_goes_on(service):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.servicetools import REPO

    svc, root = service
    env = {**os.environ, "PYTHONPATH": str(REPO), "STEMLAB_INGESTION_ADDRESS": svc.address}
    proc = subprocess.Popen([sys.executable, "-m", "stemlab.cli", "synth", "synthetic/long", "--songs", "12",
                             "--seconds", "30", "--seed", "3", "--rate", "22050"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while "RUNNING" not in proc.stderr.readline() and time.time() < deadline:
        pass  # until the command follows the running job
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    job_id = err.split("the job ")[1].split()[0]
    assert f"`stemlab jobs cancel {job_id}` to stop it" in err
    jobs = run_cli("jobs", "get", job_id, "--json", env={"STEMLAB_INGESTION_ADDRESS": svc.address})
    assert json.loads(jobs.stdout)["state"] in ("RUNNING", "SUCCEEDED")
    run_cli("jobs", "cancel", job_id, env={"STEMLAB_INGESTION_ADDRESS": svc.address})


def test_a_solo_import_keeps_a_short_last_piece_when_asked_with_zero(service):
    # --min-piece-seconds 0 used to travel as "unset" and mean the default 30 s.
    from tests.ingestion_data import tone, write

    svc, root = service
    env = {"STEMLAB_INGESTION_ADDRESS": svc.address}
    write(root / "solo" / "Riff Take.wav", tone(70.0, 196, channels=1))
    r = run_cli("dataset", "import", "solo", str(root / "solo" / "Riff Take.wav"), "--instrument", "guitar",
                "--piece-seconds", "30", "--min-piece-seconds", "0", "--json", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["result"]["added"] == [
        "Riff_Take_001", "Riff_Take_002", "Riff_Take_003"]

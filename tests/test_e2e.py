"""One song's walk through every service, with the stack started exactly as `make up` starts it
(local mode, supervisord), driven only through the `stemlab` CLI and the web JSON API.

Then the stack's own life cycle: `up` twice changes nothing, `status`, `down` leaves no process
behind, `up` again works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.polling import wait_until
from tests.servicetools import REPO, free_port, run_cli

pytestmark = pytest.mark.slow

SERVICES = ("ingestion", "processing", "training", "evaluation", "serving", "serving_rest", "web")


def stack(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "deploy/local/stack.py", *args, "--local"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def supervised_pids(data: Path) -> dict[str, int]:
    """Process ids of supervisord and of every program it runs."""
    pids = {"supervisord": int((data / "run" / "supervisord.pid").read_text())}
    out = subprocess.run([str(Path(sys.executable).parent / "supervisorctl"), "-c",
                          str(data / "run" / "supervisord.conf"), "status"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():  # "web    RUNNING   pid 1234, uptime 0:00:10"
        fields = line.replace(",", " ").split()
        if len(fields) >= 4 and fields[1] == "RUNNING" and fields[2] == "pid":
            pids[fields[0]] = int(fields[3])
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def processes_of(data: Path) -> list[int]:
    """Every live process started for this data root (services, their pools, supervisord)."""
    marker = f"STEMLAB_DATA={data}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory):
    data = tmp_path_factory.mktemp("e2e") / "data"
    ports = {name: free_port() for name in SERVICES}
    env = {**os.environ, "STEMLAB_DATA": str(data), "STEMLAB_GRACE_SECONDS": "5"}
    for name, port in ports.items():
        env[f"STEMLAB_{name.upper()}_PORT"] = str(port)
    for name in ("ingestion", "processing", "training", "evaluation", "serving"):
        env[f"STEMLAB_{name.upper()}_ADDRESS"] = f"127.0.0.1:{ports[name]}"
    env["STEMLAB_SERVING_REST_ADDRESS"] = f"127.0.0.1:{ports['serving_rest']}"
    r = stack(env, "up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"http://localhost:{ports['web']}/" in r.stdout
    yield data, ports, env
    stack(env, "down")


def cli(env: dict, *args: str, timeout: float = 600) -> dict:
    r = run_cli(*args, "--json", env=env, timeout=timeout)
    assert r.returncode == 0, f"stemlab {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def http_json(url: str, data: bytes | None = None, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def multipart(fields: dict[str, str], file_field: str, file_name: str, file_bytes: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{file_name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + file_bytes + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_up_on_an_empty_data_root_serves_both_shipped_models(running_stack):
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    data, ports, env = running_stack
    with grpc.insecure_channel(f"127.0.0.1:{ports['serving']}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        for name in ("guitar", "piano"):
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = name
            status = stub.GetModelStatus(request, timeout=30).model_version_status
            assert [s.state for s in status] == [get_model_status_pb2.ModelVersionStatus.AVAILABLE], name
            shipped = sorted(p.name for p in (REPO / "model" / "pretrained" / name).iterdir() if p.name.isdigit())
            assert str(status[0].version) == shipped[-1]


def test_a_song_walks_through_every_service(running_stack, tmp_path):
    data, ports, env = running_stack

    synth = cli(env, "synth", "synthetic/e2e", "--songs", "3", "--seconds", "8", "--seed", "3",
                "--rate", "22050", "--import")
    assert synth["state"] == "SUCCEEDED"
    tracks = cli(env, "dataset", "list")
    assert len(tracks["tracks"]) == 3
    check = cli(env, "dataset", "check")
    assert check["state"] == "SUCCEEDED"
    mix = cli(env, "mix", "--instrument", "guitar", "--rate", "22050", "--include-unchecked")
    assert mix["state"] == "SUCCEEDED"
    built = cli(env, "dataset", "build", "e2e", "--instrument", "guitar", "--rate", "22050",
                "--include-unchecked", "--validation-ratio", "0.34")
    assert built["state"] == "SUCCEEDED" and built["result"]["pairs"] >= 2

    trained = cli(env, "train", "--dataset", "e2e", "--preset", "tiny", "--epochs", "2",
                  "--steps-per-epoch", "4", "--batch-size", "2", "--run-id", "e2e-run")
    assert trained["state"] == "SUCCEEDED", trained
    assert (data / "runs" / "e2e-run").is_dir()
    # Jobs of every service, newest first, as many as asked for in all (not that many per service).
    newest = cli(env, "jobs", "list", "--limit", "2")["jobs"]
    assert [j["kind"] for j in newest] == ["training.train", "processing.dataset_build"], newest

    evaluated = cli(env, "evaluate", "--run", "e2e-run", "--dataset", "e2e", "--split", "all")
    assert evaluated["state"] == "SUCCEEDED", evaluated
    assert list((data / "evaluations").glob("*/report.json"))

    status_url = f"http://127.0.0.1:{ports['serving_rest']}/v1/models/guitar"
    exported = cli(env, "export", "e2e-run", "--model", "guitar")
    assert exported["state"] == "SUCCEEDED", exported
    version = int(exported["result"]["version"])
    def served() -> bool:  # serving polls the models folder: no restart
        try:
            states = http_json(status_url)["model_version_status"]
        except OSError:
            return False
        return any(int(s["version"]) == version and s["state"] == "AVAILABLE" for s in states)

    wait_until(served, 60, 0.2, "serving did not pick up the exported version")

    rate, seconds = 44100, 3.0
    t = np.arange(int(rate * seconds)) / rate
    song = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], axis=1)
    path = tmp_path / "song.wav"
    sf.write(path, song, rate, subtype="PCM_16")
    body, content_type = multipart({"model": "guitar"}, "file", "song.wav", path.read_bytes())
    web = f"http://127.0.0.1:{ports['web']}"
    created = http_json(f"{web}/api/separations", body, {"Content-Type": content_type})
    job_url = f"{web}/api/separations/{created['id']}"

    def ended():
        job = http_json(job_url)
        return job if job["state"].upper() in ("SUCCEEDED", "FAILED", "CANCELLED") else None

    job = wait_until(ended, 300, 0.2, f"separation {created['id']} did not end")
    assert job["state"].upper() == "SUCCEEDED", job
    for stem in ("instrument", "rest"):
        with urllib.request.urlopen(f"{job_url}/{stem}.wav", timeout=60) as r:
            out = tmp_path / f"{stem}.wav"
            out.write_bytes(r.read())
        audio, out_rate = sf.read(out, always_2d=True)
        assert out_rate == rate and audio.shape == song.shape


def test_up_twice_changes_nothing_status_down_leaves_nothing_and_up_again_works(running_stack):
    data, ports, env = running_stack
    before = supervised_pids(data)
    r = stack(env, "up")
    assert r.returncode == 0, r.stderr
    assert supervised_pids(data) == before, "a second `up` must not restart anything"
    assert stack(env, "status").returncode == 0

    # Code changed on disk since the services started (a `git pull`): `up` restarts them.
    stamp = data / "run" / "code.sha256"
    current = stamp.read_text()
    stamp.write_text("0" * 64 + "\n")
    r = stack(env, "up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the code changed since the stack started" in r.stdout
    restarted = supervised_pids(data)
    assert restarted["supervisord"] == before["supervisord"]
    assert all(restarted[name] != pid for name, pid in before.items() if name != "supervisord"), (before, restarted)
    assert stamp.read_text() == current
    before = restarted

    r = stack(env, "down")
    assert r.returncode == 0, r.stderr
    try:  # reaped within a second, as before (they may take a moment to leave the process table)
        wait_until(lambda: not any(alive(pid) for pid in before.values()), 1.0)
    except TimeoutError:
        pytest.fail(f"processes left behind after down: {({n: p for n, p in before.items() if alive(p)})}")
    assert processes_of(data) == [], "no pool worker or child may outlive `down`"
    assert stack(env, "status").returncode != 0

    r = stack(env, "up")
    assert r.returncode == 0, r.stdout + r.stderr
    again = supervised_pids(data)
    assert stack(env, "status").returncode == 0
    r = stack(env, "down")
    assert r.returncode == 0
    try:
        wait_until(lambda: not any(alive(pid) for pid in again.values()), 1.0)
    except TimeoutError:
        pass  # named and killed below
    for name, pid in again.items():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{name} ({pid}) left behind after the second down")

"""The deployment files agree with each other: compose (validated by docker-compose itself),
the GPU override, and the Kubernetes manifests (names, ports, volumes, environment)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.config import DEFAULT_PORTS
from tests.polling import wait_until

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
STEMLAB_SERVICES = ("ingestion", "processing", "training", "evaluation")


def compose_config(*files: str) -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: `make install` installs Debian's docker-compose")
    args = [exe]
    for f in files:
        args += ["-f", str(REPO / f)]
    r = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def published_port(entry) -> tuple[str, int]:
    """(host address, host port) of a compose port, in the long or the short syntax."""
    if isinstance(entry, dict):
        return entry.get("host_ip", "0.0.0.0"), int(entry["published"])
    parts = str(entry).split(":")
    return (parts[0] if len(parts) == 3 else "0.0.0.0"), int(parts[-2])


def k8s_documents() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_compose_file_is_valid_and_has_every_service_with_health_and_restart():
    config = compose_config("docker-compose.yml")
    services = config["services"]
    # `config` of docker-compose 1.29 lists every profile's services; the postgres profile's start only when selected.
    assert {n for n, svc in services.items() if not svc.get("profiles")} == {"init", *STEMLAB_SERVICES, "serving", "web"}
    assert {n for n, svc in services.items() if svc.get("profiles") == ["postgres"]} == {"postgres", "web-worker"}
    for name in (*STEMLAB_SERVICES, "serving", "web", "web-worker"):
        assert "healthcheck" in services[name], name
        assert services[name]["restart"] == "unless-stopped", name
        volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                   for v in services[name]["volumes"]]
        assert any(v.startswith("stemlab-data:/data") for v in volumes), (name, volumes)
    for name in STEMLAB_SERVICES:
        assert services[name]["command"][-1] == f"services.{name}.server"
        published = {published_port(p)[1] for p in services[name]["ports"]}
        assert published == {DEFAULT_PORTS[name]}
    assert services["serving"]["image"].startswith("tensorflow/serving:2.21")
    assert "--model_config_file=/data/serving/models.config" in services["serving"]["command"]
    assert services["web"]["depends_on"]["serving"]["condition"] == "service_healthy"
    assert services["serving"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "stemlab-data" in config["volumes"]


def test_compose_postgres_profile_adds_the_database_and_separation_workers(monkeypatch):
    monkeypatch.setenv("COMPOSE_PROFILES", "postgres")
    monkeypatch.setenv("STEMLAB_DATABASE_URL", "postgresql://stemlab:stemlab@postgres:5432/stemlab")
    services = compose_config("docker-compose.yml")["services"]
    assert set(services) == {"init", *STEMLAB_SERVICES, "serving", "web", "web-worker", "postgres"}
    db = services["postgres"]
    assert db["image"].startswith("postgres:") and "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(str(v).startswith("postgres-data:/var/lib/postgresql/data") or
               (isinstance(v, dict) and v.get("source") == "postgres-data") for v in db["volumes"])
    assert "ports" not in db  # reached on the compose network only
    worker = services["web-worker"]
    assert worker["command"] == ["python", "-m", "services.frontend.worker"]
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in (*STEMLAB_SERVICES, "web", "web-worker"):
        assert services[name]["environment"]["STEMLAB_DATABASE_URL"].startswith("postgresql://"), name


def test_serving_image_is_pinned_to_the_tensorflow_used_for_export():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"tensorflow>=2.21,<2.22"' in pyproject
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose["services"]["serving"]["image"] == "tensorflow/serving:2.21.0"


def test_gpu_override_reserves_nvidia_gpus_for_training_and_serving():
    config = compose_config("docker-compose.yml", "docker-compose.gpu.yml")
    for name in ("training", "serving"):
        devices = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert config["services"]["serving"]["image"] == "tensorflow/serving:2.21.0-gpu"
    assert config["services"]["training"]["build"]["args"]["EXTRAS"] == "gpu"


def test_kubernetes_manifests_match_compose():
    docs = k8s_documents()
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    config_map = docs[("ConfigMap", "stemlab-config")]["data"]
    # Job store settings come from the host (compose) or the database patch (Kubernetes); the token
    # is no configuration: compose gets it from `make up`, Kubernetes from a Secret.
    compose_env = {k: v for k, v in compose["x-stemlab"]["environment"].items()
                   if k not in ("STEMLAB_DATABASE_URL", "STEMLAB_WEB_START_WORKERS", "STEMLAB_TOKEN")}
    assert {k: str(v) for k, v in compose_env.items()} == {k: v for k, v in config_map.items()
                                                           if k in compose_env}
    assert docs[("PersistentVolumeClaim", "stemlab-data")]["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in (*STEMLAB_SERVICES, "web"):
        deploy = docs[("Deployment", name)]
        container = deploy["spec"]["template"]["spec"]["containers"][0]
        port = container["ports"][0]["containerPort"]
        assert port == DEFAULT_PORTS[name]
        assert docs[("Service", name)]["spec"]["ports"][0]["port"] == port
        assert container["command"] == compose["services"][name]["command"]
        assert container["volumeMounts"][0]["mountPath"] == "/data"
        volumes = deploy["spec"]["template"]["spec"]["volumes"]
        assert volumes[0]["persistentVolumeClaim"]["claimName"] == "stemlab-data"
        assert "readinessProbe" in container
        assert container["envFrom"][0]["configMapRef"]["name"] == "stemlab-config"
    serving = docs[("Deployment", "serving")]
    assert serving["spec"]["replicas"] >= 2 and docs[("Deployment", "web")]["spec"]["replicas"] >= 2
    container = serving["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == compose["services"]["serving"]["image"]
    assert set(container["args"]) >= {a for a in compose["services"]["serving"]["command"]
                                      if a.startswith(("--port", "--rest_api_port", "--model_config_file="))}
    assert {p["port"] for p in docs[("Service", "serving")]["spec"]["ports"]} == {8500, 8501}
    assert container["readinessProbe"]["httpGet"]["port"] == 8501
    # Web replicas are stateless: the queue is in the job database, results on the shared volume,
    # separations in web-worker pods; so no affinity and no volume of their own.
    web = docs[("Deployment", "web")]["spec"]["template"]["spec"]
    assert [m["mountPath"] for m in web["containers"][0]["volumeMounts"]] == ["/data"]
    assert not any("emptyDir" in v for v in web["volumes"])
    assert "sessionAffinity" not in docs[("Service", "web")]["spec"]
    assert docs[("ConfigMap", "stemlab-web")]["data"]["STEMLAB_WEB_START_WORKERS"] == "false"


def test_kubernetes_scales_workers_on_a_shared_postgresql():
    docs = k8s_documents()
    worker = docs[("Deployment", "web-worker")]["spec"]["template"]["spec"]
    assert worker["containers"][0]["command"] == ["python", "-m", "services.frontend.worker"]
    assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == "stemlab-data"
    for name in ("web-worker", "processing", "evaluation"):
        hpa = docs[("HorizontalPodAutoscaler", name)]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["metrics"][0]["resource"]["name"] == "cpu" and hpa["maxReplicas"] > hpa["minReplicas"]
    db = docs[("StatefulSet", "postgres")]["spec"]
    assert db["template"]["spec"]["containers"][0]["image"].startswith("postgres:")
    assert db["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert docs[("Service", "postgres")]["spec"]["ports"][0]["port"] == 5432
    # Every stemlab Deployment gets the database URL from the kustomization's patch.
    rendered = kustomize()
    deployments = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["labels"]["app"] == "stemlab"]
    assert {d["metadata"]["name"] for d in deployments} >= {*STEMLAB_SERVICES, "web", "web-worker"}
    for deploy in deployments:
        env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        assert env["STEMLAB_DATABASE_URL"]["value"].startswith("postgresql://stemlab:$(STEMLAB_DB_PASSWORD)@postgres")
        assert env["STEMLAB_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "stemlab-db"


def kustomize() -> list[dict]:
    """`kubectl kustomize deploy/k8s` where kubectl is installed, else the same patch applied here."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return [d for d in yaml.safe_load_all(r.stdout) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((K8S / patch["path"]).read_text())
        label = dict([patch["target"]["labelSelector"].split("=")])
        for doc in docs:
            if doc["kind"] == patch["target"]["kind"] and label.items() <= doc["metadata"].get("labels", {}).items():
                for op in ops:
                    assert op["op"] == "add" and op["path"] == "/spec/template/spec/containers/0/env"
                    doc["spec"]["template"]["spec"]["containers"][0]["env"] = op["value"]
    return docs


def test_training_jobs_exist_for_cpu_and_gpu():
    docs = k8s_documents()
    cpu, gpu = docs[("Job", "train")], docs[("Job", "train-gpu")]
    for job in (cpu, gpu):
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][:3] == ["python", "-m", "services.training.run"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    gpu_limits = gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1


def test_kustomization_lists_every_manifest_but_the_jobs():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"training-job.yaml", "training-job-gpu.yaml", "serving-external.yaml"}
    assert listed <= on_disk


def _stack_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stack", Path(__file__).parents[1] / "deploy" / "local" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    return stack


def test_install_models_copies_whole_shipped_versions_only(tmp_path):
    """After a pull that replaced guitar/4 by guitar/5, git leaves guitar/4/assets/ behind, empty."""
    from types import SimpleNamespace

    stack = _stack_module()
    shipped = tmp_path / "pretrained"
    (shipped / "guitar" / "4" / "assets").mkdir(parents=True)
    for version in ("guitar/5", "piano/4"):
        (shipped / version).mkdir(parents=True)
        (shipped / version / "saved_model.pb").write_bytes(b"graph")
    data = tmp_path / "data"
    stack.install_models(SimpleNamespace(data_root=data), pretrained=shipped)
    assert sorted(p.name for p in (data / "models" / "guitar").iterdir()) == ["5"]
    assert sorted(p.name for p in (data / "models" / "piano").iterdir()) == ["4"]
    assert (data / "models" / "guitar" / "5" / "saved_model.pb").read_bytes() == b"graph"
    assert 'name: "guitar"' in (data / "serving" / "models.config").read_text()


def _shipped_tree(root, versions):
    """A model/pretrained tree: each version a fake SavedModel, and shipped.json listing them."""
    import json

    stack = _stack_module()
    digests = {}
    for version in versions:
        folder = root / version
        (folder / "variables").mkdir(parents=True)
        (folder / "saved_model.pb").write_bytes(f"graph {version}".encode())
        (folder / "variables" / "variables.index").write_bytes(f"weights {version}".encode())
        name, number = version.split("/")
        digests.setdefault(name, {})[number] = stack.version_digest(folder)
    (root / "shipped.json").write_text(json.dumps(digests))
    return root


def test_up_after_a_pull_adds_the_newer_shipped_version_beside_the_shipped_ones(tmp_path):
    """A data root installed from guitar 11 gets guitar 12 once a pull ships it (the server serves
    the highest version); a model folder with a version of the user's own is left as it was."""
    import shutil
    from types import SimpleNamespace

    stack = _stack_module()
    old = _shipped_tree(tmp_path / "old", ["guitar/11", "piano/8"])
    data = tmp_path / "data"
    config = SimpleNamespace(data_root=data)
    stack.install_models(config, pretrained=old)
    # the user's own piano export beside the shipped one
    shutil.copytree(data / "models" / "piano" / "8", data / "models" / "piano" / "9")
    (data / "models" / "piano" / "9" / "variables" / "variables.index").write_bytes(b"trained by me")

    new = _shipped_tree(tmp_path / "new", ["guitar/11", "guitar/12", "piano/8", "piano/10"])
    stack.install_models(config, pretrained=new)
    assert sorted(p.name for p in (data / "models" / "guitar").iterdir()) == ["11", "12"]
    assert (data / "models" / "guitar" / "12" / "saved_model.pb").read_bytes() == b"graph guitar/12"
    assert sorted(p.name for p in (data / "models" / "piano").iterdir()) == ["8", "9"]
    assert (data / "models" / "piano" / "9" / "variables" / "variables.index").read_bytes() == b"trained by me"


def test_up_keeps_the_names_a_user_exported_and_repairs_a_broken_config(tmp_path):
    """`stemlab export --model bass` adds bass to the serving config; a later `make up` points the
    shipped names at this data root and keeps bass and an operator's version policy. A config that
    does not parse is rewritten."""
    from types import SimpleNamespace

    from services.common import models_config
    from services.serving.config import load_model_config

    stack = _stack_module()
    pretrained = _shipped_tree(tmp_path / "pretrained", ["guitar/12", "piano/9"])
    data = tmp_path / "data"
    config, path = SimpleNamespace(data_root=data), models_config.config_path(data)
    stack.install_models(config, pretrained=pretrained)
    assert models_config.add_model(path, "bass", data / "models" / "bass")
    # an operator's choice for guitar: serve its two newest versions
    path.write_text(path.read_text().replace('name: "guitar"', 'name: "guitar" model_version_policy '
                                             '{ latest { num_versions: 2 } }'))
    stack.install_models(config, pretrained=pretrained, models_root=tmp_path / "elsewhere")
    specs = {s.name: s for s in load_model_config(path)}
    assert {name: spec.base_path for name, spec in specs.items()} == {
        "guitar": tmp_path / "elsewhere" / "guitar", "piano": tmp_path / "elsewhere" / "piano",
        "bass": data / "models" / "bass"}
    assert (specs["guitar"].latest_count, specs["piano"].latest_count) == (2, 1)

    path.write_text("model_config_list { config { name: ")
    stack.install_models(config, pretrained=pretrained)
    assert [s.name for s in load_model_config(path)] == ["guitar", "piano"]


def test_every_shipped_version_is_listed_with_its_digest():
    """`make up` recognises installed shipped versions by shipped.json: a version shipped without
    its digest there would stop every data root from moving to the next one."""
    stack = _stack_module()
    pretrained = REPO / "model" / "pretrained"
    listed = stack.shipped_versions(pretrained)
    for name in ("guitar", "piano"):
        for version in stack.whole_versions(pretrained / name):
            assert listed[name][version.name] == stack.version_digest(version), f"{name}/{version.name}"


def test_make_up_under_docker_rebuilds_the_images_from_the_code_on_disk(tmp_path):
    """Without --build, `make up` after a `git pull` would start the old images again."""
    import os

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    # A docker client whose engine answers: `info` succeeds, every call is recorded.
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "STEMLAB_DATA": str(tmp_path / "data")}
    env.pop("STEMLAB_MODE", None)
    r = subprocess.run([sys.executable, str(REPO / "deploy" / "local" / "stack.py"), "up"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    up = [line.split() for line in calls.read_text().splitlines() if line.startswith("compose")]
    assert len(up) == 1 and up[0][-4:] == ["up", "-d", "--build", "--wait"], up
    assert up[0][up[0].index("-f") + 1] == str(REPO / "docker-compose.yml")


def test_a_stale_supervisord_pid_file_does_not_count_as_a_running_stack(tmp_path):
    """A supervisord killed without cleanup leaves its pid file; the pid may since be another
    process's, and `make up` must then start the stack rather than restart a dead one."""
    from types import SimpleNamespace

    stack = _stack_module()
    config = SimpleNamespace(data_root=tmp_path)
    (tmp_path / "run").mkdir()
    pid_file = tmp_path / "run" / "supervisord.pid"
    assert not stack.supervisord_running(config)  # no pid file
    other = subprocess.Popen(["sleep", "60"])
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "supervisord"])
    # Popen may return before the child's exec shows in /proc.
    wait_until(lambda: b"supervisord" in Path(f"/proc/{lookalike.pid}/cmdline").read_bytes(), 10)
    try:
        pid_file.write_text(f"{other.pid}\n")
        assert not stack.supervisord_running(config)  # alive, but not a supervisord
        pid_file.write_text(f"{lookalike.pid}\n")
        assert stack.supervisord_running(config)
    finally:
        for proc in (other, lookalike):
            proc.kill()
            proc.wait()
    assert not stack.supervisord_running(config)  # the pid is gone
    pid_file.write_text("not a pid\n")
    assert not stack.supervisord_running(config)


# -- closed by default (issue 37) ----------------------------------------------------------------
def test_compose_publishes_every_port_on_the_host_loopback_unless_configured(monkeypatch):
    monkeypatch.delenv("STEMLAB_PUBLISH_HOST", raising=False)
    services = compose_config("docker-compose.yml")["services"]
    published = [(name, p) for name, svc in services.items() for p in svc.get("ports", [])]
    assert len(published) >= 7  # four gRPC services, serving's two ports, the web (and any added since)
    assert all(published_port(p)[0] == "127.0.0.1" for _, p in published), published
    monkeypatch.setenv("STEMLAB_PUBLISH_HOST", "0.0.0.0")
    opened = compose_config("docker-compose.yml")["services"]
    assert {published_port(p)[0] for svc in opened.values() for p in svc.get("ports", [])} == {"0.0.0.0"}
    for name in (*STEMLAB_SERVICES, "web"):  # inside the compose network: listening, with the token
        assert services[name]["environment"]["STEMLAB_BIND_HOST"] == "0.0.0.0"
        assert "STEMLAB_TOKEN" in services[name]["environment"]


def kustomized() -> list[dict]:
    exe = shutil.which("kubectl")
    if exe is None:  # the same files, read as kustomize would list them
        names = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
        return [d for n in names for d in yaml.safe_load_all((K8S / n).read_text()) if d]
    r = subprocess.run([exe, "kustomize", str(K8S)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_kubernetes_exposes_only_the_web_outside_the_cluster():
    services = {d["metadata"]["name"]: d["spec"] for d in kustomized() if d["kind"] == "Service"}
    assert set(services) >= {*STEMLAB_SERVICES, "serving", "web"}
    assert services["web"]["type"] == "LoadBalancer"
    for name in set(services) - {"web"}:  # every other Service, present or added later
        assert services[name].get("type", "ClusterIP") == "ClusterIP", name
    assert all("nodePort" not in port for spec in services.values() for port in spec["ports"])
    # serving outside the cluster is opt-in, in a file kustomize does not apply
    external = yaml.safe_load((K8S / "serving-external.yaml").read_text())
    assert external["spec"]["type"] == "LoadBalancer" and external["spec"]["loadBalancerSourceRanges"]


def test_local_stack_binds_loopback_unless_configured(tmp_path, monkeypatch):
    from services.common.config import load_config

    monkeypatch.setenv("STEMLAB_DATA", str(tmp_path))
    monkeypatch.delenv("STEMLAB_BIND_HOST", raising=False)
    stack = _stack_module()
    config = load_config()
    assert config.bind_host == "127.0.0.1"
    progs = stack.programs(config)
    assert "--bind 127.0.0.1:" in progs["web"]["command"]
    if "tensorflow_model_server" not in progs["serving"]["command"]:
        assert "--host=127.0.0.1" in progs["serving"]["command"]
        assert f"--model_base_path_prefix={tmp_path / 'models'}" in progs["serving"]["command"]
    monkeypatch.setenv("STEMLAB_BIND_HOST", "0.0.0.0")
    assert "--bind 0.0.0.0:" in stack.programs(load_config())["web"]["command"]


def test_every_stemlab_setting_exported_for_make_up_reaches_the_services(tmp_path, monkeypatch):
    from supervisor.datatypes import dict_of_key_value_pairs

    from services.common.config import load_config

    monkeypatch.setenv("STEMLAB_DATA", str(tmp_path))
    monkeypatch.setenv("STEMLAB_WEB_MAX_SONG_SECONDS", "300")
    monkeypatch.setenv("STEMLAB_WEB_ALLOW_HOSTS", "127.0.0.1,10.0.0.0/8")
    odd = tmp_path / 'odd "name" 100%.yaml'
    odd.write_text("{}\n")
    monkeypatch.setenv("STEMLAB_CONFIG", str(odd))
    stack = _stack_module()
    config = load_config()
    conf = stack.write_supervisor_config(config, stack.programs(config))
    lines = conf.read_text().splitlines()
    sections = {x[len("[program:"):-1]: lines[i + 3] for i, x in enumerate(lines) if x.startswith("[program:")}
    assert all(line.startswith("environment=") for line in sections.values())
    # The web's own settings reach the web alone: changing one restarts nothing else.
    assert "STEMLAB_WEB_MAX_SONG_SECONDS" not in sections["ingestion"] and "STEMLAB_WEB_PORT" in sections["ingestion"]
    line = sections["web"]
    # supervisord's own parser reads back what was exported (its % interpolation done).
    env = dict_of_key_value_pairs(line.removeprefix("environment=").replace("%%", "%"))
    assert env["STEMLAB_WEB_MAX_SONG_SECONDS"] == "300" and env["STEMLAB_WEB_ALLOW_HOSTS"] == "127.0.0.1,10.0.0.0/8"
    assert env["STEMLAB_CONFIG"] == str(tmp_path / 'odd "name" 100%.yaml')
    assert "STEMLAB_MODE" not in env
    # A changed value changes the file, so `up` on a running stack restarts the services it concerns.
    before = conf.read_text()
    monkeypatch.setenv("STEMLAB_WEB_MAX_SONG_SECONDS", "5")
    assert stack.write_supervisor_config(config, stack.programs(config)).read_text() != before


def test_an_invalid_setting_stops_make_up_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "STEMLAB_DATA": str(tmp_path), "STEMLAB_LOG_LEVEL": "LOUD", "STEMLAB_MODE": "local"}
    result = subprocess.run([sys.executable, "deploy/local/stack.py", "status", "--local"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "log_level must be DEBUG, INFO, WARNING or ERROR, not 'LOUD'" in result.stderr

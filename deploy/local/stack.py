"""Run the whole stack on this machine: with Docker Compose when an engine answers, otherwise as
local processes under supervisord (same ports, same data root).

    python deploy/local/stack.py up|down|status|logs [--docker|--local]

`up` is idempotent: running it twice leaves the running stack as it is. It waits until every
started service answers its health check, then prints the addresses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from services.common import models_config  # noqa: E402
from services.common.auth import TOKEN_ENV, ensure_token  # noqa: E402
from services.common.config import GRPC_SERVICES, ConfigError, load_config  # noqa: E402
from services.common.paths import atomic_write_text  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SHIPPED_MODELS = ("guitar", "piano")


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- what runs ------------------------------------------------------------------------------
def programs(config) -> dict[str, dict]:
    """The services that exist in this checkout, as supervisord programs."""
    data = config.data_root
    progs: dict[str, dict] = {}
    for name in GRPC_SERVICES:
        if (REPO / "services" / name / "server.py").exists():
            progs[name] = {"command": f"{sys.executable} -m services.{name}.server",
                           "check": ("grpc", config.port(name))}
    serving_port, rest_port = config.port("serving"), config.port("serving_rest")
    served = models_config.config_path(data)
    tf_server = shutil.which("tensorflow_model_server")
    if tf_server:
        progs["serving"] = {"command": f"{tf_server} --port={serving_port} --rest_api_port={rest_port} "
                                       f"--model_config_file={served} "
                                       "--file_system_poll_wait_seconds=2 --model_config_file_poll_wait_seconds=5",
                            "check": ("http", f"http://127.0.0.1:{rest_port}/v1/models/guitar")}
    elif (REPO / "services" / "serving" / "server.py").exists():
        progs["serving"] = {"command": f"{sys.executable} -m services.serving.server --port={serving_port} "
                                       f"--rest_api_port={rest_port} --model_config_file={served} "
                                       f"--model_base_path_prefix={data / 'models'} --host={config.bind_host} "
                                       "--file_system_poll_wait_seconds=2 --model_config_file_poll_wait_seconds=5",
                            "check": ("grpc", serving_port)}
    if (REPO / "services" / "frontend" / "app.py").exists():
        web_port = config.port("web")
        progs["web"] = {"command": f"{VENV_BIN / 'gunicorn'} -c python:services.frontend.gunicorn_conf "
                                   f"--bind {config.bind_host}:{web_port} 'services.frontend.app:create_app()'",
                        "check": ("http", f"http://127.0.0.1:{web_port}/healthz")}
    return progs


def _supervisor_quoted(key: str, value: str) -> str:
    """`value` as one quoted token of supervisord's environment= line (shlex without escapes:
    the other quote wraps a value holding one; % is supervisord's interpolation)."""
    value = value.replace("%", "%%")
    for quote in ('"', "'"):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise SystemExit(f"stemlab: {key} holds both ' and \", which supervisord cannot pass on")


def write_supervisor_config(config, progs: dict[str, dict]) -> Path:
    run_dir = config.data_root / "run"
    logs = config.data_root / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = {"STEMLAB_DATA": str(config.data_root), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    # Every STEMLAB_* setting exported for `make up` reaches the services (the configuration table
    # of the README: job store, security, STEMLAB_WEB_*, workers, limits). Written into each
    # program's section, so a changed value changes the config and `up` restarts the programs it
    # concerns (before, supervisord kept the environment of the first `up`).
    for key, value in sorted(os.environ.items()):
        if key.startswith("STEMLAB_") and key not in ("STEMLAB_MODE", "STEMLAB_DATA") and value:
            env[key] = value
    for name in (*GRPC_SERVICES, "serving", "serving_rest", "web"):
        env[f"STEMLAB_{name.upper()}_PORT"] = str(config.port(name))
    def env_line(program: str) -> str:
        # The web's own settings only where they count, so changing one restarts the web alone.
        mine = {k: v for k, v in env.items()
                if program == "web" or not k.startswith("STEMLAB_WEB_") or k == "STEMLAB_WEB_PORT"}
        return ",".join(f"{k}={_supervisor_quoted(k, v)}" for k, v in sorted(mine.items()))

    lines = [
        "; generated by deploy/local/stack.py — do not edit",
        "[supervisord]",
        f"logfile={logs / 'supervisord.log'}",
        f"pidfile={run_dir / 'supervisord.pid'}",
        f"directory={REPO}",
        "nodaemon=false",
        "[unix_http_server]",
        f"file={run_dir / 'supervisor.sock'}",
        "[supervisorctl]",
        f"serverurl=unix://{run_dir / 'supervisor.sock'}",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
    ]
    for name, prog in progs.items():
        lines += [
            f"[program:{name}]",
            f"command={prog['command']}",
            f"directory={REPO}",
            f"environment={env_line(name)}",
            "autorestart=true",
            "startsecs=3",
            "startretries=5",
            "stopsignal=TERM",
            f"stopwaitsecs={int(config.grace_seconds) + 10}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={logs / (name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=3",
        ]
    path = run_dir / "supervisord.conf"
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)  # may hold $STEMLAB_TOKEN
        tmp.replace(path)
    return path


def supervisord_running(config) -> bool:
    pid_file = config.data_root / "run" / "supervisord.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    # A supervisord that died without cleaning up (a killed session, a reboot) leaves its pid file,
    # and the pid may since belong to another process: then `up` would talk to a dead socket and
    # never start the services. Where /proc exists, the pid must be a supervisord's.
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"supervisord" in cmdline.read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def supervisorctl(conf: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(conf), *args],
                          capture_output=True, text=True, check=check)


# -- health -----------------------------------------------------------------------------------
def healthy(check) -> bool:
    kind, target = check
    if kind == "grpc":
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from services.common.auth import open_channel

        try:
            with open_channel(f"127.0.0.1:{target}", ca_file=load_config().tls_client_ca) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False
    try:
        with urllib.request.urlopen(target, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


def wait_healthy(progs: dict[str, dict], timeout: float) -> list[str]:
    deadline = time.time() + timeout
    pending = dict(progs)
    while pending and time.time() < deadline:
        for name in list(pending):
            if healthy(pending[name]["check"]):
                del pending[name]
        if pending:
            time.sleep(0.5)
    return sorted(pending)


def version_digest(folder: Path) -> str:
    """What identifies an exported version: its graph and its weights' index (which holds each
    tensor's checksum), so a copy is recognised wherever it lies."""
    digest = hashlib.sha256()
    for part in ("saved_model.pb", "variables/variables.index"):
        f = folder / part
        digest.update(f.read_bytes() if f.is_file() else b"")
    return digest.hexdigest()


def shipped_versions(pretrained: Path) -> dict[str, dict[str, str]]:
    """Every version the project ever shipped, per model: version -> digest (`shipped.json`)."""
    path = pretrained / "shipped.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def whole_versions(folder: Path) -> list[Path]:
    # Only whole SavedModels: a version git removed can leave an empty folder behind (git keeps
    # no directories), which the server would find and fail to load.
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()),
                  key=lambda p: int(p.name))


def copy_version(version: Path, target: Path) -> None:
    """Copy under a temporary name and rename, so the server never sees half a version."""
    tmp = target / f".tmp-install-{version.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(version, tmp)
    tmp.rename(target / version.name)


def install_models(config, models_root: Path | None = None, pretrained: Path | None = None) -> None:
    """Serving needs a models.config and the shipped models.

    An empty model folder gets every shipped version. A folder holding only versions the project
    shipped (recognised by their digests) gets the newer ones a pull brought, so the server, which
    serves the highest version, moves to them. A folder with any version of the user's own is left
    alone: the shipped models never replace or outrank what a user trained. Names the config
    lists besides the shipped two (a user's exports, services/common/models_config.py) stay.
    """
    models_root = models_root or config.data_root / "models"
    pretrained = pretrained or REPO / "model" / "pretrained"
    shipped = shipped_versions(pretrained)
    for name in SHIPPED_MODELS:
        target = models_root / name
        present = [p for p in target.iterdir() if p.name.isdigit()] if target.is_dir() else []
        known = shipped.get(name, {})
        if all(known.get(p.name) == version_digest(p) for p in present):
            newest = max((int(p.name) for p in present), default=0)
            for version in whole_versions(pretrained / name):
                if int(version.name) > newest:
                    copy_version(version, target)
        target.mkdir(parents=True, exist_ok=True)
    models_config.set_models(models_config.config_path(config.data_root),
                             {name: models_root / name for name in SHIPPED_MODELS})


# -- commands ---------------------------------------------------------------------------------
# The sources the services run. A running service keeps the code it imported, and TensorFlow's
# AutoGraph re-reads a function's source from disk when it traces, so after a `git pull` a new
# training run would mix old code with new lines and fail obscurely: `up` restarts them instead.
CODE_DIRS = ("services", "model", "stemlab")


def code_fingerprint() -> str:
    """sha256 over the paths and contents of every Python file the services import."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def up_local(config, timeout: float) -> int:
    install_models(config)
    ensure_token(config.data_root)  # before any service starts: they all read the same one
    progs = programs(config)
    conf = write_supervisor_config(config, progs)
    stamp = config.data_root / "run" / "code.sha256"
    code = code_fingerprint()
    if supervisord_running(config):
        supervisorctl(conf, "reread")
        supervisorctl(conf, "update")
        started_with = stamp.read_text().strip() if stamp.is_file() else ""
        if started_with != code:
            # Jobs in flight are interrupted as after a crash (training resumes from its checkpoint).
            print("the code changed since the stack started: restarting its services")
            supervisorctl(conf, "restart", "all")
        else:
            supervisorctl(conf, "start", "all")
    else:
        subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(conf)], check=True)
    atomic_write_text(stamp, code + "\n")
    missing = wait_healthy(progs, timeout)
    if missing:
        print(f"not healthy after {timeout:.0f}s: {', '.join(missing)} "
              f"(see {config.data_root / 'logs'})", file=sys.stderr)
        return 1
    print_addresses(config, progs)
    return 0


def print_addresses(config, progs) -> None:
    print(f"stemlab is up (local processes, data root {config.data_root})")
    for name in progs:
        if name == "serving":
            print(f"  serving     grpc localhost:{config.port('serving')}  rest http://localhost:{config.port('serving_rest')}")
        elif name == "web":
            print(f"  web         http://localhost:{config.port('web')}/")
        else:
            print(f"  {name:<11} grpc localhost:{config.port(name)}")


def down_local(config) -> int:
    conf = config.data_root / "run" / "supervisord.conf"
    if not supervisord_running(config):
        print("stemlab is not running")
        return 0
    supervisorctl(conf, "stop", "all")
    supervisorctl(conf, "shutdown")
    deadline = time.time() + 60
    while supervisord_running(config) and time.time() < deadline:
        time.sleep(0.2)
    print("stemlab is down")
    return 0 if not supervisord_running(config) else 1


def status_local(config) -> int:
    progs = programs(config)
    if not supervisord_running(config):
        print("stemlab is not running")
        return 3
    bad = 0
    for name, prog in progs.items():
        ok = healthy(prog["check"])
        bad += not ok
        print(f"  {name:<11} {'healthy' if ok else 'NOT HEALTHY'}")
    return 1 if bad else 0


def compose(*args: str) -> int:
    files = ["-f", str(REPO / "docker-compose.yml")]
    gpu = REPO / "docker-compose.gpu.yml"
    if os.environ.get("STEMLAB_GPU") == "1" and gpu.exists():
        files += ["-f", str(gpu)]
    return subprocess.run(["docker", "compose", "-p", "stemlab", *files, *args], cwd=REPO).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "logs", "install-models"])
    parser.add_argument("--models-root", type=Path, default=None,
                        help="with install-models: where the model folders live (default DATA/models)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--docker", action="store_true", help="use Docker Compose")
    mode.add_argument("--local", action="store_true", help="use local processes")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as error:
        print(f"stemlab: {error}", file=sys.stderr)
        return 2
    if args.command == "install-models":
        install_models(config, args.models_root)
        return 0
    use_docker = args.docker or (not args.local and os.environ.get("STEMLAB_MODE") != "local"
                                 and docker_engine_available())
    if use_docker:
        if args.command == "up":
            # The containers get the host data root's token, so the CLI on the host is let in.
            os.environ[TOKEN_ENV] = ensure_token(config.data_root)
        # --build: images are rebuilt from the code on disk (layer cache makes it quick when
        # nothing changed), so `make up` after a `git pull` never runs the old code.
        return compose(*{"up": ["up", "-d", "--build", "--wait"], "down": ["down"], "status": ["ps"],
                         "logs": ["logs", "--tail", "200"]}[args.command])
    if args.command == "up":
        return up_local(config, args.timeout)
    if args.command == "down":
        return down_local(config)
    if args.command == "status":
        return status_local(config)
    logs = config.data_root / "logs"
    for f in sorted(logs.glob("*.log")):
        print(f"==> {f} <==")
        print("".join(f.read_text(errors="replace").splitlines(keepends=True)[-40:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validated configuration: one place for the defaults, a YAML file, then environment overrides.

Order of precedence (last wins): the defaults below, the YAML file named by STEMLAB_CONFIG
(if any), then environment variables:

    STEMLAB_DATA                 data root (default ./data)
    STEMLAB_<SERVICE>_PORT       port a service listens on (e.g. STEMLAB_INGESTION_PORT)
    STEMLAB_<SERVICE>_WORKERS    concurrent jobs of a service
    STEMLAB_<SERVICE>_ADDRESS    where clients reach a service (host:port)
    STEMLAB_MAX_MESSAGE_MB       gRPC message size limit, both directions
    STEMLAB_GRACE_SECONDS        how long SIGTERM waits for running jobs
    STEMLAB_LOG_LEVEL            DEBUG, INFO, WARNING, ERROR
    STEMLAB_BIND_HOST            address services listen on (default 127.0.0.1: this machine only)
    STEMLAB_IMPORT_ROOTS         folders besides the data root that RPCs may read (os.pathsep-separated)
    STEMLAB_SERVING_ADDRESSES    serving servers evaluation may send audio to (comma-separated;
                                 the configured serving address is always allowed)
    STEMLAB_TLS_CERT, STEMLAB_TLS_KEY, STEMLAB_TLS_CA   optional TLS (services/common/auth.py)
    STEMLAB_TOKEN                the stack's token (default: DATA/secrets/token)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.errors import InvalidArgumentError

# The default ports of docs/architecture.md.
DEFAULT_PORTS = {
    "ingestion": 50051,
    "processing": 50052,
    "training": 50053,
    "evaluation": 50054,
    "serving": 8500,
    "serving_rest": 8501,
    "web": 8080,
}
GRPC_SERVICES = ("ingestion", "processing", "training", "evaluation")


class ConfigError(InvalidArgumentError):
    """The configuration file or an environment override is invalid."""


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int = Field(ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    # Free-form settings of one service (validated by that service).
    options: dict[str, Any] = Field(default_factory=dict)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_root: Path = Path("./data")
    # Loopback unless configured: the services trust their token, not their network.
    bind_host: str = "127.0.0.1"
    client_host: str = "localhost"
    max_message_mb: int = Field(default=64, ge=1, le=2047)
    grace_seconds: float = Field(default=10.0, ge=0, le=600)
    log_level: str = "INFO"
    services: dict[str, ServiceSettings] = Field(default_factory=dict)
    # Folders outside the data root whose files RPCs may import (resolved, symlinks followed).
    import_roots: list[Path] = Field(default_factory=list)
    # Serving addresses (host:port) evaluation may talk to besides the configured one.
    serving_addresses: list[str] = Field(default_factory=list)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):  # like PATH: folders separated by os.pathsep
            return [part.strip() for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("serving_addresses", mode="before")
    @classmethod
    def _split_addresses(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {v!r}")
        return v

    def service(self, name: str) -> ServiceSettings:
        if name not in self.services:
            raise ConfigError(f"unknown service {name!r}")
        return self.services[name]

    def port(self, name: str) -> int:
        return self.service(name).port

    def address(self, name: str) -> str:
        """Where a client reaches `name`: STEMLAB_<NAME>_ADDRESS, else client_host:port."""
        env = os.environ.get(f"STEMLAB_{name.upper()}_ADDRESS")
        return env or f"{self.client_host}:{self.port(name)}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def tls_client_ca(self) -> Path | None:
        """What clients trust when TLS is on: the CA file, else the server certificate itself."""
        return self.tls_ca_file or self.tls_cert_file

    def allowed_serving_addresses(self) -> set[str]:
        return {self.address("serving"), *self.serving_addresses}


def first_error(error: ValidationError) -> str:
    """One line a person can act on: where the first invalid value is, and what is wrong."""
    first = error.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "value"
    return f"{where}: {first['msg']}"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from e


def load_config(path: str | os.PathLike | None = None) -> Config:
    """The configuration for this process (see the module docstring for the sources)."""
    raw: dict[str, Any] = {}
    path = path or os.environ.get("STEMLAB_CONFIG")
    if path:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read configuration {p}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"configuration {p} must be a mapping")
    services = {name: {"port": port} for name, port in DEFAULT_PORTS.items()}
    for name, settings in (raw.pop("services", None) or {}).items():
        if not isinstance(settings, dict):
            raise ConfigError(f"services.{name} must be a mapping")
        services.setdefault(name, {}).update(settings)
    for name in services:
        port = _env_int(f"STEMLAB_{name.upper()}_PORT")
        if port is not None:
            services[name]["port"] = port
        workers = _env_int(f"STEMLAB_{name.upper()}_WORKERS")
        if workers is not None:
            services[name]["workers"] = workers
    raw["services"] = services
    if os.environ.get("STEMLAB_DATA"):
        raw["data_root"] = os.environ["STEMLAB_DATA"]
    if (mb := _env_int("STEMLAB_MAX_MESSAGE_MB")) is not None:
        raw["max_message_mb"] = mb
    # Read where decodes start (services/common/audio.py); checked here so a wrong value stops the
    # service at start instead of meaning the default.
    if (decoded := _env_int("STEMLAB_MAX_DECODED_MB")) is not None and decoded <= 0:
        raise ConfigError(f"STEMLAB_MAX_DECODED_MB={decoded} must be at least 1")
    if os.environ.get("STEMLAB_GRACE_SECONDS"):
        raw["grace_seconds"] = os.environ["STEMLAB_GRACE_SECONDS"]
    if os.environ.get("STEMLAB_LOG_LEVEL"):
        raw["log_level"] = os.environ["STEMLAB_LOG_LEVEL"]
    for key, env in (("bind_host", "STEMLAB_BIND_HOST"), ("import_roots", "STEMLAB_IMPORT_ROOTS"),
                     ("serving_addresses", "STEMLAB_SERVING_ADDRESSES"), ("tls_cert_file", "STEMLAB_TLS_CERT"),
                     ("tls_key_file", "STEMLAB_TLS_KEY"), ("tls_ca_file", "STEMLAB_TLS_CA")):
        if os.environ.get(env):
            raw[key] = os.environ[env]
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration at {first_error(e)}") from e
    config.data_root = config.data_root.expanduser().resolve()
    config.import_roots = [p.expanduser().resolve() for p in config.import_roots]
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ConfigError("TLS needs both tls_cert_file and tls_key_file (STEMLAB_TLS_CERT, STEMLAB_TLS_KEY)")
    return config

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
    bind_host: str = "0.0.0.0"
    client_host: str = "localhost"
    max_message_mb: int = Field(default=64, ge=1, le=2047)
    grace_seconds: float = Field(default=10.0, ge=0, le=600)
    log_level: str = "INFO"
    services: dict[str, ServiceSettings] = Field(default_factory=dict)

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
    if os.environ.get("STEMLAB_GRACE_SECONDS"):
        raw["grace_seconds"] = os.environ["STEMLAB_GRACE_SECONDS"]
    if os.environ.get("STEMLAB_LOG_LEVEL"):
        raw["log_level"] = os.environ["STEMLAB_LOG_LEVEL"]
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration at {first_error(e)}") from e
    config.data_root = config.data_root.expanduser().resolve()
    return config

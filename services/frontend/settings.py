"""Settings of the web demo: defaults here, then the common config, then STEMLAB_WEB_* variables.

Order of precedence (last wins): the defaults of `WebSettings`, `services.web.options` of the
common YAML config (STEMLAB_CONFIG), environment variables named STEMLAB_WEB_<FIELD> (upper
case, e.g. STEMLAB_WEB_MAX_UPLOAD_MB=50), then the mapping given to `create_app(config)`.
The number of concurrent separations is the common `services.web.workers`
(STEMLAB_WEB_WORKERS); the serving addresses are the common STEMLAB_SERVING_ADDRESS and
STEMLAB_SERVING_REST_ADDRESS (default localhost:8500 / localhost:8501).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common import models_config
from services.common.audio import WEB_MAX_CHANNELS, WEB_MAX_RATE_HZ, DecodeLimits
from services.common.config import ConfigError, first_error, load_config

log = logging.getLogger(__name__)
DEFAULT_MODELS = ("guitar", "piano")


class WebSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_root: Path = Path("./data")
    serving_address: str = "localhost:8500"
    serving_rest_address: str = "localhost:8501"
    # How separations talk to serving: grpc (binary tensors) or rest (JSON, ~10x the bytes).
    serving_protocol: str = "grpc"
    ingestion_address: str = "localhost:50051"
    # Models offered on the home page, if serving reports a version of them AVAILABLE. Empty: the
    # names the data root's serving config lists (every model exported here; services/common/
    # models_config.py), or guitar and piano where there is none.
    models: list[str] = Field(default_factory=list)
    workers: int = Field(default=1, ge=1, le=32)  # separations running at once
    max_queued: int = Field(default=8, ge=1, le=10_000)  # separations waiting or running
    # 10 minutes of 24-bit 48 kHz stereo WAV (165 MiB) fit, as the song length limit promises.
    max_upload_mb: float = Field(default=200.0, gt=0)
    max_song_seconds: float = Field(default=600.0, gt=0)
    download_max_mb: float = Field(default=100.0, gt=0)  # yt-dlp / direct link size limit
    download_timeout_seconds: float = Field(default=120.0, gt=0)
    # Hosts (IPs or CIDR networks) a link may point to although they are loopback or private.
    allow_hosts: list[str] = Field(default_factory=list)
    result_ttl_hours: float = Field(default=24.0, gt=0)  # results are deleted after this long
    # Bytes all results may take: the oldest finished ones are deleted first (see separations.py).
    results_quota_mb: float = Field(default=10_000.0, gt=0)
    sweep_seconds: float = Field(default=600.0, gt=0)  # how often the cleanup sweep runs
    segment_seconds: float = Field(default=10.0, gt=0)  # what the separation client sends at once
    model_status_cache_seconds: float = Field(default=5.0, ge=0)
    serving_timeout_seconds: float = Field(default=300.0, gt=0)
    # How long a queued separation waits for serving to load its model (after a restart).
    serving_wait_seconds: float = Field(default=120.0, ge=0)
    # gunicorn threads of the web process (services/frontend/gunicorn_conf.py): uploads and
    # downloads served at once, each holding one for as long as its client takes.
    threads: int = Field(default=32, ge=1, le=1024)
    # Run separations in this process. False: the web only queues them, and worker processes
    # (`python -m services.frontend.worker`) on the same job store run them.
    start_workers: bool = True

    @field_validator("models", "allow_hosts", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as error:
                raise ValueError(f"allow_hosts entry {entry!r} is not an IP address or network") from error
        return value

    @field_validator("serving_protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        if value not in ("grpc", "rest"):
            raise ValueError(f"serving_protocol must be grpc or rest, not {value!r}")
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def results_quota_bytes(self) -> int:
        return int(self.results_quota_mb * 1024 * 1024)

    @property
    def decode_limits(self) -> DecodeLimits:
        """How songs are decoded: counted against the length limit, at their own rate up to 48 kHz
        and at most stereo (converted while decoding), so the stems come out the same way."""
        return DecodeLimits(max_seconds=self.max_song_seconds, max_rate_hz=WEB_MAX_RATE_HZ,
                            max_channels=WEB_MAX_CHANNELS, timeout_seconds=self.download_timeout_seconds + 300)

    @property
    def download_max_bytes(self) -> int:
        return int(self.download_max_mb * 1024 * 1024)

    @property
    def web_root(self) -> Path:
        """DATA/web: the separation store and the result folders."""
        return self.data_root / "web"


def offered_models(settings: WebSettings) -> list[str]:
    """The models the page offers: the configured ones, else what the data root's serving config
    lists (read each time: an export adds names), else guitar and piano."""
    if settings.models:
        return settings.models
    try:
        return models_config.served_names(models_config.config_path(settings.data_root)) or list(DEFAULT_MODELS)
    except (OSError, models_config.ModelsConfigError) as error:
        log.warning("offering %s: %s", ", ".join(DEFAULT_MODELS), error)
        return list(DEFAULT_MODELS)


def load_settings(overrides: dict[str, Any] | None = None) -> WebSettings:
    """Settings from the sources in the module docstring; raises ConfigError naming the bad field."""
    common = load_config()
    raw: dict[str, Any] = {
        "data_root": common.data_root,
        "serving_address": common.address("serving"),
        "serving_rest_address": os.environ.get("STEMLAB_SERVING_REST_ADDRESS")
        or f"{common.client_host}:{common.port('serving_rest')}",
        "ingestion_address": common.address("ingestion"),
        "workers": common.service("web").workers,
    }
    raw.update(common.service("web").options)
    for name in WebSettings.model_fields:
        value = os.environ.get(f"STEMLAB_WEB_{name.upper()}")
        if value is not None and value != "":
            raw[name] = value
    raw.update(overrides or {})
    try:
        settings = WebSettings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid web setting {first_error(error)}") from error
    settings.data_root = Path(settings.data_root).expanduser().resolve()
    return settings

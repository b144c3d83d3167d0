"""What the web demo asks other services: which models serving has AVAILABLE, and (for the
review page) the track library through the ingestion service.

Kept behind these small classes so the pages do not care how the answer travels.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import FailedPreconditionError


class BackendUnavailable(FailedPreconditionError):
    """A service the page needs does not answer."""


@dataclass(frozen=True)
class ModelStatus:
    name: str
    available: bool
    versions: list[int] = field(default_factory=list)  # AVAILABLE versions, highest first
    state: str = ""  # the state of the highest version serving knows, e.g. AVAILABLE, LOADING
    error: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "available": self.available, "versions": self.versions,
                "state": self.state, "error": self.error}


class ServingModels:
    """Model status through TF Serving's REST API (GET /v1/models/<name>), cached for a few seconds.

    The REST status call is the same on tensorflow_model_server and on services/serving, and
    needs no TensorFlow in the web process.
    """

    def __init__(self, rest_address: str, names: Callable[[], list[str]], cache_seconds: float = 5.0,
                 timeout_seconds: float = 3.0):
        self.rest_address = rest_address
        self.names = names  # asked again whenever the cache is stale: serving's models can change
        self.cache_seconds = cache_seconds
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[ModelStatus]] | None = None

    def status(self, name: str) -> ModelStatus:
        url = f"http://{self.rest_address}/v1/models/{urllib.parse.quote(name, safe='')}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except ValueError:
                message = str(error.reason)
            return ModelStatus(name, False, error=message or f"HTTP {error.code}")
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise BackendUnavailable(f"serving is not reachable at {self.rest_address}: "
                                     f"{getattr(error, 'reason', error)}") from None
        statuses = body.get("model_version_status") or [] if isinstance(body, dict) else []
        versions, states = [], {}
        for entry in statuses:
            try:
                version = int(entry.get("version"))
            except (TypeError, ValueError):
                continue
            states[version] = str(entry.get("state", ""))
            if states[version] == "AVAILABLE":
                versions.append(version)
        versions.sort(reverse=True)
        state = states[max(states)] if states else "UNKNOWN"
        return ModelStatus(name, bool(versions), versions, state)

    def list(self) -> list[ModelStatus]:
        """The status of every configured model; raises BackendUnavailable when serving is down."""
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
        models = [self.status(name) for name in self.names()]
        with self._lock:
            self._cached = (time.monotonic(), models)
        return models

    def available(self) -> list[str]:
        return [model.name for model in self.list() if model.available]

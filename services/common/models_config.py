"""Which model names a data root serves: ``DATA/serving/models.config``.

The file is TensorFlow Serving's ``model_config_list`` text proto. ``make up`` writes it (the
shipped models, keeping every other name listed), the training service adds a name the first
time it exports one, and both servers re-read it (``--model_config_file_poll_wait_seconds``), so
a model a user trains under a name of their own is served without a restart. Names are only
added here, never dropped: a running server unloads a model whose name leaves the file, so
taking one out is the operator's edit. Every served name costs memory (about 150 MB each with
the compatible server), which is why ``make up`` does not list every folder under ``models/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from services.common.paths import atomic_write_text


class ModelsConfigError(ValueError):
    """The file exists but is not a model_config_list this module can add to."""


def config_path(data_root: str | os.PathLike) -> Path:
    return Path(data_root) / "serving" / "models.config"


def render(models: dict[str, Path]) -> str:
    """The text proto serving ``models`` (name -> base path, in that order), newest version each."""
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in models.items():
        _add(config, name, base_path)
    return text_format.MessageToString(config)


def served_names(path: str | os.PathLike) -> list[str]:
    """The names the config at ``path`` lists, in order; [] when there is no file."""
    path = Path(path)
    text = _read(path)
    return [] if text is None else [m.name for m in _parse(path, text).model_config_list.config]


def set_models(path: str | os.PathLike, models: dict[str, Path]) -> None:
    """List ``models`` (name -> base path) first in the config at ``path``, at those paths, and
    keep every other name it lists; a version policy or labels an operator gave any of them stay.
    A missing file, or one that cannot be parsed, becomes ``models`` alone (how ``make up``
    repairs it). Written only when it changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        text = _read(path)
        try:
            listed = [] if text is None else list(_parse(path, text).model_config_list.config)
        except ModelsConfigError:
            listed = []
        config = model_server_config_pb2.ModelServerConfig()
        for name, base_path in models.items():
            _add(config, name, base_path, like=next((m for m in listed if m.name == name), None))
        config.model_config_list.config.extend(m for m in listed if m.name not in models)
        new = text_format.MessageToString(config)
        if new != text:
            atomic_write_text(path, new)


def add_model(path: str | os.PathLike, name: str, base_path: str | os.PathLike) -> bool:
    """List ``name`` in the config at ``path`` if it is not there; True when it was added.

    No file means no server reads this data root's config (a training service on its own), so
    nothing is written. Entries already there, with any version policy or labels an operator
    gave them, are kept as they are. A lock beside the file keeps two exports from losing each
    other's name; the new text is renamed into place so a polling server never reads half of it.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _locked(path):
        text = _read(path)
        if text is None:
            return False
        config = _parse(path, text)
        if any(m.name == name for m in config.model_config_list.config):
            return False
        _add(config, name, base_path)
        atomic_write_text(path, text_format.MessageToString(config))
        return True


@contextlib.contextmanager
def _locked(path: Path):
    """One writer at a time (`make up` and exports), through a lock file beside the config."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _add(config: model_server_config_pb2.ModelServerConfig, name: str, base_path: str | os.PathLike,
         like: model_server_config_pb2.ModelConfig | None = None) -> None:
    """Append an entry serving ``name`` from ``base_path``; ``like``'s other fields (a version
    policy, labels) carried over when it replaces an entry."""
    entry = config.model_config_list.config.add()
    if like is not None:
        entry.CopyFrom(like)
    entry.name, entry.base_path, entry.model_platform = name, str(base_path), "tensorflow"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _parse(path: Path, text: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelsConfigError(f"{path} is not a valid model_config_list: {error}") from error
    if config.WhichOneof("config") == "custom_model_config":
        raise ModelsConfigError(f"{path} uses custom_model_config; only model_config_list can be added to")
    return config

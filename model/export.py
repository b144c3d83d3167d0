"""Export a network as a TF-Serving SavedModel under models/<name>/<version>/, published atomically.

Signatures:
  serving_default: waveform float32 [batch, samples] at the model's rate
                   -> instrument, rest float32 [batch, samples]
  sample_rate:     x float32 [batch] (ignored) -> sample_rate int32 [batch]
An export may hold another instrument's networks too, whose mask it leaves out of its own
(`Excluded`): one SavedModel, so serving and every client see one model either way.
The version folder is built under a name starting with ".tmp-" (TF Serving loads only all-digit
folder names) and renamed into place in one step, so a server polling the folder never loads half
a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from model.config import ModelConfig, config_from_dict, config_to_dict
from model.network import build_network, fold_batch_norm
from model.separate import separate_waveform

STEMLAB_ASSET = "stemlab.json"


class ExportError(RuntimeError):
    """The model could not be exported or published."""


# An ensemble's networks must cut and read the same spectrogram chunks; each may have its own layers.
ENSEMBLE_SHARED_KEYS = ("rate_hz", "n_fft", "hop_length", "window", "chunk_frames")


class Excluded(NamedTuple):
    """Another instrument's model whose mask the export takes out of its own (separate_waveform):
    its networks, the config it applies them with, and each network's own config."""
    networks: list[keras.Model]
    config: ModelConfig
    member_configs: list[ModelConfig]


class _Separator(tf.Module):
    """What the SavedModel holds: the networks' weights and the two serving functions.

    One network is tracked as `network` (the layout every single-network export has); an
    ensemble's as `members`, in order. Those keep their batch norm layers, so a fine-tune can start
    from them. Given each network's config (`member_configs`), the serving function applies copies
    with the batch norm folded into the convolutions instead (`folded`: the same masks, faster);
    exports before those copies existed serve the networks themselves.
    """

    def __init__(self, networks: keras.Model | Sequence[keras.Model], config: ModelConfig,
                 member_configs: Sequence[ModelConfig] | None = None, excluded: Excluded | None = None):
        super().__init__(name="stemlab_separator")
        if isinstance(networks, Sequence) and len(networks) > 1:
            self.members = list(networks)
        else:
            self.network = networks[0] if isinstance(networks, Sequence) else networks
        if member_configs is not None:
            self.folded = [fold_batch_norm(n, c) for n, c in zip(self._networks(), member_configs, strict=True)]
        self._config = config
        if excluded is not None:
            # Tracked apart from network/members, so loading the export's own networks (to
            # fine-tune them) neither counts nor needs these; only the folded copies serve.
            self.excluded_members = list(excluded.networks)
            self.excluded_folded = [fold_batch_norm(n, c) for n, c in
                                    zip(excluded.networks, excluded.member_configs, strict=True)]
            self._excluded_config = excluded.config

    def _networks(self) -> list[keras.Model]:
        return self.members if hasattr(self, "members") else [self.network]

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform")])
    def separate(self, waveform):
        networks = self.folded if hasattr(self, "folded") else self._networks()
        excluded = (self.excluded_folded, self._excluded_config) if hasattr(self, "excluded_folded") else None
        instrument, rest = separate_waveform(networks, waveform, self._config, excluded)
        return {"instrument": instrument, "rest": rest}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def sample_rate(self, x):
        return {"sample_rate": tf.fill(tf.shape(x), tf.constant(self._config.rate_hz, tf.int32))}


def versions(model_dir: str | os.PathLike) -> list[int]:
    """Published integer versions under models/<name>/, ascending."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def check_ensemble(configs: Sequence[ModelConfig]) -> None:
    """Raise ExportError when an ensemble's networks do not share ENSEMBLE_SHARED_KEYS."""
    first = configs[0]
    for i, other in enumerate(configs[1:], start=2):
        differ = [k for k in ENSEMBLE_SHARED_KEYS if getattr(other, k) != getattr(first, k)]
        if differ:
            raise ExportError(f"ensemble member {i} has another spectrogram or chunk than the first: "
                              + ", ".join(f"{k} {getattr(other, k)} there, {getattr(first, k)} in the first"
                                          for k in differ))


def export_saved_model(
    network: keras.Model | Sequence[keras.Model], config: ModelConfig, out_dir: str | os.PathLike,
    metadata: dict[str, Any] | None = None, excluded: Excluded | None = None,
) -> int:
    """Write the SavedModel as the next version under `out_dir` (models/<name>/); returns the version.

    `metadata` (e.g. preset, source run) goes into assets.extra/stemlab.json with the config and rate.
    For an ensemble (several networks, applied with `config`), metadata["members"] must list one
    dict per network with its "config" (a config_to_dict), so its weights can be read back.
    `excluded`: another instrument's model whose mask is taken out of this one's (separate_waveform);
    it must cut the same spectrogram and chunks, and metadata should say which model it is.
    """
    networks = list(network) if isinstance(network, Sequence) else [network]
    configs = [config]
    if len(networks) > 1:
        members = (metadata or {}).get("members")
        if not isinstance(members, list) or len(members) != len(networks) or not all(
                isinstance(m, dict) and isinstance(m.get("config"), dict) for m in members):
            raise ExportError(f"an ensemble of {len(networks)} networks needs metadata['members'] with each one's config")
        configs = [config_from_dict(m["config"]) for m in members]
        check_ensemble([config, *configs])
    if excluded is not None:
        try:
            check_ensemble([config, excluded.config, *excluded.member_configs])
        except ExportError as e:
            raise ExportError(f"the model to leave out cuts another spectrogram ({e})") from e
    model_dir = Path(out_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
    try:
        try:
            module = _Separator(networks, config, configs, excluded)
        except ValueError as e:  # a network not built from its config: no layer of that name or shape
            raise ExportError(f"the networks do not match their configs: {e}") from e
        signatures = {
            "serving_default": module.separate.get_concrete_function(),
            "sample_rate": module.sample_rate.get_concrete_function(),
        }
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        info = {"config": config_to_dict(config), "rate_hz": config.rate_hz, **(metadata or {})}
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / "assets.extra" / STEMLAB_ASSET).write_text(json.dumps(info, indent=2, sort_keys=True))
        # Another export may publish the same number between our listing and rename: try the next.
        for _ in range(100):
            version = (versions(model_dir) or [0])[-1] + 1
            try:
                os.rename(tmp, model_dir / str(version))
                return version
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
        raise ExportError(f"could not find a free version number under {model_dir}")
    except Exception as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"export to {model_dir} failed: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_export_info(version_dir: str | os.PathLike, missing_ok: bool = False) -> dict[str, Any]:
    """assets.extra/stemlab.json of an exported version ({} when it has none and `missing_ok`).

    A SavedModel exported elsewhere may have no such file; one that is not a JSON object raises
    ExportError either way.
    """
    path = Path(version_dir) / "assets.extra" / STEMLAB_ASSET
    if not path.is_file():
        if missing_ok:
            return {}
        raise ExportError(f"{version_dir} has no assets.extra/{STEMLAB_ASSET}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ExportError(f"{path} is not a JSON object")
    return info


def member_configs(info: dict[str, Any]) -> list[ModelConfig]:
    """The network config of each member of an export (one for a single network), from its stemlab.json."""
    members = info.get("members")
    if isinstance(members, list) and len(members) > 1:
        return [config_from_dict(m["config"]) for m in members]
    return [config_from_dict(info["config"])]


def load_exported_weights(network: keras.Model, config: ModelConfig, version_dir: str | os.PathLike,
                          member: int = 1) -> None:
    """Set `network`'s weights to an exported version's (built with the same network settings).

    The SavedModel's variables are a checkpoint of `_Separator`, so the same object graph reads
    them back; a variable missing on either side raises, a silent partial load would not. From an
    ensemble, `network` gets the weights of its `member`-th network (1: the first; the others are
    read into throwaway copies).
    """
    info = read_export_info(version_dir, missing_ok=True)
    networks = [build_network(c) for c in member_configs(info)] if info.get("config") else [network]
    if not 1 <= member <= len(networks):
        raise ExportError(f"{version_dir} has {len(networks)} network(s), no member {member}")
    networks[member - 1] = network
    _read_weights(networks, config, version_dir)


def load_exported_networks(version_dir: str | os.PathLike, folded: bool = False,
                           ) -> tuple[list[keras.Model], ModelConfig]:
    """An export's networks (one, or an ensemble's members) with its weights, and the config it applies them with.

    folded=True gives what the export serves instead: each network with its batch norm folded into
    its convolutions (the same masks, faster; for inference only, not to train further).
    """
    info = read_export_info(version_dir)
    if not isinstance(info.get("config"), dict):
        raise ExportError(f"{version_dir} records no network config in assets.extra/{STEMLAB_ASSET}")
    configs = member_configs(info)
    networks = [build_network(c) for c in configs]
    config = config_from_dict(info["config"])
    _read_weights(networks, config, version_dir)
    if folded:
        networks = [fold_batch_norm(n, c) for n, c in zip(networks, configs, strict=True)]
    return networks, config


def load_excluded_networks(version_dir: str | os.PathLike, folded: bool = False) -> Excluded | None:
    """The other instrument's model an export leaves out (its networks with their weights, as
    `load_exported_networks` gives an export's own), or None when it leaves none out."""
    record = read_export_info(version_dir).get("excluded")
    if not record:
        return None
    try:
        config = config_from_dict(record["config"])
        configs = [config_from_dict(m["config"]) for m in record["members"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{version_dir} records the model it leaves out without its settings: {e}") from e
    networks = [build_network(c) for c in configs]
    holder = tf.Module()
    holder.excluded_members = networks
    _read_weights(networks, config, version_dir, holder, ("excluded_members/",))
    if folded:
        networks = [fold_batch_norm(n, c) for n, c in zip(networks, configs, strict=True)]
    return Excluded(networks, config, configs)


def _read_weights(networks: list[keras.Model], config: ModelConfig, version_dir: str | os.PathLike,
                  root: tf.Module | None = None, prefixes: tuple[str, ...] = ("network/", "members/")) -> None:
    """Read `networks`' weights from the export: those under `prefixes` of its checkpoint, through
    `root` (the same object graph down to them; default: a _Separator of the networks)."""
    prefix = Path(version_dir) / "variables" / "variables"
    # Only the networks are read: the export's folded serving copies (if it has them) are derived
    # from them. Every variable must be found and none left over; a silent partial load would not do.
    try:
        stored = [k for k, _ in tf.train.list_variables(str(prefix)) if k.startswith(prefixes)]
    except (tf.errors.OpError, ValueError) as e:
        raise ExportError(f"{version_dir} has no readable variables: {e}") from e
    expected = sum(len(n.weights) for n in networks)
    if len(stored) != expected:
        raise ExportError(f"{version_dir} holds another network's weights: {len(stored)} variables, "
                          f"{expected} expected")
    status = tf.train.Checkpoint(root or _Separator(networks, config)).read(str(prefix))
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ExportError(f"{version_dir} holds another network's weights: {e}") from e
    status.expect_partial()

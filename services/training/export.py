"""Export: a run's best weights (or several runs' and exported models' networks, as an ensemble)
become the next version of models/<name>/, the SavedModel that serving loads (model/export.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from model.checkpoint import load_best_network, read_run
from model.config import (
    INFERENCE_KEYS,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    with_inference_overrides,
)
from model.export import (
    Excluded,
    ExportError,
    check_ensemble,
    export_saved_model,
    load_excluded_networks,
    load_exported_networks,
    read_export_info,
)
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.manifest import load_manifest
from services.common.paths import PathError, safe_join
from services.training.provenance import code_version, now
from services.training.turns import tf_turn

MEMBER_RECORD_KEYS = ("preset", "source_run", "best_epoch", "best_val_loss", "dataset", "instrument", "init_from")


def model_members(version_dir: str | os.PathLike, member: int | None = None) -> list[dict[str, Any]]:
    """The records (with "config") of an exported model's networks — all of them, or its `member`-th
    (1: the first) — as export_run lists members; FailedPreconditionError when it has no such member."""
    version_dir = Path(version_dir)
    try:
        info = read_export_info(version_dir)
    except (ExportError, ValueError) as e:
        raise FailedPreconditionError(f"{version_dir} is not an exported model: {e}") from e
    members = info.get("members") if isinstance(info.get("members"), list) else [info]
    if not all(isinstance(m, dict) and isinstance(m.get("config"), dict) for m in members):
        raise FailedPreconditionError(f"exported model {version_dir} does not record its networks' settings")
    chosen = range(1, len(members) + 1) if member is None else [member]
    if member is not None and not 1 <= member <= len(members):
        raise FailedPreconditionError(f"model {version_dir.parent.name} version {version_dir.name} has "
                                      f"{len(members)} network(s), no member {member}")
    where = {"model": version_dir.parent.name, "version": int(version_dir.name) if version_dir.name.isdigit()
             else version_dir.name}
    return [{**{k: members[i - 1][k] for k in MEMBER_RECORD_KEYS if k in members[i - 1]}, "config": members[i - 1]["config"],
             "from_model": {**where, "member": i}} for i in chosen]


def export_run(run_dir: str | os.PathLike | None, models_root: str | os.PathLike, model_name: str,
               overrides: dict[str, Any] | None = None,
               with_runs: list[str | os.PathLike] | None = None,
               with_models: list[tuple[str | os.PathLike, int | None]] | None = None,
               without_model: str | os.PathLike | None = None) -> int:
    """Export the run's best weights as the next version of models/<model_name>/; returns the version.

    `overrides` may change how the network is applied (config.INFERENCE_KEYS, e.g. mask_exponent).
    `with_runs`: more runs whose networks join the first in an ensemble (the mean of their masks);
    stemlab.json then lists every member under "members", the first one's record staying on top.
    `with_models`: (exported version folder, member or None for all its networks) whose networks join
    after the runs' — e.g. a shipped model's network beside a run trained since; each member's record
    names the model, version and member it came from ("from_model").
    With no run (run_dir None, no with_runs) the exported models' networks alone are exported again,
    applied as the first of those models applies them unless `overrides` say otherwise: an export
    made by older code gets the current export (folded batch norm) with the same separation.
    `without_model`: an exported model of another instrument (version folder) whose mask is taken out
    of this one's at separation (model.export.Excluded), e.g. the piano model in the guitar model so
    that it leaves pianos alone; recorded under "excluded" in stemlab.json. Exporting such a model
    again with --with-model keeps what it leaves out (carried_exclusion) unless `without_model`
    names another; a run fine-tuned from it leaves nothing out unless asked again.
    """
    run_dirs = [Path(r) for r in [run_dir, *(with_runs or [])] if r]
    if not run_dirs and not with_models:
        raise InvalidArgumentError("nothing to export: name a run or an exported model")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", model_name or ""):
        raise InvalidArgumentError(f"invalid model name {model_name!r}: use letters, digits, '.', '_' and '-'")
    try:
        model_dir = safe_join(models_root, model_name)
    except PathError as e:
        raise InvalidArgumentError(str(e)) from e
    # Building, loading and saving the network run TF functions: in turn with the service's
    # training runs, like their own checkpoint saves (turns.tf_turn). run.yaml is read in the same
    # turn, as a training run updates it with its best weights.
    with tf_turn():
        networks, configs, records = [], [], []
        for path in run_dirs:
            info = read_run(path)
            network, member_config = load_best_network(path)
            record = {"preset": info.get("preset"), "source_run": info.get("run_id", path.name),
                      "best_epoch": info.get("best_epoch"), "best_val_loss": info.get("best_val_loss"),
                      "dataset": info.get("manifest", {}), "instrument": run_instrument(info)}
            if info.get("init_from"):  # a fine-tune names the weights it started from
                record["init_from"] = info["init_from"]
            networks.append(network)
            configs.append(member_config)
            records.append(record)
        for version_dir, member in with_models or []:
            chosen = model_members(version_dir, member)
            try:
                members, _ = load_exported_networks(version_dir)
            except ExportError as e:
                raise FailedPreconditionError(f"cannot read {version_dir}: {e}") from e
            for record in chosen:
                networks.append(members[record["from_model"]["member"] - 1])
                configs.append(config_from_dict(record.pop("config")))
                records.append(record)
        instruments = {r["instrument"] for r in records if r["instrument"]}
        if len(instruments) > 1:
            raise InvalidArgumentError(f"an ensemble separates one instrument; these runs learnt {sorted(instruments)}")
        try:
            check_ensemble(configs)
        except ExportError as e:
            raise FailedPreconditionError(str(e)) from e
        config = configs[0]
        if not run_dirs:  # the first model's own way of applying its networks, not its member's record
            applied = config_from_dict(read_export_info(with_models[0][0])["config"])
            config = config.model_copy(update={k: getattr(applied, k) for k in INFERENCE_KEYS})
        try:
            config = with_inference_overrides(config, overrides)
        except ConfigError as e:
            raise InvalidArgumentError(str(e)) from e
        metadata = {**records[0], "code_version": code_version(), "exported": now()}
        if len(records) > 1:
            metadata["members"] = [{**r, "config": config_to_dict(c)} for r, c in zip(records, configs, strict=True)]
        if without_model is not None:
            excluded, record = excluded_model(without_model, instruments, config)
        else:
            excluded, record = carried_exclusion([d for d, _ in with_models or []], instruments, config)
        if record:
            metadata["excluded"] = record
        return export_saved_model(networks if len(networks) > 1 else networks[0], config, model_dir, metadata,
                                  excluded)


def check_excluded(version_dir: str | os.PathLike, instruments: set[str], config: ModelConfig) -> list[dict[str, Any]]:
    """The records of the networks of a model to leave out of an export applied with `config`.
    InvalidArgumentError when it separates the very instrument being exported (one of
    `instruments`), FailedPreconditionError when it cuts another spectrogram or chunks."""
    version_dir = Path(version_dir)
    members = model_members(version_dir)
    instrument = members[0].get("instrument")
    if instrument and instrument in instruments:
        raise InvalidArgumentError(f"{version_dir.parent.name} separates {instrument} too: leave out another "
                                   "instrument's model")
    try:
        check_ensemble([config, *(config_from_dict(m["config"]) for m in members)])
    except ExportError as e:
        raise FailedPreconditionError(f"{version_dir.parent.name} cuts another spectrogram than the export "
                                      f"({e})") from e
    return members


def excluded_model(version_dir: str | os.PathLike, instruments: set[str],
                   config: ModelConfig) -> tuple[Excluded, dict[str, Any]]:
    """The model to leave out of an export applied with `config` (its networks and configs, checked
    by check_excluded) and its record for stemlab.json."""
    version_dir = Path(version_dir)
    members = check_excluded(version_dir, instruments, config)
    try:
        networks, applied = load_exported_networks(version_dir)
    except ExportError as e:
        raise FailedPreconditionError(f"cannot leave out {version_dir}: {e}") from e
    record = {"model": version_dir.parent.name, "version": int(version_dir.name) if version_dir.name.isdigit()
              else version_dir.name, "instrument": members[0].get("instrument"), "config": config_to_dict(applied),
              "members": [{"config": m["config"]} for m in members]}
    return Excluded(networks, applied, [config_from_dict(m["config"]) for m in members]), record


def carried_exclusion(version_dirs: list[str | os.PathLike], instruments: set[str],
                      config: ModelConfig) -> tuple[Excluded | None, dict[str, Any] | None]:
    """What the exported models joining an export leave out, carried into it as they recorded it
    (None, None when none leaves anything out). They must agree: two that leave out different
    models are refused, since the user has to say which one the new export leaves out."""
    found: dict[tuple, tuple[Path, dict[str, Any]]] = {}
    for version_dir in map(Path, version_dirs):
        record = read_export_info(version_dir).get("excluded")
        if record:
            found.setdefault((record.get("model"), record.get("version")), (version_dir, record))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(f"{m}:{v}" for m, v in found)
        raise InvalidArgumentError(f"the models joining this export leave out different models ({names}): "
                                   "name the one to leave out with --without-model")
    version_dir, record = next(iter(found.values()))
    if record.get("instrument") in instruments:
        raise InvalidArgumentError(f"{version_dir.parent.name}:{version_dir.name} leaves out {record['model']}, "
                                   f"which separates {record['instrument']}, the instrument being exported")
    try:
        excluded = load_excluded_networks(version_dir)
        check_ensemble([config, *excluded.member_configs])
    except ExportError as e:
        raise FailedPreconditionError(f"cannot keep what {version_dir.parent.name}:{version_dir.name} leaves out: "
                                      f"{e}") from e
    return excluded, record


def run_instrument(info: dict[str, Any]) -> str | None:
    """The instrument a run learnt (its dataset's), or None when its manifest is not readable here."""
    try:
        return load_manifest(info["manifest"]["path"]).instrument
    except Exception:  # noqa: BLE001 - the dataset may have been moved since training; not needed to export
        return None

"""Training runs: a custom loop over the mask network with checkpoints, resume and early stopping.

A run lives in one folder (runs/<run>/):
    run.yaml             what defines the run (config, dataset checksum, code version) and its state
    checkpoints/         the latest epochs (model, optimizer, epoch, step, best so far, history)
    best.weights.h5      weights of the epoch with the lowest validation loss (what gets exported)
    history.csv          one row per epoch (losses, speed, the learning rate it used)
    logs/                TensorBoard scalars
Decoded audio is cached once per data root (cache/decoded/, see data.decode_cached), not per run:
runs and dataset versions share the same mix files, and a per-run copy (4 GB for 800 songs) filled
the disk after a few runs.
Calling `train_run` again on the same folder continues from its last checkpoint. The loop is
hand-written (tf.GradientTape) because that is what runs under MultiWorkerMirroredStrategy with
Keras 3; the same loop serves the default strategy (CPU or one GPU) and MirroredStrategy.

`train_run` reads as its steps: `open_run` (a new run, or the recorded one resumed) gives the
`Run` record, `build` the TF side (`Learner`: network, optimiser, checkpoint), then `train_epochs`
repeats `train_epoch` and `close_epoch` (validation, best weights, checkpoint, run.yaml). Every TF
call takes the process's TF turn (turns.py). Export lives in export.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tensorflow.core.framework import summary_pb2

from model.checkpoint import BEST_WEIGHTS, RUN_FILE, read_run
from model.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    init_differences,
    init_mismatch,
    make_config,
)
from model.export import (
    ExportError,
    load_exported_weights,
    read_export_info,
)
from model.loss import masked_l1_per_chunk
from model.network import build_network
from services.common.config import first_error
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.manifest import Manifest, load_manifest, verify_files
from services.common.paths import ExclusiveLock, LockHeldError, atomic_write_text
from services.training import data, sampling
from services.training.export import model_members
from services.training.provenance import code_version, now
from services.training.turns import tf_turn

log = logging.getLogger(__name__)

Progress = Callable[..., None]
ShouldStop = Callable[[], bool]

HISTORY_FILE = "history.csv"
HISTORY_FIELDS = ("epoch", "loss", "val_loss", "seconds", "steps_per_second", "learning_rate")
# What a resumed run may change: how the optimiser steps, what it minimises and how the training
# chunks are augmented, never the network or the dataset. A change of what training optimises or
# sees (TARGET_KEYS) starts the best-epoch choice afresh: the loss weighting puts val_loss on
# another scale, and a stronger augmentation (a fine-tune with an equaliser for unheard timbres,
# say) raises val_loss on the unaugmented validation chunks of the training fonts, so the old best
# would be exported for ever and the fine-tune never.
TARGET_KEYS = ("loss_peak_power", "loss_error_power", "loss_phase_sensitive", "augment_gain_db", "remix_probability",
               "augment_eq_db", "augment_pitch_semitones")
RESUME_KEYS = ("learning_rate", "lr_plateau_patience", "lr_plateau_factor", "min_learning_rate", *TARGET_KEYS)


class TrainingOptions(BaseModel):
    """Training knobs that are not part of the network (overridable like the model config)."""

    # allow_inf_nan: a learning rate of inf passed "> 0" and trained to NaN, reported as succeeded.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    augment_gain_db: float = Field(6.0, ge=0.0, le=40.0)
    remix_probability: float = Field(0.25, ge=0.0, le=1.0)
    # Random equaliser per source and chunk, up to this many dB (sampling.random_eq_db); 0 = off.
    augment_eq_db: float = Field(0.0, ge=0.0, le=24.0)
    # Random speed change per chunk, up to this many semitones either way (sampling.Augmentation); 0 = off.
    augment_pitch_semitones: float = Field(0.0, ge=0.0, le=12.0)
    validation_chunks_per_track: int = Field(8, ge=1)
    checkpoints_kept: int = Field(2, ge=1)
    # Reduce on plateau: after this many epochs without a better val_loss (counted from the last
    # reduction too), multiply the learning rate by lr_plateau_factor, down to min_learning_rate.
    # 0 keeps it constant. A smaller step late in training settles into a lower loss than a constant
    # one that keeps overshooting; measured in docs/experiments/02-version-4.md.
    lr_plateau_patience: int = Field(0, ge=0)
    lr_plateau_factor: float = Field(0.3, gt=0.0, lt=1.0)
    min_learning_rate: float = Field(1e-6, ge=0.0)
    # How much a chunk's loss weighs by its loudness (model.loss.masked_l1_per_chunk): 0 weighs every
    # chunk alike (the thesis), 1 by the mix chunk's peak, which is how much it counts in a
    # whole-track SDR. Validation uses the same weighting, so val_loss values of runs with different
    # powers are not comparable; changing it on resume starts the best-epoch choice afresh (as a
    # change of the augmentation does: TARGET_KEYS).
    loss_peak_power: float = Field(0.0, ge=0.0, le=1.0)
    # 1: L1 of each bin's error (the thesis); 2: its square, which weighs a loud bin of the rest let
    # through as an energy ratio (SDR) does. A TARGET_KEY too: val_loss changes units.
    loss_error_power: float = Field(1.0, ge=1.0, le=2.0)
    # False: the target is the instrument's magnitude (the thesis). True: its projection on the mix's
    # phase (data.chunk_features), with which loss_error_power 2 is the error of the spectrum that
    # separation plays back. A TARGET_KEY: val_loss changes meaning.
    loss_phase_sensitive: bool = False


def split_overrides(preset: str, overrides: dict[str, Any] | None) -> tuple[ModelConfig, TrainingOptions]:
    """Model config and training options from a preset and one dict of overrides.

    Keys of either kind may be mixed; any other key is an error naming the known ones.
    """
    overrides = dict(overrides or {})
    training_keys = set(TrainingOptions.model_fields)
    model_over = {k: v for k, v in overrides.items() if k not in training_keys}
    training_over = {k: v for k, v in overrides.items() if k in training_keys}
    unknown = sorted(set(model_over) - set(ModelConfig.model_fields))
    if unknown:
        raise InvalidArgumentError(
            f"unknown overrides {unknown}; model keys: {sorted(ModelConfig.model_fields)}, "
            f"training keys: {sorted(training_keys)}")
    try:
        config = make_config(preset, model_over)
        options = TrainingOptions(**training_over)
    except ConfigError as e:
        raise InvalidArgumentError(str(e)) from e
    except ValidationError as e:
        raise InvalidArgumentError(f"invalid training options: {first_error(e)}") from e
    return config, options


def choose_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored with TF_CONFIG, Mirrored with several GPUs, else the default (GPU if any)."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_run(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(run_dir / RUN_FILE, yaml.safe_dump(info, sort_keys=False))


def read_history(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of history.csv as dicts of numbers (epoch as int)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        # Runs from before the learning_rate column have none; an empty cell is left out too.
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """history.csv of `history` rows (HISTORY_FIELDS; others ignored), replaced in one rename."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})
    atomic_write_text(run_dir / HISTORY_FILE, out.getvalue())


def _lock_run(run_dir: Path) -> ExclusiveLock:
    """One trainer per run folder, or checkpoints clash."""
    try:
        return ExclusiveLock(run_dir / ".lock")
    except LockHeldError as e:
        raise FailedPreconditionError(f"run {run_dir.name} is being trained by another process (pid {e.owner})") from None


class _State:
    """Everything a checkpoint holds besides the model and optimizer, as tf.Variables."""

    def __init__(self):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)  # completed epochs
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)  # of the epoch after `epoch`
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)  # of the unfinished epoch
        self.best_val_loss = tf.Variable(np.inf, dtype=tf.float64, trainable=False)
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.history = tf.Variable("[]", dtype=tf.string, trainable=False)
        # The epoch the learning rate last changed (by a plateau or a resume); the rate itself is
        # the optimiser's, which the checkpoint holds.
        self.lr_changed_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)

    def trackables(self) -> dict[str, tf.Variable]:
        return dict(vars(self))

    def history_rows(self) -> list[dict[str, float]]:
        return json.loads(self.history.numpy().decode())


@dataclass
class Run:
    """A run as this call trains it: its folder, what run.yaml records, and the settings it trains with.

    `record` is run.yaml's content without its state; it gains the best epoch as training goes on.
    A resumed run keeps its own config, seed, batch and dataset; `changes` (RESUME_KEYS) are what
    this call changes, and `target_changed` says whether they change what val_loss measures.
    """

    dir: Path
    record: dict[str, Any]
    manifest: Manifest
    data_root: Path
    config: ModelConfig
    options: TrainingOptions
    seed: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    patience: int
    chief: bool
    changes: dict[str, Any] = field(default_factory=dict)
    target_changed: bool = False

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def save_record(self, state: str, **fields: Any) -> None:
        """run.yaml with `state` and `fields` (the chief's; other workers keep no record)."""
        if self.chief:
            _write_run(self.dir, {**self.record, "state": state, "updated": now(), **fields})


@dataclass
class Learner:
    """The TF side of a run: network, optimiser, the checkpointed state, and the step functions."""

    strategy: tf.distribute.Strategy
    network: keras.Model
    optimizer: keras.optimizers.Optimizer
    state: _State
    manager: tf.train.CheckpointManager
    checkpoint_dir: Path
    writer: Any  # a tf.summary writer (a no-op one on workers other than the chief)
    validation: tf.data.Dataset
    train_step: Callable[..., tf.Tensor]
    validation_step: Callable[..., tuple[tf.Tensor, tf.Tensor]]
    resumed_from: str | None
    history: list[dict[str, float]] = field(default_factory=list)

    def save_checkpoint(self) -> None:
        self.manager.save(checkpoint_number=int(self.state.global_step.numpy()))


def train_run(
    run_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    data_root: str | os.PathLike,
    preset: str = "thesis",
    overrides: dict[str, Any] | None = None,
    epochs: int = 36,
    patience: int = 10,
    seed: int = 0,
    steps_per_epoch: int = 1000,
    batch_size: int = 4,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    changes: dict[str, Any] | None = None,
    init_from: str | os.PathLike | None = None,
    init_member: int | None = None,
) -> dict[str, Any]:
    """Train (or continue) the run in `run_dir`; returns a summary of where it stands.

    A folder that already holds a run continues it from its last checkpoint: its own config, seed
    and dataset are kept (the dataset must be unchanged); `epochs` and `patience` may grow, and
    `changes` may set RESUME_KEYS from now on (recorded in run.yaml under `changes`).
    `init_from`: a run folder whose best weights, or an exported model version whose weights, start a
    new run (see `check_init_from`); `init_member` picks one network of an exported ensemble (1: the
    first, as when None).
    `progress(done_steps, total_steps, message, **metrics)` gets epoch, step, loss, val_loss,
    steps_per_second and eta_seconds. `should_stop()` returning true checkpoints and stops within a
    step. The result's "state" is "completed", "early_stopped" or "cancelled".
    """
    if epochs < 1 or patience < 1 or steps_per_epoch < 1 or batch_size < 1:
        raise InvalidArgumentError("epochs, patience, steps_per_epoch and batch_size must be positive")
    strategy = choose_strategy()  # first: MultiWorkerMirroredStrategy must exist before other TF work
    run = open_run(Path(run_dir), Path(manifest_path), Path(data_root), preset, overrides, seed=seed,
                   batch_size=batch_size, steps_per_epoch=steps_per_epoch, epochs=epochs, patience=patience,
                   changes=changes, init_from=init_from, init_member=init_member, chief=_is_chief(strategy))
    if run.batch_size % strategy.num_replicas_in_sync:
        raise InvalidArgumentError(f"batch_size {run.batch_size} must be a multiple of the "
                                   f"{strategy.num_replicas_in_sync} replicas")

    def stop_requested() -> bool:
        return bool(should_stop and should_stop())

    lock = _lock_run(run.dir) if run.chief else None
    sampler = None
    try:
        run.save_record("running")
        try:
            tracks = data.load_tracks(
                run.manifest, run.data_root, run.config, data.decoded_cache_dir(run.data_root),
                progress=lambda done, total, message: progress and progress(0, run.total_steps, message),
                should_stop=should_stop)
        except data.LoadingStopped:
            run.save_record("cancelled")
            return _summary_before_training(run)
        augmentation = sampling.Augmentation(run.options.augment_gain_db, run.options.remix_probability,
                                             run.options.augment_eq_db, run.options.augment_pitch_semitones)
        sampler = sampling.ChunkSampler(tracks["train"], run.manifest.sources, run.config.segment_samples,
                                        run.config.rate_hz, augmentation)
        learner = build(run, strategy, tracks["validation"])
        report = _reporter(run, learner.state, progress)
        result_state = train_epochs(run, learner, sampler, report, stop_requested)
        summary = _summary(run, learner, result_state)
        run.save_record(result_state, epochs_completed=summary["epochs_completed"],
                        best_epoch=summary["best_epoch"], best_val_loss=summary["best_val_loss"])
        if not run.chief:
            shutil.rmtree(learner.checkpoint_dir, ignore_errors=True)
        return summary
    except Exception as e:
        run.save_record("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if sampler is not None:
            sampler.release()
        if lock:
            lock.release()


def open_run(run_dir: Path, manifest_path: Path, data_root: Path, preset: str, overrides: dict[str, Any] | None,
             *, seed: int, batch_size: int, steps_per_epoch: int, epochs: int, patience: int,
             changes: dict[str, Any] | None, init_from: str | os.PathLike | None, init_member: int | None,
             chief: bool) -> Run:
    """The run in `run_dir`: resumed from its run.yaml (same dataset, `changes` applied) or new."""
    manifest = load_manifest(manifest_path)
    verify_files(manifest, data_root)  # a published version's files are what it recorded, or no run
    checksum = manifest.checksum or _file_sha256(manifest_path)
    if (run_dir / RUN_FILE).is_file():
        record = read_run(run_dir)
        record.pop("error", None)
        recorded = record.get("manifest", {}).get("checksum")
        if recorded != checksum:
            raise FailedPreconditionError(f"run {run_dir.name} was trained on another version of the dataset "
                                          f"(checksum {recorded}); start a new run")
        config = config_from_dict(record["config"])
        options = TrainingOptions(**record.get("options", {}))
        target_changed = False
        if changes:  # recorded in run.yaml once they take effect (_record_changes)
            before = options
            config, options = apply_changes(config, options, changes)
            target_changed = any(getattr(options, k) != getattr(before, k) for k in TARGET_KEYS)
        seed, batch_size = int(record["seed"]), int(record["batch_size"])
        steps_per_epoch = int(record["steps_per_epoch"])
    elif changes:
        raise FailedPreconditionError(f"run {run_dir.name} does not exist yet: changes apply to a resumed run")
    else:
        config, options = split_overrides(preset, overrides)
        source = check_init_from(init_from, config, init_member) if init_from else None
        record = {
            "run_id": run_dir.name, "state": "created", "created": now(), "preset": preset,
            "overrides": dict(overrides or {}), "config": config_to_dict(config), "options": options.model_dump(),
            "manifest": {"path": str(manifest_path.resolve()), "name": manifest.name,
                         "version": manifest.version, "checksum": checksum},
            "data_root": str(data_root.resolve()), "seed": seed, "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch, "code_version": code_version(),
        }
        if source:
            record["init_from"] = source
        target_changed = False
    record.update(epochs=epochs, patience=patience)
    return Run(run_dir, record, manifest, data_root, config, options, seed, batch_size, steps_per_epoch,
               epochs, patience, chief, dict(changes or {}), target_changed)


def build(run: Run, strategy: tf.distribute.Strategy, validation_tracks: list[Any]) -> Learner:
    """The run's validation set, network, optimiser and checkpoint, restored from its last
    checkpoint or started from the weights it names, with this call's changes applied.

    One TF turn: building beside another run's steps hung a service with two workers (turns.py).
    """
    config, options = run.config, run.options
    segments = sampling.validation_segments(validation_tracks, config.segment_samples,
                                            options.validation_chunks_per_track)
    with tf_turn():
        validation = data.validation_dataset(segments, config, run.batch_size, options.loss_phase_sensitive)
        keras.utils.set_random_seed(run.seed)
        with strategy.scope():
            network = build_network(config)
            optimizer = keras.optimizers.Adam(config.learning_rate)
            optimizer.build(network.trainable_variables)
        state = _State()
        checkpoint = tf.train.Checkpoint(model=network, optimizer=optimizer, **state.trackables())
        # Every worker must write a checkpoint (the writes synchronise); only the chief's is kept.
        checkpoint_dir = run.dir / "checkpoints" if run.chief else Path(tempfile.mkdtemp(prefix="stemlab-ckpt-"))
        manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=options.checkpoints_kept)
        writer = tf.summary.create_file_writer(str(run.dir / "logs")) if run.chief else tf.summary.create_noop_writer()
        train_step, validation_step = _step_functions(run, strategy, network, optimizer)
        learner = Learner(strategy, network, optimizer, state, manager, checkpoint_dir, writer, validation,
                          train_step, validation_step, resumed_from=manager.latest_checkpoint)
        if learner.resumed_from:
            checkpoint.restore(learner.resumed_from).expect_partial()
        elif run.record.get("init_from"):  # a new run (no checkpoint yet) starts from another run's weights
            # (a source still training saves its best weights in its turns)
            run.record["init_from"]["sha256"] = _load_initial_weights(network, config, run.record["init_from"])
        if run.changes:
            _apply_run_changes(run, learner)
    learner.history = state.history_rows()
    _log_start(run, learner)
    if run.changes:
        _record_changes(run, state)
    return learner


def _step_functions(run: Run, strategy: tf.distribute.Strategy, network: keras.Model,
                    optimizer: keras.optimizers.Optimizer) -> tuple[Callable, Callable]:
    """(train_step(iterator) -> summed loss, validation_step(mix, instrument) -> (loss sum, chunks))."""
    config, options = run.config, run.options

    def chunk_losses(mix_rows, instrument_rows, mask):
        return masked_l1_per_chunk(mix_rows, instrument_rows, mask, config.normalise_eps,
                                   options.loss_peak_power, options.loss_error_power)

    @tf.function
    def train_step(iterator):
        def step_fn(mix_rows, instrument_rows):
            with tf.GradientTape() as tape:
                per_chunk = chunk_losses(mix_rows, instrument_rows, network(mix_rows, training=True))
                loss = tf.nn.compute_average_loss(per_chunk, global_batch_size=run.batch_size)
            gradients = tape.gradient(loss, network.trainable_variables)
            optimizer.apply_gradients(zip(gradients, network.trainable_variables, strict=True))
            return loss

        per_replica = strategy.run(step_fn, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def validation_step(mix_rows, instrument_rows):
        per_chunk = chunk_losses(mix_rows, instrument_rows, network(mix_rows, training=False))
        return tf.reduce_sum(per_chunk), tf.cast(tf.shape(per_chunk)[0], tf.float32)

    return train_step, validation_step


def _apply_run_changes(run: Run, learner: Learner) -> None:
    """This call's changes on the restored state (in the build turn), checkpointed at once."""
    state = learner.state
    if "learning_rate" in run.changes:
        learner.optimizer.learning_rate = run.config.learning_rate
        state.lr_changed_epoch.assign(state.epoch)
    if run.target_changed:
        # Earlier val_loss values measured another loss or training (TARGET_KEYS): the best epoch is
        # chosen afresh (the next epoch's weights replace best.weights.h5), and patience counts from here.
        state.best_val_loss.assign(np.inf)
        state.best_epoch.assign(state.epoch)
    # Checkpoint first, so a restart before the next one cannot go on at the old rate while
    # run.yaml names the new one.
    learner.save_checkpoint()


def _record_changes(run: Run, state: _State) -> None:
    """run.yaml records the changes from where they start: a run stopped mid-epoch resumes mid-epoch."""
    run.record.update(config=config_to_dict(run.config), options=run.options.model_dump(),
                      overrides={**(run.record.get("overrides") or {}), **run.changes},
                      changes=[*(run.record.get("changes") or []),
                               {"from_epoch": int(state.epoch.numpy()) + 1,
                                "from_step": int(state.step_in_epoch.numpy()) + 1, **run.changes}])
    run.save_record("running")


def _log_start(run: Run, learner: Learner) -> None:
    state = learner.state
    if learner.resumed_from:
        log.info("resumed %s from %s (epoch %d, step %d)", run.dir.name, learner.resumed_from,
                 int(state.epoch.numpy()), int(state.step_in_epoch.numpy()))
    elif run.record.get("init_from"):
        source = run.record["init_from"]
        log.info("%s starts from the weights of %s (epoch %s)", run.dir.name,
                 f"model {source['model']}:{source['version']}" + (f"#{source['member']}" if source.get("member") else "")
                 if source.get("saved_model") else source["run_id"],
                 source["best_epoch"])


def _reporter(run: Run, state: _State, progress: Progress | None) -> Callable[..., None]:
    """report(message, **metrics): progress with the steps done, the speed since now and the time left."""
    started, steps_at_start = time.monotonic(), int(state.global_step.numpy())

    def report(message: str, **metrics: Any) -> None:
        if not progress:
            return
        done = int(state.global_step.numpy())
        elapsed, steps_done = time.monotonic() - started, done - steps_at_start
        speed = steps_done / elapsed if elapsed > 0 and steps_done > 0 else 0.0
        eta = (run.total_steps - done) / speed if speed > 0 else -1.0
        progress(done, run.total_steps, message, steps_per_second=round(speed, 3), eta_seconds=round(eta, 1),
                 **metrics)

    return report


def train_epochs(run: Run, learner: Learner, sampler: sampling.ChunkSampler, report: Callable[..., None],
                 stop_requested: Callable[[], bool]) -> str:
    """Epochs until the last, early stopping or a stop request: "completed", "early_stopped" or "cancelled"."""
    state = learner.state

    def patience_ran_out() -> bool:
        return int(state.epoch.numpy()) - int(state.best_epoch.numpy()) >= run.patience

    if learner.history and patience_ran_out():
        return "early_stopped"
    while int(state.epoch.numpy()) < run.epochs:
        epoch = int(state.epoch.numpy()) + 1
        skip = int(state.step_in_epoch.numpy())  # steps of this epoch done before a stop
        started = time.monotonic()
        if not train_epoch(run, learner, sampler, epoch, skip, report, stop_requested):
            with tf_turn():
                learner.save_checkpoint()
            return "cancelled"
        train_loss, val_loss = close_epoch(run, learner, epoch, time.monotonic() - started, skip)
        report(f"epoch {epoch}/{run.epochs} done: loss {train_loss:.4f} val_loss {val_loss:.4f}",
               epoch=epoch, step=run.steps_per_epoch, loss=round(train_loss, 6), val_loss=round(val_loss, 6))
        if patience_ran_out():
            return "early_stopped"
    return "completed"


def train_epoch(run: Run, learner: Learner, sampler: sampling.ChunkSampler, epoch: int, skip: int,
                report: Callable[..., None], stop_requested: Callable[[], bool]) -> bool:
    """The steps of `epoch` after the first `skip`, a turn each; False when a stop was requested."""
    state, history = learner.state, learner.history

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = context.get_per_replica_batch_size(run.batch_size)
        return data.training_dataset(sampler, run.config, run.seed, epoch, run.steps_per_epoch, per_replica,
                                     worker=context.input_pipeline_id, skip_steps=skip,
                                     phase_sensitive=run.options.loss_phase_sensitive)

    with tf_turn():
        iterator = iter(learner.strategy.distribute_datasets_from_function(dataset_fn))
    for step in range(skip + 1, run.steps_per_epoch + 1):
        if stop_requested():
            return False
        with tf_turn():
            loss = float(learner.train_step(iterator).numpy())
            state.step_in_epoch.assign(step)
            state.global_step.assign_add(1)
            state.loss_sum.assign_add(loss)
        report(f"epoch {epoch}/{run.epochs} step {step}/{run.steps_per_epoch} loss {loss:.4f}",
               epoch=epoch, step=step, loss=round(loss, 6), val_loss=history[-1]["val_loss"] if history else None)
    return not stop_requested()


class TrainingDiverged(FailedPreconditionError):
    """The losses of an epoch are not finite numbers."""


def close_epoch(run: Run, learner: Learner, epoch: int, seconds: float, skip: int) -> tuple[float, float]:
    """Validate, keep the best weights, maybe lower the learning rate, checkpoint, and record the
    epoch (history, run.yaml, TensorBoard); returns (training loss, validation loss).

    One turn: an export (in its own lane, while this run trains) reads the best weights and
    run.yaml's record of them in its turn, so the exported version names the epoch its weights
    come from.
    """
    state, history = learner.state, learner.history
    with tf_turn():
        val_loss = _validation_loss(learner)
        train_loss = float(state.loss_sum.numpy()) / run.steps_per_epoch
        learning_rate = float(learner.optimizer.learning_rate.numpy())
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            # Nothing of this epoch is kept: its weights are NaN, and a checkpoint of them would
            # replace the last good one (the run used to end "succeeded" with no best weights).
            raise TrainingDiverged(
                f"training diverged in epoch {epoch} (loss {train_loss}, val_loss {val_loss}); the run is kept as it "
                f"was after epoch {epoch - 1}: resume it with a lower learning rate "
                f"(stemlab resume {run.dir.name} --set learning_rate=…; it was {learning_rate:.3g})")
        history.append({"epoch": epoch, "loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                        "seconds": round(seconds, 3),
                        "steps_per_second": round((run.steps_per_epoch - skip) / seconds, 3),
                        "learning_rate": float(f"{learning_rate:.6g}")})  # 4.5e-05, not 4.4999999999999996e-05
        improved = val_loss < float(state.best_val_loss.numpy())
        if improved:
            state.best_val_loss.assign(val_loss)
            state.best_epoch.assign(epoch)
            run.record.update(best_epoch=epoch, best_val_loss=val_loss)
        reduced = _plateau_learning_rate(run.options, learning_rate, epoch, int(state.best_epoch.numpy()),
                                         int(state.lr_changed_epoch.numpy()))
        if reduced is not None:
            state.lr_changed_epoch.assign(epoch)
            learner.optimizer.learning_rate = reduced
            log.info("%s: no better val_loss for %d epochs, learning rate %.3g -> %.3g",
                     run.dir.name, run.options.lr_plateau_patience, learning_rate, reduced)
        state.epoch.assign(epoch)
        state.step_in_epoch.assign(0)
        state.loss_sum.assign(0.0)
        state.history.assign(json.dumps(history))
        learner.save_checkpoint()
        if run.chief:
            if improved:
                _save_best_weights(learner.network, run.dir)
            run.save_record("running", epochs_completed=epoch)
            with learner.writer.as_default(step=epoch):
                _scalar_summary("loss", train_loss)
                _scalar_summary("val_loss", val_loss)
                _scalar_summary("learning_rate", learning_rate)
            learner.writer.flush()
    if run.chief:
        write_history(run.dir, history)
    return train_loss, val_loss


def _validation_loss(learner: Learner) -> float:
    """The mean loss over the validation chunks."""
    loss_sum, chunks = 0.0, 0.0
    for mix_rows, instrument_rows in learner.validation:
        s, c = learner.validation_step(mix_rows, instrument_rows)
        loss_sum, chunks = loss_sum + float(s), chunks + float(c)
    return loss_sum / max(chunks, 1.0)


def _summary(run: Run, learner: Learner, result_state: str) -> dict[str, Any]:
    state = learner.state
    return {
        "run_id": run.dir.name, "run_dir": str(run.dir), "state": result_state,
        "epochs_completed": int(state.epoch.numpy()), "global_step": int(state.global_step.numpy()),
        "best_epoch": int(state.best_epoch.numpy()),
        "best_val_loss": float(state.best_val_loss.numpy()) if learner.history else None,
        "history": learner.history,
    }


def _summary_before_training(run: Run) -> dict[str, Any]:
    """What a run stopped while its songs were still loading returns: where it stood before."""
    return {"run_id": run.dir.name, "run_dir": str(run.dir), "state": "cancelled",
            "epochs_completed": int(run.record.get("epochs_completed") or 0), "global_step": None,
            "best_epoch": int(run.record.get("best_epoch") or 0), "best_val_loss": run.record.get("best_val_loss"),
            "history": read_history(run.dir) if run.chief else []}


def apply_changes(config: ModelConfig, options: TrainingOptions,
                   changes: dict[str, Any]) -> tuple[ModelConfig, TrainingOptions]:
    """`config` and `options` with RESUME_KEYS changed; any other key raises InvalidArgumentError."""
    other = sorted(set(changes) - set(RESUME_KEYS))
    if other:
        raise InvalidArgumentError(f"{other} cannot change when resuming; only {list(RESUME_KEYS)} can")
    model_part = {k: v for k, v in changes.items() if k in ModelConfig.model_fields}
    try:
        config = config_from_dict({**config_to_dict(config), **model_part})
        options = TrainingOptions(**{**options.model_dump(),
                                     **{k: v for k, v in changes.items() if k not in model_part}})
    except ConfigError as e:
        raise InvalidArgumentError(str(e)) from e
    except ValidationError as e:
        raise InvalidArgumentError(f"invalid training options: {first_error(e)}") from e
    return config, options


def _plateau_learning_rate(options: TrainingOptions, learning_rate: float, epoch: int, best_epoch: int,
                           changed_epoch: int) -> float | None:
    """The reduced learning rate if the plateau rule fires after `epoch`, else None."""
    if not options.lr_plateau_patience or learning_rate <= options.min_learning_rate:
        return None
    if epoch - max(best_epoch, changed_epoch) < options.lr_plateau_patience:
        return None
    return max(learning_rate * options.lr_plateau_factor, options.min_learning_rate)


def _scalar_summary(tag: str, value: float) -> None:
    """A TensorBoard scalar, written with core TF ops (tf.summary.scalar needs the tensorboard package)."""
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata.SerializeToString())


def _read_source(source_dir: Path, member: int | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(how to name it, its run.yaml or export info, what a new run records of it) for a run or an
    exported model version (`member`: one network of an ensemble export, 1 the first; None the
    first); FailedPreconditionError when it is neither, has no weights yet or no such member."""
    if (source_dir / RUN_FILE).is_file():
        if member is not None:
            raise FailedPreconditionError(f"run {source_dir.name} is one network; members belong to exported models")
        info = read_run(source_dir)
        weights = source_dir / BEST_WEIGHTS
        if not weights.is_file():
            raise FailedPreconditionError(f"run {source_dir.name} has no best weights yet (no epoch finished)")
        return (f"run {source_dir.name}", info,
                {"run_id": source_dir.name, "best_epoch": info.get("best_epoch"), "weights": str(weights.resolve())})
    try:
        info = read_export_info(source_dir)
    except (ExportError, ValueError) as e:
        raise FailedPreconditionError(f"{source_dir} is neither a training run nor an exported model: {e}") from e
    if not isinstance(info.get("config"), dict):
        raise FailedPreconditionError(f"exported model {source_dir} does not record its network settings")
    if not _exported_weight_files(source_dir):
        raise FailedPreconditionError(f"exported model {source_dir} has no variables/ to start from")
    version = int(source_dir.name) if source_dir.name.isdigit() else source_dir.name
    what = f"model {source_dir.parent.name} version {source_dir.name}"
    record = {"model": source_dir.parent.name, "version": version, "saved_model": str(source_dir.resolve())}
    if member is not None:
        info = {**info, **model_members(source_dir, member)[0]}  # the member's own config, run and epoch
        what, record["member"] = f"{what} member {member}", member
    return what, info, {**record, "run_id": info.get("source_run"), "best_epoch": info.get("best_epoch")}


def check_init_from(source_dir: str | os.PathLike, config: ModelConfig, member: int | None = None) -> dict[str, Any]:
    """What run.yaml records of the weights that start a new run with `config`.

    `source_dir` is a training run (its best weights) or an exported model version
    (models/<name>/<version>/, e.g. a shipped model, to fine-tune it on one's own songs).
    Raises FailedPreconditionError when the source has no weights yet or another network or
    spectrogram (the differing keys named). The weights are read when the new run starts, and
    the checksum of what was read is recorded, as a run's best weights change if it trains on.
    """
    what, info, record = _read_source(Path(source_dir), member)
    differ = init_mismatch(info["config"], config)
    if differ:
        raise FailedPreconditionError(f"{what} has another network or spectrogram: " + ", ".join(differ))
    return record


def source_preset(source_dir: str | os.PathLike, member: int | None = None) -> str | None:
    """The preset a run or an exported model (or one member of it) was trained with (None when it does not say)."""
    preset = _read_source(Path(source_dir), member)[1].get("preset")
    return preset if isinstance(preset, str) and preset in PRESETS else None


def source_network(source_dir: str | os.PathLike, preset: str, member: int | None = None) -> dict[str, Any]:
    """The network and spectrogram settings of a run or exported model (or one member) where they
    differ from `preset`'s, as overrides: what a fine-tune that names no preset needs to build the
    network the weights fit (a widened network, another hop length)."""
    recorded = _read_source(Path(source_dir), member)[1].get("config") or {}
    return {k: theirs for k, (theirs, _) in init_differences(recorded, make_config(preset)).items() if k in recorded}


def _exported_weight_files(version_dir: Path) -> list[Path]:
    return sorted((version_dir / "variables").glob("variables.*"))


def _load_initial_weights(network: keras.Model, config: ModelConfig, source: dict[str, Any]) -> str:
    """Load the weights `check_init_from` named into `network`; returns the sha256 of what was read."""
    if source.get("saved_model"):
        version_dir = Path(source["saved_model"])
        digest = hashlib.sha256()
        for path in _exported_weight_files(version_dir):
            digest.update(_file_sha256(path).encode())
        try:
            load_exported_weights(network, config, version_dir, int(source.get("member") or 1))
        except (ExportError, tf.errors.OpError) as e:
            raise FailedPreconditionError(f"cannot start from {version_dir}: {e}") from e
        return digest.hexdigest()
    network.load_weights(source["weights"])
    return _file_sha256(Path(source["weights"]))


def _save_best_weights(network: keras.Model, run_dir: Path) -> None:
    # Keras insists on the .weights.h5 suffix, so the temporary name keeps it.
    tmp = run_dir / f".{BEST_WEIGHTS}.tmp.weights.h5"
    network.save_weights(str(tmp))
    os.replace(tmp, run_dir / BEST_WEIGHTS)


def resume_run(run_dir: str | os.PathLike, epochs: int | None = None, patience: int | None = None,
               progress: Progress | None = None, should_stop: ShouldStop | None = None,
               changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Continue a run with what its run.yaml recorded (dataset, data root, epochs, patience).

    `changes` (RESUME_KEYS only) apply from the next step on, e.g. a lower learning_rate to settle a
    run whose validation loss has flattened.
    """
    info = read_run(run_dir)
    return train_run(run_dir, info["manifest"]["path"], info["data_root"], info["preset"], info.get("overrides"),
                     epochs=epochs or int(info["epochs"]), patience=patience or int(info["patience"]),
                     seed=int(info["seed"]), steps_per_epoch=int(info["steps_per_epoch"]),
                     batch_size=int(info["batch_size"]), progress=progress, should_stop=should_stop,
                     changes=changes)

"""Train a network of model/network.py under Keras' JAX backend, for a fixed wall time.

    KERAS_BACKEND=jax python -m research.thesis_gpu.train_jax --data .gpu/data [--data .gpu/data2] --instrument guitar \
        --preset thesis --set input_log_scale=1000 --phase-sensitive --peak-power 1 --minutes 6 --out OUT

For a GPU machine with JAX and no TensorFlow (the lent ones here: TensorFlow's wheels are far
over what can be carried to them). It draws chunks with the training service's own sampler
(services/training/sampling) from songs packed by research.thesis_gpu.pack, applies its random
equaliser (--eq-db) and computes the service's features and loss in keras.ops on the device
(research/thesis_gpu/features), and trains with Adam (Keras'
epsilon). The learning rate warms up over the first steps and then follows a cosine over the wall
time, down to a tenth, since the number of steps is not known ahead. Every --validate-seconds it
scores the fixed validation chunks and keeps the best weights, written as OUT/<instrument>.weights.h5
in parts of at most 15 MiB (what a lent machine hands back per file), with OUT/<instrument>.json
holding the config, options and history; research.thesis_gpu.import_run makes a training run of them.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from model.config import config_to_dict, init_mismatch, make_config
from services.training.sampling import Augmentation, ChunkSampler, TrackAudio, validation_segments

PART_BYTES = 15 * 2**20


def read_indexes(folders: list[Path]) -> dict:
    """The packed folders' index.json as one: their songs joined (each once), refusing folders
    packed from other datasets, rates or sources (pack --skip-train-songs makes shards of one set)."""
    indexes = [json.loads((folder / "index.json").read_text()) for folder in folders]
    first = indexes[0]
    for folder, index in zip(folders[1:], indexes[1:], strict=True):
        for key in ("datasets", "rate_hz", "sources"):
            if index[key] != first[key]:
                raise SystemExit(f"{folder} was packed from another {key} than {folders[0]}: {index[key]} != {first[key]}")
    def joined(lists):
        return list(dict.fromkeys(t for songs in lists for t in songs))

    splits = ("train", "validation")
    songs = {split: joined(index["songs"][split] for index in indexes) for split in splits}
    sets = {name: {split: joined(index.get("sets", {}).get(name, index["songs"])[split] for index in indexes)
                   for split in splits} for name in ("guitar", "piano")}
    return {**first, "songs": songs, "sets": sets, "folders": [str(f) for f in folders]}


def load_all_tracks(folders: list[Path], split: str, instrument: str) -> list[TrackAudio]:
    """load_tracks over several packed folders, a song found in more than one loaded once."""
    seen: dict[str, TrackAudio] = {}
    for folder in folders:
        for track in load_tracks(folder, split, instrument):
            seen.setdefault(track.track, track)
    return list(seen.values())


def load_tracks(data: Path, split: str, instrument: str) -> list[TrackAudio]:
    """The packed songs of `split` as (instrument, rest) pairs for `instrument`."""
    index = json.loads((data / "index.json").read_text())
    sources = index["sources"]
    if instrument not in sources or instrument == "other":
        raise SystemExit(f"--instrument must be one of {[s for s in sources if s != 'other']}")
    column = sources.index(instrument)
    # Songs of this instrument's set only (pack --single-instrument-songs packs the other set's too);
    # an index without "sets" holds songs of both.
    members = set(index.get("sets", {}).get(instrument, {}).get(split, index["songs"][split]))
    tracks = []
    for track in (t for t in index["songs"][split] if t in members):
        audio, rate = sf.read(data / split / f"{track}.ogg", dtype="float32", always_2d=True)
        if rate != index["rate_hz"]:
            raise SystemExit(f"{track}: {rate} Hz, the index says {index['rate_hz']}")
        own = np.ascontiguousarray(audio[:, column])
        tracks.append(TrackAudio(track, "synthetic", own, np.ascontiguousarray(audio.sum(axis=1) - own)))
    return tracks


def parse_sets(values: list[str]) -> dict:
    """KEY=VALUE overrides, each value read as YAML as the services read `--set`
    (services.common.server.parse_overrides, which this machine cannot import: no generated code)."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def write_parts(path: Path, out: Path, name: str) -> list[str]:
    """Split `path` into OUT/<name>.partN files of at most PART_BYTES, each renamed into place."""
    blob = path.read_bytes()
    names = []
    for i in range(0, max(len(blob), 1), PART_BYTES):
        part = out / f"{name}.part{i // PART_BYTES}"
        tmp = out / f".{part.name}.tmp"
        tmp.write_bytes(blob[i : i + PART_BYTES])
        tmp.replace(part)
        names.append(part.name)
    return names


def load_init_weights(network, config, path: Path) -> None:
    """Load `path` into `network`, refusing first a source whose recorded config (member_weights'
    <path>.json) has another network or spectrogram — weights of the same shapes would load silently."""
    record = path.with_name(path.name + ".json")
    if record.is_file():
        differ = init_mismatch(json.loads(record.read_text())["config"], config)
        if differ:
            raise SystemExit(f"{path} holds another network or spectrogram: " + ", ".join(differ))
    network.load_weights(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="a folder of research.thesis_gpu.pack (repeatable: shards of one set)")
    parser.add_argument("--instrument", required=True)
    parser.add_argument("--preset", default="thesis")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    parser.add_argument("--minutes", type=float, required=True, help="wall time from start, loading included")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--gain-db", type=float, default=6.0)
    parser.add_argument("--remix", type=float, default=0.25)
    parser.add_argument("--eq-db", type=float, default=0.0)
    parser.add_argument("--pitch-semitones", type=float, default=0.0, help="the sampler's speed change (host side)")
    parser.add_argument("--peak-power", type=float, default=0.0)
    parser.add_argument("--error-power", type=float, default=2.0)
    parser.add_argument("--phase-sensitive", action="store_true")
    parser.add_argument("--validation-chunks", type=int, default=8, help="per validation song")
    parser.add_argument("--validate-seconds", type=float, default=45.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--init-weights", type=Path, default=None,
                        help="start from these weights (research.thesis_gpu.member_weights, or a run's best.weights.h5)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + 60.0 * args.minutes
    # Keras picks its backend when first imported, which happens only below; set here, not at
    # import, so that importing this module (the tests do) leaves other processes' Keras alone.
    os.environ.setdefault("KERAS_BACKEND", "jax")

    import jax
    import jax.numpy as jnp
    import keras
    import optax

    from model.network import build_network, trainable_parameter_count
    from research.thesis_gpu.features import chunk_features, equalise, loss_per_chunk

    try:  # TF32 convolutions on GPUs that have them; a JAX that names precisions otherwise keeps its default
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    except Exception as e:  # noqa: BLE001
        print(f"default matmul precision kept: {e}", flush=True)
    keras.utils.set_random_seed(args.seed)
    config = make_config(args.preset, {**parse_sets(args.set), "learning_rate": args.learning_rate})
    data_index = read_indexes(args.data)
    train = load_all_tracks(args.data, "train", args.instrument)
    validation = validation_segments(load_all_tracks(args.data, "validation", args.instrument), config.segment_samples,
                                     args.validation_chunks)
    sampler = ChunkSampler(train, {}, config.segment_samples, config.rate_hz,
                           Augmentation(args.gain_db, args.remix, args.eq_db, args.pitch_semitones))
    network = build_network(config)
    if args.init_weights:
        load_init_weights(network, config, args.init_weights)
    print(f"{args.instrument}: {jax.devices()}, {trainable_parameter_count(network):,} parameters, "
          f"{len(train)} train songs, {len(validation[0])} validation chunks, "
          f"loaded in {time.monotonic() - started:.1f} s", flush=True)

    def loss_of(trainable, non_trainable, instrument, rest, training, eq=None):
        if eq is not None and args.eq_db > 0:  # the sampler's equaliser, applied here on the device
            instrument = equalise(instrument, eq[:, 0], config, args.eq_db)
            rest = equalise(rest, eq[:, 1], config, args.eq_db)
        mix_rows, target_rows = chunk_features(instrument, rest, config, args.phase_sensitive)
        mask, non_trainable = network.stateless_call(trainable, non_trainable, mix_rows, training=training)
        errors = loss_per_chunk(mix_rows, target_rows, mask, config.normalise_eps, args.peak_power, args.error_power)
        return jnp.mean(errors), non_trainable

    adam = optax.scale_by_adam(eps=1e-7)  # Keras' Adam epsilon, as the training service uses

    @jax.jit
    def train_step(trainable, non_trainable, adam_state, instrument, rest, eq, learning_rate):
        (loss, non_trainable), grads = jax.value_and_grad(loss_of, has_aux=True)(
            trainable, non_trainable, instrument, rest, True, eq)
        updates, adam_state = adam.update(grads, adam_state, trainable)
        trainable = jax.tree.map(lambda w, u: w - learning_rate * u, trainable, updates)
        return trainable, non_trainable, adam_state, loss

    @jax.jit
    def validation_loss(trainable, non_trainable, instrument, rest):
        return loss_of(trainable, non_trainable, instrument, rest, False)[0]

    def validate(trainable, non_trainable) -> float:
        losses = [float(validation_loss(trainable, non_trainable, validation[0][i : i + args.batch],
                                        validation[1][i : i + args.batch]))
                  * len(validation[0][i : i + args.batch]) for i in range(0, len(validation[0]), args.batch)]
        return sum(losses) / len(validation[0])

    trainable = [v.value for v in network.trainable_variables]
    non_trainable = [v.value for v in network.non_trainable_variables]
    adam_state = adam.init(trainable)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    best = (math.inf, 0, None)
    step, round_start, round_steps = 0, time.monotonic(), 0
    round_loss = jnp.zeros(())
    training_seconds = 0.0
    first_step_done = None

    def save(final: bool) -> None:
        _, best_round, values = best
        if values is None:
            return
        for variable, value in zip(network.trainable_variables + network.non_trainable_variables,
                                   values[0] + values[1], strict=True):
            variable.assign(value)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "best.weights.h5"
            network.save_weights(str(path))
            parts = write_parts(path, args.out, f"{args.instrument}.weights.h5")
        summary = {
            "instrument": args.instrument, "preset": args.preset, "overrides": parse_sets(args.set),
            "config": config_to_dict(config), "options": {
                "augment_gain_db": args.gain_db, "remix_probability": args.remix, "augment_eq_db": args.eq_db,
                "augment_pitch_semitones": args.pitch_semitones,
                "validation_chunks_per_track": args.validation_chunks, "loss_peak_power": args.peak_power,
                "loss_error_power": args.error_power, "loss_phase_sensitive": args.phase_sensitive,
                "warmup_steps": args.warmup_steps, "schedule": "cosine over the wall time to a tenth",
                "init_weights": str(args.init_weights) if args.init_weights else None},
            "batch_size": args.batch, "seed": args.seed, "best_epoch": best_round, "best_val_loss": best[0],
            "history": history, "steps": step, "chunks": step * args.batch, "training_seconds": training_seconds,
            "wall_seconds": time.monotonic() - started, "finished": final, "parts": parts,
            "device": f"{jax.devices()[0].device_kind} ({jax.devices()[0]})", "jax": jax.__version__, "keras": keras.__version__,
            "train_songs": [t.track for t in train], "data_index": data_index,
        }
        tmp = args.out / f".{args.instrument}.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(args.out / f"{args.instrument}.json")

    last_save = time.monotonic()
    in_flight: collections.deque = collections.deque()
    while True:
        now = time.monotonic()
        fraction = min(1.0, (now - started) / (deadline - started))
        warm = min(1.0, (step + 1) / max(args.warmup_steps, 1))
        learning_rate = args.learning_rate * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * fraction)))
        instrument, rest, eq = sampler.draw_unequalised(rng, args.batch)
        trainable, non_trainable, adam_state, loss = train_step(
            trainable, non_trainable, adam_state, instrument, rest, eq.astype(np.float32), learning_rate)
        round_loss = round_loss + loss
        # JAX returns before the step runs; without a wait the loop would queue steps far past the
        # deadline (drawing a batch is quicker than a step). Two in flight keep the device busy.
        in_flight.append(loss)
        if len(in_flight) > 2:
            in_flight.popleft().block_until_ready()
        step += 1
        round_steps += 1
        if first_step_done is None:
            loss.block_until_ready()
            first_step_done = time.monotonic()
            print(f"{args.instrument}: first step (compiling) took {first_step_done - now:.1f} s", flush=True)
            round_start, round_steps, round_loss = first_step_done, 0, jnp.zeros(())
            continue
        out_of_time = time.monotonic() >= deadline - 20.0  # leave time to validate and save
        if time.monotonic() - round_start < args.validate_seconds and not out_of_time:
            continue
        train_loss = float(round_loss) / max(round_steps, 1)  # waits for the round's steps
        seconds = time.monotonic() - round_start
        training_seconds += seconds
        val_loss = validate(trainable, non_trainable)
        history.append({"epoch": len(history) + 1, "loss": train_loss, "val_loss": val_loss, "seconds": seconds,
                        "steps_per_second": round_steps / seconds, "learning_rate": learning_rate, "step": step})
        improved = val_loss < best[0]
        if improved:
            best = (val_loss, len(history), (jax.device_get(trainable), jax.device_get(non_trainable)))
        print(f"{args.instrument}: round {len(history)} step {step} loss {train_loss:.5f} val {val_loss:.5f}"
              f"{' *' if improved else ''} {round_steps * args.batch / seconds:.1f} chunks/s lr {learning_rate:.2e}",
              flush=True)
        if out_of_time or not np.isfinite(train_loss):
            break
        if improved and time.monotonic() - last_save > 90.0:  # so a machine taken back still hands something
            save(final=False)
            last_save = time.monotonic()
        round_start, round_steps, round_loss = time.monotonic(), 0, jnp.zeros(())
    save(final=True)
    print(f"{args.instrument}: best round {best[1]} val {best[0]:.5f}; {step} steps, {step * args.batch} chunks, "
          f"{step * args.batch / max(training_seconds, 1e-9):.1f} chunks/s over {training_seconds:.0f} s", flush=True)
    return 0 if np.isfinite(best[0]) else 1


if __name__ == "__main__":
    sys.exit(main())

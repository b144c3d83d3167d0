"""Benchmark the model presets on this machine and print JSON.

For each preset: trainable parameters, training chunks per second (Adam step, batch 4), inference
seconds per chunk, end-to-end separation speed of stereo audio (x real time, at the model rate;
resampling from 44.1 kHz is the client's and not counted) and peak resident memory. Every timing is
the median of several repeats after a warm-up. Each preset runs in its own process so peak memory
is its own.

    .venv/bin/python bench/bench_model.py [--presets tiny,cpu,thesis] [--repeats 5] [--seconds 10]

A preset may carry config overrides, to weigh a change against its preset in one run:
`--presets cpu,cpu:hourglass_filters=48` (several as `cpu:a=1:b=2`; values are YAML scalars).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: tracing and allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_spec(spec: str) -> tuple[str, dict]:
    """"cpu:hourglass_filters=48:dropout=0" -> ("cpu", {"hourglass_filters": 48, "dropout": 0})."""
    import yaml

    preset, *pairs = spec.split(":")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"bad override {pair!r} in {spec!r}: use KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return preset, overrides


def bench_preset(spec: str, repeats: int, seconds: float, batch: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from model.config import make_config
    from model.loss import masked_l1
    from model.network import build_network, trainable_parameter_count
    from model.separate import separate_waveform

    preset, overrides = parse_spec(spec)
    config = make_config(preset, overrides)
    network = build_network(config)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    rng = np.random.default_rng(0)
    shape = (batch, config.freq_rows, config.chunk_frames, 1)
    mix = tf.constant(np.abs(rng.standard_normal(shape)).astype(np.float32))
    target = mix * 0.5

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = masked_l1(mix, target, network(mix, training=True), config.normalise_eps)
        grads = tape.gradient(loss, network.trainable_variables)
        optimizer.apply_gradients(zip(grads, network.trainable_variables, strict=True))
        return loss

    @tf.function
    def infer(x):
        return network(x, training=False)

    one_chunk = mix[:1]
    chunk_batch = tf.constant(np.abs(rng.standard_normal((config.inference_batch,) + shape[1:])).astype(np.float32))
    stereo = tf.constant(rng.standard_normal((2, int(seconds * config.rate_hz))).astype(np.float32) * 0.1)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def separate(x):
        return separate_waveform(network, x, config)

    train_s = _median_seconds(lambda: train_step().numpy(), repeats)
    chunk_s = _median_seconds(lambda: infer(one_chunk).numpy(), repeats)
    batched_s = _median_seconds(lambda: infer(chunk_batch).numpy(), repeats)
    separate_s = _median_seconds(lambda: [t.numpy() for t in separate(stereo)], max(1, repeats // 2))
    return {
        "preset": preset,
        "overrides": overrides,
        "trainable_parameters": trainable_parameter_count(network),
        "train_chunks_per_second": round(batch / train_s, 3),
        "train_batch": batch,
        "inference_seconds_per_chunk": round(chunk_s, 5),
        "inference_seconds_per_chunk_batched": round(batched_s / config.inference_batch, 5),
        "inference_batch": config.inference_batch,
        "chunk_audio_seconds": round(config.chunk_frames * config.hop_length / config.rate_hz, 3),
        "separation_stereo_audio_seconds": seconds,
        "separation_seconds": round(separate_s, 4),
        "separation_x_real_time": round(seconds / separate_s, 2),
        "chunk_overlap": config.chunk_overlap,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,cpu,thesis")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="stereo audio length for end-to-end separation")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: bench one preset
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(bench_preset(args.one, args.repeats, args.seconds, args.batch)))
        return 0
    results = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "--one", preset, "--repeats", str(args.repeats),
               "--seconds", str(args.seconds), "--batch", str(args.batch)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            results.append({"preset": preset, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import tensorflow as tf

    report = json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg(),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")], "tensorflow": tf.__version__},
        "results": results,
    }, indent=2)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(report + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One training run in the foreground, without the gRPC service: `python -m services.training.run`.

For batch schedulers (deploy/k8s/training-job*.yaml) and multi-worker training, where every
worker runs this with its own TF_CONFIG. The same --run continues from its last checkpoint, so a
retried pod resumes. SIGTERM checkpoints and exits 3 (so the scheduler retries); a finished run
exits 0. The summary is printed as one JSON line on stdout, progress goes to stderr.

    python -m services.training.run --dataset guitar --preset cpu --run guitar-cpu-k8s [--epochs 36]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from services.common.cliutil import key_value
from services.common.config import load_config
from services.common.errors import StemlabError
from services.common.manifest import ManifestError, find_manifest
from services.common.paths import DataRoot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--dataset-version", type=int, default=None)
    parser.add_argument("--preset", default="thesis", choices=("tiny", "cpu", "thesis"))
    parser.add_argument("--run", required=True, help="run id: DATA/runs/<run>/")
    parser.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=36)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=1000)
    parser.add_argument("--data", default=None, help="data root (default: STEMLAB_DATA / config)")
    args = parser.parse_args(argv)

    # Heavy imports after argument parsing, so --help is instant.
    from services.common.server import parse_overrides
    from services.training import jobs, trainer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def progress(done, total, message, **metrics):
        print(f"[{done}/{total}] {message}", file=sys.stderr, flush=True)

    try:
        data = DataRoot(args.data) if args.data else DataRoot(load_config().data_root)
        manifest = find_manifest(data, args.dataset, args.dataset_version)
        result = trainer.train_run(
            jobs.run_dir(data, args.run), manifest, data.root, preset=args.preset,
            overrides=parse_overrides(dict(args.set)), epochs=args.epochs, patience=args.patience, seed=args.seed,
            steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, progress=progress,
            should_stop=stop.is_set)
    except (StemlabError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 3 if result["state"] == "cancelled" else 0


if __name__ == "__main__":
    sys.exit(main())

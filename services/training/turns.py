"""Turns for TensorFlow work: the runs and exports of one process call TF one at a time.

A training service with several workers runs several training loops in one process. TF lowers
gradient sums to temporary variables in a per-step container whose name is not unique across
concurrent function calls, so two train steps at once can fail with AlreadyExistsError
("__per_step_0/AddN_5/tmp_var"; seen here, and tensorflow/tensorflow#23780). Turns per step alone
were not enough: a run saving its first checkpoint beside another run's step hung both of TF's
inter-op threads in TemporaryVariableOp for good (three runs in one service; gdb, 2026-11-26), and a
run building its datasets and network beside another run's steps hung a service with two workers
(2026-12-06). So every TF call of a run takes a turn: its setup, each epoch's iterator, each step,
each epoch's close, every checkpoint save, and every export. The runs share the same CPU cores or
GPU anyway, so turns cost little.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Not re-entrant: a thread that holds its turn never asks for another.
_TURN = threading.Lock()


@contextmanager
def tf_turn() -> Iterator[None]:
    """Hold this process's TF turn for the `with` block."""
    with _TURN:
        yield

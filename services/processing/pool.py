"""Per-track work spread over all cores, with progress, cooperative stopping and failure isolation.

Each task is one track; a track that raises is reported as failed with its error and the others
go on. Workers are started with "spawn": the service process runs gRPC threads, and forking a
threaded process can deadlock the child. Spawning costs about a second per worker (imports),
so the pool is kept for the life of the process and shared by all jobs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from services.common.jobs import run_item  # one bad track is one failed row, never an exception

log = logging.getLogger(__name__)

Progress = Callable[[float, float, str], None]
ShouldStop = Callable[[], bool]


_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def shared_pool(workers: int) -> ProcessPoolExecutor:
    """The process pool of this size, started on first use and kept."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            _pools[workers] = pool
        return pool


def _discard_pool(workers: int, pool: ProcessPoolExecutor) -> None:
    """Forget a broken pool (a worker died) so the next job starts a fresh one."""
    with _pools_lock:
        if _pools.get(workers) is pool:
            del _pools[workers]
    pool.shutdown(wait=False, cancel_futures=True)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_tracks(fn: Callable[..., dict], tasks: Sequence[tuple[str, dict]], workers: int | None = None,
               progress: Progress | None = None, should_stop: ShouldStop | None = None,
               share: Any = None) -> tuple[list[dict], bool]:
    """Run fn(**kwargs) for every (track_id, kwargs) task.

    `fn` must be a module-level function (it is pickled to the workers) returning a JSON-able
    dict with at least "track" and "status". workers: None = all cores; 1 or 0 = in this
    process (tests, tiny jobs; a single task runs here too). Returns (results in task order,
    stopped early?). Tasks not started because of a stop are left out of the results.
    `share`: the job's items in a shared job store (JobContext.items); other replicas then run
    some of the tasks (fn registered with jobs.item_function, kwargs JSON data).
    """
    if share is not None:
        return _run_shared(fn, tasks, share, workers, progress, should_stop)
    total = len(tasks)
    results: dict[int, dict] = {}
    report = progress or (lambda done, total, message="": None)
    stop = should_stop or (lambda: False)
    workers = default_workers() if workers is None else workers
    workers = max(1, min(workers, total or 1))
    report(0, total, f"{total} tracks to do")

    def finished(i: int, row: dict) -> None:
        results[i] = row
        report(len(results), total, f"{tasks[i][0]}: {row.get('status', '?')}")

    def ordered() -> list[dict]:
        return [results[j] for j in sorted(results)]

    if workers == 1 or total == 1:
        for i, (key, kwargs) in enumerate(tasks):
            if stop():
                return ordered(), True
            finished(i, run_item(fn, key, kwargs))
        return ordered(), False

    pool = shared_pool(workers)
    pending: dict[Future, int] = {}
    next_task = 0
    stopped = broken = False
    while next_task < total or pending:
        # Keep only a few tasks queued beyond the running ones, so a stop takes effect soon.
        while not stopped and next_task < total and len(pending) < 2 * workers:
            key, kwargs = tasks[next_task]
            try:
                pending[pool.submit(run_item, fn, key, kwargs)] = next_task
            except BrokenProcessPool as e:
                broken = True
                finished(next_task, {"track": key, "status": "failed", "error": f"worker process died: {e}"})
            next_task += 1
        if not pending:
            break
        done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        for fut in done:
            i = pending.pop(fut)
            try:
                row = fut.result()
            except BrokenProcessPool as e:
                broken = True
                row = {"track": tasks[i][0], "status": "failed", "error": f"worker process died: {e}"}
            except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
                row = {"track": tasks[i][0], "status": "failed", "error": f"{type(e).__name__}: {e}"}
            finished(i, row)
        if not stopped and stop():
            # Running tracks finish (their writes are atomic either way); queued ones never start.
            stopped = True
            next_task = total
            for fut in list(pending):
                if fut.cancel():
                    pending.pop(fut)
    if broken:
        _discard_pool(workers, pool)
    return ordered(), stopped


def _run_shared(fn: Callable[..., dict], tasks: Sequence[tuple[str, dict]], share: Any, workers: int | None,
                progress: Progress | None, should_stop: ShouldStop | None) -> tuple[list[dict], bool]:
    """run_tracks over a job's shared items: this process claims tasks one at a time (as many at
    once as it has workers) beside idle replicas doing the same, and waits for theirs. An item is
    claimed by one worker at a time, so none is done twice; a job taken over after its worker
    died keeps the items already done."""
    total = len(tasks)
    report = progress or (lambda done, total, message="": None)
    stop = should_stop or (lambda: False)
    workers = max(1, default_workers() if workers is None else workers)
    share.publish(fn, list(tasks))
    pool = shared_pool(workers) if workers > 1 else None
    pending: dict[Future, Any] = {}
    stopped = False
    done = len(share.results())
    report(done, total, f"{total} tracks to do, {done} done before")
    while True:
        while not stopped and len(pending) < workers:
            item = share.claim()
            if item is None:
                break
            if pool is None:
                share.finish(item, run_item(fn, item.key, item.kwargs))
                break  # one at a time in this process: look at stop and progress in between
            pending[pool.submit(run_item, fn, item.key, item.kwargs)] = item
        if pending:
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                item = pending.pop(fut)
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - a dead worker process, an unpicklable result
                    row = {"track": item.key, "status": "failed", "error": f"{type(e).__name__}: {e}"}
                    if isinstance(e, BrokenProcessPool):
                        _discard_pool(workers, pool)
                        pool = shared_pool(workers)
                share.finish(item, row)
        results = share.results()
        if len(results) != done:
            done = len(results)
            report(done, total, f"{done} of {total} tracks done")
        if done >= total or (stopped and not pending):
            return [results[i] for i in sorted(results)], stopped
        if not stopped and stop():
            stopped = True
            for fut in list(pending):
                if fut.cancel():
                    pending.pop(fut)
        elif not pending:
            time.sleep(0.2)  # the rest is held by other replicas


def count_statuses(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    return dict(sorted(counts.items()))

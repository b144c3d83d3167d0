"""Jobs: the bounded runner every service uses, over the job store (services/common/jobstore).

A job function has the signature `fn(ctx: JobContext, params: dict) -> dict`. It reports
progress with `ctx.progress(done, total, message, **metrics)` and stops cooperatively when
`ctx.cancelled` turns true (or calls `ctx.check_cancelled()`, which raises `JobCancelled`).

Workers take jobs from the store (`claim_next`), never from memory, so a job queued by another
process (a web replica, another replica of the service) is run the same way as one queued
here. Every state change is written at once; progress at most every `PROGRESS_WRITE_SECONDS`
(watchers in this process still see every update). A heartbeat renews the leases of this
runner's jobs, carries cancel requests made by other processes to them and, where the store
is shared, requeues jobs whose worker died (or fails them after the configured attempts).

With SQLite (one process runs a store: `JobStore.claim`, a lock the kernel drops when the
process dies) a job found RUNNING at start belonged to a process that died: it is marked FAILED
with the error "interrupted", as before PostgreSQL — or, for a runner made with
`requeue_interrupted` (the web's separations), queued again, as a shutdown leaves it. Long jobs may share their items with other
replicas (`JobContext.items`, shared stores only); idle workers take them up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from services.common.errors import FailedPreconditionError, InvalidArgumentError, StemlabError
from services.common.jobstore import (  # noqa: F401 - the names services import from here
    CANCELLED,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    Item,
    JobNotFoundError,
    JobRecord,
    Progress,
    SqliteJobStore,
    SqlJobStore,
    StoreInUseError,
    StoreSettings,
    open_store,
    store_settings,
)

log = logging.getLogger(__name__)

JobStore = SqliteJobStore  # the default backend, under its old name
PROGRESS_WRITE_SECONDS = 0.5
SHUTDOWN = f"{INTERRUPTED} (service shut down)"


class JobCancelled(Exception):
    """Raised inside a job function to stop it after a cancel request."""


# Functions whose items any replica may run: "module.name" -> function (see `item_function`).
ITEM_FUNCTIONS: dict[str, Callable[..., dict]] = {}


def item_function(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Allow `fn(**kwargs) -> dict` to run as an item of a shared job in any replica.

    Only registered functions run: a name read from the database never imports anything.
    """
    ITEM_FUNCTIONS[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def run_item(fn: Callable[..., dict], key: str, kwargs: dict) -> dict:
    """One item, never raising: an item that fails is a row with status "failed" and its error."""
    try:
        return fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the error is the result
        log.warning("item %s failed: %s", key, e)
        return {"track": key, "status": "failed", "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__}


class ItemShare:
    """The items of one running job, claimed one at a time by any replica's workers.

    The job's own worker publishes the items, claims and runs as many as it can, and waits for
    the ones other replicas hold; `results` is every finished item's row by index.
    """

    def __init__(self, runner: JobRunner, job_id: str):
        self._runner = runner
        self.job_id = job_id

    def publish(self, fn: Callable[..., dict], tasks: list[tuple[str, dict]]) -> None:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if ITEM_FUNCTIONS.get(name) is not fn:
            raise ValueError(f"{name} is not registered with item_function(); other replicas could not run it")
        self._runner.store.add_items(self.job_id, name, tasks)

    def claim(self) -> Item | None:
        return self._runner._claim_item(self.job_id)

    def finish(self, item: Item, row: dict) -> None:
        self._runner._finish_item(item, row)

    def results(self) -> dict[int, dict]:
        return self._runner.store.item_results(self.job_id)


class JobContext:
    """What a running job function sees: progress reporting, the cancel flag, shared items."""

    def __init__(self, runner: JobRunner, job_id: str, started: float, data: Any = None):
        self._runner = runner
        self.job_id = job_id
        self._started = started
        self._cancel = threading.Event()
        self.cancel_reason = ""
        self.data = data

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def items(self) -> ItemShare | None:
        """Where the store is shared, this job's items, which idle replicas help with; else None."""
        return ItemShare(self._runner, self.job_id) if self._runner.store.shared else None

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(self.cancel_reason or "cancelled")

    def progress(self, done: float, total: float, message: str = "", **metrics: Any) -> None:
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        elapsed = time.time() - self._started
        eta = elapsed * (1 - fraction) / fraction if 0 < fraction else -1.0
        self._runner._report(self.job_id, Progress(
            fraction=fraction, done=float(done), total=float(total), message=message,
            eta_seconds=eta, metrics={k: v for k, v in metrics.items() if _jsonable(v)}))

    def _stop(self, reason: str) -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self._cancel.set()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


JobFunction = Callable[[JobContext, dict], dict]


class JobRunner:
    """Bounded pools of worker threads running the registered job kinds of one service.

    Kinds run in the default lane (`workers` threads) unless registered in a lane of their own, so
    short jobs (an export) never wait hours behind long ones (a training run) in the same queue.
    A runner built with `run=False` only queues, reads and cancels jobs (a web replica whose
    separations run in worker processes); it never runs one.
    """

    def __init__(self, store: SqlJobStore, service: str, workers: int = 1, data: Any = None,
                 run: bool = True, settings: StoreSettings | None = None, requeue_interrupted: bool = False):
        self.store = store
        # Jobs that simply run again from the start (a web separation whose song is kept): cut
        # short by a shutdown or a dead process they go back to the queue, not to "interrupted".
        self.requeue_interrupted = requeue_interrupted
        self.service = service
        self.data = data
        self.runs = run
        self.settings = settings or store_settings()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # How often idle workers look for jobs other processes queued: this process's wake them at
        # once, and so do other replicas' on PostgreSQL (LISTEN/NOTIFY); polling covers the rest
        # (a web beside its worker on SQLite, a lost notification, another replica's expired lease).
        self.poll_seconds = 1.0
        self._kinds: dict[str, JobFunction] = {}
        self._lane_of: dict[str, str] = {}
        self._lanes: dict[str, int] = {"": workers}
        self._contexts: dict[str, JobContext] = {}
        self._items_held: set[tuple[str, int]] = set()
        self._changed = threading.Condition()
        self._wake = threading.Condition()
        self._wakes = 0  # wake-ups so far: one that comes while a worker claims is not lost
        self._versions: dict[str, int] = {}
        self._live: dict[str, JobRecord] = {}
        self._last_write: dict[str, float] = {}
        self._accepting = True
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.interrupted: list[JobRecord] = []
        if run and not store.shared:
            # Claim the store before marking "running" jobs interrupted: they may be another
            # process's (a second copy of a service, a second web server on one data root), which
            # would also run queued jobs twice. That copy is refused with StoreInUseError instead.
            store.claim()
            if requeue_interrupted:
                requeued, failed = store.requeue_interrupted(self.settings.max_attempts)
                for job_id in requeued:
                    log.warning("job %s was running when the service stopped: queued again", job_id)
                for job_id in failed:
                    log.warning("job %s was running when the service stopped, again: marked failed", job_id)
            else:
                self.interrupted = store.mark_interrupted()
                for job in self.interrupted:
                    log.warning("job %s (%s) was running when the service stopped: marked failed", job.id, job.kind)

    def register(self, kind: str, fn: JobFunction, lane: str = "") -> None:
        """Run `kind` with `fn`; in `lane`, a one-worker queue of its own, if named."""
        if self._threads:
            raise RuntimeError("register job kinds before start()")
        self._kinds[kind] = fn
        self._lane_of[kind] = lane
        self._lanes.setdefault(lane, 1)

    def start(self) -> None:
        if not self.runs:
            raise RuntimeError("this runner only queues jobs (run=False)")
        for lane, count in self._lanes.items():
            kinds = tuple(k for k, its in self._lane_of.items() if its == lane) if lane else ()
            exclude = () if lane else tuple(k for k, its in self._lane_of.items() if its)
            if lane and not kinds:
                continue
            self._threads += [threading.Thread(target=self._work, args=(kinds, exclude, not lane), daemon=True,
                                               name=f"job-{lane or 'worker'}-{i}") for i in range(count)]
        self._threads.append(threading.Thread(target=self._heartbeat, daemon=True, name="job-heartbeat"))
        if hasattr(self.store, "listen"):  # jobs queued by other replicas wake this one's workers at once
            self._threads.append(threading.Thread(target=self.store.listen, args=(self._wake_workers, self._stopping),
                                                  daemon=True, name="job-listen"))
        for t in self._threads:
            t.start()

    # -- requests ------------------------------------------------------------------------
    def submit(self, kind: str, params: dict | None = None) -> JobRecord:
        if kind not in self._kinds:
            raise InvalidArgumentError(f"unknown job kind {kind!r}")
        if not self._accepting:
            raise FailedPreconditionError(f"{self.service} is shutting down; try again later")
        params = params or {}
        if not _jsonable(params):
            raise InvalidArgumentError("job parameters must be JSON data")
        job = self.store.create(f"{self.service}-{uuid.uuid4().hex[:12]}", kind, params)
        self._notify(job)
        self._wake_workers()
        return job

    def get(self, job_id: str) -> JobRecord:
        with self._changed:
            live = self._live.get(job_id)
        return live or self.store.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job.ended:
            return job
        ctx = self._contexts.get(job_id)
        if ctx is not None:
            ctx._stop("cancelled")
            return self.get(job_id)
        job = self.store.request_cancel(job_id)  # a running job's worker sees it at its next heartbeat
        self._notify(job)
        return job

    def watch(self, job_id: str, alive: Callable[[], bool] = lambda: True,
              poll_seconds: float = 0.5) -> Iterator[JobRecord]:
        """Yield the job now and after every change, until it has ended (or `alive` is false).

        Changes made here wake the watcher at once; those of other processes are read every
        `poll_seconds`.
        """
        version, seen = -1, None
        while True:
            with self._changed:
                current = self._versions.get(job_id, 0)
            job = self.get(job_id)
            if current != version or (job.state, job.progress, job.error) != seen:
                version, seen = current, (job.state, job.progress, job.error)
                yield job
                if job.ended:
                    return
            with self._changed:
                if self._versions.get(job_id, 0) == version:
                    self._changed.wait(timeout=poll_seconds)
            if not alive():
                return

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self, grace_seconds: float) -> None:
        """Stop taking jobs, ask running ones to stop, wait up to the grace period, then record
        the rest: interrupted (SQLite), or back in the queue for another replica (shared)."""
        self._accepting = False
        for ctx in list(self._contexts.values()):
            # A job a user cancelled stays cancelled while it winds down (a training run saves its
            # checkpoint): called "interrupted", it would be resumed at the next start.
            ctx._stop("shutdown")
        self._stopping.set()
        self._wake_workers()
        deadline = time.time() + grace_seconds
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.time()))
        for job_id, ctx in list(self._contexts.items()):
            if ctx.cancel_reason == "cancelled":
                self.store.finish(job_id, self.worker_id, state=CANCELLED, finished=time.time())
            elif self.store.shared or self.requeue_interrupted:
                self.store.release(job_id, self.worker_id)
            else:
                self.store.finish(job_id, self.worker_id, state=FAILED, error=SHUTDOWN, finished=time.time())

    # -- internals -----------------------------------------------------------------------
    def _wake_workers(self) -> None:
        with self._wake:
            self._wakes += 1
            self._wake.notify_all()

    def _notify(self, job: JobRecord) -> None:
        with self._changed:
            self._versions[job.id] = self._versions.get(job.id, 0) + 1
            if job.ended or job.id not in self._contexts:
                self._live.pop(job.id, None)
            else:
                self._live[job.id] = job
            self._changed.notify_all()

    def _report(self, job_id: str, progress: Progress) -> None:
        with self._changed:
            live = self._live.get(job_id)
        if live is None or live.ended:
            return
        job = replace(live, progress=progress)
        now = time.time()
        if now - self._last_write.get(job_id, 0.0) >= PROGRESS_WRITE_SECONDS:
            self._last_write[job_id] = now
            self.store.write_progress(job_id, self.worker_id, progress)
        self._notify(job)

    def _work(self, kinds: tuple[str, ...], exclude: tuple[str, ...], helps: bool) -> None:
        while self._accepting:
            with self._wake:
                wakes = self._wakes
            try:
                job = self.store.claim_next(self.worker_id, self.settings.lease_seconds, kinds, exclude)
                if job is None and helps and self.store.shared:
                    item = self._claim_item()
                    if item is not None:
                        self._help(item)
                        continue
            except Exception:  # a database that went away for a moment must not end the worker
                log.exception("claiming a job failed")
                job = None
            if job is None:
                with self._wake:
                    if self._wakes == wakes:
                        self._wake.wait(self.poll_seconds)
                continue
            if not self._accepting:
                self.store.release(job.id, self.worker_id)
                return
            try:
                self._run(job)
            except Exception:  # the worker must survive anything a job does
                log.exception("job %s: runner error", job.id)

    def _run(self, job: JobRecord) -> None:
        ctx = JobContext(self, job.id, job.started or time.time(), self.data)
        self._contexts[job.id] = ctx
        self._notify(job)
        log.info("job %s (%s) started%s", job.id, job.kind, f", attempt {job.attempts}" if job.attempts > 1 else "")
        try:
            fn = self._kinds.get(job.kind)
            if fn is None:
                raise InvalidArgumentError(f"unknown job kind {job.kind!r}")
            result = fn(ctx, dict(job.params)) or {}
            if not _jsonable(result):
                raise TypeError("job result is not JSON data")
            if ctx.cancelled and ctx.cancel_reason == "shutdown":
                state, error = FAILED, SHUTDOWN
            elif ctx.cancelled:
                state, error = CANCELLED, ""
            else:
                state, error = SUCCEEDED, ""
            final = {"state": state, "error": error, "result": result}
        except JobCancelled:
            if ctx.cancel_reason == "shutdown":
                final = {"state": FAILED, "error": SHUTDOWN}
            else:
                final = {"state": CANCELLED}
        except Exception as e:  # a job's failure is recorded, never raised into the service
            if isinstance(e, StemlabError):  # a failure the job explains (bad input): no traceback
                log.warning("job %s failed: %s", job.id, e)
            else:
                log.exception("job %s failed", job.id)
            final = {"state": FAILED, "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__}
        with self._changed:
            # Readers see the store from here on: get() reads the live record and then the store, so
            # a live record left until after the store says "ended" would show the job running again.
            live = self._live.pop(job.id, None)
        progress = live.progress if live else job.progress
        if final["state"] == SUCCEEDED:
            progress = replace(progress, fraction=1.0, eta_seconds=0.0)
        if final.get("error") == SHUTDOWN and (self.store.shared or self.requeue_interrupted):
            ended = False  # another replica, or this service's next start, takes it up (shutdown() gives it back)
        else:
            ended = self.store.finish(job.id, self.worker_id, finished=time.time(), progress=progress, **final)
            if not ended and ctx.cancel_reason != "shutdown":
                log.warning("job %s was taken over by another worker (lease lost): this run's end is dropped", job.id)
        if ended or self._accepting:  # else shutdown() records it (interrupted, or back in the queue)
            self._contexts.pop(job.id, None)
        self._notify(self.store.get(job.id))
        log.info("job %s ended %s", job.id, final["state"] if ended else "here (not recorded)")

    def _claim_item(self, job_id: str | None = None) -> Item | None:
        item = self.store.claim_item(self.worker_id, self.settings.lease_seconds, job_id)
        if item is not None:
            self._items_held.add((item.job_id, item.idx))
        return item

    def _finish_item(self, item: Item, row: dict) -> None:
        if not self.store.finish_item(item, self.worker_id, row):
            log.warning("item %d of job %s was taken over by another worker", item.idx, item.job_id)
        self._items_held.discard((item.job_id, item.idx))

    def _help(self, item: Item) -> None:
        """Run one item of another worker's job (a replica with nothing of its own to do)."""
        fn = ITEM_FUNCTIONS.get(item.fn)
        if fn is None:
            row = {"track": item.key, "status": "failed", "error": f"{item.fn} cannot run as an item here"}
        else:
            row = run_item(fn, item.key, item.kwargs)
        self._finish_item(item, row)

    def _heartbeat(self) -> None:
        """Renew this runner's leases, deliver cancel requests, requeue dead workers' jobs, prune."""
        lease = self.settings.lease_seconds
        interval = max(0.2, min(lease / 3, 2.0))
        last_prune = 0.0
        while not self._stopping.wait(interval):
            try:
                cancel, lost = self.store.heartbeat(self.worker_id, list(self._contexts), lease)
                for job_id in cancel:
                    if (ctx := self._contexts.get(job_id)) is not None:
                        ctx._stop("cancelled")
                for job_id in lost:
                    if (ctx := self._contexts.get(job_id)) is not None and not ctx.cancelled:
                        log.warning("job %s: this worker lost its lease; stopping it here", job_id)
                        ctx._stop("lost")
                self.store.heartbeat_items(self.worker_id, list(self._items_held), lease)
                if self.store.shared:
                    requeued, failed = self.store.requeue_expired(self.settings.max_attempts)
                    for job_id in requeued:
                        log.warning("job %s: its worker stopped renewing its lease; queued again", job_id)
                    for job_id in failed:
                        log.error("job %s: its workers were lost %d times; failed", job_id, self.settings.max_attempts)
                    if requeued:
                        self._wake_workers()
                if time.time() - last_prune > 3600:
                    last_prune = time.time()
                    pruned = self.store.prune(last_prune - self.settings.retention_days * 86400)
                    if pruned:
                        log.info("deleted %d jobs that ended more than %g days ago", pruned,
                                 self.settings.retention_days)
            except Exception:  # the heartbeat must outlive a database hiccup
                log.exception("job heartbeat failed")

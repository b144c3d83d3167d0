"""Separations of the web demo: the job that separates one song, and the bounded queue around it.

A separation's files live in DATA/web/separations/<folder>/ (the uploaded or downloaded song
while it runs, then instrument/rest as WAV, FLAC and MP3 and a waveform picture). Job states
are kept by the common job store: DATA/web/separations.sqlite by default, where a job that was
running when the server stopped or died is queued again (its song is kept until it succeeds);
or the shared PostgreSQL database
(STEMLAB_DATABASE_URL), where web replicas only queue and read jobs and separation workers
(`python -m services.frontend.worker`) run them, a dead worker's job going to another.

The web process stores the bounded upload and reads its header only; decoding happens in the
worker, after admission. Results are bounded by a byte quota (`results_quota_mb`): the oldest
finished results are deleted first, and new work is refused while running ones fill it.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from services.common import jobs as jobstore
from services.common.audio import (
    MP3_RATES_HZ,
    AudioError,
    AudioReader,
    DecodeLimits,
    DecoderStopped,
    read_audio,
    resample,
    write_audio,
)
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, StemlabError
from services.common.paths import PathError, safe_join
from services.frontend import links
from services.frontend.pictures import draw_waveforms
from services.frontend.settings import WebSettings

log = logging.getLogger(__name__)

JOB_KIND = "web.separate"
STEMS = ("instrument", "rest")
FORMATS = ("wav", "flac", "mp3")
EAGER_FORMATS = ("wav", "flac")
SUBTYPES = {"wav": "FLOAT", "flac": "PCM_24", "mp3": None}
PICTURE = "waveforms.png"
MP3_FALLBACK_RATE_HZ = 44100
_FOLDER = re.compile(r"^[a-f0-9]{32}$")

Progress = Callable[[float, float, str], None]


class SeparationFailed(StemlabError):
    """Why a separation failed, in words for the person who asked for it."""


class SongRefused(InvalidArgumentError):
    """The song itself is refused: not audio, too long."""


class QueueFull(FailedPreconditionError):
    """Too many separations are waiting; the person should try again later."""


class SeparationNotFound(NotFoundError):
    pass


class StorageFull(FailedPreconditionError):
    """The results quota is taken by separations still running or waiting."""


@dataclass(frozen=True)
class SongInfo:
    rate: int
    channels: int
    seconds: float


# Times a separation starts again after serving went away under it (a restart of the stack).
SERVING_RETRIES = 2
# A song may run this far past the length limit: headers and decoders round.
LENGTH_SLACK_SECONDS = 0.5


def check_song(path: Path, max_seconds: float, limits: DecodeLimits, count: bool = False) -> SongInfo:
    """Check that `path` is audio no longer than `max_seconds` (formats are judged by content).

    WAV, FLAC and AIFF headers give the length exactly. A compressed file's header only
    estimates it (a VBR MP3 without its Xing header can be off by a third, either way), so its
    samples are counted by decoding it — always with `count` (the worker, before it separates:
    a song found too long at the end would waste the whole separation), else only when the
    estimate says too long (the upload request: refusing a song that fits would be wrong).
    Raises SongRefused with the reason when the file is not audio or is longer than allowed.
    """
    counted = False
    try:
        reader = AudioReader(path, limits=replace(limits, max_seconds=None))
        try:
            seconds = reader.seconds
            if not reader.exact_length and (count or seconds > max_seconds + LENGTH_SLACK_SECONDS):
                seconds, counted = _counted_seconds(reader, max_seconds + LENGTH_SLACK_SECONDS), True
        finally:
            reader.close()
    except AudioError as error:
        raise SongRefused(f"this file cannot be read as audio ({error.reason})") from None
    if seconds > max_seconds + LENGTH_SLACK_SECONDS:
        # Counting stops at the limit: the whole length is not known then.
        length = f"longer than {max_seconds:.0f} s" if counted else f"{seconds:.0f} s long"
        raise SongRefused(f"the song is {length}; at most {max_seconds:.0f} s are accepted")
    return SongInfo(rate=int(reader.rate), channels=int(reader.channels), seconds=float(seconds))


def _counted_seconds(reader: AudioReader, stop_after: float) -> float:
    """The decoded length in seconds, counted until it passes `stop_after`."""
    frames = 0
    for block in reader.blocks():
        frames += block.shape[1]
        if frames > stop_after * reader.rate:
            break
    return frames / reader.rate


_mp3_locks: dict[Path, threading.Lock] = {}
_mp3_locks_guard = threading.Lock()


def ensure_mp3(folder: Path, stem: str) -> Path:
    """`folder`/<stem>.mp3, encoded from the stem's WAV the first time it is asked for.

    MP3 only knows some rates: other rates are resampled to 44.1 kHz for the MP3 alone.
    Concurrent requests for the same file wait for one encoder instead of starting their own.
    """
    target = folder / f"{stem}.mp3"
    with _mp3_locks_guard:
        lock = _mp3_locks.setdefault(target, threading.Lock())
    with lock:
        if not target.is_file():
            audio, rate = read_audio(folder / f"{stem}.wav")
            if rate not in MP3_RATES_HZ:
                audio, rate = resample(audio, rate, MP3_FALLBACK_RATE_HZ), MP3_FALLBACK_RATE_HZ
            write_audio(target, audio, rate)
    with _mp3_locks_guard:
        _mp3_locks.pop(target, None)
    return target


def separate_song(song: Path, folder: Path, model: str, settings: WebSettings,
                  progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                  progress_start: float = 0.0) -> dict:
    """Separate the song at `song` with the served `model`; the results land in `folder`.

    progress(done, total, message) runs from `progress_start` to 1 (total is 1). Returns the
    job result {model, version, rate, channels, seconds}. Raises SongRefused, or the serving
    client's ServingError / SeparationCancelled.
    """
    from services.serving.client import SongTooLong, separate_file

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(progress_start + (1 - progress_start) * fraction, 1.0, message)

    report(0.0, "reading the song")
    check_song(song, settings.max_song_seconds, settings.decode_limits, count=True)
    # The client decodes, separates and writes WAV and FLAC as one stream (the same path as
    # `stemlab separate`); MP3 is made on first request (ensure_mp3).
    try:
        result = separate_file(
            song, folder, model,
            address=settings.serving_address if settings.serving_protocol == "grpc" else settings.serving_rest_address,
            protocol=settings.serving_protocol, segment_seconds=settings.segment_seconds,
            timeout_seconds=settings.serving_timeout_seconds, formats=EAGER_FORMATS,
            max_seconds=settings.max_song_seconds + LENGTH_SLACK_SECONDS, should_stop=should_stop,
            # counted while decoding, at most 48 kHz and stereo; the length is the client's check
            limits=replace(settings.decode_limits, max_seconds=None),
            progress=lambda done, total, message: report(0.05 + 0.85 * done / max(total, 1e-9), message))
    except SongTooLong:
        raise SongRefused(f"the song is longer than {settings.max_song_seconds:.0f} s, the most accepted") from None
    except AudioError as error:
        if Path(error.path) != song:  # a stem could not be written: not the song's fault
            raise
        raise SongRefused(f"this file cannot be read as audio ({error.reason})") from None
    report(0.96, "drawing the waveforms")
    instrument, rate = read_audio(folder / "instrument.wav")
    rest, _ = read_audio(folder / "rest.wav")
    gain_db = _fit_full_scale(folder, {"instrument": instrument, "rest": rest}, rate)
    if gain_db:
        instrument, rest = (x * 10 ** (gain_db / 20) for x in (instrument, rest))
    draw_waveforms(folder / PICTURE, [("mix", instrument + rest), ("instrument", instrument), ("rest", rest)], rate)
    report(1.0, "done")
    return {"model": model, "version": result["version"], "rate": int(result["rate"]),
            "channels": int(result["channels"]), "seconds": round(float(result["seconds"]), 3),
            **({"gain_db": round(gain_db, 2)} if gain_db else {})}


def _fit_full_scale(folder: Path, stems: dict[str, np.ndarray], rate: int) -> float:
    """A song above full scale (a float WAV, or a loud master's MP3 decoded) gives stems above it
    too, which FLAC and MP3 cannot hold: they would clip. Then every stem file is written again
    with one gain that brings the loudest peak to full scale, so instrument + rest still add up
    (to the song that much quieter). Returns that gain in dB (0: nothing changed)."""
    peak = max(float(np.max(np.abs(audio))) for audio in stems.values())
    if peak <= 1.0:
        return 0.0
    gain = 1.0 / peak
    for name, audio in stems.items():
        for fmt in EAGER_FORMATS:
            write_audio(folder / f"{name}.{fmt}", audio * gain, rate, subtype=SUBTYPES[fmt])
    return 20 * math.log10(gain)


def user_message(error: str) -> str:
    """The stored error of a failed job, as shown to a person."""
    if error.startswith(jobstore.INTERRUPTED):
        return "the web server restarted while this separation ran; please start it again"
    return re.sub(r"^[A-Za-z_.]*(Failed|Error|Cancelled)[A-Za-z_]*: ", "", error, count=1) or "the separation failed"


class SeparationQueue:
    """Separations queued in the job store, run by worker threads of this process (the default) or
    of separate worker processes (`start_workers` false in the web), files under the data root."""

    def __init__(self, settings: WebSettings):
        self.settings = settings
        self.root = settings.web_root / "separations"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = jobstore.open_store("web", settings.web_root / "separations.sqlite")
        # A separation cut short by a restart runs again when the server is back (its song is kept).
        self.runner = jobstore.JobRunner(self.store, "web", workers=settings.workers, run=settings.start_workers,
                                         requeue_interrupted=True)
        self.runner.register(JOB_KIND, self._job)
        self._submit_lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        if self.runner.runs:
            self.runner.start()
        self._sweeper = threading.Thread(target=self._sweep_forever, name="web-sweep", daemon=True)
        self._sweeper.start()

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Ask running separations to stop; what still runs after `grace_seconds` is marked failed."""
        self._stopping.set()
        if self._started:
            self._started = False
            self.runner.shutdown(grace_seconds)
        self.store.release_claim()  # the runner claimed it; a restart in this process claims it again

    # -- folders --------------------------------------------------------------------------
    def new_folder(self) -> tuple[str, Path]:
        name = secrets.token_hex(16)
        folder = self.root / name
        folder.mkdir(parents=True)
        return name, folder

    def folder(self, job: jobstore.JobRecord) -> Path:
        name = str(job.params.get("folder", ""))
        if not _FOLDER.match(name):
            raise SeparationNotFound(f"separation {job.id} has no result folder")
        try:
            return safe_join(self.root, name)
        except PathError as error:
            raise SeparationNotFound(str(error)) from None

    # -- requests -------------------------------------------------------------------------
    def admit(self) -> None:
        """Refuse new work before anything is stored: QueueFull when `max_queued` separations are
        waiting or running (counted across replicas), StorageFull when the results quota is
        taken by results that cannot be deleted yet."""
        active = self.store.count((jobstore.QUEUED, jobstore.RUNNING))
        if active >= self.settings.max_queued:
            raise QueueFull(f"{active} separations are already waiting; please try again in a few minutes")
        if self.make_room() >= self.settings.results_quota_bytes:
            raise StorageFull("the server's space for results is full of separations still running; "
                              "please try again in a few minutes")

    def submit(self, params: dict) -> jobstore.JobRecord:
        """Queue a separation; raises QueueFull when `max_queued` are already waiting or running."""
        with self._submit_lock:
            active = self.store.count((jobstore.QUEUED, jobstore.RUNNING))
            if active >= self.settings.max_queued:
                raise QueueFull(f"{active} separations are already waiting; please try again in a few minutes")
            return self.runner.submit(JOB_KIND, params)

    def get(self, job_id: str) -> jobstore.JobRecord:
        if not re.fullmatch(r"web-[a-f0-9]{12}", job_id or ""):
            raise SeparationNotFound(f"no separation {job_id!r}")
        try:
            job = self.runner.get(job_id)
        except jobstore.JobNotFoundError:
            raise SeparationNotFound(f"no separation {job_id!r}") from None
        if job.kind != JOB_KIND:
            raise SeparationNotFound(f"no separation {job_id!r}")
        return job

    def queue_position(self, job: jobstore.JobRecord) -> int:
        """How many queued separations were submitted before this queued one (0: next)."""
        if job.state != jobstore.QUEUED:
            return 0
        queued, _ = self.store.list(states=(jobstore.QUEUED,), page_size=self.settings.max_queued + 1)
        return sum(1 for other in queued if other.seq < job.seq)

    # -- the job --------------------------------------------------------------------------
    def _job(self, ctx: jobstore.JobContext, params: dict) -> dict:
        folder = safe_join(self.root, params["folder"])
        progress = lambda done, total, message="": ctx.progress(done, total, message)  # noqa: E731
        should_stop = lambda: ctx.cancelled  # noqa: E731
        try:
            from services.serving.client import SeparationCancelled, ServingError

            if params.get("url"):
                progress(0, 1, "downloading the song")
                song, fetched_title = links.fetch(
                    params["url"], folder / "download", self.settings.download_max_bytes,
                    self.settings.max_song_seconds, self.settings.download_timeout_seconds,
                    self.settings.allow_hosts,
                    progress=lambda done, total, message: progress(0.2 * done / total if total else 0.0, 1, message),
                    should_stop=should_stop)
                start = 0.2
            else:
                song, fetched_title = safe_join(folder, params["input"]), ""
                start = 0.0
            result = self._separate(song, folder, params["model"], progress, should_stop, start)
            # A link's song is named by its page (a video's title) once downloaded.
            result["title"] = fetched_title or params.get("title", "")
        except (SongRefused, links.LinkError) as error:
            raise SeparationFailed(str(error)) from None
        except SeparationCancelled:
            raise jobstore.JobCancelled("cancelled") from None
        except ServingError as error:
            raise SeparationFailed(f"the model could not be reached or refused the song: {error}") from None
        except jobstore.JobCancelled:
            raise
        except Exception as error:
            if ctx.cancel_reason == "shutdown":
                # The server stops: what broke under the job (a decoder, the serving client's
                # pool) is not the song's fault, and the job goes back in the queue.
                raise jobstore.JobCancelled("shutdown") from None
            if not isinstance(error, DecoderStopped):
                log.exception("separation %s failed", ctx.job_id)
            raise SeparationFailed("the separation failed because of an internal error (see the server log)") from None
        finally:
            # The song is not kept (instrument + rest add back up to it), unless the server stops
            # and the separation is to run again when it is back.
            shutil.rmtree(folder / "download", ignore_errors=True)
            if params.get("input") and ctx.cancel_reason != "shutdown":
                (folder / params["input"]).unlink(missing_ok=True)
        return result

    def _separate(self, song: Path, folder: Path, model: str, progress: Progress, should_stop: Callable[[], bool],
                  start: float) -> dict:
        """separate_song, once serving serves the model; started again (SERVING_RETRIES times) when
        serving goes away under it, as a restart of the stack does."""
        from services.serving.client import ServingUnavailable

        retries = 0
        while True:
            self._wait_for_model(model, progress, should_stop)
            try:
                return separate_song(song, folder, model, self.settings, progress, should_stop, start)
            except ServingUnavailable:
                retries += 1
                if retries > SERVING_RETRIES or should_stop():
                    raise
                log.warning("serving went away during a separation; starting it again when serving is back")

    def _wait_for_model(self, model: str, progress: Progress, should_stop: Callable[[], bool]) -> None:
        """Wait (up to `serving_wait_seconds`) while serving starts or loads the model: after a
        restart of the stack the queue runs again before serving has loaded its models. What is
        still unavailable then fails in the separation, with serving's own reason."""
        from services.frontend.backends import BackendUnavailable, ServingModels

        models = ServingModels(self.settings.serving_rest_address, lambda: [model], cache_seconds=0)
        deadline = time.monotonic() + self.settings.serving_wait_seconds
        while time.monotonic() < deadline and not should_stop():
            try:
                if models.status(model).available:
                    return
            except BackendUnavailable:
                pass
            progress(0, 1, f"waiting for the model {model} to be served")
            time.sleep(1.0)

    # -- cleanup --------------------------------------------------------------------------
    def _owners(self) -> dict[str, jobstore.JobRecord]:
        """Every job by the name of its result folder."""
        owners: dict[str, jobstore.JobRecord] = {}
        cursor = None
        while True:
            page, cursor = self.store.list(page_size=500, before_seq=cursor)
            for job in page:
                owners[str(job.params.get("folder", ""))] = job
            if cursor is None:
                return owners

    def used_bytes(self) -> int:
        return sum(_folder_bytes(folder) for folder in self.root.iterdir() if folder.is_dir())

    def make_room(self) -> int:
        """Keep the results under their quota: at or over it, delete the results of ended
        separations, oldest first, down to 90 % of it. Returns the bytes used afterwards."""
        quota = self.settings.results_quota_bytes
        used = self.used_bytes()
        if used < quota:
            return used
        owners = self._owners()
        ended = sorted((job.finished or job.created, folder.name, _folder_bytes(folder))
                       for folder in self.root.iterdir()
                       if folder.is_dir() and (job := owners.get(folder.name)) is not None and job.ended)
        deleted = 0
        for _, name, size in ended:
            if used < 0.9 * quota:
                break
            shutil.rmtree(self.root / name, ignore_errors=True)
            used -= size
            deleted += 1
        if deleted:
            log.info("results quota: deleted the %d oldest results (%d bytes now used of %d)", deleted, used, quota)
        return used

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete result folders older than the configured time; returns the deleted folder names.

        A folder goes once its job ended more than `result_ttl_hours` ago; a folder no job
        refers to (a refused upload) once it is that old itself.
        """
        now = time.time() if now is None else now
        cutoff = now - self.settings.result_ttl_hours * 3600
        owners = self._owners()
        deleted = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            job = owners.get(folder.name)
            if job is not None:
                expired = job.ended and (job.finished or job.created) < cutoff
            else:
                expired = folder.stat().st_mtime < cutoff
            if expired:
                shutil.rmtree(folder, ignore_errors=True)
                deleted.append(folder.name)
        if deleted:
            log.info("cleanup: deleted %d expired separation folders", len(deleted))
        return deleted

    def _sweep_forever(self) -> None:
        while True:
            try:
                self.sweep()
                self.make_room()
            except Exception:  # the sweep must never stop for good
                log.exception("cleanup sweep failed")
            if self._stopping.wait(self.settings.sweep_seconds):
                return


def _folder_bytes(folder: Path) -> int:
    total = 0
    for entry in folder.rglob("*"):
        try:
            total += entry.stat().st_size if entry.is_file() else 0
        except OSError:  # deleted meanwhile (a sweep in another replica)
            pass
    return total

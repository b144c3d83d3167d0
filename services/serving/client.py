"""Separation client: a whole song -> instrument and rest stems through a served model.

One module for the web page, the CLI and evaluation. The song is resampled to the model's rate
(the model says which through its ``sample_rate`` signature), cut into overlapping segments that
travel as batch rows (one row per channel and segment) over gRPC or REST, summed back with a
weighting window normalised by the window sum, and resampled back to the song's rate. ``rest`` is
computed at the song's rate as ``mix - instrument``, so the two stems add up to the input exactly.

Everything runs as a stream: ``separate_file`` decodes the song in blocks, resamples them on the
way to the model and back, keeps a few requests in flight (the server computes one while the
client prepares the next and writes the last), and writes the stems block by block, so a few
segments are held in memory at a time, whatever the song's length. gRPC speaks TF Serving's
protocol through :mod:`services.serving.protocol`, which needs no TensorFlow: the command line
and the web page start in a fraction of a second and stay small.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from model.windows import triangle as segment_window  # the cross-fade model/separate.py uses too
from services.common.audio import MAX_CHANNELS, AudioError, DecodeLimits, StreamResampler
from services.common.config import load_config

DEFAULT_SEGMENT_SECONDS = 10.0
DEFAULT_OVERLAP = 0.25
# A segment the model sees: at least a few STFT frames, at most what one request of a many-channel
# song can carry; the overlap leaves a hop of at least a twentieth of a segment.
MIN_SEGMENT_SECONDS = 0.1
MAX_SEGMENT_SECONDS = 600.0
MAX_OVERLAP = 0.95
DEFAULT_BATCH_SEGMENTS = 2
# Requests sent before the first answer is awaited: the server computes one while the client
# prepares the next and writes the last.
DEFAULT_REQUESTS_IN_FLIGHT = 2
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# One request carries batch_segments x channels x segment_seconds of audio (40 s by default); a
# CPU-only server running the thesis-size network needs minutes for that.
DEFAULT_TIMEOUT_SECONDS = 600.0
OUTPUT_FORMATS = ("wav", "flac", "mp3")
# Bytes one sample costs on the wire: float32 each way over gRPC (only 'instrument' comes back);
# over REST both outputs come back as JSON text of up to ~24 characters per number.
_WIRE_BYTES_PER_SAMPLE = {"grpc": 4, "rest": 48}

Progress = Callable[[float, float, str], None]


class ServingError(Exception):
    """Serving could not separate: unreachable server, unknown model, refused request."""


class ServingUnavailable(ServingError):
    """Serving did not answer at all (down, restarting): trying again later may work."""


class SeparationCancelled(Exception):
    """``should_stop`` asked the separation to stop."""


class SongTooLong(AudioError):
    """The song, as it was read, ran past ``max_seconds``."""


def default_address(protocol: str = "grpc") -> str:
    """Serving address from $STEMLAB_SERVING_ADDRESS / $STEMLAB_SERVING_REST_ADDRESS, else the configured
    ports ($STEMLAB_SERVING_PORT / $STEMLAB_SERVING_REST_PORT, STEMLAB_CONFIG's file; defaults 8500 / 8501).
    An invalid configuration raises its ConfigError (a ValueError) rather than falling back to the
    default ports, which may be another stack's."""
    return load_config().address("serving_rest" if protocol == "rest" else "serving")


# ---------------------------------------------------------------------------------------------
# Talking to the served model


class ServedModel:
    """One served model reached over gRPC (TF Serving's protocol, without TensorFlow) or REST.

    ``separate(waveform)`` sends float32 [rows, samples] at ``sample_rate_hz`` and returns the
    ``instrument`` output of the same shape. It may be called from several threads at once (the
    separation keeps a few requests in flight so the server never waits for the client).
    """

    def __init__(
        self,
        model: str,
        address: str | None = None,
        protocol: str = "grpc",
        version: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ):
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be 'grpc' or 'rest', not {protocol!r}")
        self.model = model
        self.protocol = protocol
        self.address = address or default_address(protocol)
        self.version = version
        self.max_message_bytes = int(max_message_bytes)
        self.timeout_seconds = timeout_seconds
        self.served_version: int | None = None  # the version that answered, learnt from replies
        self._channel = self._predict_call = None
        if protocol == "grpc":
            import grpc

            from services.serving import protocol as tf_serving

            self._messages = tf_serving.load()
            self._channel = grpc.insecure_channel(self.address, options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
            ])
            self._predict_call = self._messages.predict_method(self._channel)
        self._sample_rate_hz: int | None = None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sample_rate_hz(self) -> int:
        """The model's own rate, asked once through its ``sample_rate`` signature."""
        if self._sample_rate_hz is None:
            outputs = self._predict("sample_rate", "x", np.zeros(1, np.float32), "sample_rate")
            rate = int(np.asarray(outputs).reshape(-1)[0])
            if not 0 < rate <= 768_000:
                raise ServingError(f"model '{self.model}' reports an implausible sample rate {rate}")
            self._sample_rate_hz = rate
        return self._sample_rate_hz

    def separate(self, waveform: np.ndarray) -> np.ndarray:
        """waveform float32 (rows, samples) at sample_rate_hz -> instrument (rows, samples)."""
        instrument = self._predict("serving_default", "waveform", waveform, "instrument")
        if instrument.shape != waveform.shape:
            raise ServingError(
                f"model '{self.model}' returned instrument of shape {instrument.shape} for {waveform.shape}")
        return instrument

    def _predict(self, signature: str, input_name: str, array: np.ndarray, output_name: str) -> np.ndarray:
        if self.protocol == "grpc":
            return self._predict_grpc(signature, input_name, array, output_name)
        return self._predict_rest(signature, input_name, array, output_name)

    def _predict_grpc(self, signature, input_name, array, output_name) -> np.ndarray:
        import grpc

        messages = self._messages
        request = messages.PredictRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = self.version
        _fill_tensor_proto(request.inputs[input_name], array, messages.DT_FLOAT)
        request.output_filter.append(output_name)
        try:
            response = self._predict_call(request, timeout=self.timeout_seconds)
        except grpc.RpcError as error:
            raise self._error(error.code().name, error.details()) from None
        self.served_version = response.model_spec.version.value
        if output_name not in response.outputs:
            raise ServingError(f"model '{self.model}' returned no '{output_name}' output")
        return _ndarray(response.outputs[output_name], messages)

    def _predict_rest(self, signature, input_name, array, output_name) -> np.ndarray:
        path = f"/v1/models/{self.model}" + (f"/versions/{self.version}" if self.version is not None else "")
        body = json.dumps({"signature_name": signature, "inputs": {input_name: array.tolist()}}).encode()
        if len(body) > self.max_message_bytes:
            raise ServingError(f"REST request of {len(body)} bytes exceeds max_message_bytes {self.max_message_bytes}")
        request = urllib.request.Request(f"http://{self.address}{path}:predict", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as reply:
                data = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except ValueError:
                message = error.reason
            code = {404: "NOT_FOUND", 400: "INVALID_ARGUMENT", 503: "UNAVAILABLE",
                    504: "DEADLINE_EXCEEDED"}.get(error.code, f"HTTP {error.code}")
            raise self._error(code, message) from None
        except TimeoutError:
            raise self._error("DEADLINE_EXCEEDED", "timed out") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise self._error("DEADLINE_EXCEEDED", "timed out") from None
            raise self._error("UNAVAILABLE", str(reason)) from None
        outputs = data.get("outputs") if isinstance(data, dict) else None
        if isinstance(outputs, dict):
            outputs = outputs.get(output_name)
        if outputs is None:
            raise ServingError(f"model '{self.model}' returned no '{output_name}' output over REST")
        if self.served_version is None:
            # REST replies do not name the version (gRPC's do): the one asked for, else the newest
            # AVAILABLE one, which is what serving's default policy answers with.
            self.served_version = self.version if self.version is not None else self._newest_rest_version()
        return np.asarray(outputs, dtype=np.float32 if output_name != "sample_rate" else np.int64)

    def _newest_rest_version(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v1/models/{self.model}",
                                        timeout=self.timeout_seconds) as reply:
                statuses = json.loads(reply.read()).get("model_version_status") or []
        except (OSError, ValueError, AttributeError):
            return None  # the separation stands; only its record lacks the version
        versions = [int(s["version"]) for s in statuses if s.get("state") == "AVAILABLE" and str(s.get("version")).isdigit()]
        return max(versions) if versions else None

    def _error(self, code: str, details: str) -> ServingError:
        if code == "UNAVAILABLE":
            return ServingUnavailable(f"serving is not reachable at {self.address} ({self.protocol}): {details}")
        if code == "CANCELLED":
            # This client never cancels a call: the server did, stopping while it answered
            # (a restart of the stack); like UNAVAILABLE, trying again later may work.
            return ServingUnavailable(f"serving at {self.address} stopped while it answered: {details}")
        if code == "NOT_FOUND":
            version = f" version {self.version}" if self.version is not None else ""
            return ServingError(f"model '{self.model}'{version} is not served at {self.address}: {details}")
        if code == "DEADLINE_EXCEEDED":
            return ServingError(
                f"model '{self.model}' at {self.address} did not answer within {self.timeout_seconds:g} s: "
                "raise timeout_seconds or send less audio per request (batch_segments, segment_seconds)")
        return ServingError(f"serving at {self.address} refused the request ({code}): {details}")


def _fill_tensor_proto(proto, array: np.ndarray, dt_float: int) -> None:
    """float32 ndarray -> TensorProto in place (raw little-endian bytes, as tf.make_tensor_proto does)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    proto.dtype = dt_float
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    proto.tensor_content = array.tobytes()


def _ndarray(proto, messages) -> np.ndarray:
    """TensorProto (float or int32, raw bytes or repeated values) -> ndarray."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    dtype = {messages.DT_FLOAT: np.dtype("<f4"), messages.DT_INT32: np.dtype("<i4")}.get(proto.dtype)
    if dtype is None:
        raise ServingError(f"unexpected output dtype {messages.data_type_name(proto.dtype)}")
    if proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, dtype=dtype)
    else:
        values = np.asarray(proto.float_val if dtype.kind == "f" else proto.int_val, dtype=dtype)
        if values.size == 1 and int(np.prod(shape)) > 1:  # TF's splat encoding of a constant
            values = np.full(int(np.prod(shape)), values[0], dtype)
    return values.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Segments and overlap-add (pure array code)


class OverlapAdd:
    """Sums windowed segments of ``channels`` rows and hands out samples once they are final.

    Segments must arrive in order of their start, ``hop`` apart. ``add`` returns the samples
    before the new segment's start (no later segment touches them), divided by the window sum;
    ``finish(total)`` returns the rest up to ``total`` samples.
    """

    def __init__(self, channels: int, length: int, window: np.ndarray):
        self.window = window
        self.start = 0  # song position of self.sum[:, 0]
        self.sum = np.zeros((channels, length), np.float64)
        self.weight = np.zeros(length, np.float64)
        self._product = np.empty((channels, length), np.float32)

    def add(self, start: int, segment: np.ndarray) -> np.ndarray:
        """segment (channels, length) starting at ``start`` -> final samples (channels, start - previous start)."""
        shift = start - self.start
        if not 0 <= shift <= self.sum.shape[1]:
            raise ValueError(f"segments must arrive in order and overlap: start {start} after {self.start}")
        final = (self.sum[:, :shift] / self.weight[:shift]).astype(np.float32)
        # Shift the sums left in place (numpy copies overlapping slices safely): no new arrays per
        # segment, so a long song does not churn the allocator.
        keep = self.sum.shape[1] - shift
        self.sum[:, :keep] = self.sum[:, shift:]
        self.sum[:, keep:] = 0.0
        self.weight[:keep] = self.weight[shift:]
        self.weight[keep:] = 0.0
        self.start = start
        np.multiply(segment, self.window, out=self._product)
        self.sum += self._product
        self.weight += self.window
        return final

    def finish(self, total: int) -> np.ndarray:
        """The remaining samples up to song position ``total``: (channels, total - start)."""
        count = max(0, total - self.start)
        return (self.sum[:, :count] / self.weight[:count]).astype(np.float32)


def _segments(blocks: Iterator[np.ndarray], channels: int, length: int, hop: int) -> Iterator[tuple[int, np.ndarray, bool]]:
    """Cut a stream of blocks into segments ``hop`` apart: (start, segment (channels, length), is_last).

    The tail is zero-padded to ``length``; the last segment is the first that reaches the end.
    """
    buffer = np.zeros((channels, 0), np.float32)
    buffer_start = 0  # stream position of buffer[:, 0]
    start = 0
    for block in blocks:
        buffer = np.concatenate([buffer, block], axis=1)
        while buffer.shape[1] - (start - buffer_start) > length:
            offset = start - buffer_start
            yield start, buffer[:, offset:offset + length], False
            start += hop
            drop = start - buffer_start
            buffer, buffer_start = buffer[:, drop:], start
    offset = start - buffer_start
    # Whatever is left (at most `length` samples) fits in one last, padded segment.
    tail = buffer[:, offset:]
    yield start, np.pad(tail, ((0, 0), (0, length - tail.shape[1]))), True


class StageTimes:
    """Seconds spent in each part of a separation, summed over its calls (the benchmark's breakdown).

    The parts overlap in time: requests run in worker threads while the main thread decodes,
    resamples, sums and writes, so the parts add up to more than the wall time. ``wait`` is the
    main thread idle, waiting for an answer.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds[name] += elapsed

    def timed(self, name: str, function: Callable) -> Callable:
        def run(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)
        return run

    def iterate(self, name: str, iterable: Iterable) -> Iterator:
        iterator = iter(iterable)
        while True:
            with self.stage(name):
                item = next(iterator, None)
            if item is None:
                return
            yield item


class _MixQueue:
    """The song-rate mix between reading and writing: blocks go in as they are read and come out,
    as many samples as the instrument has, when the instrument for them is back from the model."""

    def __init__(self, channels: int):
        self.blocks: deque[np.ndarray] = deque()
        self.channels = channels
        self.held = 0

    def put(self, block: np.ndarray) -> None:
        if block.shape[1]:
            self.blocks.append(block)
            self.held += block.shape[1]

    def take(self, count: int) -> np.ndarray:
        """Up to ``count`` samples (fewer only at the end of the song)."""
        parts, wanted = [], min(count, self.held)
        while wanted > 0:
            block = self.blocks[0]
            if block.shape[1] <= wanted:
                parts.append(self.blocks.popleft())
            else:
                parts.append(block[:, :wanted])
                self.blocks[0] = block[:, wanted:]
            wanted -= parts[-1].shape[1]
            self.held -= parts[-1].shape[1]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.channels, 0), np.float32)


# ---------------------------------------------------------------------------------------------
# The separation


def _request_plan(served: ServedModel, channels: int, segment_seconds: float, overlap: float,
                  batch_segments: int) -> tuple[int, int, int]:
    """(segment length, hop, segments per request) at the model's rate, within the message limit."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if segment_seconds <= 0 or batch_segments < 1:
        raise ValueError("segment_seconds must be positive and batch_segments at least 1")
    model_rate = served.sample_rate_hz
    length = max(1, round(segment_seconds * model_rate))
    hop = max(1, round(length * (1 - overlap)))
    row_bytes = length * _WIRE_BYTES_PER_SAMPLE[served.protocol] + 1024
    fitting_segments = int(0.9 * served.max_message_bytes) // (row_bytes * channels)
    if fitting_segments < 1:
        raise ServingError(
            f"one segment of {segment_seconds:g} s x {channels} channels needs about {row_bytes * channels} bytes, "
            f"more than max_message_bytes {served.max_message_bytes}: lower segment_seconds")
    return length, hop, min(batch_segments, fitting_segments)


def separate_stream(
    blocks: Iterable[np.ndarray],
    rate: int,
    channels: int,
    served: ServedModel,
    sink: Callable[[np.ndarray, np.ndarray], None],
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
    overlap: float = DEFAULT_OVERLAP,
    batch_segments: int = DEFAULT_BATCH_SEGMENTS,
    requests_in_flight: int = DEFAULT_REQUESTS_IN_FLIGHT,
    total_seconds: float | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    times: StageTimes | None = None,
) -> int:
    """Separate a song arriving as (channels, k) float32 blocks at ``rate``; returns its length in samples.

    ``sink(instrument, mix)`` receives consecutive (channels, m) blocks at ``rate`` as soon as
    they are final: the instrument and the mix it was separated from. The song goes to the
    model's rate and back through streaming resamplers and is cut into overlapping segments;
    ``requests_in_flight`` requests are sent before the first answer is awaited, so the server
    always has the next one while the client sums, resamples and writes the last. Memory holds
    those requests and a segment or two of the song, whatever its length. ``times`` collects the
    seconds of each part (decode, resample, request, wait, overlap_add, write).
    """
    rate = int(rate)
    times = times or StageTimes()
    length, hop, segments_per_request = _request_plan(served, channels, segment_seconds, overlap, batch_segments)
    model_rate = served.sample_rate_hz
    forward = StreamResampler(rate, model_rate, channels)
    back = StreamResampler(model_rate, rate, channels)
    mix = _MixQueue(channels)
    overlap_add = OverlapAdd(channels, length, segment_window(length))
    song_samples = model_samples = 0

    def model_rate_blocks() -> Iterator[np.ndarray]:
        nonlocal song_samples, model_samples
        iterator = times.iterate("decode", blocks)
        block = next(iterator, None)
        while block is not None:
            upcoming = next(iterator, None)  # one block ahead: the resampler must know the last
            block = np.asarray(block, dtype=np.float32)
            mix.put(block)
            song_samples += block.shape[1]
            with times.stage("resample"):
                out = forward.push(block, last=upcoming is None)
            model_samples += out.shape[1]
            yield out
            block = upcoming

    def emit(model_block: np.ndarray, last: bool = False) -> None:
        with times.stage("resample"):
            instrument = back.push(model_block, last)
        mixed = mix.take(instrument.shape[1])
        if mixed.shape[1]:
            with times.stage("write"):
                sink(np.ascontiguousarray(instrument[:, :mixed.shape[1]]), mixed)

    def receive(pending: deque) -> None:
        starts, answer = pending.popleft()
        with times.stage("wait"):
            separated = answer.result().reshape(len(starts), channels, length)
        for start, result in zip(starts, separated, strict=True):
            with times.stage("overlap_add"):
                final = overlap_add.add(start, result)
            emit(final)
        if progress is not None:
            total = total_seconds if total_seconds is not None else song_samples / rate
            done = min(total, (starts[-1] + length) / model_rate)
            progress(done, total, f"separated {done:.1f} of {total:.1f} s")

    request = times.timed("request", served.separate)
    pending: deque = deque()
    executor = ThreadPoolExecutor(max_workers=max(1, requests_in_flight), thread_name_prefix="separate")
    try:
        batch: list[tuple[int, np.ndarray]] = []
        for start, segment, is_last in _segments(model_rate_blocks(), channels, length, hop):
            batch.append((start, segment))
            if len(batch) < segments_per_request and not is_last:
                continue
            if should_stop is not None and should_stop():
                raise SeparationCancelled("separation cancelled")
            rows = np.concatenate([segment for _, segment in batch], axis=0)  # segment-major rows
            pending.append(([start for start, _ in batch], executor.submit(request, rows)))
            batch = []
            while len(pending) >= max(1, requests_in_flight):
                receive(pending)
        while pending:
            receive(pending)
        with times.stage("overlap_add"):
            final = overlap_add.finish(model_samples)
        emit(final, last=True)
        if mix.held:  # the resampler may come back a sample short: silence for the rest
            leftover = mix.take(mix.held)
            sink(np.zeros_like(leftover), leftover)
    finally:
        for _, answer in pending:
            answer.cancel()
        executor.shutdown(wait=False, cancel_futures=True)
    return song_samples


def check_segments(segment_seconds: float, overlap: float,
                   names: tuple[str, str] = ("segment_seconds", "overlap")) -> None:
    """Refuse segment settings that cannot work (or would send a song as millions of requests);
    `names`: what the caller calls the two (the CLI's flags)."""
    if not (np.isfinite(segment_seconds) and MIN_SEGMENT_SECONDS <= segment_seconds <= MAX_SEGMENT_SECONDS):
        raise ValueError(f"{names[0]} must be between {MIN_SEGMENT_SECONDS:g} and {MAX_SEGMENT_SECONDS:g}, "
                         f"got {segment_seconds}")
    if not (np.isfinite(overlap) and 0 <= overlap <= MAX_OVERLAP):
        raise ValueError(f"{names[1]} must be between 0 and {MAX_OVERLAP:g}, got {overlap}")


def _float_samples(audio) -> np.ndarray:
    """float32 samples: integer PCM (a WAV read as int16) scaled to [-1, 1], other kinds refused."""
    array = np.asarray(audio)
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype.kind == "i":
        return (array / float(-np.iinfo(array.dtype).min)).astype(np.float32)
    if array.dtype.kind == "u":  # unsigned PCM (8-bit WAV) is centred on the middle of its range
        middle = (np.iinfo(array.dtype).max + 1) / 2
        return ((array - middle) / middle).astype(np.float32)
    raise ValueError(f"audio must be float or integer PCM samples, got {array.dtype}")


def separate_array(
    audio: np.ndarray,
    rate: int,
    model: str,
    address: str | None = None,
    protocol: str = "grpc",
    version: int | None = None,
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
    overlap: float = DEFAULT_OVERLAP,
    batch_segments: int = DEFAULT_BATCH_SEGMENTS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    served_model: ServedModel | None = None,
    requests_in_flight: int = DEFAULT_REQUESTS_IN_FLIGHT,
) -> tuple[np.ndarray, np.ndarray]:
    """Separate a mix into (instrument, rest), both float32 with the shape of ``audio``.

    audio: (channels, samples) at ``rate`` Hz (a 1-D array is one channel).
    segment_seconds: length of one segment the model sees, in seconds at the model's rate.
    overlap: share of a segment shared with the next one (0 <= overlap < 1).
    batch_segments: segments per request (each brings one row per channel), further limited so
        one request and its reply fit in ``max_message_bytes``.
    progress(done_seconds, total_seconds, message) after each request; ``should_stop()`` before
    each, raising SeparationCancelled when it returns True. ``served_model`` reuses a connection.
    For a file, ``separate_file`` streams instead of holding the whole song.
    """
    audio = _float_samples(audio)
    one_dimensional = audio.ndim == 1
    if one_dimensional:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2 or audio.shape[0] == 0:
        raise ValueError(f"audio must have shape (channels, samples), got {audio.shape}")
    if audio.shape[0] > MAX_CHANNELS:
        # soundfile.read gives (samples, channels): separated as thousands of 2-sample "channels",
        # it returned nonsense without a word.
        raise ValueError(f"audio has {audio.shape[0]} channels of {audio.shape[1]} samples; pass (channels, samples) "
                         f"(for soundfile's (samples, channels) arrays, audio.T)")
    check_segments(segment_seconds, overlap)
    if batch_segments < 1:
        raise ValueError(f"batch_segments must be at least 1, got {batch_segments}")
    if not (np.isfinite(rate) and rate > 0 and float(rate).is_integer()):
        raise ValueError(f"rate must be a whole number of Hz above 0, got {rate}")
    rate = int(rate)
    channels, samples = audio.shape
    instrument = np.empty_like(audio)
    written = 0

    def collect(block: np.ndarray, _mix: np.ndarray) -> None:
        nonlocal written
        instrument[:, written:written + block.shape[1]] = block
        written += block.shape[1]

    owned = served_model is None
    served = served_model or ServedModel(model, address, protocol, version, max_message_bytes, timeout_seconds)
    try:
        block = max(1, round(segment_seconds * rate * (1 - overlap)))
        song_blocks = (audio[:, start:start + block] for start in range(0, max(samples, 1), block))
        separate_stream(song_blocks, rate, channels, served, collect, segment_seconds, overlap, batch_segments,
                        requests_in_flight, samples / rate, progress, should_stop)
    finally:
        if owned:
            served.close()
    rest = audio - instrument
    if one_dimensional:
        return instrument[0], rest[0]
    return instrument, rest


def separate_file(
    in_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str,
    address: str | None = None,
    protocol: str = "grpc",
    version: int | None = None,
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
    overlap: float = DEFAULT_OVERLAP,
    batch_segments: int = DEFAULT_BATCH_SEGMENTS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    formats: Sequence[str] = ("wav",),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    requests_in_flight: int = DEFAULT_REQUESTS_IN_FLIGHT,
    max_seconds: float | None = None,
    limits: DecodeLimits | None = None,
    times: StageTimes | None = None,
) -> dict:
    """Separate an audio file into ``out_dir``/instrument.<format> and rest.<format>.

    Any format read_audio decodes is accepted; the stems keep the song's rate and channel count.
    The song is decoded, separated and written as a stream (a few segments in memory whatever
    its length); the files appear, all at once, only when the separation succeeded. A song
    longer than ``max_seconds`` (when given) is refused with SongTooLong as it is read; ``limits``
    bound the decoding as read_audio's do (the web's: at most 48 kHz and stereo, which the stems
    then have too).
    Returns {"paths": {"instrument": {format: path}, "rest": {...}}, "rate": Hz, "channels": n,
    "seconds": song length, "model": name, "version": served version}. Raises AudioError for
    an unreadable song, ServingError for serving trouble, SeparationCancelled when stopped.
    """
    from services.common.audio import AudioReader
    from services.serving.audio_stream import StemWriter

    check_segments(segment_seconds, overlap)
    formats = [str(fmt).lower().lstrip(".") for fmt in formats]
    unknown = [fmt for fmt in formats if fmt not in OUTPUT_FORMATS]
    if not formats or unknown:
        raise ValueError(f"output formats must be among {', '.join(OUTPUT_FORMATS)}; got {', '.join(unknown) or 'none'}")
    times = times or StageTimes()
    with times.stage("open"):
        reader = AudioReader(in_path, limits=limits)
    with reader, ServedModel(model, address, protocol, version, max_message_bytes, timeout_seconds) as served:
        limit = None if max_seconds is None else int(max_seconds * reader.rate)

        def song_blocks() -> Iterator[np.ndarray]:
            read = 0
            for block in reader.blocks():
                read += block.shape[1]
                if limit is not None and read > limit:
                    raise SongTooLong(reader.path, f"the song is longer than {max_seconds:g} s")
                yield block

        with times.stage("open"):
            served.sample_rate_hz  # noqa: B018  (an unknown model or no server fails before any file is made)
        with StemWriter(out_dir, formats, reader.rate, reader.channels) as writer:
            samples = separate_stream(
                song_blocks(), reader.rate, reader.channels, served, writer.write, segment_seconds, overlap,
                batch_segments, requests_in_flight, reader.seconds, progress, should_stop, times)
            with times.stage("write"):
                paths = writer.commit()
    return {
        "paths": paths,
        "rate": reader.rate,
        "channels": reader.channels,
        "seconds": samples / reader.rate,
        "model": model,
        "version": served.served_version,
    }

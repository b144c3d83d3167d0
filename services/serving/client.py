"""Separation client: a whole song -> instrument and rest stems through a served model.

One module for the web page, the CLI and evaluation. The song is resampled to the model's rate
(the model says which through its ``sample_rate`` signature), cut into overlapping segments that
travel as batch rows (one row per channel and segment) over gRPC or REST, summed back with a
weighting window normalised by the window sum, and resampled back to the song's rate. ``rest`` is
computed at the song's rate as ``mix - instrument``, so the two stems add up to the input exactly.

Resampling runs as a stream in both directions, so besides the input and the two output arrays
only a few segments are held in memory at a time, whatever the song's length.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from model.windows import triangle as segment_window  # the cross-fade model/separate.py uses too
from services.common.audio import StreamResampler, read_audio, write_audio
from services.common.config import load_config

DEFAULT_SEGMENT_SECONDS = 10.0
DEFAULT_OVERLAP = 0.25
DEFAULT_BATCH_SEGMENTS = 2
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# One request carries batch_segments x channels x segment_seconds of audio (40 s by default); a
# CPU-only server running the thesis-size network needs minutes for that.
DEFAULT_TIMEOUT_SECONDS = 600.0
OUTPUT_FORMATS = ("wav", "flac", "mp3")
# The float WAV keeps instrument + rest == mix bit for bit; FLAC stores 24-bit integers.
_SUBTYPES = {"wav": "FLOAT", "flac": "PCM_24", "mp3": None}
# Bytes one sample costs on the wire: float32 each way over gRPC (only 'instrument' comes back);
# over REST both outputs come back as JSON text of up to ~24 characters per number.
_WIRE_BYTES_PER_SAMPLE = {"grpc": 4, "rest": 48}

Progress = Callable[[float, float, str], None]


class ServingError(Exception):
    """Serving could not separate: unreachable server, unknown model, refused request."""


class SeparationCancelled(Exception):
    """``should_stop`` asked the separation to stop."""


def default_address(protocol: str = "grpc") -> str:
    """Serving address from $STEMLAB_SERVING_ADDRESS / $STEMLAB_SERVING_REST_ADDRESS, else the configured
    ports ($STEMLAB_SERVING_PORT / $STEMLAB_SERVING_REST_PORT, STEMLAB_CONFIG's file; defaults 8500 / 8501).
    An invalid configuration raises its ConfigError (a ValueError) rather than falling back to the
    default ports, which may be another stack's."""
    return load_config().address("serving_rest" if protocol == "rest" else "serving")


# ---------------------------------------------------------------------------------------------
# Talking to the served model


class ServedModel:
    """One served model reached over gRPC (tensorflow-serving-api stubs) or REST.

    ``separate(waveform)`` sends float32 [rows, samples] at ``sample_rate_hz`` and returns the
    ``instrument`` output of the same shape.
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
        self._channel = self._stub = None
        if protocol == "grpc":
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            self._channel = grpc.insecure_channel(self.address, options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
            ])
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
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
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = self.version
        request.inputs[input_name].CopyFrom(_tensor_proto(array))
        request.output_filter.append(output_name)
        try:
            response = self._stub.Predict(request, timeout=self.timeout_seconds)
        except grpc.RpcError as error:
            raise self._error(error.code().name, error.details()) from None
        self.served_version = response.model_spec.version.value
        if output_name not in response.outputs:
            raise ServingError(f"model '{self.model}' returned no '{output_name}' output")
        return _ndarray(response.outputs[output_name])

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
        return np.asarray(outputs, dtype=np.float32 if output_name != "sample_rate" else np.int64)

    def _error(self, code: str, details: str) -> ServingError:
        if code == "UNAVAILABLE":
            return ServingError(f"serving is not reachable at {self.address} ({self.protocol}): {details}")
        if code == "NOT_FOUND":
            version = f" version {self.version}" if self.version is not None else ""
            return ServingError(f"model '{self.model}'{version} is not served at {self.address}: {details}")
        if code == "DEADLINE_EXCEEDED":
            return ServingError(
                f"model '{self.model}' at {self.address} did not answer within {self.timeout_seconds:g} s: "
                "raise timeout_seconds or send less audio per request (batch_segments, segment_seconds)")
        return ServingError(f"serving at {self.address} refused the request ({code}): {details}")


def _tensor_proto(array: np.ndarray):
    """float32 ndarray -> TensorProto (raw little-endian bytes, as tf.make_tensor_proto does)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    array = np.ascontiguousarray(array, dtype="<f4")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in array.shape]),
        tensor_content=array.tobytes(),
    )


def _ndarray(proto) -> np.ndarray:
    """TensorProto (float or int32, raw bytes or repeated values) -> ndarray."""
    from tensorflow.core.framework import types_pb2

    shape = [dim.size for dim in proto.tensor_shape.dim]
    dtype = {types_pb2.DT_FLOAT: np.dtype("<f4"), types_pb2.DT_INT32: np.dtype("<i4")}.get(proto.dtype)
    if dtype is None:
        raise ServingError(f"unexpected output dtype {types_pb2.DataType.Name(proto.dtype)}")
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

    def add(self, start: int, segment: np.ndarray) -> np.ndarray:
        """segment (channels, length) starting at ``start`` -> final samples (channels, start - previous start)."""
        shift = start - self.start
        if not 0 <= shift <= self.sum.shape[1]:
            raise ValueError(f"segments must arrive in order and overlap: start {start} after {self.start}")
        final = self.sum[:, :shift] / self.weight[:shift]
        self.sum = np.roll(self.sum, -shift, axis=1)
        self.sum[:, self.sum.shape[1] - shift:] = 0.0
        self.weight = np.roll(self.weight, -shift)
        self.weight[self.weight.shape[0] - shift:] = 0.0
        self.start = start
        self.sum += segment * self.window
        self.weight += self.window
        return final.astype(np.float32)

    def finish(self, total: int) -> np.ndarray:
        """The remaining samples up to song position ``total``: (channels, total - start)."""
        count = max(0, total - self.start)
        return (self.sum[:, :count] / self.weight[:count]).astype(np.float32)


def _resampled_stream(audio: np.ndarray, from_hz: int, to_hz: int, block: int) -> Iterator[np.ndarray]:
    """(channels, samples) -> consecutive blocks (channels, k) of the audio at ``to_hz``."""
    resampler = StreamResampler(from_hz, to_hz, audio.shape[0])
    samples = audio.shape[1]
    for start in range(0, max(samples, 1), block):
        yield resampler.push(audio[:, start:start + block], last=start + block >= samples)


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


# ---------------------------------------------------------------------------------------------
# The separation


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
) -> tuple[np.ndarray, np.ndarray]:
    """Separate a mix into (instrument, rest), both float32 with the shape of ``audio``.

    audio: (channels, samples) at ``rate`` Hz (a 1-D array is one channel).
    segment_seconds: length of one segment the model sees, in seconds at the model's rate.
    overlap: share of a segment shared with the next one (0 <= overlap < 1).
    batch_segments: segments per request (each brings one row per channel), further limited so
        one request and its reply fit in ``max_message_bytes``.
    progress(done_seconds, total_seconds, message) after each request; ``should_stop()`` before
    each, raising SeparationCancelled when it returns True. ``served_model`` reuses a connection.
    """
    audio = np.asarray(audio, dtype=np.float32)
    one_dimensional = audio.ndim == 1
    if one_dimensional:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2 or audio.shape[0] == 0:
        raise ValueError(f"audio must have shape (channels, samples), got {audio.shape}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if segment_seconds <= 0 or batch_segments < 1:
        raise ValueError("segment_seconds must be positive and batch_segments at least 1")
    rate = int(rate)
    channels, samples = audio.shape
    total_seconds = samples / rate

    owned = served_model is None
    served = served_model or ServedModel(model, address, protocol, version, max_message_bytes, timeout_seconds)
    try:
        model_rate = served.sample_rate_hz
        length = max(1, round(segment_seconds * model_rate))
        hop = max(1, round(length * (1 - overlap)))
        row_bytes = length * _WIRE_BYTES_PER_SAMPLE[served.protocol] + 1024
        fitting_segments = int(0.9 * served.max_message_bytes) // (row_bytes * channels)
        if fitting_segments < 1:
            raise ServingError(
                f"one segment of {segment_seconds:g} s x {channels} channels needs about {row_bytes * channels} bytes, "
                f"more than max_message_bytes {served.max_message_bytes}: lower segment_seconds")
        segments_per_request = min(batch_segments, fitting_segments)

        instrument = np.empty_like(audio)
        written = 0

        back = StreamResampler(model_rate, rate, channels)

        def emit(block: np.ndarray, last: bool = False) -> None:
            # Model-rate instrument -> song rate, straight into the output array.
            nonlocal written
            out = back.push(block, last)
            count = min(out.shape[1], samples - written)
            instrument[:, written:written + count] = out[:, :count]
            written += count

        window = segment_window(length)
        overlap_add = OverlapAdd(channels, length, window)
        model_samples = 0  # model-rate samples seen so far (the song's length at the model rate)

        def counted(blocks):
            nonlocal model_samples
            for block in blocks:
                model_samples += block.shape[1]
                yield block

        blocks = counted(_resampled_stream(audio, rate, model_rate, block=hop * segments_per_request))
        batch: list[tuple[int, np.ndarray]] = []
        for start, segment, is_last in _segments(blocks, channels, length, hop):
            batch.append((start, segment))
            if len(batch) < segments_per_request and not is_last:
                continue
            if should_stop is not None and should_stop():
                raise SeparationCancelled("separation cancelled")
            rows = np.concatenate([segment for _, segment in batch], axis=0)  # segment-major rows
            separated = served.separate(rows).reshape(len(batch), channels, length)
            for (segment_start, _), result in zip(batch, separated, strict=True):
                emit(overlap_add.add(segment_start, result))
            batch = []
            if progress is not None:
                done = min(total_seconds, (start + length) / model_rate)
                progress(done, total_seconds, f"separated {done:.1f} of {total_seconds:.1f} s")
        emit(overlap_add.finish(model_samples), last=True)
        if written < samples:  # the resampler may come back a sample short
            instrument[:, written:] = 0.0
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
) -> dict:
    """Separate an audio file into ``out_dir``/instrument.<format> and rest.<format>.

    Any format read_audio decodes is accepted; the stems keep the song's rate and channel count.
    Returns {"paths": {"instrument": {format: path}, "rest": {...}}, "rate": Hz, "channels": n,
    "seconds": song length, "model": name, "version": served version}. Raises AudioError for
    an unreadable song, ServingError for serving trouble, SeparationCancelled when stopped.
    """
    formats = [str(fmt).lower().lstrip(".") for fmt in formats]
    unknown = [fmt for fmt in formats if fmt not in OUTPUT_FORMATS]
    if not formats or unknown:
        raise ValueError(f"output formats must be among {', '.join(OUTPUT_FORMATS)}; got {', '.join(unknown) or 'none'}")
    audio, rate = read_audio(in_path)
    with ServedModel(model, address, protocol, version, max_message_bytes, timeout_seconds) as served:
        instrument, rest = separate_array(
            audio, rate, model, segment_seconds=segment_seconds, overlap=overlap, batch_segments=batch_segments,
            progress=progress, should_stop=should_stop, served_model=served,
        )
    del audio
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, str]] = {"instrument": {}, "rest": {}}
    for stem, stem_audio in (("instrument", instrument), ("rest", rest)):
        for fmt in formats:
            path = write_audio(out_dir / f"{stem}.{fmt}", stem_audio, rate, _SUBTYPES[fmt])
            paths[stem][fmt] = str(path)
    return {
        "paths": paths,
        "rate": rate,
        "channels": int(instrument.shape[0]),
        "seconds": instrument.shape[1] / rate,
        "model": model,
        "version": served.served_version,
    }

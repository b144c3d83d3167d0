"""Served models: finds version folders on disk, loads and unloads them, answers requests.

This is the domain of the compatible model server, shared by its gRPC and REST faces; it raises
:class:`~services.serving.errors.ServableError` subclasses and never imports grpc. Version folders
are integer names under a model's base path; anything else (``.tmp-3``, ``tmp-3``, ``3.partial``)
and any version folder without ``saved_model.pb`` is a publication in progress and is ignored.
"""

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from services.serving.config import ModelSpec
from services.serving.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, ServableError

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

# tf.errors.OpError.error_code uses the canonical code numbers; index -> name.
_CODE_NAMES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
]


@dataclass
class Servable:
    """One loaded model version.

    ``signatures`` maps signature name -> callable (keyword tensors in, dict of tensors out);
    ``signature_defs`` maps signature name -> SignatureDef proto as stored in saved_model.pb.
    ``handle`` keeps the loaded object alive: the signature functions use its variables.
    """

    name: str
    version: int
    path: Path
    signatures: Mapping[str, Callable]
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    handle: object = None


@dataclass
class VersionStatus:
    """What GetModelStatus reports for one version: a ModelVersionStatus.State name and an error."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


def version_folder_stamp(path: Path) -> tuple:
    """A fingerprint of a version folder's files; it changes whenever a file is added or rewritten."""
    entries = []
    for folder, _dirs, files in os.walk(path):
        for file_name in files:
            try:
                info = os.stat(os.path.join(folder, file_name))
            except OSError:
                continue
            entries.append((os.path.relpath(os.path.join(folder, file_name), path), info.st_size, info.st_mtime_ns))
    return tuple(sorted(entries))


def scan_versions(base_path: Path) -> dict[int, Path]:
    """Version folders ready to load: ``{version: path}`` for all-digit folder names holding a SavedModel."""
    versions: dict[int, Path] = {}
    try:
        entries = sorted(os.scandir(base_path), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return versions
    for entry in entries:
        # str.isdigit() accepts other scripts' digits; TF Serving wants ASCII numbers.
        if not (entry.name.isascii() and entry.name.isdigit()) or not entry.is_dir():
            continue
        path = Path(entry.path)
        if any((path / file_name).is_file() for file_name in SAVED_MODEL_FILES):
            versions[int(entry.name)] = path
    return versions


def aspired_versions(spec: ModelSpec, present: Iterable[int]) -> set[int]:
    """The versions the policy wants served, out of those present on disk."""
    present = sorted(present)
    if spec.version_policy == "all":
        return set(present)
    if spec.version_policy == "specific":
        return set(present) & set(spec.specific_versions)
    return set(present[-spec.latest_count:]) if present else set()


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """Signature defs of the serving meta graph stored in ``path``/saved_model.pb."""
    saved_model = saved_model_pb2.SavedModel()
    pb_path = path / "saved_model.pb"
    if pb_path.is_file():
        saved_model.ParseFromString(pb_path.read_bytes())
    else:
        from google.protobuf import text_format

        text_format.Parse((path / "saved_model.pbtxt").read_text(encoding="utf-8"), saved_model)
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise FailedPrecondition(f"SavedModel at {path} has no meta graph tagged 'serve'")


def load_servable(name: str, version: int, path: Path) -> Servable:
    """Load a SavedModel version folder with tf.saved_model.load."""
    signature_defs = read_signature_defs(path)
    handle = tf.saved_model.load(str(path), tags=["serve"])
    signatures = dict(handle.signatures)
    return Servable(name, version, path, signatures, signature_defs, handle)


def _describe_request(name: str, version: int | None) -> str:
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


def numpy_dtype(tensor_info: meta_graph_pb2.TensorInfo) -> np.dtype:
    """The numpy dtype of a signature input or output."""
    dtype = tf.dtypes.as_dtype(tensor_info.dtype)
    return np.dtype(object) if dtype == tf.string else np.dtype(dtype.as_numpy_dtype)


def _check_shape(alias: str, shape: tuple[int, ...], expected) -> None:
    """Refuse an input whose rank or fixed dimensions differ from the signature's TensorShapeProto."""
    if expected.unknown_rank:
        return
    dims = [dim.size for dim in expected.dim]
    if len(shape) != len(dims) or any(want >= 0 and want != got for want, got in zip(dims, shape, strict=True)):
        wanted = "[" + ", ".join("?" if size < 0 else str(size) for size in dims) + "]"
        raise InvalidArgument(f"input '{alias}' has shape {list(shape)}, the signature expects {wanted}")


class ModelRegistry:
    """Configured models and their loaded versions; thread-safe for concurrent requests.

    ``poll()`` brings the loaded versions in line with the folders on disk (the server calls it
    every ``file_system_poll_wait_seconds``); requests use ``predict``, ``metadata`` and ``status``.
    A new version is loaded before the old one is unloaded, and if it fails to load the old one
    keeps serving while the status reports the failure.
    """

    def __init__(self, specs: Iterable[ModelSpec], loader: Callable[[str, int, Path], Servable] = load_servable):
        self._loader = loader
        self._lock = threading.Lock()  # guards the three dicts below
        self._poll_lock = threading.Lock()  # one poll at a time; loads happen outside _lock
        self._specs: dict[str, ModelSpec] = {spec.name: spec for spec in specs}
        self._servables: dict[str, dict[int, Servable]] = {name: {} for name in self._specs}
        self._statuses: dict[str, dict[int, VersionStatus]] = {name: {} for name in self._specs}
        self._failed: dict[tuple[str, int], tuple] = {}  # (model, version) -> folder stamp that failed

    # ----- configuration and polling -------------------------------------------------------------

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._specs)

    def reload_config(self, specs: Iterable[ModelSpec]) -> None:
        """Replace the configured models (HandleReloadConfigRequest); returns after the new poll."""
        specs = {spec.name: spec for spec in specs}
        with self._poll_lock:
            with self._lock:
                for name in list(self._specs):
                    if name not in specs:
                        del self._specs[name]
                        del self._servables[name]
                        del self._statuses[name]
                        log.info("model %s removed from the config; unloaded", name)
                for name, spec in specs.items():
                    self._specs[name] = spec
                    self._servables.setdefault(name, {})
                    self._statuses.setdefault(name, {})
            self._poll_locked()

    def poll(self) -> None:
        """Load aspired versions that appeared on disk and unload the ones no longer aspired."""
        with self._poll_lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        with self._lock:
            specs = list(self._specs.values())
        for spec in specs:
            try:
                self._poll_model(spec)
            except Exception:  # one model's trouble must not stop the others from being polled
                log.exception("polling model %s failed", spec.name)

    def _set_status(self, name: str, status: VersionStatus) -> None:
        with self._lock:
            if name in self._statuses:
                self._statuses[name][status.version] = status

    def _poll_model(self, spec: ModelSpec) -> None:
        name = spec.name
        present = scan_versions(spec.base_path)
        aspired = aspired_versions(spec, present)
        with self._lock:
            loaded = set(self._servables.get(name, {}))
        for version in sorted(aspired - loaded, reverse=True):
            path = present[version]
            stamp = version_folder_stamp(path)
            if self._failed.get((name, version)) == stamp:
                continue  # same files that already failed; wait for them to change
            self._set_status(name, VersionStatus(version, "LOADING"))
            log.info("loading model %s version %d from %s", name, version, path)
            try:
                servable = self._loader(name, version, path)
            except Exception as error:
                code = error.code if isinstance(error, ServableError) else "UNKNOWN"
                message = f"failed to load model {name} version {version} from {path}: {error}"
                log.error("%s", message)
                self._failed[(name, version)] = stamp
                self._set_status(name, VersionStatus(version, "END", code, message))
                continue
            self._failed.pop((name, version), None)
            with self._lock:
                if name not in self._servables:
                    return  # the model was removed from the config while it loaded
                self._servables[name][version] = servable
                self._statuses[name][version] = VersionStatus(version, "AVAILABLE")
            log.info("model %s version %d is AVAILABLE", name, version)
        with self._lock:
            servables = self._servables.get(name, {})
            statuses = self._statuses.get(name, {})
            aspired_available = any(version in servables for version in aspired)
            for version in list(servables):
                # Keep an old version while no aspired one is up, unless its folder is gone.
                if version not in aspired and (aspired_available or version not in present):
                    del servables[version]
                    statuses[version] = VersionStatus(version, "END")
                    log.info("model %s version %d unloaded", name, version)
            for version in list(statuses):
                if version not in present and version not in servables:
                    del statuses[version]

    # ----- requests ------------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names: the latest available version unless one is given."""
        with self._lock:
            spec = self._specs.get(name)
            servables = self._servables.get(name, {})
            if label:
                if spec is None:
                    raise NotFound(f"Servable not found for request: Latest({name})")
                if label not in spec.version_labels:
                    raise InvalidArgument(f"Unrecognized servable version label: {label}")
                version = spec.version_labels[label]
            if version is None:
                if servables:
                    return servables[max(servables)]
            elif version in servables:
                return servables[version]
        raise NotFound(f"Servable not found for request: {_describe_request(name, version)}")

    def signature(self, servable: Servable, signature_name: str) -> tuple[str, meta_graph_pb2.SignatureDef]:
        """The named signature (``serving_default`` when empty) of a servable."""
        signature_name = signature_name or DEFAULT_SIGNATURE
        if signature_name not in servable.signatures or signature_name not in servable.signature_defs:
            raise FailedPrecondition(f'Serving signature name: "{signature_name}" not found in signature def')
        return signature_name, servable.signature_defs[signature_name]

    def predict(
        self,
        servable: Servable,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Iterable[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run one signature of a servable on named input arrays; returns its named outputs."""
        signature_name, signature_def = self.signature(servable, signature_name)
        expected = sorted(signature_def.inputs)
        for alias in inputs:
            if alias not in signature_def.inputs:
                raise InvalidArgument(
                    f"input tensor alias not found in signature: {alias}. "
                    f"Inputs expected to be in the set {{{','.join(expected)}}}."
                )
        missing = [alias for alias in expected if alias not in inputs]
        if missing:
            raise InvalidArgument(
                f"Request inputs do not match required inputs for model `{servable.name}`. "
                f"Missing but required: {{{','.join(missing)}}}."
            )
        output_filter = list(output_filter)
        for alias in output_filter:
            if alias not in signature_def.outputs:
                raise InvalidArgument(
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(sorted(signature_def.outputs))}}}."
                )
        tensors = {}
        for index, alias in enumerate(expected):
            want = numpy_dtype(signature_def.inputs[alias])
            array = np.asarray(inputs[alias])
            if array.dtype != want and not (want == np.dtype(object) and array.dtype.kind in "OSU"):
                raise InvalidArgument(f"Expects arg[{index}] ({alias}) to be {want.name} but {array.dtype.name} is provided")
            _check_shape(alias, array.shape, signature_def.inputs[alias].tensor_shape)
            # A NaN or infinity spreads through every mask it touches: refuse it, as a person can act on that.
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise InvalidArgument(f"input '{alias}' holds NaN or infinite values; send finite samples")
            tensors[alias] = tf.convert_to_tensor(array)
        try:
            outputs = servable.signatures[signature_name](**tensors)
        except (TypeError, ValueError) as error:
            raise InvalidArgument(f"{signature_name} rejected the inputs: {error}") from error
        except tf.errors.OpError as error:
            code = _CODE_NAMES[error.error_code] if 0 <= error.error_code < len(_CODE_NAMES) else "UNKNOWN"
            exception = {"INVALID_ARGUMENT": InvalidArgument, "NOT_FOUND": NotFound}.get(code, Internal)
            raise exception(error.message) from error
        wanted = output_filter or list(outputs)
        return {alias: outputs[alias].numpy() for alias in wanted}

    def metadata(self, servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
        """The ``signature_def`` metadata of a servable, as GetModelMetadata returns it."""
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for signature_name, signature_def in servable.signature_defs.items():
            signature_map.signature_def[signature_name].CopyFrom(signature_def)
        return signature_map

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Version states of a model, newest first (GetModelStatus)."""
        with self._lock:
            statuses = dict(self._statuses.get(name, {}))
        if not statuses:
            raise NotFound(f"Could not find any versions of model {name}")
        if version is not None:
            if version not in statuses:
                raise NotFound(f"Could not find version {version} of model {name}")
            return [statuses[version]]
        return [statuses[v] for v in sorted(statuses, reverse=True)]

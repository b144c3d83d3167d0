"""gRPC face of the compatible server: tensorflow.serving PredictionService and ModelService.

Each method validates the request, calls :class:`ModelRegistry`, and maps its errors to status
codes; the messages and service names are the official tensorflow-serving-api ones.
"""

import logging
import math
from pathlib import Path

import grpc
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from services.serving.config import ConfigError, outside_roots, specs_from_proto
from services.serving.errors import InvalidArgument, ServableError
from services.serving.registry import ModelRegistry, Servable, numpy_dtype

# The largest input tensor a Predict may describe (elements), checked before anything is allocated.
DEFAULT_MAX_INPUT_ELEMENTS = 1 << 26  # 64 Mi float32 values = 256 MiB; a 10 s stereo segment is ~1 M
_VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
                 "bool_val", "dcomplex_val", "uint32_val", "uint64_val")

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, error: ServableError):
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)


def _resolve(registry: ModelRegistry, model_spec) -> Servable:
    if not model_spec.name:
        raise InvalidArgument("Missing ModelSpec")
    version = model_spec.version.value if model_spec.HasField("version") else None
    label = model_spec.version_label if model_spec.WhichOneof("version_choice") == "version_label" else None
    return registry.resolve(model_spec.name, version, label)


def check_tensor_proto(alias: str, proto, signature_def, max_elements: int) -> None:
    """Refuse an input tensor before it is decoded: unknown alias, other dtype, a shape with more than
    `max_elements` values, or fewer values than its shape (TensorFlow would repeat the last one to fill
    the shape, so 45 bytes could ask for gigabytes)."""
    if alias not in signature_def.inputs:
        return  # the registry names the missing or unknown aliases
    want = signature_def.inputs[alias].dtype
    if proto.dtype != want:
        raise InvalidArgument(f"input '{alias}' is {tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else 'untyped'}, "
                              f"the signature expects {tf.dtypes.as_dtype(want).name}")
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input '{alias}' has no shape")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"input '{alias}' has a negative dimension {dims}")
    count = math.prod(dims)
    if count > max_elements:
        raise InvalidArgument(f"input '{alias}' has shape {dims}: {count} values, more than the limit of {max_elements}")
    dtype = numpy_dtype(signature_def.inputs[alias])
    if proto.tensor_content:
        given = len(proto.tensor_content) // max(dtype.itemsize, 1)
    else:
        given = sum(len(getattr(proto, field)) for field in _VALUE_FIELDS)
    if given != count:
        raise InvalidArgument(f"input '{alias}' has shape {dims} ({count} values) but holds {given}")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify/Regress/MultiInference are not offered (no Examples)."""

    def __init__(self, registry: ModelRegistry, max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS):
        self.registry = registry
        self.max_input_elements = max_input_elements

    def Predict(self, request: predict_pb2.PredictRequest, context):
        try:
            servable = _resolve(self.registry, request.model_spec)
            signature_name, signature_def = self.registry.signature(servable, request.model_spec.signature_name)
            for alias, proto in request.inputs.items():
                check_tensor_proto(alias, proto, signature_def, self.max_input_elements)
            try:
                inputs = {alias: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}
            except (TypeError, ValueError) as error:
                raise InvalidArgument(f"cannot decode input tensor: {error}") from error
            outputs = self.registry.predict(servable, signature_name, inputs, request.output_filter)
        except ServableError as error:
            _abort(context, error)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        for alias, array in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(array))
        return response

    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        try:
            if not request.metadata_field:
                raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise InvalidArgument(f"Metadata field {field} is not supported")
            servable = _resolve(self.registry, request.model_spec)
            signature_map = self.registry.metadata(servable)
        except ServableError as error:
            _abort(context, error)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        packed = any_pb2.Any()
        packed.Pack(signature_map)
        response.metadata["signature_def"].CopyFrom(packed)
        return response

    def _unimplemented(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "only Predict and GetModelMetadata are served")

    Classify = Regress = MultiInference = _unimplemented


def status_response(registry: ModelRegistry, name: str, version: int | None):
    """GetModelStatusResponse for a model (shared with the REST face, which prints it as JSON)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in registry.status(name, version):
        entry = response.model_version_status.add()
        entry.version = status.version
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
        entry.status.error_code = _error_code_value(status.error_code)
        entry.status.error_message = status.error_message
    return response


def _error_code_value(name: str) -> int:
    return status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type.values_by_name[name].number


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, registry: ModelRegistry, base_path_prefix: str | None = None,
                 allowed_roots: list[Path] | None = None):
        self.registry = registry
        self.base_path_prefix = base_path_prefix
        # Where a reloaded config may point: the prefix, else the folders of the startup config's models.
        self.allowed_roots = [Path(r).resolve() for r in (allowed_roots or [])]

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        try:
            if not request.model_spec.name:
                raise InvalidArgument("Missing ModelSpec")
            version = request.model_spec.version.value if request.model_spec.HasField("version") else None
            return status_response(self.registry, request.model_spec.name, version)
        except ServableError as error:
            _abort(context, error)

    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):
        response = model_management_pb2.ReloadConfigResponse()
        try:
            specs = specs_from_proto(request.config, self.base_path_prefix)
        except ConfigError as error:
            response.status.error_code = _error_code_value("INVALID_ARGUMENT")
            response.status.error_message = str(error)
            return response
        # The paths as asked for (before any prefix re-roots them) and as they will be loaded.
        asked = [(m.name, Path(m.base_path)) for m in request.config.model_config_list.config]
        outside = outside_roots([*asked, *((spec.name, spec.base_path) for spec in specs)], self.allowed_roots)
        if outside:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, outside)
        self.registry.reload_config(specs)
        response.status.error_code = _error_code_value("OK")
        return response

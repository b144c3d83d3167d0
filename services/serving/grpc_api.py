"""gRPC face of the compatible server: tensorflow.serving PredictionService and ModelService.

Each method validates the request, calls :class:`ModelRegistry`, and maps its errors to status
codes; the messages and service names are the official tensorflow-serving-api ones.
"""

import logging

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

from services.serving.config import ConfigError, specs_from_proto
from services.serving.errors import InvalidArgument, ServableError
from services.serving.registry import ModelRegistry, Servable

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, error: ServableError):
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)


def _resolve(registry: ModelRegistry, model_spec) -> Servable:
    if not model_spec.name:
        raise InvalidArgument("Missing ModelSpec")
    version = model_spec.version.value if model_spec.HasField("version") else None
    label = model_spec.version_label if model_spec.WhichOneof("version_choice") == "version_label" else None
    return registry.resolve(model_spec.name, version, label)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify/Regress/MultiInference are not offered (no Examples)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def Predict(self, request: predict_pb2.PredictRequest, context):
        try:
            servable = _resolve(self.registry, request.model_spec)
            signature_name, _ = self.registry.signature(servable, request.model_spec.signature_name)
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

    def __init__(self, registry: ModelRegistry, base_path_prefix: str | None = None):
        self.registry = registry
        self.base_path_prefix = base_path_prefix

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
        self.registry.reload_config(specs)
        response.status.error_code = _error_code_value("OK")
        return response

"""TensorFlow Serving's gRPC protocol without TensorFlow: its messages, loaded into a private pool.

The protocol's messages (``tensorflow.serving.PredictRequest`` and what it is built of:
``ModelSpec``, ``tensorflow.TensorProto``, ``TensorShapeProto``, ``DataType``...) are the ones
TensorFlow Serving declares in ``tensorflow_serving/apis/*.proto`` and TensorFlow in
``tensorflow/core/framework/*.proto``. The ``tensorflow-serving-api`` wheel ships them only as
generated modules that import all of TensorFlow (7 s and 800 MB before the first request), so the
separation client does not use those modules at run time. Instead ``make protos`` runs this module
once (``python -m services.serving.protocol``): it takes the compiled descriptors of
``prediction_service.proto`` and everything it imports from the installed wheels, and writes them
as a ``FileDescriptorSet`` beside this file (generated, never committed). At run time the set is
loaded into a descriptor pool of its own — not protobuf's default pool, where TensorFlow's modules
register the same names when a process imports both (the evaluation service, the tests) — and the
message classes are made from it. The wire is TF Serving's by construction: the same descriptors,
the same method paths, taken from the installed TF Serving version.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = Path(__file__).with_name("tf_serving_protocol.binpb")
ROOT_FILE = "tensorflow_serving/apis/prediction_service.proto"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"


class ProtocolNotBuilt(RuntimeError):
    """The descriptor set is missing: ``make protos`` has not run in this checkout."""


@dataclass(frozen=True)
class Protocol:
    """The message classes of TF Serving's prediction protocol, and its method paths."""

    pool: descriptor_pool.DescriptorPool
    PredictRequest: type
    PredictResponse: type
    GetModelMetadataRequest: type
    GetModelMetadataResponse: type
    TensorProto: type
    DT_FLOAT: int
    DT_INT32: int

    def method_path(self, method: str) -> str:
        """'/tensorflow.serving.PredictionService/Predict' for 'Predict', from the service descriptor."""
        service = self.pool.FindServiceByName(PREDICTION_SERVICE)
        return f"/{service.full_name}/{service.methods_by_name[method].name}"

    def predict_method(self, channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
        """The Predict call on a channel, as PredictionServiceStub(channel).Predict."""
        return channel.unary_unary(self.method_path("Predict"),
                                   request_serializer=self.PredictRequest.SerializeToString,
                                   response_deserializer=self.PredictResponse.FromString)

    def get_model_metadata_method(self, channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
        return channel.unary_unary(self.method_path("GetModelMetadata"),
                                   request_serializer=self.GetModelMetadataRequest.SerializeToString,
                                   response_deserializer=self.GetModelMetadataResponse.FromString)

    def data_type_name(self, value: int) -> str:
        enum = self.pool.FindEnumTypeByName("tensorflow.DataType")
        found = enum.values_by_number.get(value)
        return found.name if found is not None else str(value)


@functools.cache
def load(path: Path = DESCRIPTOR_SET) -> Protocol:
    """The protocol from the descriptor set ``make protos`` wrote; ProtocolNotBuilt when it is absent."""
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(Path(path).read_bytes())
    except FileNotFoundError:
        raise ProtocolNotBuilt(
            f"{path.name} is missing: run `make protos` (the TF Serving protocol is built from the "
            "installed tensorflow-serving-api)") from None
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:  # dependencies come first in the set
        pool.Add(file)

    def message(name: str) -> type:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    data_type = pool.FindEnumTypeByName("tensorflow.DataType")
    return Protocol(
        pool=pool,
        PredictRequest=message("tensorflow.serving.PredictRequest"),
        PredictResponse=message("tensorflow.serving.PredictResponse"),
        GetModelMetadataRequest=message("tensorflow.serving.GetModelMetadataRequest"),
        GetModelMetadataResponse=message("tensorflow.serving.GetModelMetadataResponse"),
        TensorProto=message("tensorflow.TensorProto"),
        DT_FLOAT=data_type.values_by_name["DT_FLOAT"].number,
        DT_INT32=data_type.values_by_name["DT_INT32"].number,
    )


def build(path: Path = DESCRIPTOR_SET) -> Path:
    """Write the descriptor set of prediction_service.proto and its imports (run by `make protos`).

    Imports the wheels' generated modules, and with them TensorFlow: a build step, never run by
    the client. The file is written under a temporary name and renamed into place.
    """
    from tensorflow_serving.apis import prediction_service_pb2

    ordered: list = []

    def add(file) -> None:  # dependencies before the files that import them
        for dependency in file.dependencies:
            add(dependency)
        if file.name not in {done.name for done in ordered}:
            ordered.append(file)

    add(prediction_service_pb2.DESCRIPTOR)
    if ordered[-1].name != ROOT_FILE:
        raise RuntimeError(f"the installed tensorflow-serving-api declares {ordered[-1].name}, not {ROOT_FILE}")
    files = descriptor_pb2.FileDescriptorSet()
    for file in ordered:
        file.CopyToProto(files.file.add())
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(files.SerializeToString(deterministic=True))
    temporary.replace(path)
    return path


if __name__ == "__main__":
    written = build(Path(sys.argv[1]) if len(sys.argv) > 1 else DESCRIPTOR_SET)
    print(f"wrote {written}")

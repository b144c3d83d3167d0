"""REST face of the compatible server: TF Serving's ``/v1/models/...`` JSON API as a Flask app.

Routes (as in TF Serving): ``GET /v1/models/NAME[/versions/V|/labels/L]`` (status),
``GET .../metadata``, ``POST ...:predict`` with the row (``instances`` -> ``predictions``) or
columnar (``inputs`` -> ``outputs``) format and an optional ``signature_name``. Errors come back as
``{"error": "..."}`` with the HTTP status TF Serving uses for the same canonical code.
"""

import base64
import json
import re

import numpy as np
from flask import Flask, Response, request
from google.protobuf import json_format

from services.serving.errors import HTTP_STATUS, InvalidArgument, NotFound, ServableError
from services.serving.grpc_api import status_response
from services.serving.registry import ModelRegistry, numpy_dtype

_MODEL_PATH = re.compile(
    r"^(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?$"
)


def _json_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _error(message: str, status: int) -> Response:
    return _json_response({"error": message}, status)


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _decode_strings(value):
    if _is_b64(value):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_strings(item) for item in value]
    return value.encode("utf-8") if isinstance(value, str) else value


def _to_array(value, dtype: np.dtype, alias: str) -> np.ndarray:
    """A JSON value -> ndarray of the signature's dtype (JSON has no float32, so convert here)."""
    try:
        if dtype == np.dtype(object):
            return np.asarray(_decode_strings(value), dtype=object)
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"input '{alias}' is not a well-formed {dtype.name} tensor: {error}") from error


def _to_json(array: np.ndarray):
    if array.dtype == np.dtype(object):
        def encode(item):
            if isinstance(item, bytes):
                try:
                    return item.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(item).decode("ascii")}
            return item
        return np.vectorize(encode, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def parse_predict_body(body, signature_def) -> tuple[dict[str, np.ndarray], bool]:
    """Decode a :predict body into named input arrays; the flag says it used the row format."""
    if not isinstance(body, dict):
        raise InvalidArgument("Request body must be a JSON object")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidArgument("Missing 'inputs' or 'instances' key" if "instances" not in body
                              else "Not allowed to specify both 'instances' and 'inputs' keys")
    dtypes = {alias: numpy_dtype(info) for alias, info in signature_def.inputs.items()}
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidArgument("'instances' must be a non-empty JSON list")
        if all(isinstance(item, dict) and not _is_b64(item) for item in instances):
            aliases = set(instances[0])
            if any(set(item) != aliases for item in instances):
                raise InvalidArgument("every instance must name the same inputs")
            inputs = {alias: _to_array([item[alias] for item in instances], dtypes.get(alias, np.dtype(np.float32)), alias)
                      for alias in aliases}
        else:
            if len(dtypes) != 1:
                raise InvalidArgument(f"instances must be JSON objects naming the inputs {sorted(dtypes)}")
            (alias, dtype), = dtypes.items()
            inputs = {alias: _to_array(instances, dtype, alias)}
        return inputs, True
    value = body["inputs"]
    if isinstance(value, dict) and not _is_b64(value):
        inputs = {alias: _to_array(item, dtypes.get(alias, np.dtype(np.float32)), alias) for alias, item in value.items()}
    else:
        if len(dtypes) != 1:
            raise InvalidArgument(f"'inputs' must be a JSON object naming the inputs {sorted(dtypes)}")
        (alias, dtype), = dtypes.items()
        inputs = {alias: _to_array(value, dtype, alias)}
    return inputs, False


def format_predict_response(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """Named output arrays -> ``{"predictions": ...}`` (row) or ``{"outputs": ...}`` (columnar)."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": _to_json(next(iter(outputs.values())))}
        return {"outputs": {alias: _to_json(array) for alias, array in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": _to_json(next(iter(outputs.values())))}
    batch_sizes = {array.shape[0] if array.ndim else None for array in outputs.values()}
    if len(batch_sizes) != 1 or None in batch_sizes:
        raise InvalidArgument("Batch size for output tensors must be the same for the row format; use 'inputs'")
    rows = {alias: _to_json(array) for alias, array in outputs.items()}
    count = batch_sizes.pop()
    return {"predictions": [{alias: rows[alias][index] for alias in rows} for index in range(count)]}


def create_rest_app(registry: ModelRegistry, max_request_bytes: int | None = None) -> Flask:
    """The REST application over a registry."""
    app = Flask("services.serving.rest")
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes

    @app.errorhandler(404)
    def not_found(_exception):
        return _error(f"Malformed request: {request.method} {request.path}", 404)

    @app.errorhandler(405)
    def wrong_method(_exception):
        return _error(f"Malformed request: {request.method} {request.path}", 405)

    @app.errorhandler(413)
    def too_large(_exception):
        return _error(f"Request body is larger than the limit of {max_request_bytes} bytes", 413)

    @app.route("/v1/models/<path:model_path>", methods=["GET", "POST"])
    def model_route(model_path: str):
        match = _MODEL_PATH.match(model_path)
        if match is None or (request.method == "POST") != bool(match["verb"]):
            return _error(f"Malformed request: {request.method} {request.path}", 404)
        name, label = match["name"], match["label"]
        version = int(match["version"]) if match["version"] else None
        try:
            if match["verb"]:
                return _predict(name, version, label, match["verb"])
            if match["metadata"]:
                return _metadata(name, version, label)
            if label:
                version = registry.resolve(name, None, label).version
            return _json_response(json_format.MessageToDict(
                status_response(registry, name, version),
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            ))
        except ServableError as error:
            return _error(error.message, HTTP_STATUS.get(error.code, 500))

    def _metadata(name, version, label):
        servable = registry.resolve(name, version, label)
        signature_map = json_format.MessageToDict(registry.metadata(servable), preserving_proto_field_name=True)
        return _json_response({
            "model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": signature_map},
        })

    def _predict(name, version, label, verb):
        if verb != "predict":
            raise NotFound(f"{verb} is not served; use :predict")
        try:
            body = json.loads(request.get_data())
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"JSON Parse error: {error}") from error
        servable = registry.resolve(name, version, label)
        signature_name = body.get("signature_name", "") if isinstance(body, dict) else ""
        if not isinstance(signature_name, str):
            raise InvalidArgument("'signature_name' must be a string")
        signature_name, signature_def = registry.signature(servable, signature_name)
        inputs, row_format = parse_predict_body(body, signature_def)
        outputs = registry.predict(servable, signature_name, inputs)
        return _json_response(format_predict_response(outputs, row_format))

    return app

"""Contract tests of the compatible model server, run as a real process and called through the
official tensorflow-serving-api stubs and TF Serving's REST API, the way every caller talks to it."""

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from services.serving.config import load_model_config, rebase, rebased_config_text
from services.serving.local import running_server, write_config
from services.serving.reference_models import save_gain_model
from tests.polling import wait_until

MAX_MESSAGE_MB = 8


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_gain_model(root / "guitar" / "1", gain=1.0)
    save_gain_model(root / "piano" / "1", gain=0.5)
    save_gain_model(root / "versioned" / "1", gain=1.0)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    return root


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    names = ["guitar", "piano", "versioned", "broken", "empty"]
    config = write_config(folder / "models.config", {name: models_root / name for name in names})
    with running_server(config, folder / "server.log", ready_model="guitar", poll_seconds=0.3,
                        extra_args=("--grpc_max_message_mb", str(MAX_MESSAGE_MB))) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    from services.common.auth import client_token, open_channel

    with open_channel(server.grpc_address, options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
    ], token=client_token()) as opened:
        yield opened


@pytest.fixture(scope="module")
def predictions(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_service(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(model, array, input_name="waveform", signature="", version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(np.asarray(array, np.float32)))
    return request


def rest(server, path, body=None, raw=None):
    """(HTTP status, decoded JSON body) of a REST call; POST when a body is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{server.rest_address}{path}", data=data,
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ----- gRPC ---------------------------------------------------------------------------------------


def test_grpc_predict_returns_instrument_and_rest_that_sum_to_the_waveform(predictions):
    waveform = np.random.default_rng(0).uniform(-1, 1, (2, 1000)).astype(np.float32)
    response = predictions.Predict(predict_request("piano", waveform), timeout=30)
    instrument = tf.make_ndarray(response.outputs["instrument"])
    rest_part = tf.make_ndarray(response.outputs["rest"])
    np.testing.assert_allclose(instrument, 0.5 * waveform, atol=1e-7)
    np.testing.assert_allclose(instrument + rest_part, waveform, atol=1e-6)
    assert response.model_spec.name == "piano"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_grpc_output_filter_returns_only_the_named_output(predictions):
    request = predict_request("guitar", np.ones((1, 10)))
    request.output_filter.append("instrument")
    response = predictions.Predict(request, timeout=30)
    assert list(response.outputs) == ["instrument"]


def test_grpc_sample_rate_signature_reports_the_model_rate(predictions):
    response = predictions.Predict(predict_request("guitar", [0.0], "x", "sample_rate"), timeout=30)
    assert tf.make_ndarray(response.outputs["sample_rate"]).tolist() == [22050]


def test_grpc_unknown_model_is_not_found(predictions):
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request("nope", np.ones((1, 4))), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Servable not found for request: Latest(nope)" in raised.value.details()


def test_grpc_unknown_version_is_not_found(predictions):
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request("guitar", np.ones((1, 4)), version=7), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Specific(guitar, 7)" in raised.value.details()


def test_grpc_wrong_input_name_is_invalid_argument(predictions):
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request("guitar", np.ones((1, 4)), input_name="audio"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio" in raised.value.details() and "waveform" in raised.value.details()


def test_grpc_wrong_rank_is_invalid_argument(predictions):
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request("guitar", np.ones(4)), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_unknown_signature_is_failed_precondition(predictions):
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request("guitar", np.ones((1, 4)), signature="nope"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_grpc_request_over_the_message_limit_is_refused(predictions):
    too_big = np.zeros((1, (MAX_MESSAGE_MB << 20) // 4 + 1000), np.float32)
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request("guitar", too_big), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_metadata_lists_the_signatures(predictions):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "guitar"
    request.metadata_field.append("signature_def")
    response = predictions.GetModelMetadata(request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    serving = signature_map.signature_def["serving_default"]
    assert list(serving.inputs) == ["waveform"]
    assert sorted(serving.outputs) == ["instrument", "rest"]
    assert [dim.size for dim in serving.inputs["waveform"].tensor_shape.dim] == [-1, -1]
    assert "sample_rate" in signature_map.signature_def
    assert response.model_spec.version.value == 1


def test_grpc_status_reports_available(model_service):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "guitar"
    response = model_service.GetModelStatus(request, timeout=30)
    (status,) = response.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0


def test_grpc_status_of_a_model_without_versions_is_not_found(model_service):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "empty"
    with pytest.raises(grpc.RpcError) as raised:
        model_service.GetModelStatus(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_service_reports_serving(channel):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_requests_are_all_answered(predictions, server):
    def call(index):
        waveform = np.full((2, 22050), index, np.float32)
        if index % 2:
            status, body = rest(server, "/v1/models/piano:predict", {"inputs": {"waveform": waveform[:, :100].tolist()}})
            assert status == 200
            return np.asarray(body["outputs"]["instrument"])[0, 0]
        response = predictions.Predict(predict_request("piano", waveform), timeout=60)
        return tf.make_ndarray(response.outputs["instrument"])[0, 0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    assert results == [0.5 * index for index in range(16)]


# ----- REST ---------------------------------------------------------------------------------------


def test_rest_predict_row_format(server):
    status, body = rest(server, "/v1/models/piano:predict", {"instances": [[1.0, 2.0], [4.0, -2.0]]})
    assert status == 200
    assert body == {"predictions": [{"instrument": [0.5, 1.0], "rest": [0.5, 1.0]},
                                    {"instrument": [2.0, -1.0], "rest": [2.0, -1.0]}]}


def test_rest_predict_row_format_with_named_inputs(server):
    status, body = rest(server, "/v1/models/piano:predict", {"instances": [{"waveform": [2.0, 4.0]}]})
    assert status == 200
    assert body["predictions"] == [{"instrument": [1.0, 2.0], "rest": [1.0, 2.0]}]


def test_rest_predict_columnar_format(server):
    status, body = rest(server, "/v1/models/piano/versions/1:predict", {"inputs": {"waveform": [[1.0, 2.0]]}})
    assert status == 200
    assert body == {"outputs": {"instrument": [[0.5, 1.0]], "rest": [[0.5, 1.0]]}}


def test_rest_predict_other_signature(server):
    status, body = rest(server, "/v1/models/guitar:predict", {"signature_name": "sample_rate", "instances": [0.0]})
    assert (status, body) == (200, {"predictions": [22050]})


def test_rest_unknown_model_is_404_with_tf_serving_message(server):
    status, body = rest(server, "/v1/models/nope:predict", {"instances": [[1.0]]})
    assert status == 404
    assert body == {"error": "Servable not found for request: Latest(nope)"}


def test_rest_wrong_input_name_is_400(server):
    status, body = rest(server, "/v1/models/guitar:predict", {"inputs": {"audio": [[1.0]]}})
    assert status == 400
    assert "audio" in body["error"]


def test_rest_bad_json_is_400(server):
    status, body = rest(server, "/v1/models/guitar:predict", raw=b'{"instances": [1.0,')
    assert status == 400
    assert "JSON" in body["error"]


def test_rest_body_without_instances_or_inputs_is_400(server):
    status, body = rest(server, "/v1/models/guitar:predict", {"signature_name": "serving_default"})
    assert status == 400
    assert "instances" in body["error"] and "inputs" in body["error"]


def test_rest_status_reports_available(server):
    status, body = rest(server, "/v1/models/guitar")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert rest(server, "/v1/models/guitar/versions/1")[0] == 200


def test_rest_metadata_lists_the_signature(server):
    status, body = rest(server, "/v1/models/guitar/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "guitar", "signature_name": "", "version": "1"}
    serving = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert serving["inputs"]["waveform"]["dtype"] == "DT_FLOAT"
    assert sorted(serving["outputs"]) == ["instrument", "rest"]


def test_rest_malformed_path_is_json_error(server):
    status, body = rest(server, "/v1/models/guitar:explode", {"instances": [1]})
    assert status == 404 and "error" in body


# ----- loading, versions, failures ----------------------------------------------------------------


def test_a_model_that_fails_to_load_reports_its_error_and_the_others_keep_serving(server, predictions):
    status, body = rest(server, "/v1/models/broken")
    assert status == 200
    (version,) = body["model_version_status"]
    assert version["state"] == "END"
    assert version["status"]["error_code"] != "OK" and "broken" in version["status"]["error_message"]
    assert rest(server, "/v1/models/broken:predict", {"instances": [[1.0]]})[0] == 404
    response = predictions.Predict(predict_request("guitar", np.ones((1, 3))), timeout=30)
    assert tf.make_ndarray(response.outputs["instrument"]).tolist() == [[1.0, 1.0, 1.0]]


def test_a_new_version_is_served_without_restart_and_half_written_ones_are_ignored(server, models_root):
    base = models_root / "versioned"
    # Half-written publications: a temp name holding a complete model, and a version folder
    # whose saved_model.pb is not there yet.
    save_gain_model(base / ".tmp-5", gain=0.25)
    shutil.copytree(base / ".tmp-5", base / "tmp-6")
    (base / "7" / "variables").mkdir(parents=True)
    shutil.copy(base / ".tmp-5" / "variables" / "variables.index", base / "7" / "variables")
    time.sleep(1.0)  # a negative check: three polls of the server (every 0.3 s) must not pick these up
    status, body = rest(server, "/v1/models/versioned:predict", {"instances": [[4.0]]})
    assert (status, body["predictions"][0]["instrument"]) == (200, [4.0])
    assert [v["version"] for v in rest(server, "/v1/models/versioned")[1]["model_version_status"]] == ["1"]

    os.rename(base / ".tmp-5", base / "5")  # the atomic publication
    wait_until(lambda: rest(server, "/v1/models/versioned:predict",
                            {"instances": [[4.0]]})[1]["predictions"][0]["instrument"] == [1.0], interval=0.1)
    states = {v["version"]: v["state"] for v in rest(server, "/v1/models/versioned")[1]["model_version_status"]}
    assert states == {"5": "AVAILABLE", "1": "END"}
    assert rest(server, "/v1/models/versioned/versions/1:predict", {"instances": [[4.0]]})[0] == 404


def test_reload_config_adds_a_model_without_restart(model_service, predictions, models_root):
    config = model_server_config_pb2.ModelServerConfig()
    for name in ["guitar", "piano", "versioned", "broken", "empty"]:
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, str(models_root / name), "tensorflow"
    added = config.model_config_list.config.add()
    added.name, added.base_path = "piano_copy", str(models_root / "piano")
    response = model_service.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
    assert response.status.error_code == 0
    reply = predictions.Predict(predict_request("piano_copy", [[2.0]]), timeout=30)
    assert tf.make_ndarray(reply.outputs["instrument"]).tolist() == [[1.0]]


def test_a_model_named_in_the_polled_config_file_is_served_and_a_bad_file_changes_nothing(tmp_path):
    """What `stemlab export --model bass` relies on: the training service adds the name to the
    data root's models.config and the running server (polling it) serves it without a restart."""
    from services.common import models_config

    save_gain_model(tmp_path / "models" / "guitar" / "1", gain=1.0)
    save_gain_model(tmp_path / "models" / "bass" / "1", gain=0.5)
    config = write_config(tmp_path / "models.config", {"guitar": tmp_path / "models" / "guitar"})
    with running_server(config, tmp_path / "server.log", ready_model="guitar", poll_seconds=0.2,
                        extra_args=("--model_config_file_poll_wait_seconds", "0.2")) as server:
        assert rest(server, "/v1/models/bass")[0] == 404
        assert models_config.add_model(config, "bass", tmp_path / "models" / "bass")
        wait_until(lambda: rest(server, "/v1/models/bass:predict", {"instances": [[2.0]]})[0] == 200, interval=0.1)
        assert rest(server, "/v1/models/bass:predict", {"instances": [[2.0]]})[1]["predictions"][0]["instrument"] == [1.0]

        config.write_text("model_config_list { config { name: ")  # an editor's half-saved file
        wait_until(lambda: "model config not reloaded" in server.log(), interval=0.1)
        for name in ("guitar", "bass"):
            assert rest(server, f"/v1/models/{name}:predict", {"instances": [[2.0]]})[0] == 200

        save_gain_model(tmp_path / "elsewhere" / "stray" / "1", gain=1.0)  # beyond the served folders
        write_config(config, {"guitar": tmp_path / "models" / "guitar", "stray": tmp_path / "elsewhere" / "stray"})
        wait_until(lambda: "outside the model folders" in server.log(), interval=0.1)
        assert rest(server, "/v1/models/stray")[0] == 404 and rest(server, "/v1/models/bass")[0] == 200

        write_config(config, {"guitar": tmp_path / "models" / "guitar"})  # taken out: unloaded
        wait_until(lambda: rest(server, "/v1/models/bass")[0] == 404, interval=0.1)
        assert rest(server, "/v1/models/guitar:predict", {"instances": [[2.0]]})[0] == 200


# ----- the deploy config ----------------------------------------------------------------------------


def test_deploy_config_serves_guitar_and_piano_and_rebases_to_the_data_root(tmp_path):
    config_file = os.path.join(os.path.dirname(__file__), "..", "deploy", "serving", "models.config")
    specs = load_model_config(config_file)
    assert {spec.name: str(spec.base_path) for spec in specs} == {"guitar": "/models/guitar", "piano": "/models/piano"}
    local = load_model_config(config_file, base_path_prefix=tmp_path / "models")
    assert {spec.name: spec.base_path for spec in local} == {
        "guitar": tmp_path / "models" / "guitar", "piano": tmp_path / "models" / "piano"}
    assert rebase("/models/guitar/", "/data/models") == rebase("/models/guitar", "/data/models")
    # A re-rooted copy for a real tensorflow_model_server outside Docker reads back the same way.
    copy = tmp_path / "local.config"
    copy.write_text(rebased_config_text(config_file, tmp_path / "models"))
    assert {spec.name: spec.base_path for spec in load_model_config(copy)} == {
        spec.name: spec.base_path for spec in local}


# ----- version bookkeeping of the registry (in process, with a stand-in loader) -----------------


def fake_loader(name, version, path):
    from services.serving.registry import Servable

    if (path / "saved_model.pb").read_bytes() == b"broken":
        raise ValueError("cannot parse saved_model.pb")
    return Servable(name, version, path, {}, {})


def publish(base, version, content=b"ok"):
    (base / str(version)).mkdir(parents=True, exist_ok=True)
    (base / str(version) / "saved_model.pb").write_bytes(content)


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving_until_it_is_fixed(tmp_path):
    from services.serving.config import ModelSpec
    from services.serving.registry import ModelRegistry

    publish(tmp_path, 1)
    registry = ModelRegistry([ModelSpec("guitar", tmp_path)], loader=fake_loader)
    registry.poll()
    publish(tmp_path, 2, b"broken")
    registry.poll()
    assert registry.resolve("guitar").version == 1
    states = {s.version: (s.state, s.error_code) for s in registry.status("guitar")}
    assert states == {2: ("END", "UNKNOWN"), 1: ("AVAILABLE", "OK")}
    assert "cannot parse" in registry.status("guitar", 2)[0].error_message

    (tmp_path / "2" / "saved_model.pb").write_bytes(b"fixed, and a different size")
    registry.poll()
    assert registry.resolve("guitar").version == 2
    assert {s.version: s.state for s in registry.status("guitar")} == {2: "AVAILABLE", 1: "END"}


def test_a_deleted_version_is_unloaded_and_the_previous_one_served_again(tmp_path):
    from services.serving.config import ModelSpec
    from services.serving.registry import ModelRegistry

    publish(tmp_path, 1)
    publish(tmp_path, 2)
    registry = ModelRegistry([ModelSpec("guitar", tmp_path)], loader=fake_loader)
    registry.poll()
    assert registry.resolve("guitar").version == 2
    shutil.rmtree(tmp_path / "2")
    registry.poll()
    assert registry.resolve("guitar").version == 1
    with pytest.raises(Exception, match=r"Specific\(guitar, 2\)"):
        registry.resolve("guitar", 2)


@pytest.mark.parametrize("policy,expected", [
    ({"version_policy": "latest", "latest_count": 2}, {3, 10}),
    ({"version_policy": "all"}, {1, 3, 10}),
    ({"version_policy": "specific", "specific_versions": frozenset({1, 4})}, {1}),
])
def test_version_policies_choose_the_served_versions(tmp_path, policy, expected):
    from services.serving.config import ModelSpec
    from services.serving.registry import ModelRegistry

    for version in (1, 3, 10):
        publish(tmp_path, version)
    publish(tmp_path, "x12")  # not a version
    registry = ModelRegistry([ModelSpec("guitar", tmp_path, **policy)], loader=fake_loader)
    registry.poll()
    assert {s.version for s in registry.status("guitar") if s.state == "AVAILABLE"} == expected


def test_server_refuses_an_invalid_config_file_with_a_message(tmp_path, capsys):
    from services.serving.server import main

    bad = tmp_path / "models.config"
    bad.write_text('model_config_list { config { name: "guitar" base_path: "/m/guitar" model_platform: "pytorch" } }')
    assert main(["--model_config_file", str(bad)]) == 2
    assert "pytorch" in capsys.readouterr().err
    bad.write_text("model_config_list { config { name: ")
    assert main(["--model_config_file", str(bad)]) == 2
    assert "not a valid ModelServerConfig" in capsys.readouterr().err

"""Process entry point of the TF-Serving-compatible model server (flags as tensorflow_model_server).

    python -m services.serving.server --port 8500 --rest_api_port 8501 \
        --model_config_file deploy/serving/models.config \
        --model_base_path_prefix "$STEMLAB_DATA/models" --file_system_poll_wait_seconds 1

``--model_base_path_prefix`` (ours; TF Serving has no such flag) re-roots every ``base_path`` of
the config to ``<prefix>/<last component>``, so the compose config (``/models/guitar``) also
serves ``$STEMLAB_DATA/models/guitar`` locally. ``--model_name``/``--model_base_path`` serve a
single model without a config file, as in TF Serving.
"""

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
from werkzeug.serving import make_server

from services.common import auth
from services.common.config import ConfigError as CommonConfigError
from services.common.config import load_config
from services.serving.config import ConfigError, ModelSpec, load_model_config, outside_roots, rebase
from services.serving.grpc_api import DEFAULT_MAX_INPUT_ELEMENTS, ModelServicer, PredictionServicer
from services.serving.registry import ModelRegistry
from services.serving.rest_api import create_rest_app

log = logging.getLogger("services.serving")

# TF Serving accepts messages up to INT32_MAX bytes; ours stops at 256 MiB (64 Mi float32 values).
DEFAULT_MAX_MESSAGE_MB = 256
# Open to every client, as in tensorflow_model_server (which has no authentication): predictions,
# metadata, status and health. HandleReloadConfigRequest (and reflection) need the stack's token.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/tensorflow.serving.PredictionService/",
                "/tensorflow.serving.ModelService/GetModelStatus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.serving.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: do not serve gRPC)")
    parser.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0: do not serve REST)")
    parser.add_argument("--host", default=os.environ.get("STEMLAB_BIND_HOST") or "127.0.0.1",
                        help="address to bind both ports to (default $STEMLAB_BIND_HOST, else 127.0.0.1)")
    parser.add_argument("--model_config_file", help="ModelServerConfig text proto (model_config_list)")
    parser.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                        help="seconds between re-reads of --model_config_file, so models named there later "
                             "are served and ones taken out unloaded (0: read once at startup)")
    parser.add_argument("--model_base_path_prefix", help="re-root every base_path to PREFIX/<last component>")
    parser.add_argument("--model_name", default="default", help="single model name (without a config file)")
    parser.add_argument("--model_base_path", help="single model base path (without a config file)")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="seconds between scans for new versions (0: scan once at startup)")
    parser.add_argument("--grpc_max_message_mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help="largest gRPC request/response in MiB")
    parser.add_argument("--grpc_max_threads", type=int, default=16, help="concurrent gRPC requests")
    parser.add_argument("--rest_api_max_request_mb", type=int, default=64,
                        help="largest REST body in MiB (larger: 413)")
    parser.add_argument("--max_input_elements", type=int, default=DEFAULT_MAX_INPUT_ELEMENTS,
                        help="most values one input tensor may hold (checked before decoding)")
    parser.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                        help="threads one TensorFlow op may use (0: TensorFlow's choice, the cores)")
    parser.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                        help="TensorFlow ops run at once (0: TensorFlow's choice, the cores)")
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        parser.error("give --model_config_file or --model_base_path")
    if args.port == 0 and args.rest_api_port == 0:
        parser.error("both --port and --rest_api_port are 0: nothing to serve")
    return args


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    if args.model_config_file:
        return load_model_config(args.model_config_file, args.model_base_path_prefix)
    return [ModelSpec(name=args.model_name, base_path=rebase(args.model_base_path, args.model_base_path_prefix))]


class ModelServer:
    """The registry, its poller, the gRPC server and the REST server of one process."""

    def __init__(self, args: argparse.Namespace, specs: list[ModelSpec]):
        self.args = args
        self.config = load_config()
        # A reloaded config may only point under the prefix, else beside the startup config's models.
        prefix = args.model_base_path_prefix
        self.allowed_roots = ([Path(prefix).resolve()] if prefix
                              else sorted({spec.base_path.resolve().parent for spec in specs}))
        self.registry = ModelRegistry(specs)
        self.stopping = threading.Event()
        self.grpc_server = None
        self.rest_server = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # Like tensorflow_model_server: load what is there before opening the ports.
        self.registry.poll()
        args = self.args
        if args.port:
            max_bytes = args.grpc_max_message_mb * 1024 * 1024
            options = [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes),
                       ("grpc.so_reuseport", 0)]  # one server per port: a second copy fails to bind
            interceptor = auth.TokenInterceptor(auth.ensure_token(self.config.data_root), OPEN_METHODS)
            self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.grpc_max_threads),
                                           options=options, interceptors=[interceptor])
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
                PredictionServicer(self.registry, args.max_input_elements), self.grpc_server)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(
                ModelServicer(self.registry, args.model_base_path_prefix, self.allowed_roots), self.grpc_server)
            health_servicer = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.grpc_server)
            reflection.enable_server_reflection([
                "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
            ], self.grpc_server)
            try:
                bound = auth.add_port(self.grpc_server, f"{args.host}:{args.port}",
                                      self.config.tls_cert_file, self.config.tls_key_file)
            except RuntimeError as error:  # newer grpcio raises instead of returning 0
                raise OSError(f"cannot bind gRPC port {args.port}: {error}") from error
            if bound == 0:
                raise OSError(f"cannot bind gRPC port {args.port}")
            self.grpc_server.start()
            for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
                health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
            log.info("gRPC serving on %s:%d", args.host, args.port)
        if args.rest_api_port:
            app = create_rest_app(self.registry, args.rest_api_max_request_mb * 1024 * 1024)
            tls = self.config.tls_cert_file
            ssl_context = (str(tls), str(self.config.tls_key_file)) if tls else None
            self.rest_server = make_server(args.host, args.rest_api_port, app, threaded=True, ssl_context=ssl_context)
            self._spawn(self.rest_server.serve_forever, "rest")
            log.info("REST serving on %s:%d", args.host, args.rest_api_port)
        if args.file_system_poll_wait_seconds > 0:
            self._spawn(self._poll_forever, "poll")
        if args.model_config_file and args.model_config_file_poll_wait_seconds > 0:
            self._spawn(self._poll_config_forever, "config-poll")

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll_forever(self) -> None:
        while not self.stopping.wait(self.args.file_system_poll_wait_seconds):
            self.registry.poll()

    def _poll_config_forever(self) -> None:
        # As tensorflow_model_server: a config that cannot be read or parsed is logged (once per
        # change) and the models already served keep serving.
        last = None
        while not self.stopping.wait(self.args.model_config_file_poll_wait_seconds):
            try:
                text = Path(self.args.model_config_file).read_text(encoding="utf-8")
            except OSError as error:
                text = f"unreadable: {error}"
                if text != last:
                    log.error("model config not reloaded: %s", error)
            else:
                if text != last:
                    self._reload_config_file()
            last = text

    def _reload_config_file(self) -> None:
        try:
            specs = load_model_config(self.args.model_config_file, self.args.model_base_path_prefix)
        except ConfigError as error:
            log.error("model config not reloaded: %s", error)
            return
        # The file is written while the stack runs (an export adds its name): held to the same
        # folders as a HandleReloadConfigRequest.
        outside = outside_roots([(spec.name, spec.base_path) for spec in specs], self.allowed_roots)
        if outside:
            log.error("model config not reloaded: %s", outside)
            return
        before = self.registry.model_names()
        self.registry.reload_config(specs)
        if self.registry.model_names() != before:
            log.info("model config reloaded: serving %s", ", ".join(self.registry.model_names()))

    def stop(self, grace_seconds: float = 5.0) -> None:
        self.stopping.set()
        if self.rest_server is not None:
            self.rest_server.shutdown()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace_seconds).wait()


def set_threading(intra_op: int, inter_op: int) -> None:
    """TensorFlow's thread pools, as tensorflow_model_server's flags of the same names set them;
    only possible before the first model is loaded. The pools are shared by concurrent requests."""
    import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        specs = model_specs(args)
        set_threading(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism)
        server = ModelServer(args, specs)
    except (ConfigError, CommonConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        server.start()
    except (OSError, auth.TokenError) as error:
        print(f"error: {error}", file=sys.stderr)
        server.stop(0)
        return 1
    done = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared secret of a stack: one bearer token, checked by one gRPC server interceptor.

Every gRPC service (and serving's admin RPC, and the web's review pages) refuses a call without
`authorization: Bearer <token>` with UNAUTHENTICATED; the gRPC health service stays open so
probes need no secret. The token is, in order:

    $STEMLAB_TOKEN                       (an operator's override; compose and Kubernetes pass it)
    $STEMLAB_DATA/secrets/token          (mode 0600; `make up` or the first service creates it)

Clients (the CLI, the web, the tests) read it from the same place, so a user on the machine
that owns the data root is authenticated without doing anything, and nobody else is.

Optional TLS: `tls_cert_file` + `tls_key_file` in the config (STEMLAB_TLS_CERT / STEMLAB_TLS_KEY)
make servers listen with TLS; clients then trust `tls_ca_file` (STEMLAB_TLS_CA, default the
certificate itself).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "STEMLAB_TOKEN"
HEADER = "authorization"
# Methods anyone may call: probes must work without the secret.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MIN_TOKEN_CHARS = 16


class TokenError(RuntimeError):
    """The token cannot be read or created; the message says where and why."""


def token_path(data_root: str | os.PathLike) -> Path:
    return Path(data_root) / "secrets" / "token"


def _env_token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"{TOKEN_ENV} is too short: use at least {MIN_TOKEN_CHARS} characters")
    return token


def read_token(data_root: str | os.PathLike) -> str | None:
    """$STEMLAB_TOKEN, else the token file of `data_root`; None if neither exists."""
    token = _env_token()
    if token:
        return token
    path = token_path(data_root)
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise TokenError(f"cannot read the token {path}: {error.strerror or error}") from error
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the token in {path} is empty or too short; delete it to make a new one")
    return token


def ensure_token(data_root: str | os.PathLike) -> str:
    """The token of `data_root`, creating the file (0600) when there is none and no override.

    The new token is written to a private temporary file and hard-linked onto the final name:
    the link fails if another process created the token first, and then that one is used, so
    two services starting together agree and an existing token is never overwritten.
    """
    token = read_token(data_root)
    if token:
        return token
    path = token_path(data_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(prefix=".token.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.info("created the stack's token %s", path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    token = read_token(data_root)
    if not token:
        raise TokenError(f"the token {path} vanished while it was being created")
    return token


def client_token(data_root: str | os.PathLike | None = None) -> str | None:
    """What clients send: $STEMLAB_TOKEN, else the token file of `data_root` (default: the
    configured data root). None when there is none yet (calls then get UNAUTHENTICATED)."""
    if data_root is None:
        token = _env_token()
        if token:
            return token
        from services.common.config import load_config

        data_root = load_config().data_root
    return read_token(data_root)


def token_matches(expected: str, presented: str | None) -> bool:
    """Compare in constant time; `presented` is a header value such as "Bearer abc"."""
    if not presented:
        return False
    scheme, _, value = presented.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), expected.encode())


# -- server side ------------------------------------------------------------------------------
def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without the bearer token, except methods under `open_prefixes`."""

    def __init__(self, token: str, open_prefixes: Iterable[str] = (HEALTH_PREFIX,)):
        self.token = token
        self.open_prefixes = tuple(open_prefixes)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(HEADER)
        if token_matches(self.token, presented):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED; say nothing more
            return None
        why = "no token" if not presented else "a wrong token"
        log.warning("refused %s: %s", method, why)
        return _refusal(handler, f"{method} needs the stack's token ({why} given): send "
                                 f"'{HEADER}: Bearer <token>' from $STEMLAB_DATA/secrets/token or ${TOKEN_ENV}")


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike) -> grpc.ServerCredentials:
    try:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as error:
        raise TokenError(f"cannot read the TLS certificate or key: {error}") from error
    return grpc.ssl_server_credentials([(key, cert)])


def add_port(server: grpc.Server, address: str, cert_file=None, key_file=None) -> int:
    """Listen on `address`, with TLS when a certificate and key are configured."""
    if cert_file and key_file:
        return server.add_secure_port(address, server_credentials(cert_file, key_file))
    return server.add_insecure_port(address)


# -- client side ------------------------------------------------------------------------------
class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.header = (HEADER, f"Bearer {token}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self.header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def open_channel(address: str, options: list | None = None, token: str | None = None,
                 ca_file: str | os.PathLike | None = None) -> grpc.Channel:
    """A channel to `address` that sends `token` (if any) on every call; TLS when `ca_file`
    (the certificate or authority to trust) is given."""
    options = options or []
    if ca_file:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca_file).read_bytes()), options)
    else:
        channel = grpc.insecure_channel(address, options)
    if token:
        channel = grpc.intercept_channel(channel, _TokenClientInterceptor(token))
    return channel


def stack_channel(address: str, options: list | None = None, data_root: str | os.PathLike | None = None) -> grpc.Channel:
    """A channel to one of this stack's services: its token and TLS settings from the config."""
    from services.common.config import load_config

    config = load_config()
    root = data_root if data_root is not None else config.data_root
    return open_channel(address, options, client_token(root), config.tls_client_ca)

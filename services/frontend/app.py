"""The web demo's application factory: `gunicorn 'services.frontend.app:create_app()'`.

By default the process also runs the separations (`start_workers`), with their states in
DATA/web/separations.sqlite: run it then with one gunicorn worker process and many threads, as
`gunicorn -c python:services.frontend.gunicorn_conf` does.
With STEMLAB_WEB_START_WORKERS=false it only queues and serves them, separation workers
(`python -m services.frontend.worker`) run them, and on the shared PostgreSQL store
(STEMLAB_DATABASE_URL) any number of web processes and replicas answer (docs/scaling.md).
"""

from __future__ import annotations

import atexit
import hmac
import logging
from typing import Any

from flask import Flask, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from services.common.auth import ensure_token
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, StemlabError
from services.frontend.backends import ServingModels
from services.frontend.ingestion import ReviewConflict
from services.frontend.separations import QueueFull, SeparationQueue
from services.frontend.settings import load_settings, offered_models

log = logging.getLogger(__name__)


def error_status(error: Exception) -> int:
    """The HTTP status of a domain error (the web's counterpart of the gRPC mapping)."""
    if isinstance(error, QueueFull):
        return 503
    if isinstance(error, ReviewConflict):
        return 409
    if isinstance(error, FailedPreconditionError):
        return 503  # a service we need is down or busy: try again later
    if isinstance(error, (NotFoundError, LookupError)):
        return 404
    if isinstance(error, (InvalidArgumentError, ValueError)):
        return 400
    if isinstance(error, StemlabError):
        return 502  # another service failed in a way it did not explain
    return 500


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app; `config` overrides settings (see services/frontend/settings.py)."""
    settings = load_settings(config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    token = ensure_token(settings.data_root)
    app.extensions["stemlab_token"] = token
    # Session cookies (the review login) are signed with a key only the token's holders can derive.
    app.secret_key = hmac.new(token.encode(), b"stemlab web session key", "sha256").digest()
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
    app.json.sort_keys = False
    app.extensions["stemlab_settings"] = settings
    app.extensions["stemlab_models"] = ServingModels(
        settings.serving_rest_address, lambda: offered_models(settings), settings.model_status_cache_seconds)
    queue = SeparationQueue(settings)
    app.extensions["stemlab_queue"] = queue

    from services.frontend import api, pages, review

    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(review.bp)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", workers=settings.workers)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_error):
        message = f"the upload is larger than {settings.max_upload_mb:g} MB"
        return _error_response(message, 413)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return _error_response(error.description or error.name, error.code or 500)

    @app.errorhandler(Exception)
    def any_error(error: Exception):
        status = error_status(error)
        if status == 500:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error_response("internal error; the details are in the server log", 500)
        return _error_response(str(error), status)

    if settings.start_workers:
        queue.start()
        # Under gunicorn the config's worker_exit hook stops the queue first (while the serving
        # client can still work); this covers the development server and other hosts.
        atexit.register(queue.stop, 5.0)
    return app


# What a 503 (a full queue, serving down) tells a client to wait before it tries again.
RETRY_AFTER_SECONDS = 60


def _error_response(message: str, status: int):
    if wants_json():
        response = make_response(jsonify(error=message), status)
    else:
        response = make_response(render_template("error.html", message=message, status=status), status)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def main() -> None:
    """Development server (`python -m services.frontend.app`); production runs gunicorn (see above)."""
    from services.common.config import load_config

    create_app().run(host="127.0.0.1", port=load_config().port("web"), threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()

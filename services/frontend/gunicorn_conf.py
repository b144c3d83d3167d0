"""gunicorn settings of the web (`gunicorn -c python:services.frontend.gunicorn_conf …`), the same
under `make up`, Docker Compose and Kubernetes.

- One worker process (it runs the separation queue) with many threads: each upload and each
  download holds a thread for as long as the client takes, so 8 slow clients used to stop the
  whole site, health checks included. STEMLAB_WEB_THREADS sets the number (the web setting
  `threads`, default 32).
- No control socket: gunicorn 24+ opens one under the home folder, shared by every stack of
  the user and deleted by whichever stops first.
- `worker_exit` stops the separation queue while the worker still runs normally: at interpreter
  exit (atexit) the serving client's thread pool already refuses work, so a running
  separation failed with an internal error instead of being recorded as interrupted.
"""

from __future__ import annotations

import sys

from services.common.config import ConfigError
from services.frontend.settings import load_settings

try:
    threads = load_settings().threads
except ConfigError as error:  # one line, as every service says it, not gunicorn's traceback
    sys.exit(f"web: {error}")
workers = 1
timeout = 600
control_socket_disable = True


def worker_exit(server, worker) -> None:
    app = getattr(worker, "wsgi", None)
    queue = getattr(app, "extensions", {}).get("stemlab_queue") if app is not None else None
    if queue is not None:
        queue.stop(5.0)

"""A separation worker: takes the web's separations from the shared job store and runs them.

    python -m services.frontend.worker            run separations until SIGTERM
    python -m services.frontend.worker --check    exit 0 if the job store answers (health checks)

It reads the same settings as the web (services/frontend/settings.py: the data root, the
serving addresses, STEMLAB_WEB_WORKERS separations at once) and the same job store
(STEMLAB_DATABASE_URL, else DATA/web/separations.sqlite). Results are written under the data
root, which web replicas read. With PostgreSQL any number of workers share the queue; a job
whose worker died is taken up by another once its lease runs out. With SQLite one worker runs
the queue (a second exits with a message), and the web must be started with
STEMLAB_WEB_START_WORKERS=false.

SIGTERM or SIGINT: running separations get STEMLAB_GRACE_SECONDS to finish; what is cut short
goes back to the queue (PostgreSQL) or reads as interrupted (SQLite).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from services.common.config import load_config
from services.common.logs import setup_logging

log = logging.getLogger("stemlab.web.worker")


def check() -> int:
    """Health check: the separation queue's store opens and answers."""
    from services.common import jobstore
    from services.frontend.settings import load_settings

    try:
        settings = load_settings({"start_workers": False})
        store = jobstore.open_store("web", settings.web_root / "separations.sqlite")
        store.count((jobstore.QUEUED,))
        store.close()
    except Exception as error:  # noqa: BLE001 - any failure is an unhealthy worker
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    if "--check" in sys.argv[1:]:
        return check()
    config = load_config()
    setup_logging(config.log_level, "web-worker")
    from services.frontend.separations import SeparationQueue
    from services.frontend.settings import load_settings

    try:
        settings = load_settings({"start_workers": True})
        queue = SeparationQueue(settings)
    except Exception as error:  # a bad setting, the queue run by another process, no database
        log.error("separation worker cannot start: %s", error)
        print(f"error: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    queue.start()
    log.info("separation worker %s: %d at once, results in %s", queue.runner.worker_id, settings.workers, queue.root)
    stop.wait()
    queue.stop(config.grace_seconds)
    log.info("separation worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

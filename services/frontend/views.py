"""How a separation job is shown: the JSON the API returns and the pages render."""

from __future__ import annotations

from flask import url_for

from services.common import jobs as jobstore
from services.frontend.separations import FORMATS, PICTURE, STEMS, SeparationQueue, user_message


def separation_json(queue: SeparationQueue, job: jobstore.JobRecord) -> dict:
    """{id, state, progress, message, error, ..., links} of one separation."""
    folder = queue.folder(job)
    done = job.state == jobstore.SUCCEEDED
    expired = done and not folder.is_dir()
    ready = done and not expired
    body = {
        "id": job.id,
        "state": job.state.lower(),
        "progress": round(job.progress.fraction if job.state != jobstore.SUCCEEDED else 1.0, 4),
        "message": job.progress.message,
        "queue_position": queue.queue_position(job),
        "error": user_message(job.error) if job.state == jobstore.FAILED else "",
        "model": job.params.get("model", ""),
        "title": (job.result or {}).get("title") or job.params.get("title", ""),
        "created": job.created,
        "finished": job.finished,
        "expired": expired,
        "result": job.result if ready else {},
        "links": {
            "self": url_for("api.separation", job_id=job.id),
            "page": url_for("pages.separation", job_id=job.id),
        },
    }
    if job.state == jobstore.CANCELLED:
        body["error"] = "the separation was cancelled"
    if expired:
        body["error"] = "the results of this separation have been deleted (they are kept only for a while)"
    if ready:
        for stem in STEMS:
            body["links"][stem] = {fmt: url_for("api.stem_file", job_id=job.id, stem=stem, ext=fmt) for fmt in FORMATS}
        if (folder / PICTURE).is_file():
            body["links"]["picture"] = url_for("api.picture", job_id=job.id)
    if not job.ended:
        body["links"]["cancel"] = url_for("api.cancel", job_id=job.id)
    return body

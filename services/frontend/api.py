"""The JSON API: models, separations (start, state, cancel) and their files.

    GET  /api/models
    POST /api/separations                 multipart `file`, or form/JSON `url`; and `model` -> 202
    GET  /api/separations/<id>            state, progress fraction, message, links
    POST /api/separations/<id>/cancel
    GET  /api/separations/<id>/instrument.<wav|flac|mp3>, /rest.<ext>   (Range requests work)
    GET  /api/separations/<id>/waveforms.png
Errors come back as {"error": "..."} with a 4xx/5xx status.
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, jsonify, request, send_file

from services.common import jobs as jobstore
from services.frontend.intake import start_separation
from services.frontend.separations import PICTURE, ensure_mp3
from services.frontend.views import separation_json

bp = Blueprint("api", __name__, url_prefix="/api")

_MIMETYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}


def _queue():
    return current_app.extensions["stemlab_queue"]


def _settings():
    return current_app.extensions["stemlab_settings"]


def _models():
    return current_app.extensions["stemlab_models"]


@bp.get("/models")
def models():
    return jsonify(models=[model.to_dict() for model in _models().list()])


def _request_values() -> dict:
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, description="the JSON body must be an object with 'url' and 'model'")
        return {key: str(value) for key, value in body.items() if isinstance(value, (str, int, float))}
    return request.form.to_dict()


@bp.post("/separations")
def create():
    values = _request_values()
    upload = request.files.get("file")
    job = start_separation(_settings(), _queue(), _models(), upload, values.get("url"), values.get("model"))
    body = separation_json(_queue(), job)
    return jsonify(body), 202, {"Location": body["links"]["self"]}


@bp.get("/separations/<job_id>")
def separation(job_id: str):
    return jsonify(separation_json(_queue(), _queue().get(job_id)))


@bp.post("/separations/<job_id>/cancel")
def cancel(job_id: str):
    queue = _queue()
    queue.get(job_id)
    return jsonify(separation_json(queue, queue.runner.cancel(job_id)))


def _result_file(job_id: str, name: str):
    queue = _queue()
    job = queue.get(job_id)
    if job.state != jobstore.SUCCEEDED:
        abort(409, description=f"separation {job_id} is {job.state.lower()}, it has no results")
    path = queue.folder(job) / name
    if not path.is_file():
        abort(410, description="the results of this separation have been deleted (they are kept only for a while)")
    return path, job


@bp.get("/separations/<job_id>/<any(instrument, rest):stem>.<any(wav, flac, mp3):ext>")
def stem_file(job_id: str, stem: str, ext: str):
    if ext == "mp3":
        wav, job = _result_file(job_id, f"{stem}.wav")
        path = ensure_mp3(wav.parent, stem)
    else:
        path, job = _result_file(job_id, f"{stem}.{ext}")
    name = (job.result or {}).get("title") or job.params.get("title", "")
    title = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60].strip("_")
    download_name = f"{title or 'song'}-{job.params.get('model', '')}-{stem}.{ext}"
    # conditional=True answers Range requests (206), so players can seek without fetching it all.
    return send_file(path, mimetype=_MIMETYPES[ext], conditional=True, max_age=3600,
                     as_attachment=request.args.get("download") == "1", download_name=download_name)


@bp.get("/separations/<job_id>/waveforms.png")
def picture(job_id: str):
    path, _ = _result_file(job_id, PICTURE)
    return send_file(path, mimetype="image/png", conditional=True, max_age=3600)

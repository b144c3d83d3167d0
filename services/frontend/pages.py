"""The HTML pages of the separation demo: home (choose a model, give a song) and one separation."""

from __future__ import annotations

from flask import Blueprint, current_app, redirect, render_template, request, url_for

from services.common.errors import StemlabError
from services.frontend.backends import BackendUnavailable
from services.frontend.intake import start_separation
from services.frontend.views import separation_json

bp = Blueprint("pages", __name__)


def _home(error: str = "", status: int = 200):
    settings = current_app.extensions["stemlab_settings"]
    try:
        models = current_app.extensions["stemlab_models"].list()
        serving_error = ""
    except BackendUnavailable as unavailable:
        models, serving_error = [], str(unavailable)
    return render_template(
        "home.html", models=models, error=error, serving_error=serving_error,
        max_upload_mb=settings.max_upload_mb, max_song_seconds=settings.max_song_seconds,
        selected=request.form.get("model", ""), url=request.form.get("url", "")), status


@bp.get("/")
def home():
    return _home()


@bp.post("/")
def submit():
    """The form without JavaScript: queue the separation and go to its page."""
    from services.frontend.app import error_status

    try:
        job = start_separation(current_app.extensions["stemlab_settings"], current_app.extensions["stemlab_queue"],
                               current_app.extensions["stemlab_models"], request.files.get("file"),
                               request.form.get("url"), request.form.get("model"))
    except StemlabError as error:
        return _home(str(error), error_status(error))
    return redirect(url_for("pages.separation", job_id=job.id), code=303)


@bp.get("/separations/<job_id>")
def separation(job_id: str):
    queue = current_app.extensions["stemlab_queue"]
    job = separation_json(queue, queue.get(job_id))
    return render_template("separation.html", job=job)

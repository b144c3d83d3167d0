"""The review page: listen to each stem of one instrument in five parts and set quality marks.

As in the thesis' tool, every stem is trimmed of leading and trailing silence and played in
five equal parts; one button (and one key) per mark. Tracks, parts and marks all come from the
ingestion service over gRPC; the automatic checks' suggestions are shown beside the buttons.
"""

from __future__ import annotations

import hmac
import re
import urllib.parse

from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from services.common.auth import token_matches
from services.common.errors import InvalidArgumentError
from services.common.library import CLASSES
from services.frontend.backends import BackendUnavailable
from services.frontend.ingestion import MARK_KEYS, MARKS, IngestionClient

bp = Blueprint("review", __name__)

# Classes a person reviews stems of (mix and excluded stems are never mixed, so never reviewed).
REVIEWED_CLASSES = tuple(c for c in CLASSES if c not in ("mix", "excluded"))


# Reviewing changes what trains: only the stack's users may, with its token as a bearer header
# (scripts) or once through the login form, which keeps a signed session cookie (browsers).
SESSION_KEY = "review_token_digest"


def _token() -> str:
    return current_app.extensions["stemlab_token"]


def _digest(token: str) -> str:
    return hmac.new(token.encode(), b"stemlab review session", "sha256").hexdigest()


def authenticated() -> bool:
    if token_matches(_token(), request.headers.get("Authorization")):
        return True
    return hmac.compare_digest(session.get(SESSION_KEY, ""), _digest(_token()))


@bp.before_request
def require_token():
    if request.endpoint in ("review.login", "review.logout") or authenticated():
        return None
    message = ("reviewing needs the stack's token: send 'Authorization: Bearer <token>' "
               "($STEMLAB_DATA/secrets/token) or log in at /login")
    if request.path.startswith("/api/"):
        return jsonify(error=message), 401
    return render_template("login.html", message=message, next=request.full_path), 401


def local_path(target: str) -> str:
    """`target` if it is a path on this site, else "": never redirect to another site. Browsers
    drop tabs and newlines and read "\\" as "/", so "/\tevil.example" or "/\\evil.example"
    would lead to evil.example; only a plain absolute path passes."""
    if not re.fullmatch(r"/(?![/\\])[\x21-\x7e]*", target or ""):
        return ""
    if "\\" in target or urllib.parse.urlsplit(target).netloc:
        return ""
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    target = local_path(request.values.get("next", "")) or url_for("review.page")
    if request.method == "POST":
        if token_matches(_token(), "Bearer " + request.form.get("token", "")):
            session.clear()
            session[SESSION_KEY] = _digest(_token())
            return redirect(target)
        return render_template("login.html", message="that is not the stack's token", next=target), 401
    return render_template("login.html", message="", next=target)


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("pages.home"))


def _client() -> IngestionClient:
    client = current_app.extensions.get("stemlab_ingestion")
    if client is None:
        settings = current_app.extensions["stemlab_settings"]
        client = IngestionClient(settings.ingestion_address, data_root=settings.data_root)
        current_app.extensions["stemlab_ingestion"] = client
    return client


def _instrument() -> str:
    instrument = (request.args.get("instrument") or "guitar").strip()
    if instrument not in REVIEWED_CLASSES:
        raise InvalidArgumentError(f"unknown instrument {instrument!r}; choose one of {', '.join(REVIEWED_CLASSES)}")
    return instrument


def _unchecked() -> bool:
    """?unchecked=1: only the tracks nobody has checked yet (what is left to review)."""
    return request.args.get("unchecked", "") in ("1", "true", "yes")


@bp.get("/review")
def page():
    instrument, unchecked = _instrument(), _unchecked()
    try:
        tracks = _client().list_tracks(instrument, unchecked)
        error = ""
    except BackendUnavailable as unavailable:
        tracks, error = [], str(unavailable)
    return render_template("review.html", instrument=instrument, tracks=tracks, error=error, unchecked=unchecked,
                           marks=MARKS, keys=MARK_KEYS, instruments=REVIEWED_CLASSES, classes=CLASSES)


@bp.get("/api/review/tracks")
def tracks():
    return jsonify(tracks=_client().list_tracks(_instrument(), _unchecked()))


@bp.get("/api/review/tracks/<track_id>")
def track(track_id: str):
    return jsonify(_client().track_review(track_id, _instrument()))


@bp.get("/api/review/tracks/<track_id>/parts/<int:part>.wav")
def part_audio(track_id: str, part: int):
    data = _client().part_audio(track_id, _instrument(), part)
    return Response(data, mimetype="audio/wav", headers={"Cache-Control": "max-age=600"})


@bp.put("/api/review/tracks/<track_id>/stems/<path:stem>/class")
def stem_class(track_id: str, stem: str):
    """Confirm or change a stem's class: JSON {"class": "guitar"} (null or "none": unmapped)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "class" not in body:
        raise InvalidArgumentError('send JSON {"class": CLASS} (null or "none" leaves the stem unmapped)')
    cls = body["class"]
    if cls in (None, "none"):
        cls = None
    elif cls not in CLASSES:
        raise InvalidArgumentError(f"unknown class {cls!r}; classes are {', '.join(CLASSES)} or none")
    return jsonify(_client().set_class(track_id, _instrument(), stem, cls))


@bp.route("/api/review/tracks/<track_id>/marks/<mark>", methods=["PUT", "DELETE"])
def mark(track_id: str, mark: str):
    client = _client()
    if request.method == "PUT":
        track = client.set_mark(track_id, _instrument(), mark)
    else:
        track = client.clear_mark(track_id, _instrument(), mark)
    return jsonify(track)

"""Turning a request (an uploaded file or a link, and a model name) into a queued separation.

Everything a person can get wrong is refused here, before anything is queued: both or neither
of file and link, an unknown or unavailable model, a link that is not http(s) or leads to a
private address, a file whose header is not audio or says it is too long, a full queue or a
full results quota. The song is decoded by the worker that separates it.
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
from pathlib import Path

from werkzeug.datastructures import FileStorage

from services.common import jobs as jobstore
from services.common.errors import InvalidArgumentError
from services.frontend import links
from services.frontend.backends import ServingModels
from services.frontend.separations import SeparationQueue, check_song
from services.frontend.settings import WebSettings


class RequestRefused(InvalidArgumentError):
    pass


def _suffix(filename: str) -> str:
    """A harmless suffix from the uploaded name (decoders with ffmpeg like a hint, never trust it)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def _title(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip()[:200]


def link_title(url: str) -> str:
    """What a person would call the song behind a link until the download names it: the file's
    name ("a song é" for ".../a%20song%20%C3%A9.mp3"), else the site."""
    parts = urllib.parse.urlsplit(url)
    name = Path(urllib.parse.unquote(parts.path)).stem
    return _title(name or parts.hostname or url)


def start_separation(settings: WebSettings, queue: SeparationQueue, models: ServingModels,
                     upload: FileStorage | None, url: str | None, model: str | None) -> jobstore.JobRecord:
    """Validate the request and queue its separation; returns the queued job."""
    has_file = upload is not None and bool(upload.filename)
    url = (url or "").strip()
    if has_file and url:
        raise RequestRefused("give either a file or a link, not both")
    if not has_file and not url:
        raise RequestRefused("give a file to upload or a link to a song")
    model = (model or "").strip()
    if not model:
        raise RequestRefused("choose a model")
    offered = models.names()
    if model not in offered:
        raise RequestRefused(f"unknown model {model!r}; models are {', '.join(offered)}")
    if model not in models.available():
        raise RequestRefused(f"model {model!r} is not available in serving right now")
    if url:
        url = links.check_url(url, settings.allow_hosts)
    queue.admit()
    name, folder = queue.new_folder()
    try:
        params = {"folder": name, "model": model}
        if url:
            params.update(url=url, title=link_title(url))
        else:
            input_name = "input" + _suffix(upload.filename)
            upload.save(folder / input_name)
            # The header (decoded only if it says too long): separating happens in the worker.
            check_song(folder / input_name, settings.max_song_seconds, settings.decode_limits)
            params.update(input=input_name, title=_title(Path(upload.filename).stem))
        return queue.submit(params)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

"""The web page: GET / (the page) and GET /web/<file> (its script and style), files shipped in app/api/web/.

Plain files, no build step and nothing fetched from elsewhere, so the page works offline. Open paths (see
app/api/security.py): the page holds no secret; the caller types a key into it and it sends that as Bearer.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Request, Response

from app.errors import NotFoundError

router = APIRouter(tags=["web page"])

WEB_DIR = Path(__file__).resolve().parent / "web"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# One plain name from the folder: no separators, no dot files, no other kinds of file.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(?:html|js|css|svg|png|ico)")
_HEADERS = {
    # The file names carry no content hash (no build step), so browsers keep a copy but ask again each time
    # (a 304 when unchanged): after an upgrade the page and its script never disagree.
    "Cache-Control": "no-cache",
    # Only our own script and style run, and the page talks only to this server: an answer or a document
    # passage that carries markup cannot load or run anything even if some code path showed it as HTML.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@router.get("/", include_in_schema=False)
def index(request: Request) -> Response:
    """The web page: ask questions, see the answer as it is written and the passages it came from."""
    return _serve("index.html", request)


@router.get("/web/{name}", include_in_schema=False)
def web_file(name: str, request: Request) -> Response:
    """One of the web page's files (`app.js`, `style.css`)."""
    return _serve(name, request)


def _serve(name: str, request: Request) -> Response:
    path = _web_file(name)
    content = path.read_bytes()  # a few kB; the route is sync, so FastAPI reads it in its thread pool
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    headers = {**_HEADERS, "ETag": etag}
    if etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=_CONTENT_TYPES[path.suffix], headers=headers)


def _web_file(name: str) -> Path:
    """The file `name` directly in WEB_DIR, a regular file and not a link, or NotFoundError."""
    if _NAME.fullmatch(name):
        path = WEB_DIR / name
        if not path.is_symlink() and path.is_file() and path.resolve().parent == WEB_DIR:
            return path
    raise NotFoundError("no such file in the web page; the page is at /")


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}

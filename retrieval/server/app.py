"""The ASGI app: `create_app(root, ...)` -> FastAPI, a thin layer over the API the CLI uses.

Routes that read the library or decode images are plain `def`s: FastAPI runs them in its
threadpool, so a long dedup search or an upload being embedded never blocks the event loop, and
several browsers are served at once. Apply and undo run as background jobs (jobs.py).
Every error is `{"detail": "one line"}` with a 4xx status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Annotated

from dinoseek.indexer.errors import IndexerError, LibraryLockedError, NotIndexedError
from dinoseek.indexer.errors import InvalidArgumentError as IndexerArgumentError
from dinoseek.indexer.library import Library
from dinoseek.model.errors import ModelError
from dinoseek.retrieval.errors import InvalidArgumentError, JournalError, QueryError
from fastapi import FastAPI, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from . import api_dedup, api_search
from .docs import add_docs
from .files import FileNotServed, file_chunks, media_type, served_file
from .groups import GroupCache, StaleReviewError
from .jobs import Jobs
from .responses import JSONResponse
from .library_access import LibraryPlace, Reader
from .pages import CONTENT_SECURITY_POLICY, page
from .security import HEADERS, Security
from .thumbnails import SIDES as THUMBNAIL_SIDES
from .thumbnails import ThumbnailError, Thumbnails

log = logging.getLogger(__name__)

UPLOAD_LIMIT = 50 * 1000 * 1000  # bytes of an image uploaded to search by
BODY_LIMIT = 16 * 1000 * 1000  # any other request body (a reviewed plan of 10,000 groups is ~1 MB)
UPLOAD_PATH = "/api/search"
# A catalog id as SQLite can bind it (a signed 64-bit integer); anything else names no photo (404).
CatalogId = Annotated[int, FastAPIPath(ge=1, le=2**63 - 1, description="Catalog id of the photo")]
# Photos are for this server's pages only: another site may not embed them (<img> from elsewhere).
MEDIA_HEADERS = {"Cross-Origin-Resource-Policy": "same-origin"}


class ServerState:
    """What every route shares: where the library is, its reader, caches, jobs and security."""

    def __init__(self, place: LibraryPlace, security: Security, upload_limit: int) -> None:
        self.place, self.security, self.upload_limit = place, security, upload_limit
        self.reader = Reader(place)
        self.groups = GroupCache()
        self.jobs = Jobs()
        # Taking the writer lock is serialised here: the lock's own in-process check (indexer.lock,
        # POSIX locks do not conflict inside one process) is not atomic between two threads.
        self.taking_writer = threading.Lock()

    def writer(self) -> Library:
        """A handle to write "not a duplicate" marks through. Without the library's writer lock, as
        `dinoseek mark-distinct`: marks work while `dinoseek index` or an apply job runs (SQLite
        orders the small writes; a catalog kept busy past its timeout is a 409, nothing changed)."""
        return self.place.open()


def create_app(root: str | Path, *, library_dir: str | Path | None = None, url: str | None = None,
               model: str | None = None, weights: str | Path | None = None, device: str = "cpu",
               precision: str = "auto", host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
               allowed_hosts: tuple[str, ...] = (), upload_limit: int = UPLOAD_LIMIT) -> FastAPI:
    """The app for the library of photo folder `root` (opened here: a missing library fails now,
    not on the first request). `host`/`port` are where it is served (the Host check and the token
    rule: off loopback a token is required); `allowed_hosts` adds Host names (a reverse proxy)."""
    place = LibraryPlace(Path(root).expanduser(), Path(library_dir) if library_dir else None, url, model,
                         Path(weights) if weights else None, device, precision)
    state = ServerState(place, Security.for_binding(host, port, token, allowed_hosts), upload_limit)
    state.reader.search()  # fails here (NotIndexedError, ...) rather than on every request

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        running = state.jobs.running()
        if running is not None and running.thread is not None:  # never cut an apply or undo short
            log.warning("waiting for the running %s to finish", running.kind)
            running.thread.join()
        state.reader.close()

    # /docs is served by add_docs with Swagger UI's files from this server (no CDN); no /redoc.
    app = FastAPI(title="dinoseek", summary="Search and de-duplicate a photo library", lifespan=lifespan,
                  docs_url=None, redoc_url=None, default_response_class=JSONResponse)
    app.state.server = state
    app.state.csrf_token = state.security.csrf
    _guard(app, state)
    _errors(app)
    _pages_and_files(app, state)
    add_docs(app)
    app.include_router(api_search.router)
    app.include_router(api_dedup.router)
    return app


def _guard(app: FastAPI, state: ServerState) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        refusal = state.security.refusal(request) or _body_refusal(request, state.upload_limit)
        if refusal is not None:
            return refusal
        response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if response.headers.get("content-type", "").startswith("text/html"):  # /docs and any other page
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


def _body_refusal(request: Request, upload_limit: int) -> Response | None:
    """Bodies are bounded before they are read: Starlette would spool any upload to disk first."""
    if request.method in ("GET", "HEAD"):
        return None
    length = request.headers.get("content-length")
    if length is None:
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            return _json(411, "send a Content-Length with the request body")
        return None
    limit = upload_limit + 64 * 1024 if request.url.path == UPLOAD_PATH else BODY_LIMIT  # + multipart framing
    if not length.isdigit() or int(length) > limit:
        return _json(413, f"request body over the limit of {limit:,} bytes")
    return None


def _json(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=HEADERS)


def _errors(app: FastAPI) -> None:
    """The project's typed errors -> one-line JSON answers (as the CLI's `Error: ...` lines)."""
    statuses = [(RequestValidationError, 400), (InvalidArgumentError, 400), (IndexerArgumentError, 400),
                (QueryError, 400), (FileNotServed, 404), (NotIndexedError, 404), (ThumbnailError, 422),
                (LibraryLockedError, 409), (StaleReviewError, 409), (JournalError, 409), (ModelError, 400),
                (IndexerError, 500), (SQLAlchemyError, 503),
                (OverflowError, 400)]  # a number in the request too big to bind in SQLite (an id over int64)

    def one_line(exc: Exception) -> str:
        if isinstance(exc, RequestValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
            return f"{where}: {first.get('msg', 'invalid')}"
        if isinstance(exc, LibraryLockedError):
            return f"the library is busy: {exc}"
        if isinstance(exc, OverflowError):
            return f"a number in the request is out of range: {exc}"
        if isinstance(exc, SQLAlchemyError):
            return "catalog error: " + str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return (str(exc).splitlines() or [type(exc).__name__])[0]

    for error_type, status in statuses:
        def handler(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            if isinstance(exc, RequestValidationError) and any(e.get("loc", ())[:1] == ("path",) for e in exc.errors()):
                return _json(404, "not found: files and photos are named by their catalog id only")
            return _json(status, one_line(exc))

        app.add_exception_handler(error_type, handler)

    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything else is a bug: the traceback goes to the server's log, the client gets one JSON
        # line with the same security headers as every other answer (not Starlette's plain text).
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _json(500, "internal error: " + one_line(exc))

    app.add_exception_handler(Exception, unexpected)


def _pages_and_files(app: FastAPI, state: ServerState) -> None:
    page_headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-store"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def review_page() -> HTMLResponse:
        return HTMLResponse(page("review", state.security.csrf), headers=page_headers)

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> HTMLResponse:
        return HTMLResponse(page("search", state.security.csrf), headers=page_headers)

    @app.get("/api/info", summary="Library info, as `dinoseek info --json`")
    def info() -> JSONResponse:
        # As `dinoseek info --json` prints it: dates and paths as strings.
        return JSONResponse(json.loads(json.dumps(state.reader.search().library.info(), default=str)))

    @app.get("/thumb/{row_id}", summary="A thumbnail (JPEG, upright) of the photo with this catalog id",
             response_class=Response)
    def thumbnail(row_id: CatalogId, size: int = Query(256, ge=1, le=100_000, description=
                  f"Long side in pixels, served as the nearest of {', '.join(map(str, THUMBNAIL_SIDES))} at or above it")
                  ) -> Response:
        library = state.reader.search().library
        photo = served_file(library, row_id)
        data = Thumbnails(library.folder).get(photo, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300", **MEDIA_HEADERS})

    @app.get("/image/{row_id}", summary="The full-size photo with this catalog id", response_class=Response)
    def image(row_id: CatalogId) -> StreamingResponse:
        photo = served_file(state.reader.search().library, row_id)
        return StreamingResponse(file_chunks(photo), media_type=media_type(photo.format),
                                 headers={"Content-Security-Policy": "default-src 'none'", "Cache-Control": "private",
                                          **MEDIA_HEADERS})

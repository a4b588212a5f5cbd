"""Search routes: by upload, by an indexed image's id, and `similar` — the Python API's answers.

Same filters as the CLI (`--folder --after --before --camera --min-pixels --min-bytes --max-bytes`),
validated by the same `Filters` (a bad date is a 400 naming the accepted forms).
"""

from __future__ import annotations

import os
import tempfile
from typing import Annotated, Literal

from dinoseek.indexer.catalog_gateway import Filters
from dinoseek.retrieval.api import Hit
from dinoseek.retrieval.errors import QueryError
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile

router = APIRouter(prefix="/api", tags=["search"])

Kind = Literal["cls", "patch", "both"]
TopK = Annotated[int, Query(ge=1, le=10_000, description="Number of results.")]


def search_filters(request: Request, folder: str | None = None, after: str | None = None,
                   before: str | None = None, camera: str | None = None, min_pixels: int | None = Query(None, ge=0),
                   min_bytes: int | None = Query(None, ge=0), max_bytes: int | None = Query(None, ge=0)) -> Filters:
    """The CLI's filter options as query parameters (folder: relative to ROOT; after/before:
    YYYY-MM-DD, YYYY/MM/DD or YYYY-MM-DDTHH:MM[:SS]; before is exclusive). A folder that does not
    exist under ROOT is a 400, as `--folder` is an error in the CLI, not an empty result."""
    if folder:
        root = os.path.realpath(request.app.state.server.place.root)
        found = os.path.realpath(os.path.join(root, folder.strip("/")))
        if os.path.commonpath([root, found]) != root or not os.path.isdir(found):
            raise HTTPException(400, f"folder: no such folder under the library's photo folder: {folder}")
    return Filters(folder=folder or None, captured_after=after or None, captured_before=before or None,
                   camera=camera or None, min_pixels=min_pixels, min_bytes=min_bytes, max_bytes=max_bytes)


SearchFilters = Annotated[Filters, Depends(search_filters)]


def hits_json(hits: list[Hit]) -> dict:
    return {"hits": [{**hit.to_dict(), "folder": os.path.dirname(hit.path)} for hit in hits]}


def _reader(request: Request):
    return request.app.state.server.reader


@router.get("/search", summary="Photos most similar to an indexed one (itself first)")
def search_by_id(request: Request, id: int, filters: SearchFilters, k: TopK = 10, kind: Kind = "cls") -> dict:
    library = _reader(request).search()
    try:
        _, vector = library.row_vector(id, kind)
    except QueryError as e:
        raise HTTPException(404, f"no embedded photo with id {id}") from e
    return hits_json(library.search(vector, k=k, kind=kind, filters=filters))


@router.get("/similar/{row_id}", summary="Photos most similar to an indexed one (itself left out)")
def similar(request: Request, row_id: int, filters: SearchFilters, k: TopK = 10, kind: Kind = "cls") -> dict:
    library = _reader(request).search()
    try:
        hits = library.similar(row_id, k=k, kind=kind, filters=filters)
    except QueryError as e:
        raise HTTPException(404, f"no embedded photo with id {row_id}") from e
    return hits_json(hits)


@router.post("/search", summary="Photos most similar to an uploaded image (multipart field `image`)")
def search_by_upload(request: Request, image: Annotated[UploadFile, File()], filters: SearchFilters,
                     k: TopK = 10, kind: Kind = "cls") -> dict:
    state = request.app.state.server
    name = image.filename or "upload"
    # The upload goes through the same file path as `dinoseek search FILE` (indexer.decode: the pixel
    # cap, the format allowlist, EXIF orientation), so the same bytes give the same vector.
    with tempfile.TemporaryDirectory(prefix="dinoseek-upload-") as folder:
        path = os.path.join(folder, "query")
        copied = 0
        with open(path, "wb") as out:
            while block := image.file.read(1 << 20):
                copied += len(block)
                if copied > state.upload_limit:
                    raise HTTPException(413, f"{name}: over the upload limit of {state.upload_limit:,} bytes")
                out.write(block)
        searcher = state.reader.with_encoder()
        try:
            hits = searcher.search(path, k=k, kind=kind, filters=filters)
        except QueryError as e:
            reason = getattr(e.__cause__, "reason", None) or str(e)
            raise HTTPException(400, f"{name} is not an image that can be searched by: {reason}") from e
    return hits_json(hits)

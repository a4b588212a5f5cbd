"""Duplicate routes: groups for a threshold, "not a duplicate" marks, apply, undo, job progress.

Only apply, undo and marks take the library's writer lock, each for its own time; a second writer
(this server or `dinoseek index`/`dedup --apply` elsewhere) gets 409 with the holder's pid.
Apply goes through the same journaled `actions.apply` as `dinoseek dedup --apply`, which re-checks
every file before it moves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from dinoseek.retrieval import actions
from dinoseek.retrieval.dedup import DEFAULT_THRESHOLD
from dinoseek.retrieval.errors import InvalidArgumentError
from dinoseek.retrieval.marks import ids_to_sha_pairs
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from .groups import group_json, reviewed
from .jobs import JobFailed

router = APIRouter(prefix="/api", tags=["duplicates"])

Action = Literal["move", "hardlink", "symlink"]
MAX_LIMIT = 500
# Every pair among the ids is marked: 200 ids are 19,900 pairs, 10,000 would be 50 million rows.
MAX_MARK_IDS = 200


class Ids(BaseModel):
    ids: list[int] = Field(min_length=2, description=f"Catalog ids (2..{MAX_MARK_IDS}): every pair of different "
                                                     f"contents among them; byte-identical pairs are left out.")


class ReviewedPlan(BaseModel):
    threshold: float = Field(DEFAULT_THRESHOLD, gt=0, le=1)
    action: Action = "move"
    keepers: dict[str, int] = Field(default_factory=dict, description="group key -> the member id to keep")
    skip: list[str] = Field(default_factory=list, description="keys of groups to leave alone")
    version: str = Field(description="`version` of the groups the page reviewed (GET /api/groups): if the groups "
                                     "changed since, 409 instead of acting on groups nobody saw")
    groups: list[str] = Field(description="keys of the groups the page showed (every page visited): only these are "
                                          "acted on; the other groups at the threshold are left alone")
    crops: Literal[False] = False  # --crops re-ranking is the CLI's only (it re-reads files with the model)


class UndoRequest(BaseModel):
    journal: str | None = Field(None, description="Journal file name (default: the newest not undone).")


def _state(request: Request):
    return request.app.state.server


@router.get("/groups", summary="Duplicate groups at a threshold, a page at a time, and what applying them frees")
def groups(request: Request, threshold: float = Query(DEFAULT_THRESHOLD, gt=0, le=1), action: Action = "move",
           offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> dict:
    state = _state(request)
    reader, token = state.reader.current()
    plan = state.groups.plan(reader.library, token, threshold, action)
    shown = zip(plan.keys[offset:offset + limit], plan.groups[offset:offset + limit])
    return {"threshold": threshold, "action": action, "version": plan.version, "total_groups": len(plan.groups),
            "offset": offset, "limit": limit, "summary": plan.summary,
            "groups": [group_json(g, key, action) for key, g in shown]}


@router.post("/marks", summary='Mark every pair of these photos\' contents "not a duplicate"')
def mark(request: Request, body: Ids) -> dict:
    return {"marked": _marks(request, body.ids, "mark_not_duplicate")}


@router.post("/marks/remove", summary='Remove the "not a duplicate" marks between these photos\' contents')
def unmark(request: Request, body: Ids) -> dict:
    return {"removed": _marks(request, body.ids, "unmark_not_duplicate")}


def _marks(request: Request, ids: list[int], method: str) -> int:
    """Marks are pairs of contents (sha256), so they survive renames and re-indexing (retrieval.marks).
    Every pair of different contents among the photos: a group mixing byte copies and near duplicates
    marks only the pairs between different contents; ids that are all one content are a 400."""
    if len(ids) > MAX_MARK_IDS:
        raise InvalidArgumentError(f"must name at most {MAX_MARK_IDS} photos (every pair among them is marked), "
                                   f"got {len(ids)}", argument="ids")
    state = _state(request)
    with state.writer() as library:
        pairs = ids_to_sha_pairs(library, ids, refuse_identical=False)  # identical contents are one sha: no pair
        if not pairs and method == "mark_not_duplicate":
            raise InvalidArgumentError("these photos have identical bytes: byte-identical copies are always "
                                       "duplicates and cannot be marked as not duplicates (skip the group instead)")
        changed = getattr(library.catalog, method)(pairs)
    state.reader.wrote()
    return changed


@router.post("/apply", status_code=202, summary="Apply a reviewed plan as a background job")
def apply(request: Request, body: ReviewedPlan) -> dict:
    state = _state(request)
    with state.taking_writer:  # one apply or undo starts at a time
        _refuse_if_busy(state)
        library = state.place.open(write=True)  # LibraryLockedError -> 409, naming the holder
    try:
        reader, token = state.reader.current()  # groups from the reader's indexes, as GET /api/groups built them
        plan = state.groups.plan(reader.library, token, body.threshold, body.action)
        chosen = reviewed(plan, body.keepers, body.skip, body.version, body.groups)

        planned = sum(len(g.others) for g in chosen)

        def work() -> dict:
            result = actions.apply(library, chosen, body.action)
            return {**result.to_dict(library.root), "planned": planned}

        job = state.jobs.start("apply", work, cleanup=lambda: _close(state, library), total=planned)
    except BaseException:
        library.close()
        raise
    return {"job": job.id}


@router.post("/undo", status_code=202, summary="Undo an apply (default: the newest not undone) as a background job")
def undo(request: Request, body: UndoRequest) -> dict:
    state = _state(request)
    with state.taking_writer:
        _refuse_if_busy(state)
        library = state.place.open(write=True)
    try:
        journal = None if body.journal is None else _journal_path(library, body.journal)

        def work() -> dict:
            try:
                result = actions.undo(library, journal)
            except actions.UndoIncomplete as e:
                raise JobFailed(f"{len(e.result.problems)} file(s) not restored; their quarantined copies were "
                                f"left as they are", _undo_json(e.result, library.root)) from e
            return _undo_json(result, library.root)

        job = state.jobs.start("undo", work, cleanup=lambda: _close(state, library))
    except BaseException:
        library.close()
        raise
    return {"job": job.id}


@router.get("/jobs/{job_id}", summary="Progress and result of an apply or undo")
def job(request: Request, job_id: str) -> dict:
    found = _state(request).jobs.get(job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    return found.to_dict()


def _refuse_if_busy(state) -> None:
    running = state.jobs.running()
    if running is not None:
        raise HTTPException(409, f"another {running.kind} is running on this server; try again when it has finished")


def _close(state, library) -> None:
    library.close()
    state.reader.wrote()


def _journal_path(library, name: str):
    """A journal by file name only, inside the library's journals folder (never a path from the request)."""
    if not name or name != os.path.basename(name) or name.startswith(".") or "\\" in name:
        raise HTTPException(400, "journal: give the journal's file name, without folders (as the journal list shows it)")
    path = library.folder / "journals" / name
    if not path.is_file():
        raise HTTPException(404, f"no journal {name}")
    return path


def _undo_json(result: actions.UndoResult, root: Path) -> dict:
    """UndoResult as JSON, photo paths relative to the root as the plan shows them."""
    def shown(path) -> str:
        text = str(path)
        return text[len(str(root)) + 1:] if text.startswith(f"{root}{os.sep}") else text

    return {"journal": None if result.journal is None else result.journal.name,
            "restored": [shown(p) for p in result.restored],
            "sidecars": [shown(s) for s in getattr(result, "sidecars", [])], "not_in_catalog": result.not_in_catalog,
            "problems": [str(p) for p in result.problems], "accepted": [str(a) for a in result.accepted]}

"""What an indexing run will do, decided from the catalog's state and a scan alone.

Pure: no files are read, no torch, no FAISS. `make_plan` turns the rows the catalog knows and the
items a scan yields into the files to read, the problems to record and the rows that are candidates
for the sweep; `sweep_decision` applies the mass-delete guard once the run has matched moved files.
The local executor (`pipeline.run_index`) runs a plan; a distributed run executes the same plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .catalog import EMBEDDED, QUARANTINED
from .errors import LibraryError, SweepRefusedError
from .scan import ScanEntry, ScanProblem, included

# Which path of a file with several paths (hard links, followed symlinks) keeps its row: the one the
# catalog embeds, then new paths, last a path dedup set aside — where it left a link to the keeper.
_PATH_RANK = {EMBEDDED: 0, QUARANTINED: 2}
# A sweep that would delete more than this share of a library stops: the disk is probably unmounted.
MASS_DELETE_FRACTION = 0.5
MASS_DELETE_MIN = 20  # small libraries may legitimately lose most files


class RowState(Protocol):
    """What a run knows of one catalog row (`Catalog.file_states`)."""

    id: int
    size: int
    mtime_ns: int
    status: str
    sha256: str | None
    usable: bool


@dataclass(frozen=True)
class Task:
    """A file to read this run: its path relative to the root, and size and mtime as scanned."""

    rel: bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Plan:
    """A run's decisions; picklable, so another process (a distributed run) can execute it. Its
    mappings are read-only by convention: an executor copies what it consumes."""

    catalogued: int  # rows the catalog held when the run began
    scanned: int  # paths the scan reported (files and problems)
    to_read: tuple[Task, ...]  # new, changed or to be re-checked: decoded, then embedded or recorded
    problems: tuple[ScanProblem, ...]  # to record: new, or changed since the last run
    missing: Mapping[bytes, RowState]  # path -> row not seen where this run looked: swept unless moved
    moved_from: Mapping[str, bytes]  # sha256 -> missing embedded path: a file read now with it moved
    returned: Mapping[bytes, str]  # quarantined path -> sha256 of its row: a file there again
    unlisted: tuple[bytes, ...]  # folders that could not be listed ("dir/"): nothing under them is missing

    @property
    def known_hashes(self) -> frozenset[str]:
        """Hashes whose pixels need no decoding: a moved file or a quarantined one put back."""
        return frozenset(self.moved_from) | frozenset(self.returned.values())


def path_rank(catalog_state: Mapping[bytes, RowState]) -> Callable[[bytes], int]:
    """The scan's `rank`: the path the catalog embeds keeps a file with several paths."""
    def rank(rel: bytes) -> int:
        return _PATH_RANK.get(catalog_state[rel].status, 1) if rel in catalog_state else 1
    return rank


def set_aside(catalog_state: Mapping[bytes, RowState]) -> Callable[[bytes], bool]:
    """The scan's `set_aside`: paths whose rows dedup set aside (a symlink it left may sit there)."""
    def is_set_aside(rel: bytes) -> bool:
        return rel in catalog_state and catalog_state[rel].status == QUARANTINED
    return is_set_aside


def make_plan(
    catalog_state: Mapping[bytes, RowState],
    scan_items: Iterable[ScanEntry | ScanProblem],
    *,
    retry_statuses: Iterable[str],
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    allow_mass_delete: bool = False,
    root: object = "the library root",
) -> Plan:
    """Compare a scan with the catalog. Raises LibraryError when the root itself cannot be read and
    SweepRefusedError when it is empty but the catalog is not (unless `allow_mass_delete`); `root`
    only names the folder in those messages."""
    retry = frozenset(retry_statuses)
    seen: set[bytes] = set()
    tasks: list[Task] = []
    problems: list[ScanProblem] = []
    unlisted: list[bytes] = []
    returned: dict[bytes, str] = {}
    for item in scan_items:
        seen.add(item.rel)
        row = catalog_state.get(item.rel)
        if isinstance(item, ScanProblem):
            if item.rel == b"":
                raise LibraryError(f"cannot read {root}: {item.reason}")
            if item.status == "unreadable":
                unlisted.append(item.rel + b"/")
            if _records_problem(row, item):
                problems.append(item)
        elif needs_reading(row, item, retry):
            if row is not None and row.status == QUARANTINED and row.sha256 and row.usable:
                returned[item.rel] = row.sha256  # the same bytes get their row and vectors back
            tasks.append(Task(item.rel, item.size, item.mtime_ns))
    if catalog_state and not seen and not allow_mass_delete:
        raise SweepRefusedError(f"{root} is empty but the library knows {len(catalog_state)} files; is the disk "
                                f"mounted? Nothing was changed")
    missing = _missing(catalog_state, seen, tuple(unlisted), include, exclude)
    moved_from = {row.sha256: path for path, row in missing.items()
                  if row.status == EMBEDDED and row.sha256 and row.usable}
    return Plan(len(catalog_state), len(seen), tuple(tasks), tuple(problems), missing, moved_from, returned,
                tuple(unlisted))


def _records_problem(row: RowState | None, item: ScanProblem) -> bool:
    if row is not None and row.status == QUARANTINED and item.status == "linked":
        return False  # the link dedup left at a duplicate's old path: the row stays quarantined
    return row is None or row.status != item.status  # already recorded: leave the row alone


def _missing(catalog_state: Mapping[bytes, RowState], seen: set[bytes], unlisted: tuple[bytes, ...],
             include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[bytes, RowState]:
    """Only paths this run looked for can be missing: not those under folders that could not be
    listed, nor those the --include/--exclude filters leave out."""
    return {
        path: row for path, row in catalog_state.items()
        if path not in seen and not path.startswith(unlisted or (b"\0",)) and included(path, include, exclude)
    }


def needs_reading(row: RowState | None, item: ScanEntry, retry: Iterable[str]) -> bool:
    """Whether a scanned file must be decoded: it is new or changed (size, mtime), its last failure
    may have gone away, its row lost its vectors, or it is a quarantined path that is a file of its
    own again — put back by hand (a rename keeps size and mtime), so its row must be re-checked."""
    if row is None or (row.size, row.mtime_ns) != (item.size, item.mtime_ns):
        return True
    if row.status == EMBEDDED:
        return not row.usable
    return row.status in retry or row.status == QUARANTINED


def sweep_decision(
    plan: Plan,
    moved: Iterable[bytes] = (),
    *,
    allow_mass_delete: bool = False,
    catalogued: int | None = None,
    root: object = "the library root",
) -> list[int]:
    """Ids of the rows to delete: the plan's missing rows less the old paths of files matched as
    moved, and less the rows dedup set aside: their files wait in the quarantine, and the rows stay
    (vectors and all) until `undo` brings the files back or `purge` deletes them. The guard runs
    after moves were matched (reorganising folders is not a mass deletion). `catalogued` is the
    library size the share is taken of (default: the rows at the start of the run)."""
    moved = set(moved)
    gone = [row for path, row in plan.missing.items() if path not in moved]
    total = plan.catalogued if catalogued is None else catalogued
    vanished = sum(1 for row in gone if row.status != QUARANTINED)
    if vanished > MASS_DELETE_FRACTION * total and vanished >= MASS_DELETE_MIN and not allow_mass_delete:
        raise SweepRefusedError(
            f"{vanished} of {total} catalogued files are gone from {root}; is the disk mounted? Nothing was deleted"
        )
    return [row.id for row in gone if row.status != QUARANTINED]

""""Not a duplicate" marks: photos the user said are different, whatever their similarity.

A mark is a pair of contents (sha256), kept in the catalog (revision 0005, `Catalog.mark_not_duplicate`),
so it survives renames, moves and re-indexing and covers every byte copy of either photo. Marking
several photos at once marks every pair among them (a whole group: no two of them are duplicates).
Byte-identical photos cannot be marked: identical bytes are a duplicate by definition.

`drop_marked` removes marked pairs from dedup's candidate pairs before grouping, so complete linkage
never puts two marked photos in one group (a group of three whose two members are marked splits).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dinoseek.indexer.catalog import EMBEDDED
from dinoseek.indexer.catalog_gateway import not_duplicate_key
from dinoseek.indexer.library import Library
from dinoseek.indexer.paths import under_root

from .errors import InvalidArgumentError

# Candidate pairs looked up together: one query for their rows' sha256 and one for the marks among
# them, instead of two per pair.
MARK_BATCH = 4096


def ids_to_sha_pairs(library: Library, ids: Iterable[int], *, refuse_identical: bool = True) -> list[tuple[str, str]]:
    """Every pair of contents among the embedded photos with these catalog ids, ordered (sha_a < sha_b),
    sorted, each once. InvalidArgumentError for fewer than two photos, an id that is not an embedded
    photo, or (unless refuse_identical=False, for removing marks) two photos with identical bytes."""
    wanted = []
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(f"photo ids are integers, got {value!r}", argument="ids")
        wanted.append(int(value))
    found = library.catalog.contents_by_id(wanted)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise InvalidArgumentError(f"no embedded photo with id {', '.join(map(str, missing))}", argument="ids")
    return _pairs([(text, sha) for sha, text in found.values()], refuse_identical)


def paths_to_sha_pairs(library: Library, paths: Iterable[str | bytes | os.PathLike], *,
                       refuse_identical: bool = True) -> list[tuple[str, str]]:
    """Like ids_to_sha_pairs, for photo paths as the user types them (absolute, relative to the current
    folder or to the library's root, as `similar` takes them)."""
    relative = {_relative(library.root, path): path for path in paths}
    rows = library.catalog.rows_at(list(relative))
    named = []
    for raw, given in relative.items():
        sha, status = rows.get(raw, (None, None))
        if status != EMBEDDED:
            raise InvalidArgumentError(f"{os.fsdecode(given)} is not an indexed photo of {library.root}"
                                       + (f" (its status is {status})" if status else ""))
        named.append((os.fsdecode(raw), sha))
    return _pairs(named, refuse_identical)


def _relative(root: Path, path) -> bytes:
    """A typed photo path as the catalog's raw path relative to the root (symlinked folders resolved
    where the path exists), as LibrarySearch finds a row for `similar`."""
    raw = os.fsencode(under_root(root, path))
    return os.path.normpath(os.path.relpath(os.path.realpath(raw) if os.path.exists(raw) else raw, os.fsencode(root)))


def _pairs(named: list[tuple[str, str | None]], refuse_identical: bool) -> list[tuple[str, str]]:
    """(name, sha256) of each photo -> every pair of different contents among them."""
    if len(named) < 2:
        raise InvalidArgumentError(f"marking needs at least two different photos, got {len(named)}")
    for name, sha in named:
        if not sha:  # rows get their sha256 when embedded; one without is not a content that can be named
            raise InvalidArgumentError(f"{name} has no recorded sha256 yet; index the library first")
    if refuse_identical:
        first: dict[str, str] = {}
        for name, sha in sorted(named):
            if sha in first:
                raise InvalidArgumentError(f"{first[sha]} and {name} have identical bytes: byte-identical copies are "
                                           f"always duplicates and cannot be marked as not duplicates")
            first[sha] = name
    shas = sorted({sha for _, sha in named})
    return [not_duplicate_key(a, b) for a, b in itertools.combinations(shas, 2)]


def drop_marked(pairs: Iterable[tuple], library: Library, *, batch: int = MARK_BATCH) -> Iterator[tuple]:
    """The candidate pairs (id_a, id_b, score, ...) whose two photos are not marked "not a duplicate",
    in their order. Lazy, `batch` pairs at a time, so a stream of candidates stays a stream; a library
    without marks costs one query. A pair whose row is gone (an index run since) passes: grouping
    drops rows that are no longer there."""
    catalog = library.catalog
    if not catalog.has_not_duplicate_marks():
        yield from pairs
        return
    pairs = iter(pairs)
    while chunk := list(itertools.islice(pairs, batch)):
        contents = catalog.contents_by_id({i for pair in chunk for i in pair[:2]})
        sha = {row_id: digest for row_id, (digest, _) in contents.items() if digest}
        marked = catalog.marked_among(sha.values())
        for pair in chunk:
            a, b = sha.get(pair[0]), sha.get(pair[1])
            if a is None or b is None or a == b or (min(a, b), max(a, b)) not in marked:
                yield pair

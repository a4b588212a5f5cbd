"""Catalog rows whose content cannot be trusted, for `verify` (report) and `verify --repair` (drop).

SQLite keeps no checksums, so this uses the redundancy there is: a row's raw path and its two
printable forms must agree, and an embedded row's vectors must be present, of the model's length,
finite, of unit norm, and equal to the float32 copy an exact (Flat) index holds.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from .catalog import EMBEDDED, KINDS
from .catalog_gateway import Catalog, vectors_from_blobs
from .decode import display_path
from .store import VectorIndex

# Storing a unit vector as float16 moves its norm by ~5e-4; a damaged vector is usually far off.
NORM_TOLERANCE = 1e-2
VERIFY_BLOCK = 4096  # rows per read when verify checks every vector

_DAMAGE = {
    "path": "have a damaged path (its raw and printable forms disagree)",
    "missing": "have no vectors",
    "length": "have vectors of another length than the model's {dim}",
    "not finite": "have vectors that are not finite numbers",
    "not unit": "have vectors that are not of unit length",
    "differs from index": "have vectors that differ from the exact index's copy",
}


def damaged_rows(catalog: Catalog, indexes: dict[str, VectorIndex | None] | None = None) -> dict[int, str]:
    """Rows whose content cannot be trusted -> why: "path" (raw and printable forms disagree),
    "missing", "length", "not finite", "not unit" (an embedded row's vectors), or "differs from
    index" (not equal to the copy an exact index in `indexes` holds — which finds any change to a
    stored value)."""
    dim = catalog.dim()
    exact = {kind: (index, set(index.ids().tolist())) for kind, index in (indexes or {}).items()
             if index is not None and index.is_exact()}
    damaged: dict[int, str] = {}
    for rows in catalog.check_blocks(VERIFY_BLOCK):
        for row_id, path, text, folder, *_ in rows:
            printed = [t if isinstance(t, bytes) else t.encode() for t in (text, folder)]
            if printed != [display_path(path).encode(), display_path(os.path.dirname(path)).encode()]:
                damaged[row_id] = "path"
        embedded = [r for r in rows if r.status == EMBEDDED]
        for position, kind in enumerate(KINDS, 5):  # cls and patch are the 6th and 7th columns
            if dim is None:
                break
            for row_id, why in _vector_problems([(r[0], r[position]) for r in embedded], dim, exact.get(kind)):
                damaged.setdefault(row_id, why)
    return damaged


def _vector_problems(rows: list[tuple[int, bytes | None]], dim: int, exact) -> list[tuple[int, str]]:
    """(id, why) for each damaged vector among (id, float16 blob) rows; `exact` is (a Flat index,
    its ids) to compare with, or None."""
    out = [(row_id, "missing" if blob is None else "length") for row_id, blob in rows
           if blob is None or len(blob) != 2 * dim]
    good = [(row_id, blob) for row_id, blob in rows if blob is not None and len(blob) == 2 * dim]
    if not good:
        return out
    ids = np.array([row_id for row_id, _ in good], dtype=np.int64)
    vectors = vectors_from_blobs([blob for _, blob in good], dim)  # (N, dim)
    with np.errstate(all="ignore"):
        finite = np.isfinite(vectors).all(axis=1)
        unit = np.abs(np.linalg.norm(vectors, axis=1) - 1) <= NORM_TOLERANCE
    same = np.ones(len(ids), dtype=bool)
    if exact is not None:
        index, indexed = exact
        present = np.array([i in indexed for i in ids.tolist()], dtype=bool)
        if present.any():
            stored = index.reconstruct(ids[present])  # (n, dim) float32
            same[present] = (stored == vectors[present]).all(axis=1)  # -0.0 == 0.0: numerically equal
    for row_id, is_finite, is_unit, is_same in zip(ids.tolist(), finite, unit, same):
        if not (is_finite and is_unit and is_same):
            out.append((row_id, "not finite" if not is_finite else "not unit" if not is_unit else "differs from index"))
    return out


def describe_damage(damaged: dict[int, str], dim: int | None) -> list[str]:
    """One line per kind of damage, with a few of the ids and what to do."""
    problems = []
    for why, count in sorted(Counter(damaged.values()).items()):
        ids = sorted(i for i, w in damaged.items() if w == why)
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        rows = "rows" if why == "path" else "embedded rows"
        problems.append(f"{count} {rows} {_DAMAGE[why].format(dim=dim)} (ids {shown}); a repair drops them "
                        f"and the next index run reads their files again")
    return problems

"""Duplicate groups over a whole library: identical bytes, and near duplicates by similarity."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from dinoseek.indexer.library import Library
from dinoseek.indexer.paths import under_root
from dinoseek.indexer.store import VectorIndex, ivf_lists, trained_ivf_flat, training_sample
from dinoseek.indexer.tuning import DEDUP_BLOCK, DEDUP_NPROBE, EXACT_PAIRS_MAX
from dinoseek.model import Embedder

from .errors import InvalidArgumentError
from .grouping import complete_linkage, range_pairs
from .keep import DEFAULT_ORDER, Member, choose_keeper, in_folder

DEFAULT_THRESHOLD = 0.95  # cosine of CLS vectors; `dinoseek calibrate` recommends one for a library


@dataclass(frozen=True)
class Group:
    kind: str  # "exact" (all bytes identical) or "near"
    members: list[Member]  # sorted by id
    min_similarity: float  # lowest pairwise similarity inside the group (1.0 for exact)
    keeper: Member
    reason: str  # why the keeper stays
    protected_ids: frozenset[int] = frozenset()  # members in a --protect folder: they all stay too

    def keeps(self, member: Member) -> bool:
        return member.id == self.keeper.id or member.id in self.protected_ids

    @property
    def others(self) -> list[Member]:
        """The members an action applies to: neither the keeper nor protected."""
        return [m for m in self.members if not self.keeps(m)]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "min_similarity": round(self.min_similarity, 6),
            "keep": self.keeper.path,
            "reason": self.reason,
            "members": [{"id": m.id, "path": m.path, "bytes": m.size, "width": m.width, "height": m.height,
                         "format": m.format, "captured_at": m.captured_at, "sha256": m.sha256,
                         "keep": self.keeps(m)} for m in self.members],
        }


def folder_prefix(root: Path, folder: str | bytes | os.PathLike, argument: str = "protected") -> bytes:
    """A folder given on the command line (absolute, relative to the current folder or to the root,
    see indexer.paths.under_root; "." is the root) as the raw bytes of its path relative to the root (b"" for the root itself), so that
    names that are not UTF-8 compare exactly with the catalog's raw paths."""
    absolute = root if os.path.normpath(os.fsdecode(folder)) == "." else under_root(root, folder)
    try:
        relative = absolute.resolve().relative_to(root.resolve())
    except ValueError:
        raise InvalidArgumentError(f"{os.fsdecode(folder)}: not inside {root}", argument=argument) from None
    if not absolute.is_dir():
        raise InvalidArgumentError(f"{os.fsdecode(folder)}: no such folder under {root}", argument=argument)
    return b"" if relative == Path(".") else os.fsencode(relative)


def find_duplicates(
    library: Library,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    kind: str = "cls",
    exact_only: bool = False,
    order: tuple[str, ...] = DEFAULT_ORDER,
    protected: tuple[str, ...] = (),
    block: int = DEDUP_BLOCK,
    folder: str | None = None,
    crop_encoder: Embedder | None = None,
    candidate_threshold: float | None = None,
    nprobe: int = DEDUP_NPROBE,
) -> list[Group]:
    """Exact groups (same sha256) and, unless exact_only, near-duplicate groups of embedded images.

    Exact copies have similarity 1 and so land in the same near group; a group is labelled
    "exact" when all its members share one hash. Truncated or otherwise failed files are never
    members (only embedded rows are). With `crop_encoder`, pairs down to `candidate_threshold`
    are re-scored with patch tokens (retrieval.rerank) so crops of one photo group together.

    `protected` folders: every member inside one stays (the keeper is one of them, reason "in a
    protected folder"); a group with every member protected has nothing to act on and is left out.
    `folder` (like `protected`: absolute, ./relative or relative to the root, "." for all) keeps
    only groups with a member under it.
    """
    if not 0 < threshold <= 1:
        raise InvalidArgumentError(f"must be in (0, 1], got {threshold}", argument="threshold")
    protected = tuple(folder_prefix(library.root, p) for p in protected)
    prefix = None if folder is None else folder_prefix(library.root, folder, "folder")
    if protected and "protected" not in order:
        order = ("protected", *order)  # --protect always wins, whatever --keep lists
    if exact_only:
        groups = [(ids, 1.0) for ids in library.catalog.exact_hash_groups()]
    else:
        index = candidate_index(library, kind, block)
        # Byte copies first, at similarity 1: their float16 vectors may score 0.9999 against each
        # other, which a threshold of 1 would miss; complete_linkage keeps the first score of a pair.
        exact = exact_pairs(library.catalog.exact_hash_groups())
        if crop_encoder is None:
            blocks = library.catalog.vector_blocks(kind, block)
            groups = complete_linkage(itertools.chain(exact, range_pairs(index, blocks, threshold, nprobe)))
        else:
            from .rerank import rerank

            low = candidate_threshold if candidate_threshold is not None else max(0.0, threshold - 0.15)
            candidates = range_pairs(index, library.catalog.vector_blocks(kind, block), low, nprobe)
            groups = complete_linkage(itertools.chain(exact, rerank(candidates, library, crop_encoder, threshold)))
    members = _members(library, [i for ids, _ in groups for i in ids])
    result = []
    for ids, lowest in groups:
        group_members = [members[i] for i in ids if i in members]  # rows deleted meanwhile drop out
        if prefix is not None and not any(in_folder(m, prefix) for m in group_members):
            continue
        shielded = frozenset(m.id for m in group_members if any(in_folder(m, p) for p in protected))
        if len(group_members) < 2 or len(shielded) == len(group_members):
            continue
        keeper, reason = choose_keeper(group_members, order, protected)
        if len(shielded) > 1:
            reason = f"{reason}; all {len(shielded)} copies in protected folders stay"
        exact = len({m.sha256 for m in group_members}) == 1
        lowest = min(1.0, max(-1.0, lowest))  # float16 vectors: a cosine may round to 1.0001
        result.append(Group("exact" if exact else "near", group_members, 1.0 if exact else lowest, keeper, reason,
                            shielded))
    return result


def exact_pairs(hash_groups: list[list[int]]) -> list[tuple[int, int, float]]:
    """Every pair of rows with one sha256, at similarity 1.0 (identical bytes, whatever the vectors say)."""
    return [(a, b, 1.0) for ids in hash_groups for a, b in itertools.combinations(sorted(ids), 2)]


def candidate_index(library: Library, kind: str, block: int = DEDUP_BLOCK) -> VectorIndex:
    """The index to find close pairs with: the library's own, unless it is exact and large; then
    a temporary IVF-Flat is trained on a sample and filled block by block (the library's exact
    index is not loaded at all, so memory stays at one copy of the vectors)."""
    record = library.index_set.record(kind)
    if kind in library.indexes or record is None or record.nprobe is not None or record.count <= EXACT_PAIRS_MAX:
        return library.indexes.get(kind) or library.load_indexes((kind,))[kind]
    ids = library.catalog.embedded_ids()
    nlist = ivf_lists(len(ids))
    _, sample = library.catalog.vectors(kind, ids[training_sample(len(ids), nlist)])
    index = trained_ivf_flat(library.dim(), nlist, sample, nprobe=DEDUP_NPROBE, requested="dedup",
                             trained_on=len(ids))
    del sample
    for block_ids, vectors in library.catalog.vector_blocks(kind, block):
        index.add(block_ids, vectors)
    return index


def _members(library: Library, ids: list[int]) -> dict[int, Member]:
    return {r.id: Member(r.id, r.path_text, r.path, r.size, r.width or 0, r.height or 0, r.format or "",
                         r.captured_at, r.sha256 or "", r.mtime_ns)
            for r in library.catalog.members(ids)}

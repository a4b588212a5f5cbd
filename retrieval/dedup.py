"""Duplicate groups over a whole library: identical bytes, and near duplicates by similarity."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from dinoseek.indexer.errors import first_line
from dinoseek.indexer.library import Library
from dinoseek.indexer.paths import under_root
from dinoseek.indexer.store import VectorIndex, gpu_available, ivf_lists, trained_ivf_flat, training_sample
from dinoseek.indexer.torch_search import RESIDENT_FRACTION, TorchExactIndex, search_device
from dinoseek.indexer.tuning import DEDUP_BLOCK, DEDUP_NPROBE, EXACT_PAIRS_MAX
from dinoseek.model import Embedder
from dinoseek.model.progress import progress

from .errors import InvalidArgumentError
from .grouping import linked_groups, rescored_pairs, unit_rows
from .keep import DEFAULT_ORDER, Member, check_order, choose_keeper, in_folder
from .marks import drop_marked
from .sidecars import folder_index, raw_partner

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95  # cosine of CLS vectors; `dinoseek calibrate` recommends one for a library
# Candidates are searched this far below the threshold, then re-scored exactly (see score_margin).
FLAT_MARGIN = 0.002
SQ_MARGIN = 0.01
PQ_MARGIN = 0.1


@dataclass(frozen=True)
class Group:
    kind: str  # "exact" (all bytes identical) or "near"
    members: list[Member]  # sorted by id
    min_similarity: float  # lowest pairwise similarity inside the group (1.0 for exact)
    keeper: Member
    reason: str  # why the keeper stays: true against every member that goes
    protected_ids: frozenset[int] = frozenset()  # members in a --protect folder: they all stay too
    reasons: dict[int, str] = field(default_factory=dict)  # member id -> why it goes (keep.choose_keeper)
    # member id -> cosine of its catalog vectors with the keeper's (1.0 for identical bytes)
    similarities: dict[int, float] = field(default_factory=dict)
    # member id -> the patch-token score that joined it to the keeper, where --crops re-ranking did
    crop_similarities: dict[int, float] = field(default_factory=dict)

    def keeps(self, member: Member) -> bool:
        return member.id == self.keeper.id or member.id in self.protected_ids

    @property
    def others(self) -> list[Member]:
        """The members an action applies to: neither the keeper nor protected."""
        return [m for m in self.members if not self.keeps(m)]

    def reason_for(self, member: Member) -> str:
        """The keeper's reason for the keeper; each other member's own (the group's if none recorded)."""
        return self.reason if member.id == self.keeper.id else self.reasons.get(member.id, self.reason)

    def similarity_to_keeper(self, member: Member) -> float | None:
        return 1.0 if member.id == self.keeper.id else self.similarities.get(member.id)

    def to_dict(self) -> dict:
        def similarity(m: Member):
            value = self.similarity_to_keeper(m)
            return None if value is None else round(value, 6)

        return {
            "kind": self.kind,
            "min_similarity": round(self.min_similarity, 6),
            "keep": self.keeper.path,
            "reason": self.reason,
            "members": [{"id": m.id, "path": m.path, "bytes": m.size, "width": m.width, "height": m.height,
                         "format": m.format, "captured_at": m.captured_at, "camera": m.camera,
                         "raw_partner": m.raw_partner, "sha256": m.sha256, "keep": self.keeps(m),
                         "similarity": similarity(m), "reason": self.reason_for(m),
                         **({"crop_similarity": round(self.crop_similarities[m.id], 6)}
                            if m.id in self.crop_similarities else {})}
                        for m in self.members],
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
    members (only embedded rows are). Every score that decides is exact: candidates from the
    library's index (compressed or not) are re-scored as cosines of the catalog's vectors before the
    threshold applies (grouping.rescored_pairs). With `crop_encoder`, pairs down to
    `candidate_threshold` are re-scored with patch tokens (retrieval.rerank) so crops of one photo
    group together.

    Each group names its keeper and why (retrieval.keep: `order`, default keep.DEFAULT_ORDER), and
    for every other member its own reason and its exact similarity to the keeper.

    `protected` folders: every member inside one stays (the keeper is one of them, reason "in a
    protected folder"); a group with every member protected has nothing to act on and is left out.
    `folder` (like `protected`: absolute, ./relative or relative to the root, "." for all) keeps
    only groups with a member under it.
    """
    if not 0 < threshold <= 1:
        raise InvalidArgumentError(f"must be in (0, 1], got {threshold}", argument="threshold")
    protected = tuple(folder_prefix(library.root, p) for p in protected)
    prefix = None if folder is None else folder_prefix(library.root, folder, "folder")
    order = check_order(tuple(order))
    if protected and "protected" not in order:
        order = ("protected", *order)  # --protect always wins, whatever --keep lists
    if exact_only:  # each hash is one group as it is (no pairs: a file copied 1,000 times is 1 group)
        linked, scores = [(ids, 1.0) for ids in library.catalog.exact_hash_groups()], None
    else:
        # Byte copies first, at similarity 1: their float16 vectors may score 0.9999 against each
        # other, which a threshold of 1 would miss; linked_groups keeps the first score of a pair.
        byte_copy_pairs = exact_pairs(library.catalog.exact_hash_groups())
        low = threshold if crop_encoder is None else (
            candidate_threshold if candidate_threshold is not None else max(0.0, threshold - 0.15))
        # closing(): a search cut short (Ctrl-C while grouping) ends its progress step now, not when collected
        with contextlib.closing(candidate_search(library, kind, low, block=block, nprobe=nprobe)) as candidates:
            candidates = drop_marked(candidates, library)  # pairs the user marked "not a duplicate"
            if crop_encoder is not None:
                from .rerank import rerank

                candidates = rerank(candidates, library, crop_encoder, threshold)
            linked, scores = linked_groups(itertools.chain(byte_copy_pairs, candidates))
    return groups_from_links(library, linked, scores, kind=kind, order=order, protected=protected, prefix=prefix)


def candidate_search(library: Library, kind: str, low: float, *, block: int = DEDUP_BLOCK,
                     nprobe: int = DEDUP_NPROBE) -> Iterator[tuple[int, int, float]]:
    """Every pair (a, b, exact cosine) of embedded images at or above `low`, each pair once, found
    through the library's index in blocks and re-scored from the catalog's vectors; a generator
    (close it to stop early)."""
    index = candidate_index(library, kind, block)

    def vectors_of(ids):
        return library.catalog.vectors(kind, ids)

    # A torch index holds the catalog's vectors already: its queries come from it, not a second read.
    blocks = index.blocks(block) if isinstance(index, TorchExactIndex) else library.catalog.vector_blocks(kind, block)
    return rescored_pairs(index, blocks, low, vectors_of, nprobe=nprobe, margin=score_margin(index),
                          total=index.count)


def groups_from_links(library: Library, linked: list[tuple[list[int], float]],
                      scores: dict[int, dict[int, float]] | None, *, kind: str = "cls",
                      order: tuple[str, ...] = DEFAULT_ORDER, protected: tuple[bytes, ...] = (),
                      prefix: bytes | None = None) -> list[Group]:
    """Groups from linked ids (grouping.linked_groups; `scores` None for byte-copy groups): members
    read from the catalog (rows deleted meanwhile drop out), the keeper and every reason, each
    member's exact similarity to the keeper. `protected`/`prefix` are folder_prefix() values."""
    members = _members(library, [i for ids, _ in linked for i in ids])
    result = []
    for ids, lowest in linked:
        group_members = [members[i] for i in ids if i in members]
        if prefix is not None and not any(in_folder(m, prefix) for m in group_members):
            continue
        shielded = frozenset(m.id for m in group_members if any(in_folder(m, p) for p in protected))
        if len(group_members) < 2 or len(shielded) == len(group_members):
            continue
        decision = choose_keeper(group_members, order, protected)
        reason = decision.reason
        if len(shielded) > 1:
            reason = f"{reason}; all {len(shielded)} copies in protected folders stay"
        exact = len({m.sha256 for m in group_members}) == 1
        lowest = min(1.0, max(-1.0, lowest))  # float16 vectors: a cosine may round to 1.0001
        result.append(Group("exact" if exact else "near", group_members, 1.0 if exact else lowest, decision.keeper,
                            reason, shielded, decision.reasons))
    return _with_similarities(library, result, kind, scores) if result else result


def score_margin(index: VectorIndex | TorchExactIndex) -> float:
    """How far below the threshold to look for candidates in `index`, by how far its scores can be off.

    Flat, SQfp16 and IVF-Flat hold the catalog's float16 vectors as they are, not re-normalised: each norm is
    off by up to 2^-11 (float16 rounding), so their inner product can fall ~1e-3 below the exact
    cosine and a pair just above the threshold would be missed: 0.002. SQ8 errs by ~0.002 on unit
    vectors (measured, 128 and 384 dimensions): 0.01. PQ and RaBitQ err by up to ~0.1 on clustered
    vectors and more on random ones: 0.1 finds nearly all pairs of real photos; one still missed is a
    duplicate left unreported, never a wrong group, since every candidate is re-scored exactly.
    A torch exact index gives float32 inner products of the same un-normalised vectors (it re-scores
    its float16 products itself, see indexer.torch_search): as Flat.
    """
    if isinstance(index, TorchExactIndex):
        return FLAT_MARGIN
    inner = index.inner
    if index.is_exact() or isinstance(inner, faiss.IndexIVFFlat):
        return FLAT_MARGIN
    if isinstance(inner, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)):
        return SQ_MARGIN
    return PQ_MARGIN


def _with_similarities(library: Library, groups: list[Group], kind: str,
                       scores: dict[int, dict[int, float]] | None) -> list[Group]:
    """Groups with each member's exact similarity to its keeper: 1.0 for identical bytes, else the
    cosine of the two catalog vectors (float16, re-normalised). `scores` (None for --exact) are the
    pair scores the groups were linked by: where one exceeds the cosine, --crops re-ranking joined
    the pair, and that score is kept as its crop similarity."""
    unit: dict[int, np.ndarray] = {}
    if scores is not None:
        ids, vectors = library.catalog.vectors(kind, sorted({m.id for g in groups for m in g.members}))
        unit = dict(zip(ids.tolist(), unit_rows(vectors)))
    out = []
    for group in groups:
        keeper = group.keeper
        similarities, crops = {}, {}
        for m in group.members:
            if m.id == keeper.id:
                continue
            if m.sha256 and m.sha256 == keeper.sha256 or scores is None:
                similarities[m.id] = 1.0
                continue
            if m.id in unit and keeper.id in unit:
                similarities[m.id] = float(np.clip(unit[m.id] @ unit[keeper.id], -1.0, 1.0))
            linked = scores.get(keeper.id, {}).get(m.id)
            if linked is not None and m.id in similarities and linked > similarities[m.id] + 1e-6:
                crops[m.id] = linked
        out.append(replace(group, similarities=similarities, crop_similarities=crops))
    return out


def exact_pairs(hash_groups: list[list[int]]) -> list[tuple[int, int, float]]:
    """Every pair of rows with one sha256, at similarity 1.0 (identical bytes, whatever the vectors say)."""
    return [(a, b, 1.0) for ids in hash_groups for a, b in itertools.combinations(sorted(ids), 2)]


def candidate_index(library: Library, kind: str, block: int = DEDUP_BLOCK) -> VectorIndex | TorchExactIndex:
    """The index to find close pairs with. On a CUDA machine without faiss-gpu (see
    indexer.torch_search.search_device): exact search on the GPU over the catalog's vectors, whatever
    the library's index type. Otherwise the library's own, unless it is exact and large; then a
    temporary IVF-Flat is trained on a sample and filled block by block (the library's exact index
    is not loaded at all, so memory stays at one copy of the vectors).

    Decided by the index's record (its type and size), never by whether it happens to be loaded: a
    long-lived reader (the server's) holds every index, and must search as a fresh `dinoseek dedup`."""
    device = search_device(gpu_available())
    if device is not None:
        exact = _torch_candidate_index(library, kind, block, device)
        if exact is not None:
            return exact
    record = library.index_set.record(kind)
    if record is None or record.nprobe is not None or record.count <= EXACT_PAIRS_MAX:
        return library.indexes.get(kind) or library.load_indexes((kind,))[kind]
    ids = library.catalog.embedded_ids()
    nlist = ivf_lists(len(ids))
    _, sample = library.catalog.vectors(kind, ids[training_sample(len(ids), nlist)])
    index = trained_ivf_flat(library.dim(), nlist, sample, nprobe=DEDUP_NPROBE, requested="dedup",
                             trained_on=len(ids))
    del sample
    with progress(len(ids), "dedup: search index", unit="images") as step:
        for block_ids, vectors in library.catalog.vector_blocks(kind, block):
            index.add(block_ids, vectors)
            step.update(len(block_ids))
    return index


def _torch_candidate_index(library: Library, kind: str, block: int, device) -> TorchExactIndex | None:
    """The catalog's vectors in a torch exact index on `device`, read block by block; None (logged)
    where they cannot be put there (out of GPU memory): the FAISS candidate index is used instead."""
    record = library.index_set.record(kind)
    if device.type == "cuda" and record is not None:
        # Only where the vectors stay on the GPU: streamed from the host, every query block would copy
        # all of them again, and the bounded-memory IVF path is the better one.
        free, _ = torch.cuda.mem_get_info(device)
        if record.count * library.dim() * 2 > RESIDENT_FRACTION * free:
            log.info("duplicate search stays on FAISS: %d vectors do not fit in %s's free memory", record.count, device)
            return None
    ids, vectors = [], []
    # float16 on the GPU anyway (the catalog's own precision: nothing lost), half the host memory meanwhile
    dtype = np.float16 if device.type == "cuda" else np.float32
    with progress(record.count if record else None, "dedup: search index", unit="images") as step:
        for block_ids, block_vectors in library.catalog.vector_blocks(kind, block):
            ids.append(block_ids)
            vectors.append(block_vectors.astype(dtype))
            step.update(len(block_ids))
    if not ids:
        return None  # nothing embedded: the library's index answers (empty) as before
    try:
        return TorchExactIndex(np.concatenate(ids), np.concatenate(vectors), device)
    except (RuntimeError, MemoryError) as e:
        log.warning("duplicate search stays on FAISS: the vectors do not fit on %s: %s", device,
                    first_line(e))
        return None


def _members(library: Library, ids: list[int]) -> dict[int, Member]:
    """The keep rules' view of these rows: catalog fields, and whether a RAW file sits beside each."""
    index = folder_index()  # the command's shared listing (one_listing_per_folder), else a fresh one
    return {r.id: Member(r.id, r.path_text, r.path, r.size, r.width or 0, r.height or 0, r.format or "",
                         r.captured_at, r.sha256 or "", r.mtime_ns, camera=r.camera,
                         raw_partner=raw_partner(library.root / os.fsdecode(r.path), index) is not None)
            for r in library.catalog.members(ids)}

"""Building an index in bounded memory: vectors streamed in blocks, training and tuning on samples.

Nothing here holds all vectors of a kind at once. IVF quantizers train on a seeded sample; nprobe
is tuned on TUNE_QUERIES sampled vectors whose exact top-k is found by streaming the blocks once
(no exact index of the library is made); large IVF indexes are filled straight into on-disk lists
(indexer.ondisk). `auto` tries its choices one after the other, releasing each before the next, so
at most one index is ever built at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from . import ondisk
from .budget import exact_fits, exact_index_bytes, memory_budget
from .store import VectorIndex, _min_training, auto_factory, check_factory, is_exact_index, training_sample
from .tuning import (BUILD_BLOCK, EXACT_FALLBACK, EXACT_PAIRS_MAX, FLAT_FALLBACK_MAX, MAX_PROBE_FRACTION,
                     MIN_AUTO_RECALL, ONDISK_FROM, ONDISK_SHARD, TARGET_RECALL, TUNE_QUERIES)

log = logging.getLogger(__name__)

Blocks = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclass
class ArraySource:
    """Vectors already in memory (tests, benchmarks, small callers), served in blocks."""

    ids: np.ndarray
    vectors: np.ndarray
    dim: int

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1, self.dim)

    @property
    def count(self) -> int:
        return len(self.ids)

    def blocks(self) -> Blocks:
        for start in range(0, self.count, BUILD_BLOCK):
            yield self.ids[start:start + BUILD_BLOCK], self.vectors[start:start + BUILD_BLOCK]

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[positions], self.vectors[positions]


@dataclass
class CatalogSource:
    """One kind's vectors in the catalog: blocks by keyset pagination, samples by id."""

    catalog: object  # indexer.catalog_gateway.Catalog (not imported: it pulls in SQLAlchemy models)
    kind: str
    ids: np.ndarray  # sorted embedded ids, taken once: positions index into it
    dim: int

    @property
    def count(self) -> int:
        return len(self.ids)

    def blocks(self) -> Blocks:
        return self.catalog.vector_blocks(self.kind, BUILD_BLOCK)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.catalog.vectors(self.kind, self.ids[positions])


def exact_top_k(queries: np.ndarray, blocks: Blocks, k: int) -> np.ndarray:
    """(n, k) ids of the k largest inner products with `queries`, over the streamed blocks: the
    ground truth tuning compares against, with one block in memory at a time."""
    n = len(queries)
    best_scores = np.full((n, 0), -np.inf, np.float32)
    best_ids = np.zeros((n, 0), np.int64)
    for ids, vectors in blocks:
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)  # (n, kept + block)
        candidates = np.concatenate([best_ids, np.broadcast_to(ids, (n, len(ids)))], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(scores, top, 1)
        best_ids = np.take_along_axis(candidates, top, 1)
    return best_ids


@dataclass(frozen=True)
class Probe:
    """Sampled queries and their exact top-k ids, shared by every trial of one build."""

    queries: np.ndarray  # (n, dim) float32
    truth: np.ndarray  # (n, k) row ids
    k: int = 10


def sample_probe(source, queries: int = TUNE_QUERIES, k: int = 10) -> Probe:
    positions = np.sort(np.random.default_rng(1).choice(source.count, min(queries, source.count), replace=False))
    _, vectors = source.take(positions)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return Probe(vectors, exact_top_k(vectors, source.blocks(), k), k)


def recall_at(index: VectorIndex, probe: Probe) -> float:
    _, found = index.search(probe.queries, probe.k)
    return float(np.mean([len(set(f) & set(t)) / probe.k for f, t in zip(found.tolist(), probe.truth.tolist())]))


def tune_nprobe(index: VectorIndex, probe: Probe) -> tuple[int, float]:
    """(nprobe, recall@k): the smallest power-of-two nprobe whose recall against exact search
    reaches TARGET_RECALL, or the largest tried (1/MAX_PROBE_FRACTION of the lists)."""
    nlist = faiss.extract_index_ivf(index.inner).nlist
    limit = max(1, nlist // MAX_PROBE_FRACTION)
    nprobe = 1
    while True:
        index.nprobe = nprobe
        recall = recall_at(index, probe)
        if recall >= TARGET_RECALL:
            return nprobe, recall
        if nprobe >= limit:
            log.warning("IVF recall@%d only %.2f at nprobe %d of %d lists: the vectors barely cluster",
                        probe.k, recall, nprobe, nlist)
            return nprobe, recall
        nprobe = min(nprobe * 2, limit)


def _flat(source, requested: str) -> VectorIndex:
    return _exact(faiss.IndexFlatIP(source.dim), "Flat", source, requested)


def _exact(inner: faiss.IndexFlatCodes, factory: str, source, requested: str) -> VectorIndex:
    """An exact index (Flat, or SQfp16: the catalog's float16 values as they are) filled by blocks."""
    # Reserve the whole array once (resize keeps the capacity when shrunk back): appended block by
    # block, std::vector doubling would copy it at each growth, twice the index at the last one.
    inner.codes.resize(source.count * inner.code_size)
    inner.codes.resize(0)
    index = VectorIndex(faiss.IndexIDMap2(inner), factory, requested, None, source.count)
    for ids, vectors in source.blocks():
        index.add(ids, vectors)
    return index


def _trial(factory: str, source, *, requested: str, lists_for, probe: Probe | None,
           centroids: np.ndarray | None = None) -> tuple[VectorIndex, float]:
    """(index, recall@10 or 1.0 for exact) of one factory, trained on a sample and filled by blocks.
    `centroids`: an earlier trial's IVF centroids for the same lists (the same k-means on the same
    sample would give them again): the coarse quantizer starts from them instead of training."""
    inner = check_factory(factory, source.dim)
    if centroids is not None and isinstance(inner, faiss.IndexIVF) and inner.nlist == len(centroids):
        inner.quantizer.add(centroids)  # a quantizer holding nlist vectors is not trained again
    if not inner.is_trained:
        needed = _min_training(inner)
        if source.count < needed:
            # Too few vectors to train yet: exact search until the library has grown enough.
            # Said aloud where the user asked for this index; auto's own choice grows into it quietly.
            log.log(logging.INFO if requested == "auto" else logging.WARNING,
                    "%s needs %d vectors to train, have %d: using Flat for now", factory, needed, source.count)
            return _flat(source, requested), 1.0
        nlist = inner.nlist if isinstance(inner, faiss.IndexIVF) else 0
        if hasattr(inner, "do_polysemous_training"):
            # On by default for factory-made PQ indexes: ~2 s of simulated annealing per
            # sub-quantizer (3 min for PQ96), whatever the size, for a Hamming pre-filter that
            # search never turns on (polysemous_ht stays 0).
            inner.do_polysemous_training = False
        _, sample = source.take(training_sample(source.count, nlist, needed))
        inner.train(np.ascontiguousarray(sample, dtype=np.float32))
        del sample
    if not isinstance(inner, faiss.IndexIVF):
        if isinstance(inner, faiss.IndexFlatCodes) and is_exact_index(inner):
            return _exact(inner, factory, source, requested), 1.0
        return _filled(inner, factory, source, requested), 1.0
    index = VectorIndex(inner, factory, requested, None, source.count)
    if lists_for is not None and source.count >= ONDISK_FROM and lists_fit_on_disk(inner):
        index.lists = lists_for()
        ondisk.fill_on_disk(inner, source.blocks(), index.lists, ONDISK_SHARD)
    else:
        for ids, vectors in source.blocks():
            index.add(ids, vectors)
    index.nprobe, recall = tune_nprobe(index, probe or sample_probe(source))
    index.release_pages()
    return index, recall


def lists_fit_on_disk(ivf: faiss.IndexIVF) -> bool:
    """Whether FAISS's on-disk lists can hold this index's lists. FastScan's cannot: they pack codes
    in blocks of 32 vectors, and on-disk lists copy code_size bytes per vector (a last partial block
    is cut short: wrong results). Their 4-bit codes are small, so they stay in memory (PQ96x4fs:
    56 B a vector with its id, 280 MB per kind at 5M)."""
    return not isinstance(ivf, faiss.IndexIVFFastScan)


def _filled(inner: faiss.Index, factory: str, source, requested: str) -> VectorIndex:
    index = VectorIndex(faiss.IndexIDMap2(inner), factory, requested, None, source.count)
    for ids, vectors in source.blocks():
        index.add(ids, vectors)
    return index


def _centroids(index: VectorIndex) -> np.ndarray:
    quantizer = faiss.extract_index_ivf(index.inner).quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def _discard(index: VectorIndex) -> None:
    """Let go of a trial index, its lists file included."""
    if index.lists is not None:
        index.lists.path.unlink(missing_ok=True)


def build_streamed(factory: str, source, *, requested: str,
                   lists_for: Callable[[], ondisk.ListsFile] | None = None) -> VectorIndex:
    """The index `factory` (or, for "auto", auto's choice) over `source`, built block by block.

    `lists_for` gives the lists file for an IVF index of ONDISK_FROM vectors or more (None: lists
    stay in memory whatever the size, as for indexes that are never checkpointed)."""
    if factory != "auto":
        return _trial(factory, source, requested=requested, lists_for=lists_for, probe=None)[0]
    return _build_auto(source, requested=requested, lists_for=lists_for)


def _build_auto(source, *, requested: str, lists_for) -> VectorIndex:
    """auto_factory's choice; if its recall stays below MIN_AUTO_RECALL (vectors that barely
    cluster): IVF-SQ8 in place of PQ, then exact search where it fits the memory budget, else the
    best IVF index with a warning. Never two candidates in memory at once."""
    count, dim = source.count, source.dim
    factory = auto_factory(count, dim)
    if factory == "Flat":
        return _flat(source, requested)
    probe = sample_probe(source)
    index, recall = _trial(factory, source, requested=requested, lists_for=lists_for, probe=probe)
    if recall >= MIN_AUTO_RECALL or index.factory == "Flat":
        return index
    if ",PQ" in factory:
        sq8 = factory.split(",")[0] + ",SQ8"
        log.warning("%s reaches recall@10 %.2f only; auto tries %s", factory, recall, sq8)
        centroids = _centroids(index)
        _discard(index)
        index = None  # released before the next trial is built
        index, recall = _trial(sq8, source, requested=requested, lists_for=lists_for, probe=probe,
                               centroids=centroids)
        if recall >= MIN_AUTO_RECALL:
            return index
    budget = memory_budget()
    exact = "Flat" if count <= EXACT_PAIRS_MAX else EXACT_FALLBACK
    if count <= FLAT_FALLBACK_MAX and exact_fits(count, dim, budget, exact):
        # auto never trades away this much recall when exact search fits: slower but right.
        log.warning("%s reaches recall@10 %.2f only; auto uses exact search (%s) instead", index.factory, recall, exact)
        _discard(index)
        index = None
        return _exact(check_factory(exact, dim), exact, source, requested)
    log.warning("%s reaches recall@10 %.2f only; exact search would need %.1f GB, over the %.1f GB budget "
                "(set DINOSEEK_INDEX_MEMORY to raise it): keeping %s", index.factory, recall,
                exact_index_bytes(count, dim, exact) / 1e9, budget / 1e9, index.factory)
    return index

"""Near-duplicate grouping on constructed vectors with known groups, including chains."""

from __future__ import annotations

import numpy as np

from dinoseek.indexer.store import build_index
from dinoseek.retrieval.grouping import linked_groups, rescored_pairs


def complete_linkage(pairs):
    return linked_groups(pairs)[0]


def test_chain_does_not_merge():
    # A~B 0.96, B~C 0.96, A~C 0.90: with threshold 0.95, B joins one of them, never both.
    groups = complete_linkage([(1, 2, 0.96), (2, 3, 0.96)])
    assert groups == [([1, 2], 0.96)]
    groups = complete_linkage([(1, 2, 0.96), (2, 3, 0.97)])
    assert groups == [([2, 3], 0.97)]


def test_clique_merges_and_reports_lowest_similarity():
    pairs = [(1, 2, 0.99), (1, 3, 0.97), (2, 3, 0.96), (3, 4, 0.98)]
    # Strongest first: 3 pairs with 4 (0.98) before {1, 2} can take it; 4 is not close to 1 or 2.
    assert complete_linkage(pairs) == [([1, 2], 0.99), ([3, 4], 0.98)]
    pairs.append((5, 4, 0.99))  # now 4 pairs with 5 first, and 3 is free to join {1, 2}
    assert complete_linkage(pairs) == [([1, 2, 3], 0.96), ([4, 5], 0.99)]


def test_duplicate_pairs_from_both_ends_are_counted_once():
    assert complete_linkage([(1, 2, 0.99), (2, 1, 0.99)]) == [([1, 2], 0.99)]


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_known_groups_through_faiss_range_search():
    rng = np.random.default_rng(0)
    d = 64
    base = _unit(rng.standard_normal((50, d)))  # 50 unrelated photos
    vectors, truth = [base], []
    next_id = 50
    for g, size in enumerate([2, 3, 5]):  # three planted groups of near copies of photos 0, 1, 2
        copies = _unit(base[g] + 0.02 * rng.standard_normal((size - 1, d)))
        vectors.append(copies)
        truth.append(sorted([g] + list(range(next_id, next_id + size - 1))))
        next_id += size - 1
    # A chain: X, Y = X rotated a bit, Z = Y rotated a bit more in the same direction.
    x = base[3]
    direction = _unit(rng.standard_normal(d) - (rng.standard_normal(d) @ x) * x)
    y = _unit(x + 0.33 * direction)
    z = _unit(x + 0.70 * direction)
    vectors.append(np.stack([y, z]))
    vectors = np.concatenate(vectors)
    ids = np.arange(len(vectors), dtype=np.int64) * 10  # catalog ids are not positions
    assert x @ y >= 0.94 and y @ z >= 0.94 and x @ z < 0.9
    index = build_index("Flat", d, vectors, ids, requested="auto")
    blocks = [(ids[i:i + 7], vectors[i:i + 7]) for i in range(0, len(ids), 7)]  # small blocks
    by_id = dict(zip(ids.tolist(), vectors))

    def vectors_of(wanted):
        return np.asarray(wanted, np.int64), np.stack([by_id[int(i)] for i in wanted])

    groups = complete_linkage(rescored_pairs(index, blocks, 0.94, vectors_of))
    found = [sorted(int(i) // 10 for i in g) for g, _ in groups]
    for group in truth:
        assert group in found
    chain = [g for g in found if 3 in g or next_id in g or next_id + 1 in g]
    assert len(chain) == 1 and len(chain[0]) == 2  # the chain X-Y-Z gives one pair, never all three
    brute = vectors @ vectors.T
    for members, lowest in groups:
        positions = [int(i) // 10 for i in members]
        sims = brute[np.ix_(positions, positions)][np.triu_indices(len(positions), 1)]
        assert sims.min() >= 0.94 and abs(sims.min() - lowest) < 1e-5

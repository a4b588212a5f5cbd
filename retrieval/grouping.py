"""Near-duplicate grouping without chaining.

Candidate pairs come from range searches over the whole library in blocks (memory bounded by the
block size and the number of close pairs, never N^2). Groups are then formed by complete linkage
(`linked_groups`): two groups merge only if every member of one is above the threshold with every
member of the other, so A~B and B~C never put A with C unless A~C too.

Scores that decide are exact: the index (compressed or not) only proposes candidate pairs, searched a
margin below the threshold, and each candidate is re-scored as the cosine of the catalog's own vectors
before the threshold is applied (`rescored_pairs`).

Both long loops report progress (model.progress): the candidate search per block of query images,
the linkage per pair taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from dinoseek.model.progress import progress

# Pairs linked between progress updates: one update per pair would cost more than the linking itself.
_PAIRS_PER_UPDATE = 4096


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float16 storage leaves them a little off): their inner products
    are cosines. All-zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def rescored_pairs(index, blocks: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float,
                   vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *,
                   nprobe: int | None = None, margin: float = 0.0,
                   total: int | None = None) -> Iterator[tuple[int, int, float]]:
    """(a, b, similarity) with a < b and the exact similarity >= threshold, each pair once, for query
    blocks (ids, vectors) over `index` (an indexer.store.VectorIndex: anything with
    `range_search(vectors, threshold, nprobe)` returning (lims, scores, ids)).

    Candidates are searched at `threshold - margin` (an index's scores err both ways), then each is
    re-scored as the cosine of the two vectors `vectors_of(ids)` returns ((ids, vectors) of those
    still present, as Catalog.vectors does) and kept only at >= threshold. A candidate found from
    either end counts: a compressed index's scores are not symmetric (b may be found from a and not
    a from b), and the cosine is. Block by block: memory is bounded by the block size and the number
    of pairs found (one set of them, so a pair found from both ends is given once).

    Reported as the step "dedup: candidates", in images searched (`total`: how many the blocks hold).
    """
    given: set[tuple[int, int]] = set()
    with progress(total, "dedup: candidates", unit="images") as step:
        for ids, vectors in blocks:
            queries = unit_rows(vectors)  # (B, D)
            lims, _, found = index.range_search(vectors, threshold - margin, nprobe)
            rows = np.repeat(np.arange(len(ids)), np.diff(lims).astype(np.int64))  # query row of each candidate
            keep = (found >= 0) & (found != ids[rows])  # FAISS pads with -1; a row is not its own duplicate
            rows, partners = rows[keep], found[keep]
            if len(partners):
                present, partner_vectors = vectors_of(np.unique(partners))  # rows deleted meanwhile drop out
                if len(present):  # every candidate gone (a concurrent index run removed them): nothing to score
                    position = np.searchsorted(present, partners)
                    known = (position < len(present)) & (present[np.minimum(position, len(present) - 1)] == partners)
                    rows, partners, position = rows[known], partners[known], position[known]
                    sims = np.einsum("ij,ij->i", queries[rows], unit_rows(partner_vectors)[position])  # (P,)
                    for row, b, sim in zip(rows.tolist(), partners.tolist(), sims.tolist()):
                        pair = (min(int(ids[row]), b), max(int(ids[row]), b))
                        if sim >= threshold and pair not in given:
                            given.add(pair)
                            yield pair[0], pair[1], min(1.0, sim)
            step.update(len(ids))


def linked_groups(pairs: Iterable[tuple[int, int, float]]) -> tuple[list[tuple[list[int], float]],
                                                                    dict[int, dict[int, float]]]:
    """Groups (sorted members, lowest pairwise similarity) of size >= 2, largest first, and the score
    of every pair it was given (id -> id -> score, both ways; the first score of a pair counts), so
    callers can report each member's score.

    Complete linkage: edges are taken in order of decreasing similarity; two groups merge only when
    all their cross pairs are edges, so every pair inside a group is above the threshold.
    """
    neighbours: dict[int, dict[int, float]] = {}
    edges = []
    for a, b, sim in pairs:
        if a == b:
            continue
        if b in neighbours.setdefault(a, {}):  # the same pair found from both ends
            continue
        neighbours[a][b] = sim
        neighbours.setdefault(b, {})[a] = sim
        edges.append((sim, a, b))
    edges.sort(key=lambda e: (-e[0], e[1], e[2]))
    group_of = {node: node for node in neighbours}
    members = {node: [node] for node in neighbours}
    lowest = {node: 1.0 for node in neighbours}
    with progress(len(edges), "dedup: grouping", unit="pairs") as step:
        for taken, (sim, a, b) in enumerate(edges):
            if taken and taken % _PAIRS_PER_UPDATE == 0:
                step.update(_PAIRS_PER_UPDATE)
            ga, gb = group_of[a], group_of[b]
            if ga == gb:
                continue
            left, right = members[ga], members[gb]
            cross = [neighbours[x].get(y) for x in left for y in right]
            if any(c is None for c in cross):
                continue  # some pair across the two groups is not similar enough: no chaining
            if len(left) < len(right):
                ga, gb, left, right = gb, ga, right, left
            left.extend(right)
            for node in right:
                group_of[node] = ga
            lowest[ga] = min(lowest[ga], lowest[gb], min(cross))
            del members[gb]
        step.update(len(edges) - step.done)
    groups = [(sorted(m), lowest[g]) for g, m in members.items() if len(m) > 1]
    return sorted(groups, key=lambda g: (-len(g[0]), g[0][0])), neighbours

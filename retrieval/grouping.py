"""Near-duplicate grouping without chaining.

Candidate pairs come from range searches over the whole library in blocks (memory bounded by the
block size and the number of close pairs, never N^2). Groups are then formed by complete linkage:
two groups merge only if every member of one is above the threshold with every member of the
other, so A~B and B~C never put A with C unless A~C too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def range_pairs(index, blocks: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float,
                nprobe: int | None = None) -> Iterator[tuple[int, int, float]]:
    """(a, b, similarity) with a < b and similarity >= threshold, for query blocks (ids, vectors).

    `index` is an indexer.store.VectorIndex (anything with `range_search(vectors, threshold,
    nprobe)` returning (lims, scores, ids)).
    """
    for ids, vectors in blocks:
        lims, scores, found = index.range_search(vectors, threshold, nprobe)
        for row, a in enumerate(ids):
            for b, score in zip(found[lims[row]:lims[row + 1]], scores[lims[row]:lims[row + 1]]):
                if a < b:
                    yield int(a), int(b), float(score)


def complete_linkage(pairs: Iterable[tuple[int, int, float]]) -> list[tuple[list[int], float]]:
    """Groups (sorted members, lowest pairwise similarity) of size >= 2, strongest pairs first.

    Edges are taken in order of decreasing similarity; two groups merge only when all their cross
    pairs are edges, so every pair inside a group is above the threshold.
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
    for sim, a, b in edges:
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
    groups = [(sorted(m), lowest[g]) for g, m in members.items() if len(m) > 1]
    return sorted(groups, key=lambda g: (-len(g[0]), g[0][0]))

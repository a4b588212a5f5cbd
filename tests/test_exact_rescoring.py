"""Dedup decides on exact similarities: pairs a compressed index (SQ8, PQ) proposes are re-scored from
the catalog's vectors before the threshold applies, and the scores reported are those cosines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_retrieval import THRESHOLD, make_library_photos

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.library import Library
from dinoseek.indexer.store import build_index
from dinoseek.retrieval import dedup
from dinoseek.retrieval.cli import main
from dinoseek.retrieval.dedup import FLAT_MARGIN, PQ_MARGIN, SQ_MARGIN, find_duplicates, score_margin
from dinoseek.retrieval.grouping import rescored_pairs


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def index_pairs(index, blocks, threshold, nprobe=None):
    """(a, b) with a < b that the index alone scores >= threshold, from either end: what grouping
    on the index's own scores would take."""
    pairs = set()
    for ids, vectors in blocks:
        lims, _, found = index.range_search(vectors, threshold, nprobe)
        for row, a in enumerate(ids):
            pairs.update((min(int(a), int(b)), max(int(a), int(b))) for b in found[lims[row]:lims[row + 1]]
                         if b >= 0 and b != a)
    return pairs


@pytest.fixture(scope="module")
def pq_case():
    """600 vectors: 300 photos and a copy of each at a cosine spread around 0.9, in an IVF-PQ index
    coarse enough (8 bytes for 32 dimensions) that its scores are visibly off."""
    rng = np.random.default_rng(3)
    d = 32
    base = _unit(rng.standard_normal((300, d)))
    noise = _unit(rng.standard_normal((300, d)))
    mix = rng.uniform(0.3, 0.6, (300, 1)).astype(np.float32)
    vectors = np.concatenate([base, _unit(base + mix * noise)])
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64) * 3  # catalog ids are not positions
    index = build_index("IVF4,PQ8x8", d, vectors, ids, requested="IVF4,PQ8x8")
    assert score_margin(index) == PQ_MARGIN
    by_id = dict(zip(ids.tolist(), vectors))

    def vectors_of(wanted):
        return np.asarray(wanted, dtype=np.int64), np.stack([by_id[int(i)] for i in wanted])

    blocks = [(ids[i:i + 50], vectors[i:i + 50]) for i in range(0, len(ids), 50)]
    exact = {}
    sims = vectors @ vectors.T
    for a, b in zip(*np.triu_indices(len(ids), 1)):
        if sims[a, b] >= 0.9:
            exact[(int(ids[a]), int(ids[b]))] = float(sims[a, b])
    return index, blocks, vectors_of, exact


def test_rescored_pairs_equal_brute_force_scores(pq_case):
    index, blocks, vectors_of, exact = pq_case
    found = {(a, b): s for a, b, s in rescored_pairs(index, blocks, 0.9, vectors_of, nprobe=4, margin=1.0)}
    assert set(found) == set(exact) and len(found) > 20
    for pair, score in found.items():
        assert score == pytest.approx(exact[pair], abs=1e-6)


def test_pairs_whose_compressed_score_passes_but_exact_does_not_are_dropped(pq_case):
    index, blocks, vectors_of, exact = pq_case
    compressed = index_pairs(index, blocks, 0.9, nprobe=4)
    false_positives = compressed - set(exact)
    assert false_positives  # PQ at this size does score some pairs above the threshold wrongly
    rescored = {(a, b) for a, b, _ in rescored_pairs(index, blocks, 0.9, vectors_of, nprobe=4, margin=PQ_MARGIN)}
    assert not rescored & false_positives and rescored <= set(exact)


def test_rows_gone_from_the_catalog_drop_out_of_rescoring(pq_case):
    index, blocks, vectors_of, exact = pq_case
    gone = {b for _, b in exact}

    def fewer(wanted):
        kept = np.asarray([i for i in wanted if int(i) not in gone], dtype=np.int64)
        return vectors_of(kept) if len(kept) else (kept, np.zeros((0, 32), np.float32))

    # Gone from the catalog: no longer read as queries either (the index still holds them).
    remaining = [(ids[present], vectors[present]) for ids, vectors in blocks
                 for present in [np.asarray([int(i) not in gone for i in ids])]]
    assert not list(rescored_pairs(index, remaining, 0.9, fewer, nprobe=4, margin=0.2))


def test_block_whose_candidates_are_all_gone_is_skipped(pq_case):
    """A concurrent index run removed every candidate of a block: vectors_of returns nothing, and
    the search goes on (it used to raise IndexError on the empty array)."""
    index, blocks, vectors_of, exact = pq_case
    first = {int(i) for i in blocks[0][0]}

    def none_for_the_first_block(wanted):
        kept = np.asarray([i for i in wanted if int(i) not in first and int(i) not in exact_partners], np.int64)
        return vectors_of(kept) if len(kept) else (kept, np.zeros((0, 32), np.float32))

    exact_partners = {b for a, b in exact if a in first} | {a for a, b in exact if b in first}
    found = list(rescored_pairs(index, blocks, 0.9, none_for_the_first_block, nprobe=4, margin=0.2))
    assert found and not any({a, b} & first for a, b, _ in found)

    def nothing(wanted):
        return np.zeros(0, np.int64), np.zeros((0, 32), np.float32)

    assert not list(rescored_pairs(index, blocks, 0.9, nothing, nprobe=4, margin=0.2))


class OneWayIndex:
    """An index that finds the pair (3, 9) only from 9's end, as a compressed index may (its scores
    are not symmetric), and both ends of (3, 6)."""

    def range_search(self, vectors, threshold, nprobe=None):
        found = {3: [6], 6: [3], 9: [3]}
        lists = [found.get(int(i), []) for i in self.ids]
        lims = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        return lims, np.ones(lims[-1], np.float32), np.asarray([b for x in lists for b in x], np.int64)


def test_pair_found_only_from_its_larger_id_is_kept_and_each_pair_given_once():
    ids = np.asarray([3, 6, 9], np.int64)
    vectors = _unit(np.asarray([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02]]))
    index = OneWayIndex()
    blocks = []
    for block in ([0, 1], [2]):  # 3 and 9 in different blocks: (3, 9) is only found in the second
        index.ids = ids[block]
        blocks.append((ids[block], vectors[block]))

    def vectors_of(wanted):
        at = np.searchsorted(ids, wanted)
        return ids[at], vectors[at]

    def searched_blocks():
        for block_ids, block_vectors in blocks:
            index.ids = block_ids
            yield block_ids, block_vectors

    found = list(rescored_pairs(index, searched_blocks(), 0.99, vectors_of))
    assert sorted((a, b) for a, b, _ in found) == [(3, 6), (3, 9)]  # (3, 6) from both ends: once
    assert {(a, b): s for a, b, s in found}[(3, 9)] == pytest.approx(float(vectors[0] @ vectors[2]))


def test_flat_index_margin_finds_pairs_its_float16_inner_product_puts_below_the_threshold():
    """Flat holds the catalog's float16 vectors un-normalised: norms a little under 1 make the index's
    inner product fall below the exact cosine. The Flat margin still proposes such a pair."""
    rng = np.random.default_rng(5)
    d = 64
    base = _unit(rng.standard_normal((20, d)))
    twin = _unit(base[0] + 0.05 * rng.standard_normal(d))
    stored = np.concatenate([base, twin[None]]) * np.float32(1 - 2**-11)  # norms off as float16 rounding allows
    ids = np.arange(1, 22, dtype=np.int64)
    index = build_index("Flat", d, stored, ids, requested="auto")
    assert score_margin(index) == FLAT_MARGIN
    cosine = float(base[0] @ twin)
    threshold = cosine - 1e-4  # above the stored inner product (cosine * (1 - 2^-11)^2), below the cosine
    assert float(stored[0] @ stored[20]) < threshold
    blocks = [(ids, stored)]

    def vectors_of(wanted):
        return np.asarray(wanted, np.int64), stored[np.asarray(wanted) - 1]

    assert (1, 21) not in index_pairs(index, blocks, threshold)
    assert not list(rescored_pairs(index, blocks, threshold, vectors_of, margin=0.0))
    found = list(rescored_pairs(index, blocks, threshold, vectors_of, margin=score_margin(index)))
    assert [(a, b) for a, b, _ in found] == [(1, 21)] and found[0][2] == pytest.approx(cosine, abs=1e-6)


def test_each_pair_is_given_once_from_a_compressed_index(pq_case):
    index, blocks, vectors_of, _ = pq_case
    pairs = [(a, b) for a, b, _ in rescored_pairs(index, blocks, 0.9, vectors_of, nprobe=4, margin=PQ_MARGIN)]
    assert len(pairs) == len(set(pairs)) and all(a < b for a, b in pairs)


# ---- a library indexed with SQ8 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sq8_root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("sq8") / "photos"
    make_library_photos(root)
    result = CliRunner().invoke(main, ["index", str(root), "--weights", str(tiny_folder), "--precision", "fp32",
                                       "--workers", "0", "--index", "SQ8"])
    assert result.exit_code == 0, result.output
    return root


def catalog_cosines(library: Library) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    with library.catalog.session() as s:
        rows = sorted((r.id, r.path_text, r.cls) for r in s.query(ImageRow).filter(ImageRow.status == EMBEDDED))
    ids = np.asarray([r[0] for r in rows])
    vectors = _unit(np.stack([np.frombuffer(r[2], np.float16).astype(np.float32) for r in rows]))
    return ids, vectors @ vectors.T, {r[0]: r[1] for r in rows}


def test_sq8_library_reports_exact_cosines(sq8_root):
    with Library.open(sq8_root) as library:
        index = library.load_indexes(("cls",))["cls"]
        assert index.factory == "SQ8" and score_margin(index) == SQ_MARGIN
        ids, cosines, _ = catalog_cosines(library)
    position = {int(i): n for n, i in enumerate(ids)}
    result = CliRunner().invoke(main, ["dedup", str(sq8_root), "--threshold", str(THRESHOLD), "--json"])
    groups = json.loads(result.output)["groups"]
    near = [g for g in groups if g["kind"] == "near"]
    assert len(near) == 2
    for group in groups:
        keeper = next(m for m in group["members"] if m["path"] == group["keep"])
        for m in group["members"]:
            expected = 1.0 if m["sha256"] == keeper["sha256"] else cosines[position[m["id"]], position[keeper["id"]]]
            assert m["similarity"] == pytest.approx(min(1.0, expected), abs=1e-6), m["path"]


def test_sq8_pair_above_the_threshold_only_when_compressed_is_not_grouped(sq8_root):
    """Pick the pair of different photos whose SQ8 score most exceeds its exact cosine, and put the
    threshold between the two: the index alone would group them; dedup does not."""
    with Library.open(sq8_root) as library:
        index = library.load_indexes(("cls",))["cls"]
        ids, cosines, paths = catalog_cosines(library)
        _, vectors = library.catalog.vectors("cls")
        scores, found = index.search(vectors, len(ids))  # compressed scores of every pair
        position = {int(i): n for n, i in enumerate(ids)}
        best = max(((float(s) - cosines[n, position[int(b)]], int(ids[n]), int(b), float(s))
                    for n in range(len(ids)) for s, b in zip(scores[n], found[n])
                    if b > ids[n] and cosines[n, position[int(b)]] < 0.99),  # different photos only
                   key=lambda c: c[0])
        gap, a, b, compressed = best
        exact = cosines[position[a], position[b]]
        assert gap > 1e-4, "SQ8 scored no pair of different photos above its cosine"
        threshold = float((compressed + exact) / 2)
        blocks = library.catalog.vector_blocks("cls", 4096)
        proposed = index_pairs(index, blocks, threshold)
        assert (a, b) in proposed, (paths[a], paths[b])  # grouping on index scores would take this edge
        groups = find_duplicates(library, threshold=threshold)
        assert not any({a, b} <= {m.id for m in g.members} for g in groups), (paths[a], paths[b])
        for g in groups:  # and every pair inside every group is above it, exactly
            members = [position[m.id] for m in g.members]
            inside = cosines[np.ix_(members, members)][np.triu_indices(len(members), 1)]
            exact_copies = len({m.sha256 for m in g.members}) == 1
            assert exact_copies or inside.min() >= threshold - 1e-6


def test_candidates_are_searched_a_margin_below_the_threshold(sq8_root, monkeypatch):
    """The search goes SQ_MARGIN below the threshold (a pair SQ8 scores a little low is still found)."""
    monkeypatch.setenv("DINOSEEK_TORCH_SEARCH", "off")  # the SQ8 index's own search, as without a GPU
    seen = []
    real = dedup.rescored_pairs

    def spy(index, blocks, threshold, vectors_of, **kw):
        seen.append((threshold, kw["margin"]))
        return real(index, blocks, threshold, vectors_of, **kw)

    monkeypatch.setattr(dedup, "rescored_pairs", spy)
    with Library.open(sq8_root) as library:
        find_duplicates(library, threshold=THRESHOLD)
    assert seen == [(THRESHOLD, SQ_MARGIN)]


def test_crop_rerank_score_is_shown_beside_the_exact_cosine(sq8_root, monkeypatch):
    """With --crops a pair may join by its patch-token score: the member's similarity stays the exact
    cosine, and the score that joined it is reported as its crop similarity."""
    from dinoseek.retrieval import rerank

    with Library.open(sq8_root) as library:
        ids, cosines, paths = catalog_cosines(library)
        position = {p: n for n, p in enumerate(paths.values())}
        a, b = (next(i for i, p in paths.items() if p == name) for name in ("a/p3.jpg", "b/p4.jpg"))

        def lifted(candidates, library, encoder, threshold):  # p4 is a "crop" of p3: patch score 0.999
            kept = [(x, y, s) for x, y, s in candidates if s >= threshold]
            return [*kept, (a, b, 0.999)]

        monkeypatch.setattr(rerank, "rerank", lifted)
        groups = find_duplicates(library, threshold=THRESHOLD, crop_encoder=object(), candidate_threshold=0.5)
    group = next(g for g in groups if b in {m.id for m in g.members})
    other = next(m for m in group.members if m.id != group.keeper.id and m.id in (a, b))
    exact = cosines[position["a/p3.jpg"], position["b/p4.jpg"]]
    assert exact < THRESHOLD
    assert group.similarities[other.id] == pytest.approx(exact, abs=1e-6)
    assert group.crop_similarities == {other.id: 0.999}
    assert group.to_dict()["members"][[m.id for m in group.members].index(other.id)]["crop_similarity"] == 0.999

"""Exact search as torch matrix products (indexer.torch_search) against FAISS's IndexFlatIP: the same
top-k except ties within 1e-3, the same range-search sets, the same duplicate groups. Here the torch
path runs on the CPU in float32 (forced with DINOSEEK_TORCH_SEARCH=cpu or device="cpu"); the `gpu`
tests repeat the comparisons on CUDA in float16."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos

from dinoseek.indexer import torch_search
from dinoseek.indexer.errors import InvalidArgumentError
from dinoseek.indexer.library import Library
from dinoseek.indexer.store import build_index
from dinoseek.indexer.torch_search import ENV, PAD_SCORE, TorchExactIndex, search_device
from dinoseek.retrieval import dedup
from dinoseek.retrieval.dedup import FLAT_MARGIN, find_duplicates, score_margin

TIE = 1e-3


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Tight clusters (many near-ties) with some near-copies, rounded to float16 as the catalog stores them."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((max(1, n // 50), d)))
    x = unit(centers[rng.integers(0, len(centers), n)] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))
    x[n // 2: n // 2 + n // 20] = unit(x[: n // 20] + 0.02 * rng.standard_normal((n // 20, d)) / np.sqrt(d))
    return x.astype(np.float16).astype(np.float32)


DATA = {"random": random_vectors, "clustered": clustered_vectors}


def faiss_flat(ids: np.ndarray, vectors: np.ndarray) -> faiss.IndexIDMap2:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, ids)
    return index


def assert_same_top_k(found, expected, tie: float = TIE, atol: float = 1e-5):
    """Per query: the same scores best first (within atol), the same ids except where a score is
    within `tie` of the k-th (either may then be taken), the same -1 padding."""
    scores, ids = found
    ref_scores, ref_ids = expected
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == ref_ids.shape
    np.testing.assert_array_equal(ids == -1, ref_ids == -1)
    np.testing.assert_array_equal(scores[ids == -1], ref_scores[ref_ids == -1])
    np.testing.assert_allclose(scores[ids >= 0], ref_scores[ref_ids >= 0], atol=atol)
    for row in range(len(ids)):
        valid = ref_ids[row] >= 0
        if not valid.any():
            continue
        kth = ref_scores[row][valid][-1]
        ours, theirs = dict(zip(ids[row], scores[row])), dict(zip(ref_ids[row], ref_scores[row]))
        assert all(abs(ours[i] - kth) <= tie for i in set(ours) - set(theirs)), row
        assert all(abs(theirs[i] - kth) <= tie for i in set(theirs) - set(ours)), row


def assert_same_ranges(found, expected, threshold: float, near: float = 1e-5):
    """Equal sets per query, except pairs FAISS scores within `near` of the threshold (summation order)."""
    lims, scores, ids = found
    ref_lims, ref_scores, ref_ids = expected
    assert lims.dtype == ref_lims.dtype and scores.dtype == np.float32 and ids.dtype == np.int64
    assert len(lims) == len(ref_lims)
    for i in range(len(lims) - 1):
        ours = dict(zip(ids[lims[i]:lims[i + 1]].tolist(), scores[lims[i]:lims[i + 1]]))
        theirs = dict(zip(ref_ids[ref_lims[i]:ref_lims[i + 1]].tolist(), ref_scores[ref_lims[i]:ref_lims[i + 1]]))
        for id_ in set(ours) ^ set(theirs):
            assert abs(ours.get(id_, theirs.get(id_)) - threshold) <= near, (i, id_)
        for id_ in set(ours) & set(theirs):
            assert ours[id_] == pytest.approx(theirs[id_], abs=near)
        assert [j for j in ours if j in theirs] == [j for j in theirs if j in ours]  # FAISS's (stored) order


@pytest.fixture
def torch_on_cpu(monkeypatch):
    monkeypatch.setenv(ENV, "cpu")


# ---- the index itself, against FAISS --------------------------------------------------------------
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("k", [1, 10, 40])
def test_search_equals_faiss_flat_except_ties(data, k):
    vectors = DATA[data](2000, 48)
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 3  # catalog ids are not positions
    queries = unit(vectors[::20] + 0.05 * np.random.default_rng(1).standard_normal((100, 48)))
    expected = faiss_flat(ids, vectors).search(queries, k)
    assert_same_top_k(TorchExactIndex(ids, vectors, "cpu").search(queries, k), expected)


@pytest.mark.parametrize("data", DATA)
def test_float16_products_give_faiss_results_once_re_scored(data):
    """The GPU's arithmetic on the CPU: float16 storage and products pick candidates, float32 re-scores
    them. Catalog-like (float16) vectors come out with FAISS's scores; float32 ones within 1e-3."""
    vectors = DATA[data](3000, 64)
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    queries = unit(vectors[::30] + 0.05 * np.random.default_rng(3).standard_normal((100, 64)))
    index = TorchExactIndex(ids, vectors, "cpu", half=True, tile_rows=1000)
    assert_float16_index_matches_faiss(index, ids, vectors, queries, data, ks=(1, 10, 50))


def assert_float16_index_matches_faiss(index, ids, vectors, queries, data: str, ks) -> None:
    """float16-exact stored vectors (clustered, as the catalog's) come out with FAISS's scores once
    re-scored; float32 ones within 1e-3 (ties may swap)."""
    assert index.dtype == torch.float16
    reference = faiss_flat(ids, vectors)
    atol = 1e-5 if data == "clustered" else TIE
    for k in ks:
        assert_same_top_k(index.search(queries, k), reference.search(queries, k), atol=atol)
    for threshold in (0.5, 0.9):
        assert_same_ranges(index.range_search(queries, threshold), reference.range_search(queries, threshold),
                           threshold, near=atol)


def test_a_query_too_long_for_float16_is_answered_in_float32():
    """An un-normalised query (norm > 16) cannot be lowered to float16: the products run in float32,
    with FAISS's results, rather than failing (which would send every later search to FAISS)."""
    vectors = random_vectors(500, 32).astype(np.float16).astype(np.float32)  # as stored: catalog-like
    ids = np.arange(len(vectors), dtype=np.int64)
    index = TorchExactIndex(ids, vectors, "cpu", half=True)
    queries = vectors[:5] * 100  # norm 100
    reference = faiss_flat(ids, vectors)
    assert_same_top_k(index.search(queries, 10), reference.search(queries, 10), atol=1e-3)
    assert_same_ranges(index.range_search(queries, 30.0), reference.range_search(queries, 30.0), 30.0, near=1e-3)


def test_k_larger_than_the_index_pads_like_faiss():
    vectors = random_vectors(5, 16)
    ids = np.arange(10, 15, dtype=np.int64)
    expected = faiss_flat(ids, vectors).search(vectors, 9)
    found = TorchExactIndex(ids, vectors, "cpu").search(vectors, 9)
    assert_same_top_k(found, expected)
    assert (found[1][:, 5:] == -1).all() and (found[0][:, 5:] == PAD_SCORE).all()


def test_empty_index_and_no_queries_answer_in_faiss_formats():
    empty = TorchExactIndex(np.zeros(0, np.int64), np.zeros((0, 16), np.float32), "cpu")
    queries = random_vectors(3, 16)
    assert_same_top_k(empty.search(queries, 4), faiss_flat(np.zeros(0, np.int64), np.zeros((0, 16), np.float32))
                      .search(queries, 4))
    lims, scores, ids = empty.range_search(queries, 0.5)
    assert lims.tolist() == [0, 0, 0, 0] and lims.dtype == np.uint64 and len(scores) == len(ids) == 0
    full = TorchExactIndex(np.arange(4), random_vectors(4, 16), "cpu")
    scores, ids = full.search(np.zeros((0, 16), np.float32), 3)
    assert scores.shape == ids.shape == (0, 3)
    assert full.range_search(np.zeros((0, 16), np.float32), 0.5)[0].tolist() == [0]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_range_search_equals_faiss_sets(data, threshold):
    vectors = DATA[data](1500, 32)
    ids = np.arange(len(vectors), dtype=np.int64) * 2 + 1
    queries = vectors[::7]
    expected = faiss_flat(ids, vectors).range_search(queries, threshold)
    found = TorchExactIndex(ids, vectors, "cpu").range_search(queries, threshold)
    assert len(found[2]) > len(queries) or (data, threshold) == ("random", 0.9)  # more than the queries themselves
    assert_same_ranges(found, expected, threshold)


@pytest.mark.parametrize("data", DATA)
def test_tiny_tiles_and_query_blocks_give_identical_results(data):
    vectors = DATA[data](700, 24)
    ids = np.arange(len(vectors), dtype=np.int64) + 100
    queries = vectors[::9]
    whole = TorchExactIndex(ids, vectors, "cpu")
    tiled = TorchExactIndex(ids, vectors, "cpu", query_rows=3, tile_rows=7)  # 100 tiles, merged top-k
    for a, b in zip(whole.search(queries, 12), tiled.search(queries, 12)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(whole.range_search(queries, 0.6), tiled.range_search(queries, 0.6)):
        np.testing.assert_array_equal(a, b)


def test_out_of_memory_halves_the_blocks_and_runs_the_block_again(monkeypatch):
    vectors = random_vectors(300, 16)
    index = TorchExactIndex(np.arange(300), vectors, "cpu", query_rows=64, tile_rows=64)
    expected = index.search(vectors, 5)
    real = index._search_block
    failures = []

    def once_out_of_memory(*args):
        if not failures:
            failures.append(args[0].shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(index, "_search_block", once_out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    found = index.search(vectors, 5)
    assert failures == [64] and index._sizes(300) == (32, 32)
    for a, b in zip(found, expected):
        np.testing.assert_array_equal(a, b)


def test_wrong_query_width_and_k_are_one_line_errors():
    index = TorchExactIndex(np.arange(4), random_vectors(4, 16), "cpu")
    with pytest.raises(InvalidArgumentError, match=r"queries must be an \(n, 16\) array, got shape \(2, 8\)"):
        index.search(np.zeros((2, 8), np.float32), 3)
    with pytest.raises(InvalidArgumentError, match="k must be at least 1"):
        index.search(np.zeros((2, 16), np.float32), 0)
    with pytest.raises(InvalidArgumentError, match="one id per vector"):
        TorchExactIndex(np.arange(3), random_vectors(4, 16), "cpu")


# ---- when it is used ----------------------------------------------------------------------------
def test_cpu_machines_stay_on_faiss_by_default(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(torch_search, "_cuda_device", lambda: None)
    assert search_device(faiss_gpu=False) is None


def test_setting_chooses_the_device_and_faiss_gpu_wins_in_auto(monkeypatch):
    monkeypatch.setattr(torch_search, "_cuda_device", lambda: torch.device("cuda", 0))
    monkeypatch.delenv(ENV, raising=False)
    assert search_device(faiss_gpu=False) == torch.device("cuda", 0)
    assert search_device(faiss_gpu=True) is None  # faiss-gpu's own GPU indexes
    # small indexes: FAISS on the CPU answers before CUDA has started
    assert search_device(faiss_gpu=False, count=torch_search.AUTO_MIN_VECTORS - 1) is None
    assert search_device(faiss_gpu=False, count=torch_search.AUTO_MIN_VECTORS) == torch.device("cuda", 0)
    monkeypatch.setenv(ENV, "cuda")
    assert search_device(faiss_gpu=False, count=10) == torch.device("cuda", 0)
    assert search_device(faiss_gpu=True) == torch.device("cuda", 0)
    monkeypatch.setenv(ENV, "off")
    assert search_device(faiss_gpu=False) is None
    monkeypatch.setenv(ENV, "CPU")
    assert search_device(faiss_gpu=True) == torch.device("cpu")
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(InvalidArgumentError, match=r"^DINOSEEK_TORCH_SEARCH must be one of auto, cuda, cpu, off, "
                                                   r"got 'gpu'$"):
        search_device(faiss_gpu=False)


@pytest.mark.parametrize("factory", ["Flat", "SQfp16"])
def test_exact_vector_index_searches_through_torch_and_refreshes_after_changes(torch_on_cpu, monkeypatch, factory):
    """Flat, and SQfp16 (auto's large exact index) handed over as its float16 codes, no float32 copy."""
    vectors = clustered_vectors(600, 32).astype(np.float16).astype(np.float32)  # the catalog's values
    ids = np.arange(600, dtype=np.int64) * 5 + 1
    index = build_index(factory, 32, vectors, ids, requested="auto")
    made, dtypes = [], set()
    real = torch_search.TorchExactIndex
    monkeypatch.setattr(torch_search, "TorchExactIndex",
                        lambda *a, **k: made.append(len(a[0])) or dtypes.add(a[1].dtype) or real(*a, **k))
    queries = vectors[::10]
    reference = faiss_flat(ids, vectors)
    assert_same_top_k(index.search(queries, 10), reference.search(queries, 10))
    assert_same_ranges(index.range_search(queries, 0.8), reference.range_search(queries, 0.8), 0.8)
    assert made == [600]  # one copy for both searches
    removed = ids[::3]
    index.remove(removed)
    reference.remove_ids(faiss.IDSelectorBatch(removed))
    found = index.search(queries, 10)
    assert made == [600, 400] and not np.isin(found[1], removed).any()
    assert_same_top_k(found, reference.search(queries, 10))
    extra = random_vectors(5, 32, seed=9).astype(np.float16).astype(np.float32)
    index.add(np.arange(10_000, 10_005), extra)
    reference.add_with_ids(extra, np.arange(10_000, 10_005))
    assert_same_top_k(index.search(extra, 3), reference.search(extra, 3))
    assert made == [600, 400, 405]
    assert dtypes == {np.dtype(np.float16 if factory == "SQfp16" else np.float32)}


def test_compressed_indexes_stay_on_faiss(torch_on_cpu, monkeypatch):
    vectors = clustered_vectors(2000, 32)
    index = build_index("IVF8,Flat", 32, vectors, np.arange(2000), requested="IVF8,Flat")
    monkeypatch.setattr(torch_search, "TorchExactIndex", lambda *a, **k: pytest.fail("torch path taken"))
    index.search(vectors[:5], 3)
    index.range_search(vectors[:5], 0.9)


def test_a_failing_torch_search_falls_back_to_faiss_until_the_index_changes(torch_on_cpu, monkeypatch, caplog):
    vectors = random_vectors(200, 16)
    index = build_index("Flat", 16, vectors, np.arange(200), requested="auto")
    calls = []

    def broken(self, queries, k):
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TorchExactIndex, "search", broken)
    with caplog.at_level(logging.WARNING, logger="dinoseek.indexer.store"):
        found = index.search(vectors[:4], 3)
        index.search(vectors[:4], 3)
    assert_same_top_k(found, faiss_flat(np.arange(200), vectors).search(vectors[:4], 3))
    assert calls == [1] and "FAISS on the CPU takes over: CUDA error" in caplog.text
    index.remove([0])
    index.search(vectors[:4], 3)
    assert calls == [1, 1]  # a new copy is tried once the index changed


# ---- dedup --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("torch-dedup") / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


def as_compared(groups):
    return [(g.kind, [m.id for m in g.members], g.keeper.id, round(g.min_similarity, 6),
             {i: round(s, 6) for i, s in g.similarities.items()}) for g in groups]


def test_dedup_finds_the_same_groups_through_torch_over_the_catalog(flat_root, monkeypatch):
    monkeypatch.setenv(ENV, "off")  # the reference is FAISS's path, also on a CUDA machine
    with Library.open(flat_root) as library:
        expected = find_duplicates(library, threshold=THRESHOLD)
    monkeypatch.setenv(ENV, "cpu")
    with Library.open(flat_root) as library:
        index = dedup.candidate_index(library, "cls")
        assert isinstance(index, TorchExactIndex) and index.count == 11 and score_margin(index) == FLAT_MARGIN
        assert library.indexes == {}  # the library's own index was not needed
        found = find_duplicates(library, threshold=THRESHOLD)
        at_lower = find_duplicates(library, threshold=0.9)
    assert as_compared(found) == as_compared(expected) and len(found) == 3
    monkeypatch.setenv(ENV, "off")
    with Library.open(flat_root) as library:
        assert as_compared(at_lower) == as_compared(find_duplicates(library, threshold=0.9))


def test_torch_dedup_reads_the_catalog_once_for_large_libraries_too(flat_root, monkeypatch):
    """Where the FAISS path would train a temporary IVF (a large exact library), torch searches the
    catalog's vectors exactly, and its query blocks come from the index, not a second catalog read."""
    monkeypatch.setenv(ENV, "cpu")
    monkeypatch.setattr(dedup, "EXACT_PAIRS_MAX", 5)
    monkeypatch.setattr(dedup, "trained_ivf_flat", lambda *a, **k: pytest.fail("temporary IVF trained"))
    with Library.open(flat_root) as library:
        reads = []
        real = library.catalog.vector_blocks
        monkeypatch.setattr(library.catalog, "vector_blocks", lambda *a: reads.append(a) or real(*a))
        found = find_duplicates(library, threshold=THRESHOLD, block=4)
    assert reads == [("cls", 4)] and len(found) == 3


def test_dedup_stays_on_faiss_when_the_vectors_cannot_be_placed(flat_root, monkeypatch, caplog):
    monkeypatch.setenv(ENV, "cpu")

    def out_of_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(TorchExactIndex, "__init__", out_of_memory)
    with Library.open(flat_root) as library, caplog.at_level(logging.WARNING, logger="dinoseek.retrieval.dedup"):
        index = dedup.candidate_index(library, "cls")
        found = find_duplicates(library, threshold=THRESHOLD)
    assert not isinstance(index, TorchExactIndex) and len(found) == 3
    assert "duplicate search stays on FAISS" in caplog.text


# ---- on CUDA, in float16 -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("resident", [True, False])  # False: tiles copied from pinned host memory
def test_cuda_fp16_search_equals_faiss_except_ties(data, resident):
    vectors = DATA[data](20_000, 384)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 1
    queries = unit(vectors[::40] + 0.05 * np.random.default_rng(2).standard_normal((500, 384)))
    index = TorchExactIndex(ids, vectors, "cuda", resident=resident, tile_rows=3001)
    assert_float16_index_matches_faiss(index, ids, vectors, queries, data, ks=(1, 10, 100))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_blocks_equal_tiny_blocks():
    vectors = clustered_vectors(30_000, 384)
    ids = np.arange(len(vectors), dtype=np.int64)
    queries = vectors[::30]
    whole = TorchExactIndex(ids, vectors, "cuda")
    tiled = TorchExactIndex(ids, vectors, "cuda", query_rows=97, tile_rows=1009)
    assert_same_top_k(tiled.search(queries, 10), whole.search(queries, 10), atol=1e-5)
    assert_same_ranges(tiled.range_search(queries, 0.8), whole.range_search(queries, 0.8), 0.8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dedup_finds_the_same_groups(flat_root, monkeypatch):
    monkeypatch.setenv(ENV, "off")  # the reference is FAISS's path, not torch on this GPU
    with Library.open(flat_root) as library:
        expected = find_duplicates(library, threshold=THRESHOLD)
    monkeypatch.setenv(ENV, "cuda")
    with Library.open(flat_root) as library:
        index = dedup.candidate_index(library, "cls")
        assert isinstance(index, TorchExactIndex) and index.device.type == "cuda"
        found = find_duplicates(library, threshold=THRESHOLD)
        vectors = library.load_indexes(("cls",))["cls"]
        _, queries = library.catalog.vectors("cls")
        scores, ids = vectors.search(queries, 5)  # the library's Flat index, through torch on CUDA
        assert vectors._torch is not None and vectors._torch[1] is not None
    assert as_compared(found) == as_compared(expected)
    assert_same_top_k((scores, ids), faiss_flat(*library_vectors(flat_root)).search(queries, 5), atol=1e-5)


def library_vectors(root):
    with Library.open(root) as library:
        return library.catalog.vectors("cls")

"""FAISS stores against brute force; index choice by size; atomic checkpoint files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dinoseek.indexer.store import (TRAIN_PER_LIST, auto_factory, build_index, read_index, remove_temp_files, trained_ivf_flat,
                           training_sample, write_atomic)


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_factory_grows_with_the_library():
    assert auto_factory(10, 384) == "Flat"
    assert auto_factory(50_000, 384) == "Flat"
    assert auto_factory(200_000, 384).startswith("IVF") and auto_factory(200_000, 384).endswith(",SQ8")
    assert auto_factory(100_000_000, 384) == "IVF32768,PQ96x8"  # nlist ~ 4 sqrt(N), a power of two
    assert auto_factory(100_000_000, 1536) == "IVF32768,PQ384x8"


def test_one_training_sample_for_every_ivf_index():
    positions = training_sample(10_000, 8)
    assert len(positions) == 8 * TRAIN_PER_LIST and (np.diff(positions) > 0).all()  # sorted, no repeats
    assert (training_sample(10_000, 8) == positions).all()  # seeded: the same sample every time
    assert len(training_sample(10_000, 1, needed=1000)) == 1000 and len(training_sample(100, 8)) == 100
    # The temporary IVF-Flat dedup fills block by block: trained on that sample, it finds what exact search finds.
    vectors, ids = unit_vectors(4000, 16), np.arange(1, 4001, dtype=np.int64)
    index = trained_ivf_flat(16, 8, vectors[training_sample(4000, 8)], nprobe=8, requested="dedup", trained_on=4000)
    for start in range(0, 4000, 1000):
        index.add(ids[start:start + 1000], vectors[start:start + 1000])
    assert (index.factory, index.count, index.nprobe) == ("IVF8,Flat", 4000, 8)
    _, found = index.search(vectors[:50], 1)
    assert (found[:, 0] == ids[:50]).all()


def test_flat_equals_brute_force_with_catalog_ids():
    vectors = unit_vectors(500, 32)
    ids = np.arange(1000, 1500, dtype=np.int64) * 3  # row ids, not positions
    index = build_index("Flat", 32, vectors, ids, requested="auto")
    queries = unit_vectors(20, 32, seed=1)
    scores, found = index.search(queries, 5)
    exact = queries @ vectors.T
    order = np.argsort(-exact, axis=1)[:, :5]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), atol=1e-5)


def test_ivf_trained_on_a_sample_reaches_target_recall():
    # Clustered data, as embeddings are: random centers plus small noise.
    rng = np.random.default_rng(0)
    centers = unit_vectors(64, 48, seed=2)
    vectors = centers[rng.integers(0, 64, 20_000)] + 0.3 * unit_vectors(20_000, 48, seed=3)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(20_000, dtype=np.int64) + 1
    index = build_index("IVF64,SQ8", 48, vectors, ids, requested="IVF64,SQ8")
    assert index.nprobe is not None and 1 <= index.nprobe <= 64
    queries = vectors[rng.choice(20_000, 100, replace=False)]
    _, found = index.search(queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10] + 1
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9


def test_untrainable_factory_starts_flat_and_bad_factory_is_a_value_error():
    index = build_index("IVF256,Flat", 16, unit_vectors(50, 16), np.arange(50), requested="IVF256,Flat")
    assert index.factory == "Flat" and index.count == 50
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        build_index("IVF-nonsense", 16, unit_vectors(5, 16), np.arange(5), requested="IVF-nonsense")
    with pytest.raises(ValueError, match="cannot remove vectors"):
        build_index("HNSW16", 16, unit_vectors(5, 16), np.arange(5), requested="HNSW16")


def test_remove_and_add():
    index = build_index("Flat", 8, unit_vectors(10, 8), np.arange(10), requested="auto")
    assert index.remove([3, 4, 99]) == 2
    index.add(np.array([42]), unit_vectors(1, 8))
    assert sorted(index.ids()) == [0, 1, 2, 5, 6, 7, 8, 9, 42]


def test_atomic_checkpoint_round_trip_and_damage(tmp_path):
    index = build_index("Flat", 8, unit_vectors(10, 8), np.arange(10), requested="auto")
    path = tmp_path / "cls.faiss"
    data = index.serialize()
    write_atomic(path, data)
    checksum = hashlib.sha256(data).hexdigest()
    loaded = read_index(path, checksum)
    assert loaded is not None and loaded.ntotal == 10
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert read_index(path, "0" * 64) is None  # stale record
    path.write_bytes(path.read_bytes()[:-7])
    assert read_index(path, checksum) is None  # truncated
    assert read_index(tmp_path / "gone.faiss", checksum) is None
    (tmp_path / ".cls.0123456789abcdef.faiss.123.tmp").write_bytes(b"x")
    (tmp_path / ".someone-elses.tmp").write_bytes(b"x")
    assert remove_temp_files(tmp_path) == 1
    assert (tmp_path / ".someone-elses.tmp").exists()

"""A library of N random unit vectors (no photos), with planted near-duplicate pairs, for the
search and dedup benchmarks. Built once into a folder and reused."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from dinoseek.indexer.catalog import EMBEDDED, ImageRow, path_digest
from dinoseek.indexer.library import Library

MANIFEST = {"arch": {"synthetic": True}, "weights_sha256": "synthetic", "preprocess": {"mode": "crop", "size": 224},
            "precision": "fp32", "dim": None}


def synthetic_vectors(n: int, dim: int, duplicates: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """Unit vectors; the last `duplicates * n` are noisy copies (cosine ~0.98) of the first ones."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    planted = int(n * duplicates)
    vectors[n - planted:] = vectors[:planted] + 0.2 * rng.standard_normal((planted, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, planted


CHUNK = 20_000  # rows generated and inserted at a time: a 5M library never exists as one matrix


def clustered_chunk(lo: int, hi: int, dim: int, clusters: int = 4096, spread: float = 0.04,
                    seed: int = 0) -> np.ndarray:
    """Rows lo..hi of a mixture of `clusters` Gaussians around random unit centres, normalised: like
    real embeddings, which gather around what photos show (cosine ~0.8 to their centre at 384-d,
    spread * sqrt(dim) of noise). Each chunk is seeded by its position, so any slice is reproducible
    without generating the rows before it."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng((seed, lo))
    rows = centres[rng.integers(0, clusters, hi - lo)] + spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def uniform_chunk(lo: int, hi: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows lo..hi of uniformly random unit vectors (no structure for IVF to use)."""
    rows = np.random.default_rng((seed, lo)).standard_normal((hi - lo, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def build_chunked(folder: Path, n: int, dim: int, chunk_of) -> Path:
    """A catalog of n rows whose vectors come from chunk_of(lo, hi) (both kinds the same), written
    CHUNK rows at a time; no index is built (the caller measures that)."""
    root = folder / "root"
    if (root / ".dinoseek" / "catalog.sqlite").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Library.open(root, write=True, create=True) as library:
        library.bind_model({**MANIFEST, "dim": dim})
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            blobs = chunk_of(lo, hi).astype(np.float16)
            with library.catalog.engine.begin() as connection:
                connection.execute(insert(ImageRow), [
                    {"path": b"img/%08d.jpg" % i, "path_sha256": path_digest(b"img/%08d.jpg" % i),
                     "path_text": f"img/{i:08d}.jpg", "folder": "img", "size": 2_000_000 + i,
                     "mtime_ns": 0, "sha256": f"{i:064x}", "width": 4000, "height": 3000, "format": "JPEG",
                     "status": EMBEDDED, "cls": blobs[i - lo].tobytes(), "patch": blobs[i - lo].tobytes()}
                    for i in range(lo, hi)
                ])
    print(f"# catalog: {n:,} rows in {time.perf_counter() - start:.0f}s", flush=True)
    return root


def build(folder: Path, n: int, dim: int = 384, duplicates: float = 0.01) -> Path:
    root = folder / "root"
    if (root / ".dinoseek" / "catalog.sqlite").exists():
        with Library.open(root, write=True) as library:
            if library.index_set.record("cls") is None:  # build and save the indexes once
                start = time.perf_counter()
                library.load_indexes()
                print(f"# indexes built ({library.indexes['cls'].factory}) in {time.perf_counter() - start:.0f}s",
                      flush=True)
        return root
    root.mkdir(parents=True, exist_ok=True)
    vectors, _ = synthetic_vectors(n, dim, duplicates)
    blobs = vectors.astype(np.float16)
    start = time.perf_counter()
    with Library.open(root, write=True, create=True) as library:
        library.bind_model({**MANIFEST, "dim": dim})
        with library.catalog.engine.begin() as connection:
            for lo in range(0, n, 20_000):
                connection.execute(insert(ImageRow), [
                    {"path": b"img/%08d.jpg" % i, "path_sha256": path_digest(b"img/%08d.jpg" % i),
                     "path_text": f"img/{i:08d}.jpg", "folder": "img", "size": 2_000_000 + i,
                     "mtime_ns": 0, "sha256": f"{i:064x}", "width": 4000, "height": 3000, "format": "JPEG",
                     "status": EMBEDDED, "cls": blobs[i].tobytes(), "patch": blobs[i].tobytes()}
                    for i in range(lo, min(n, lo + 20_000))
                ])
        print(f"# catalog: {n:,} rows in {time.perf_counter() - start:.0f}s", flush=True)
        start = time.perf_counter()
        library.load_indexes()
        print(f"# indexes ({library.indexes['cls'].factory}, nprobe {library.indexes['cls'].nprobe}) built in "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    return root

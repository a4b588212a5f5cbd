"""Search: our API vs raw FAISS on the same index, and the auto index against exact search.

    python benchmarks/search.py --n 1000000 --keep /tmp/bench-1m

N random unit vectors (384-d) in a synthetic library (catalog + auto index). For the exact (Flat)
and the auto index: raw `index.search` vs `LibrarySearch.search_batch` (which adds query
normalization, deleted-row filtering and hit metadata from the catalog), batch 1000 and single
queries; recall@10 of auto against exact; queries/s; index memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dinoseek.indexer.library import Library  # noqa: E402
from dinoseek.indexer.store import VectorIndex  # noqa: E402
from dinoseek.retrieval.api import LibrarySearch  # noqa: E402
from synthetic_library import build, synthetic_vectors  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="Build the library here once and reuse it.")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="dinoseek-search-"))
    print(f"# {platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"{args.n:,} x {args.dim} random unit vectors")
    root = build(folder, args.n, args.dim)
    vectors, _ = synthetic_vectors(args.n, args.dim, 0.01)
    vectors = vectors.astype(np.float16).astype(np.float32)  # what the catalog holds
    queries = np.random.default_rng(9).standard_normal((args.batch, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.arange(1, args.n + 1, dtype=np.int64)

    with Library.open(root) as library, LibrarySearch(library) as lib:
        auto = lib.indexes["cls"]
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
        flat.add_with_ids(vectors, ids)
        exact = VectorIndex(flat, "Flat", "Flat", None, args.n)
        _, truth = exact.search(queries, 10)
        print(f"{'index':<18}{'mode':<14}{'raw faiss':>12}{'our API':>12}{'overhead':>10}{'QPS (API)':>11}{'recall@10':>11}{'MB':>8}")
        from dinoseek.indexer.store import auto_factory, build_index

        ivf_factory = auto_factory(args.n, args.dim) if "IVF" in auto_factory(args.n, args.dim) else "IVF1024,SQ8"
        ivf = auto if auto.factory == ivf_factory else build_index(ivf_factory, args.dim, vectors, ids, requested=ivf_factory)
        candidates = [("Flat (exact)", exact), (f"auto: {auto.factory}", auto)]
        if ivf is not auto:
            candidates.append((f"{ivf.factory} np{ivf.nprobe}", ivf))
        for name, index in candidates:
            lib.indexes["cls"] = index
            _, found = index.search(queries, 10)
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            mb = len(index.serialize()) / 1e6
            repeats = 1 if name.startswith("Flat") else 3
            raw = timed(lambda: index.search(queries, 10), repeats)
            api = timed(lambda: lib.search_batch(queries, 10), repeats)
            print(f"{name:<18}{'batch ' + str(args.batch):<14}{raw * 1e3:>10.0f}ms{api * 1e3:>10.0f}ms"
                  f"{api / raw - 1:>+10.1%}{args.batch / api:>11.0f}{recall:>11.3f}{mb:>8.0f}", flush=True)
            singles = queries[:20]
            raw = timed(lambda: [index.search(q[None], 10) for q in singles], 1) / len(singles)
            api = timed(lambda: [lib.search(q, 10) for q in singles], 1) / len(singles)
            print(f"{name:<18}{'single':<14}{raw * 1e3:>10.1f}ms{api * 1e3:>10.1f}ms{api / raw - 1:>+10.1%}"
                  f"{1 / api:>11.0f}{'':>11}{'':>8}", flush=True)
    print(f"# peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (includes the float32 "
          f"copy for the exact reference)")


if __name__ == "__main__":
    main()

"""Exact search and the dedup candidate search through torch (indexer.torch_search) on a GPU, against
faiss-cpu and numpy in the same process, on the same vectors.

    python benchmarks/gpu_search.py                     # 1M x 384 on CUDA (about a minute on an H200)
    python benchmarks/gpu_search.py --n 20000 --device cpu   # a smoke run anywhere

Vectors: clustered (n/1000 centres, members at cosine ~0.4 of each other) and rounded to float16 as
the catalog stores them, with 1% planted near-copies (cosine 0.93-0.995 to their source, each next
to it: row 100m + 1 copies row 100m, so any prefix holds its share of them).

1. Exact search, k=10: torch in batches of 1000 and 10000 (all queries), faiss-cpu IndexFlatIP and
   numpy float32 on the first --ref-queries of them (slow on a CPU); recall@10 of each against numpy
   (exact float32) on those queries, and the largest score difference.
2. Dedup candidate search, all pairs >= --threshold: torch exact range search feeding
   grouping.rescored_pairs then linked_groups (what find_duplicates does with the catalog's vectors),
   over all n; and FAISS's path for large libraries (a temporary IVF-Flat, nprobe 16, on the CPU) and
   torch again on the first --ref-n rows, for a ratio on the same data. Pairs found, planted pairs
   found, seconds.
Peak GPU memory per phase (torch.cuda.max_memory_allocated) and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoseek.indexer.torch_search import TorchExactIndex  # noqa: E402
from dinoseek.retrieval.grouping import linked_groups, rescored_pairs  # noqa: E402

try:
    import faiss
except ImportError:  # the torch rows still run; FAISS's are left out
    faiss = None

try:
    from dinoseek.retrieval.dedup import FLAT_MARGIN
except ImportError:  # dedup needs sqlalchemy; the margin it would give an exact index
    FLAT_MARGIN = 0.002


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(float32 vectors holding float16 values, planted (source, copy) row pairs)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // 1000), dim), dtype=np.float32))
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= 1.2 / np.sqrt(dim)
    x += centres[rng.integers(0, len(centres), n)]
    unit(x)
    sources = np.arange(0, n - 1, 100)
    noise = rng.standard_normal((len(sources), dim), dtype=np.float32) / np.sqrt(dim)
    noise *= rng.uniform(0.1, 0.4, (len(sources), 1)).astype(np.float32)  # cosine 0.93-0.995 to the source
    x[sources + 1] = unit(x[sources] + noise)
    return x.astype(np.float16).astype(np.float32), list(zip(sources.tolist(), (sources + 1).tolist()))


def numpy_top_k(x: np.ndarray, queries: np.ndarray, k: int, rows: int = 250) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = [], []
    for lo in range(0, len(queries), rows):
        s = queries[lo:lo + rows] @ x.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)
        ids.append(top)
        scores.append(np.take_along_axis(s, top, 1))
    return np.concatenate(scores), np.concatenate(ids)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


class Peak:
    """Peak GPU memory of a phase (MB), where there is a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Peak:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else float("nan")


def dedup(index, x: np.ndarray, n: int, threshold: float, block: int, nprobe: int | None = None):
    """(seconds searching, seconds grouping, pairs found, groups) over the first n rows; ids = row + 1."""

    def vectors_of(ids):
        return ids, x[ids - 1]

    blocks = ((np.arange(lo, min(n, lo + block)) + 1, x[lo:min(n, lo + block)]) for lo in range(0, n, block))
    start = time.perf_counter()
    pairs = list(rescored_pairs(index, blocks, threshold, vectors_of, nprobe=nprobe, margin=FLAT_MARGIN, total=n))
    searched = time.perf_counter() - start
    start = time.perf_counter()
    groups, _ = linked_groups(pairs)
    return searched, time.perf_counter() - start, {(a, b) for a, b, _ in pairs}, groups


def planted_found(pairs: set, planted: list[tuple[int, int]], n: int) -> str:
    inside = [(a + 1, b + 1) for a, b in planted if b < n]
    return f"{sum(p in pairs for p in inside) / max(1, len(inside)):.1%} of {len(inside):,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 10000], help="torch query batch sizes")
    parser.add_argument("--queries", type=int, default=50_000, help="queries per torch batch size")
    parser.add_argument("--ref-queries", type=int, default=1000, help="queries for faiss-cpu, numpy and recall")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=4096, help="dedup query block (find_duplicates' default)")
    parser.add_argument("--ref-n", type=int, default=100_000, help="rows for the FAISS IVF dedup comparison")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (and a small --n)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {name}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'faiss ' + faiss.__version__ if faiss else 'faiss not importable'}")

    start = time.perf_counter()
    x, planted = clustered(args.n, args.dim)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    rng = np.random.default_rng(1)
    queries = unit(x[rng.integers(0, args.n, args.queries)] + 0.3 / np.sqrt(args.dim)
                   * rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ref = queries[:args.ref_queries]
    print(f"# {args.n:,} x {args.dim} clustered vectors, {len(planted):,} planted copies, made in "
          f"{time.perf_counter() - start:.1f}s")

    # ---- 1. exact search ---------------------------------------------------------------------------
    with Peak(device) as upload:
        start = time.perf_counter()
        index = TorchExactIndex(ids, x, device)
        built = time.perf_counter() - start
    print(f"# torch index on {device} ({index.dtype}, {'resident' if index.resident else 'streamed'}) in "
          f"{built:.1f}s, peak GPU {upload.mb:,.0f} MB")
    start = time.perf_counter()
    truth_scores, truth = numpy_top_k(x, ref, args.k)  # exact float32: the reference for recall
    numpy_seconds = time.perf_counter() - start
    rows = []
    for batch in args.batches:
        index.search(queries[:batch], args.k)  # warm-up: CUDA context, cuBLAS handles
        with Peak(device) as peak:
            start = time.perf_counter()
            for lo in range(0, args.queries, batch):
                index.search(queries[lo:lo + batch], args.k)
            seconds = time.perf_counter() - start
        scores, found = index.search(ref, args.k)
        rows.append((f"torch {device.type} {str(index.dtype).removeprefix('torch.')}", batch, args.queries, seconds,
                     recall(found - 1, truth), float(np.abs(scores - truth_scores).max()), peak.mb))
    if faiss is not None:
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        flat.search(ref[:10], args.k)
        start = time.perf_counter()
        scores, found = flat.search(ref, args.k)
        seconds = time.perf_counter() - start
        rows.append(("faiss-cpu IndexFlatIP", len(ref), len(ref), seconds, recall(found, truth),
                     float(np.abs(scores - truth_scores).max()), float("nan")))
        del flat
    rows.append(("numpy float32", 250, len(ref), numpy_seconds, 1.0, 0.0, float("nan")))
    print(f"\n## exact search, k={args.k}, {args.n:,} x {args.dim}")
    print(f"{'method':<24} {'batch':>6} {'queries':>8} {'seconds':>8} {'queries/s':>10} {'vs numpy':>9} "
          f"{'recall@10':>9} {'max |ds|':>9} {'peak GPU MB':>11}")
    for method, batch, count, seconds, r, diff, mb in rows:
        rate = count / seconds
        print(f"{method:<24} {batch:>6} {count:>8,} {seconds:>8.2f} {rate:>10,.0f} "
              f"{rate / (len(ref) / numpy_seconds):>8.1f}x {r:>9.4f} {diff:>9.1e} {mb:>11,.0f}")

    # ---- 2. dedup candidate search -----------------------------------------------------------------
    print(f"\n## dedup: all pairs >= {args.threshold} (re-scored exactly, complete linkage), block {args.block}")
    print(f"{'method':<40} {'n':>9} {'build s':>8} {'search s':>9} {'group s':>8} {'total s':>8} {'pairs':>8} "
          f"{'groups':>8} {'planted found':>20} {'peak GPU MB':>11}")

    def report(method, n, build_s, result, mb):
        searched, grouped, pairs, groups = result
        print(f"{method:<40} {n:>9,} {build_s:>8.1f} {searched:>9.1f} {grouped:>8.1f} "
              f"{build_s + searched + grouped:>8.1f} {len(pairs):>8,} {len(groups):>8,} {planted_found(pairs, planted, n):>20} "
              f"{mb:>11,.0f}", flush=True)
        return pairs

    del index
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sizes = [args.n] + ([args.ref_n] if args.ref_n < args.n and faiss is not None else [])
    torch_pairs = {}
    for n in sizes:
        with Peak(device) as peak:
            start = time.perf_counter()
            index = TorchExactIndex(ids[:n], x[:n].astype(np.float16) if device.type == "cuda" else x[:n], device)
            build_s = time.perf_counter() - start
            result = dedup(index, x, n, args.threshold, args.block)
        torch_pairs[n] = report(f"torch exact ({device.type})", n, build_s, result, peak.mb)
        del index
    if faiss is not None:
        from dinoseek.indexer.store import ivf_lists, trained_ivf_flat, training_sample

        n = min(args.ref_n, args.n)
        start = time.perf_counter()
        nlist = ivf_lists(n)
        ivf = trained_ivf_flat(args.dim, nlist, x[:n][training_sample(n, nlist)], nprobe=16, requested="dedup",
                               trained_on=n)
        ivf.add(ids[:n], x[:n])
        build_s = time.perf_counter() - start
        pairs = report(f"faiss-cpu IVF{nlist},Flat nprobe 16", n, build_s, dedup(ivf, x, n, args.threshold,
                                                                                args.block, nprobe=16), float("nan"))
        print(f"# torch pairs at n={n:,} include every FAISS IVF pair: {pairs <= torch_pairs[n]} "
              f"({len(torch_pairs[n] - pairs):,} only torch found)")
    print(f"# peak RSS {rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()

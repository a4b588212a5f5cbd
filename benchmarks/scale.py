"""Indexes at scale: build time, peak RSS, recall@10 against exact search, queries/s, dedup memory.

    python benchmarks/scale.py --n 1000000 --data clustered --keep /tmp/scale-1m-clustered
    python benchmarks/scale.py --n 1000000 --data uniform --keep /tmp/scale-1m-uniform
    python benchmarks/scale.py --n 5000000 --data clustered --keep /tmp/scale-5m-clustered --skip-dedup
    python benchmarks/scale.py --n 1000000 --data clustered --keep /tmp/scale-1m-clustered \
        --index IVF4096,PQ96x8 --on-disk-from 0 --skip-dedup     # the on-disk IVF-PQ path at 1M

Both vector kinds (cls and patch, the same synthetic vectors), 384-d. `clustered` is a mixture of
Gaussians like real embeddings (synthetic_library.clustered_chunk); `uniform` is random unit
vectors, on which IVF cannot reach the recall target and `auto` falls back (see indexer.build).

Every phase runs in a process of its own, so each peak RSS is that phase's alone: `catalog` (made
once, chunk by chunk; not measured), `index` (auto builds both kinds from the catalog and saves
them), `search` (a reader opens the saved indexes; 1000 fresh queries from the same distribution;
recall@10 against exact search over the catalog, computed by streaming it in blocks), `dedup`
(find_duplicates over cls). Each phase reports its peak RSS and its peak anonymous memory (sampled
every 0.1 s, Linux only):
the RSS also counts touched pages of the mapped on-disk lists, page cache the kernel can drop. Each
phase's figures are also written to KEEP/<phase>.json. The goals of issue 11 are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 1 << 30
QUERIES = 1000


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakAnonymous:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 0.1 s. The peak
    RSS also counts the pages of mapped files (the on-disk lists) that were touched: page cache the
    kernel can drop at any time, so this is the figure the memory goals are about."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.now()
            time.sleep(0.1)

    def now(self) -> int:
        """The peak so far, this moment included (a lower bound: spikes between samples are missed)."""
        with open("/proc/self/status") as f:
            current = next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
        with self._lock:
            self.peak = max(self.peak, current)
            return self.peak


def chunk_of(data: str, dim: int):
    from synthetic_library import clustered_chunk, uniform_chunk

    if data == "clustered":
        return lambda lo, hi: clustered_chunk(lo, hi, dim)
    return lambda lo, hi: uniform_chunk(lo, hi, dim)


def phase_index(root: Path, choice: str | None, on_disk_from: int | None, anon: PeakAnonymous) -> dict:
    from dinoseek.indexer import build
    from dinoseek.indexer.library import Library

    if on_disk_from is not None:
        build.ONDISK_FROM = on_disk_from
    start = time.perf_counter()
    with Library.open(root, write=True, index_choice=choice) as library:
        indexes = library.load_indexes()
        built = {kind: (index.factory, index.nprobe, index.lists is not None) for kind, index in indexes.items()}
        on_disk = sum(p.stat().st_size for p in library.folder.glob("*.ivfdata"))
    return {"seconds": time.perf_counter() - start, "rss": peak_rss(), "anon": anon.now(), "built": built,
            "lists_bytes": on_disk}


def phase_search(root: Path, n: int, dim: int, data: str, anon: PeakAnonymous) -> dict:
    import numpy as np

    from dinoseek.indexer.build import exact_top_k
    from dinoseek.indexer.library import Library
    from dinoseek.indexer.tuning import BUILD_BLOCK

    queries = chunk_of(data, dim)(n, n + QUERIES)  # rows after the library's: the same distribution, not in it
    with Library.open(root) as library:
        start = time.perf_counter()
        index = library.load_indexes(("cls",))["cls"]
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        seconds = time.perf_counter() - start
        rss, peak_anon = peak_rss(), anon.now()  # before the exact reference below: the benchmark's, not search's
        truth = exact_top_k(queries, library.catalog.vector_blocks("cls", BUILD_BLOCK), 10)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))
    return {"load_seconds": load_seconds, "qps": QUERIES / seconds, "recall": recall, "rss": rss, "anon": peak_anon,
            "factory": index.factory, "nprobe": index.nprobe}


def phase_dedup(root: Path, anon: PeakAnonymous) -> dict:
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval.dedup import find_duplicates

    with Library.open(root) as library:
        start = time.perf_counter()
        groups = find_duplicates(library, threshold=0.97)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss": peak_rss(), "anon": anon.now(), "groups": len(groups)}


def run_phase(args, phase: str, timeout: float | None) -> dict | None:
    (args.keep / f"{phase}.json").unlink(missing_ok=True)  # never an earlier run's figures
    command = [sys.executable, __file__, "--phase", phase, "--n", str(args.n), "--dim", str(args.dim),
               "--data", args.data, "--keep", str(args.keep)]
    command += ["--index", args.index] if args.index else []
    command += ["--on-disk-from", str(args.on_disk_from)] if args.on_disk_from is not None else []
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"# {phase}: stopped after {timeout:.0f}s", flush=True)
        return None
    if done.returncode != 0:
        print(f"# {phase} failed:\n{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--keep", type=Path, required=True, help="Library folder, made once and reused.")
    parser.add_argument("--skip-dedup", action="store_true")
    parser.add_argument("--index", help="A FAISS factory string instead of auto (rebuilds a kept library's indexes).")
    parser.add_argument("--on-disk-from", type=int, help="Put IVF lists on disk from this many vectors "
                        "(default: indexer.tuning.ONDISK_FROM), e.g. to measure the on-disk path at 1M.")
    parser.add_argument("--phase-timeout", type=float, default=None, help="Seconds per phase (default: none).")
    parser.add_argument("--phase", choices=("catalog", "index", "search", "dedup"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.keep / "root"
    if args.phase == "catalog":
        from synthetic_library import build_chunked

        build_chunked(args.keep, args.n, args.dim, chunk_of(args.data, args.dim))
        print(json.dumps({}))
        return
    if args.phase:
        anon = PeakAnonymous()
        result = {"index": lambda: phase_index(root, args.index, args.on_disk_from, anon),
                  "search": lambda: phase_search(root, args.n, args.dim, args.data, anon),
                  "dedup": lambda: phase_dedup(root, anon)}[args.phase]()
        (args.keep / f"{args.phase}.json").write_text(json.dumps(result))  # also kept beside the library
        print(json.dumps(result))
        return

    import faiss

    from dinoseek.indexer.budget import memory_budget

    print(f"# {platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
          f"{args.n:,} x {args.dim} {args.data} vectors, both kinds; exact-index budget {memory_budget() / GB:.1f} GB",
          flush=True)
    start = time.perf_counter()
    run_phase(args, "catalog", args.phase_timeout)
    print(f"# catalog ready in {time.perf_counter() - start:.0f}s", flush=True)
    goal = 3 if args.n <= 1_000_000 else 6
    index = run_phase(args, "index", args.phase_timeout)
    if index:
        kinds = ", ".join(f"{k} {f}{' np' + str(p) if p else ''}{' on disk' if d else ''}"
                          for k, (f, p, d) in index["built"].items())
        print(f"index  : built {kinds} in {index['seconds']:.0f}s; peak RSS {index['rss'] / GB:.2f} GB, "
              f"anonymous {index['anon'] / GB:.2f} GB (goal < {goal} GB); "
              f"lists on disk {index['lists_bytes'] / GB:.2f} GB", flush=True)
    search = run_phase(args, "search", args.phase_timeout)
    if search:
        recall_goal = " (goal >= 0.95)" if args.data == "clustered" and args.n >= 5_000_000 else ""
        print(f"search : {search['factory']} nprobe {search['nprobe']}: recall@10 {search['recall']:.3f}{recall_goal}, "
              f"{search['qps']:,.0f} queries/s (batch {QUERIES}), load {search['load_seconds']:.1f}s; "
              f"peak RSS {search['rss'] / GB:.2f} GB, anonymous {search['anon'] / GB:.2f} GB (goal < {goal} GB)",
              flush=True)
    if not args.skip_dedup:
        dedup = run_phase(args, "dedup", args.phase_timeout)
        if dedup:
            print(f"dedup  : {dedup['groups']:,} groups in {dedup['seconds']:.0f}s; "
                  f"peak RSS {dedup['rss'] / GB:.2f} GB, anonymous {dedup['anon'] / GB:.2f} GB "
                  f"(goal < {goal} GB)", flush=True)


if __name__ == "__main__":
    main()

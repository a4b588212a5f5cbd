"""Near-duplicate grouping over a whole library: time, peak RSS, and recall of planted pairs.

    python benchmarks/dedup.py --n 1000000 --keep /tmp/bench-1m     # reuses search.py's library

The synthetic library (see synthetic_library.py) has 1% of its vectors planted as noisy copies
(cosine ~0.98) of others. `find_duplicates` streams the catalog in blocks through range searches
on the library's own index, so peak RSS should follow the block size and the index, not N^2.
Run in its own process so the RSS is that of the grouping alone (plus the loaded index).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dinoseek.indexer.library import Library  # noqa: E402
from dinoseek.retrieval.dedup import find_duplicates  # noqa: E402
from synthetic_library import build  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query.")
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="dinoseek-dedup-"))
    root = build(folder, args.n, args.dim)
    planted = int(args.n * 0.01)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {args.n:,} x {args.dim}, {planted:,} planted pairs, "
          f"threshold {args.threshold}")
    with Library.open(root) as library:
        record = library.index_set.record("cls")
        print(f"# library index {record.factory} (nprobe {record.nprobe}), RSS before grouping {rss_mb():.0f} MB")
        for block in args.blocks:
            start = time.perf_counter()
            groups = find_duplicates(library, threshold=args.threshold, block=block, nprobe=args.nprobe)
            seconds = time.perf_counter() - start
            found = {tuple(m.id for m in g.members) for g in groups if len(g.members) == 2}
            # Planted copies: row n - planted + i copies row i (ids are positions + 1).
            hits = sum((i + 1, args.n - planted + i + 1) in found for i in range(planted))
            print(f"block {block:>6}: {len(groups):,} groups in {seconds:.0f}s ({args.n / seconds:,.0f} vectors/s), "
                  f"planted pairs found {hits / planted:.1%}, peak RSS so far {rss_mb():.0f} MB", flush=True)


if __name__ == "__main__":
    main()

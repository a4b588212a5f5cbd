"""Reading and hashing photos: what every decode (CPU workers, the GPU JPEG lane, `embed`) pays
before any pixel is decoded.

    python benchmarks/read.py --files 64 --threads 1 4

Writes `--files` 12 MP JPEGs (the benchmarks' synthetic photos, 1.3-6 MB), then times, per thread
count, each file read whole and its sha256 taken by:
  - `read_file`: the project's reader (regular-file checks, stat before and after, size cap);
  - `read(cap + 1)`: the same open, reading with the 1 GiB cap as the size, as it did before;
  - `read_bytes`: plain `Path.read_bytes()` + sha256, no checks (the floor).
Files are read from the page cache (each read once before timing), so this is the CPU's cost.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _old_read(path: Path) -> bytes:
    from dinoseek.indexer.decode import MAX_FILE_BYTES
    from dinoseek.model.files import open_regular

    with open_regular(path, max_bytes=MAX_FILE_BYTES) as f:
        return f.read(MAX_FILE_BYTES + 1)


def _readers():
    from dinoseek.indexer.decode import read_file

    return {
        "read_file": lambda p: read_file(p)[1]["sha256"],
        "read(cap + 1)": lambda p: hashlib.sha256(_old_read(p)).hexdigest(),
        "read_bytes": lambda p: hashlib.sha256(p.read_bytes()).hexdigest(),
    }


def files_per_second(read, paths: list[Path], threads: int, rounds: int) -> float:
    def work(k: int) -> None:
        for p in paths[k::threads] * rounds:
            read(p)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(paths) * rounds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3, help="Times each file is read per measurement.")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from index import make_collection

    with tempfile.TemporaryDirectory(prefix="dinoseek-read-") as work:
        paths = make_collection(Path(work), args.files)
        sizes = [p.stat().st_size for p in paths]
        readers = _readers()
        for p in paths:  # into the page cache; and every reader gives the same hash
            assert len({read(p) for read in readers.values()}) == 1
        print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; {len(paths)} "
              f"12 MP JPEGs, {sum(sizes) / len(sizes) / 1e6:.1f} MB on average, from the page cache")
        print(f"{'reader':<16}{'threads':>8}{'files/s':>10}{'MB/s':>9}{'vs read_bytes':>15}")
        for threads in args.threads:
            rates = {name: files_per_second(read, paths, threads, args.rounds) for name, read in readers.items()}
            for name, rate in rates.items():
                print(f"{name:<16}{threads:>8}{rate:>10.0f}{rate * sum(sizes) / len(sizes) / 1e6:>9.0f}"
                      f"{rate / rates['read_bytes']:>14.2f}x")
        print(f"# peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

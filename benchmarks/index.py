"""Indexing throughput on large JPEGs: decode limit, encoder limit, end to end, peak RSS.

    python benchmarks/index.py --sizes 48 144 --workers 1 --precision fp32

Generates a collection of 12 MP JPEGs (4000 x 3000), builds a full-size ViT-S/14 with random
weights, then measures, in this order and on this machine:
  1. full decode vs draft decode (one process) of the same files: the JPEG DCT-scaling speedup;
  2. the decode limit: `--workers` processes decoding + resizing only;
  3. the encoder limit: the encoder alone on preprocessed batches;
  4. end to end: `dinoseek index` on a fresh library, once per collection size, each in its own
     process so peak RSS (indexer + workers) is measured per size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_collection(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 12 MP JPEGs, built from a few synthetic photos re-encoded at different qualities."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = []
    for i in range(min(count, 6)):
        y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
        img = np.stack([127 + 100 * np.sin(rng.uniform(1, 8) * 6.28 * x / 4000 + rng.uniform(1, 8) * 6.28 * y / 3000)
                        for _ in range(3)], axis=-1)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        bases.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    paths = []
    for i in range(count):
        path = folder / f"IMG_{i:05d}.jpg"
        bases[i % len(bases)].save(path, quality=80 + i // len(bases) % 18)
        paths.append(path)
    return paths


def rate(count: int, seconds: float) -> float:
    return count / seconds


def measure_decode(paths, workers: int) -> dict:
    from PIL import Image

    from dinoseek.indexer.decode import load_pixels
    from dinoseek.indexer.pipeline import Options, Task, _decoded
    from dinoseek.model import Embedder, Embeddings, InputSpec

    spec = InputSpec("crop", 224)
    sample = paths[: min(len(paths), 12)]
    start = time.perf_counter()
    for p in sample:
        with Image.open(p) as im:
            spec.pixels(im.convert("RGB"))  # decoded at full size: what draft decoding saves
    full = rate(len(sample), time.perf_counter() - start)
    start = time.perf_counter()
    for p in sample:
        load_pixels(p, spec)
    draft = rate(len(sample), time.perf_counter() - start)

    class _DecodeOnly:
        """An Embedder without a model: the decode limit measures what `_decoded` does with its spec."""

        dim = 1
        input_spec = spec

        def manifest(self) -> dict:
            return {"arch": {"decode-only": True}, "preprocess": spec.as_dict(), "dim": self.dim}

        def embed_pixels(self, pixels: np.ndarray, *, return_tokens: bool = False) -> Embeddings:
            ones = np.ones((len(pixels), self.dim), np.float32)
            return Embeddings(ones, ones)

    fake: Embedder = _DecodeOnly()
    tasks = [Task(os.fsencode(p.name), 0, 0) for p in paths]
    root = os.fsencode(paths[0].parent)
    start = time.perf_counter()
    done = sum(1 for _ in _decoded(root, tasks, fake, Options(workers=workers), frozenset()))
    limit = rate(done, time.perf_counter() - start)
    return {"full_decode_1p": full, "draft_decode_1p": draft, "decode_limit": limit}


def measure_encoder(weights: Path, precision: str, batch: int, device: str, repeats: int = 4) -> float:
    import torch

    from dinoseek.model import Encoder

    encoder = Encoder.from_pretrained(weights, precision=precision, device=device)
    pixels = torch.randn(batch, 3, 224, 224)
    encoder.embed(pixels)  # .embed returns numpy arrays: each call ends synchronized
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.embed(pixels)
    return rate(batch * repeats, time.perf_counter() - start)


def end_to_end(root: Path, weights: Path, precision: str, workers: int, batch: int, device: str) -> dict:
    """Index `root` from scratch in a child process (so peak RSS is per run); time `run_index` only."""
    shutil.rmtree(root / ".dinoseek", ignore_errors=True)
    command = [sys.executable, __file__, "--child", str(root), str(weights), precision, str(workers), str(batch), device]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(root: str, weights: str, precision: str, workers: str, batch: str, device: str) -> None:
    from dinoseek.indexer.library import Library
    from dinoseek.indexer.pipeline import Options, run_index
    from dinoseek.model import Encoder

    encoder = Encoder.from_pretrained(weights, precision=precision, device=device)
    with Library.open(root, write=True, create=True) as library:
        start = time.perf_counter()
        counts = run_index(library, encoder, Options(workers=int(workers), batch_size=int(batch)))
        seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds,
        "embedded": counts["embedded"],
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs=2, type=int, default=[48, 144])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", type=Path, help="Reuse/keep the generated collection in this folder.")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from encoder import reference_model

    work = args.keep or Path(tempfile.mkdtemp(prefix="dinoseek-bench-"))
    weights = work / "vits14"
    if not (weights / "model.safetensors").exists():
        reference_model("small", weights)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"ViT-S/14 random weights, {args.device}, {args.precision}, batch {args.batch}, workers {args.workers}, 12 MP JPEGs")
    largest = max(args.sizes)
    collection = work / "photos"
    existing = sorted(collection.glob("*.jpg")) if collection.exists() else []
    paths = existing if len(existing) >= largest else make_collection(collection, largest)
    d = measure_decode(paths[: min(args.sizes)], args.workers)
    e = measure_encoder(weights, args.precision, args.batch, args.device)
    bound = min(d["decode_limit"], e)
    shared = 1 / (1 / d["decode_limit"] + 1 / e)  # both stages on the same cores at once
    print(f"{'full decode (1 process)':<36}{d['full_decode_1p']:>10.1f} img/s")
    print(f"{'draft decode (1 process)':<36}{d['draft_decode_1p']:>10.1f} img/s   {d['draft_decode_1p'] / d['full_decode_1p']:.1f}x full")
    print(f"{'decode limit (' + str(args.workers) + ' workers)':<36}{d['decode_limit']:>10.1f} img/s")
    print(f"{'encoder limit':<36}{e:>10.1f} img/s")
    print(f"{'shared-core bound 1/(1/d + 1/e)':<36}{shared:>10.1f} img/s")
    for size in sorted(args.sizes):
        root = work / f"lib{size}"
        root.mkdir(exist_ok=True)
        for p in paths[:size]:
            target = root / p.name
            if not target.exists():
                os.link(p, target)
        run = end_to_end(root, weights, args.precision, args.workers, args.batch, args.device)
        speed = size / run["seconds"]
        print(f"{'end to end, ' + str(size) + ' images':<36}{speed:>10.1f} img/s   {speed / bound:.0%} of min(decode, encoder),"
              f" {speed / shared:.0%} of shared bound"
              f"   peak RSS {run['rss_mb']:.0f} MB (workers {run['worker_rss_mb']:.0f} MB)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Indexing throughput on large JPEGs: decode limit (CPU, nvjpeg, both), encoder limit, end to
end with --decode cpu and gpu, peak RSS and GPU memory.

    python benchmarks/index.py --sizes 48 144 --workers 1 --precision fp32
    python benchmarks/index.py --device cuda --precision fp16 --batch 128 --workers 15 --sizes 256 768

Generates a collection of 12 MP JPEGs (4000 x 3000, in a process pool), builds a full-size ViT-S/14
with random weights, then measures, in this order and on this machine:
  1. full decode vs draft decode (one process) of the same files: the JPEG DCT-scaling speedup;
  2. the decode limit: `--workers` processes decoding + resizing only (Pillow, draft); with CUDA
     also the GPU path alone (reader threads + batched nvjpeg + reduction; then stage by stage) and
     both together (the indexer's mixed pipeline); without CUDA those rows say so;
  3. the encoder limit: the encoder alone on preprocessed batches;
  4. end to end: `dinoseek index` on a fresh library, per collection size and per --decode (cpu,
     and gpu where CUDA is), each in its own process so peak RSS (indexer + workers) and peak GPU
     memory (torch's allocator) are measured per run.
"""

from __future__ import annotations

import argparse
import json
import logging
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


BASES = 6
_bases: dict = {}


def _base(i: int, seed: int):
    """Synthetic 12 MP photo number `i` (made once per process)."""
    from PIL import Image

    if i not in _bases:
        rng = np.random.default_rng([seed, i])
        y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
        img = np.stack([127 + 100 * np.sin(rng.uniform(1, 8) * 6.28 * x / 4000 + rng.uniform(1, 8) * 6.28 * y / 3000)
                        for _ in range(3)], axis=-1)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        _bases[i] = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return _bases[i]


def _write_one(folder: Path, i: int, seed: int) -> Path:
    path = folder / f"IMG_{i:05d}.jpg"
    _base(i % BASES, seed).save(path, quality=80 + i // BASES % 18)
    return path


def make_collection(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 12 MP JPEGs, built from a few synthetic photos re-encoded at different
    qualities, written by a process pool (each worker makes the bases it needs)."""
    import concurrent.futures as cf

    folder.mkdir(parents=True, exist_ok=True)
    # Files of one base go to one worker (chunks), so each worker builds few bases.
    order = sorted(range(count), key=lambda i: i % BASES)
    with cf.ProcessPoolExecutor(min(os.cpu_count() or 1, 16)) as pool:
        list(pool.map(_write_one, [folder] * count, order, [seed] * count, chunksize=max(1, count // 64)))
    return [folder / f"IMG_{i:05d}.jpg" for i in range(count)]


def rate(count: int, seconds: float) -> float:
    return count / seconds


def measure_decode(paths, workers: int, gpu_batch: int) -> dict:
    from dinoseek.indexer.decode import load_pixels
    from dinoseek.indexer.pipeline import Options, Task, _decoded
    from dinoseek.model import Embedder, Embeddings, InputSpec
    from PIL import Image

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

    def run(options: Options) -> float:
        start = time.perf_counter()
        done = sum(1 for _ in _decoded(root, tasks, fake, options, frozenset()))
        return rate(done, time.perf_counter() - start)

    out = {"full_decode_1p": full, "draft_decode_1p": draft, "decode_limit": run(Options(workers=workers, decode="cpu"))}
    decoder = _nvjpeg()
    if decoder is not None:
        import torch

        from dinoseek.indexer.gpu_jpeg import decode_batch, read_jpeg

        decode_batch([read_jpeg(paths[0], spec)], decoder, spec)  # nvjpeg's and CUDA's start-up, not timed
        torch.cuda.reset_peak_memory_stats()
        out["lane"] = _lane_stages(paths, spec, decoder, gpu_batch)
        out["nvjpeg_only"] = out["lane"]["pipelined"]
        out["both"] = run(Options(workers=workers, jpeg_decoder=decoder, gpu_batch=gpu_batch))
        out["decode_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _nvjpeg():
    """torchvision's batched nvjpeg decoder, or None without CUDA/torchvision (the reason printed)."""
    import torch

    from dinoseek.indexer.gpu_jpeg import gpu_decode_problem, nvjpeg_decoder

    problem = gpu_decode_problem("cuda")
    if problem is not None:
        print(f"# GPU decoding: {problem}")
        return None
    return nvjpeg_decoder(torch.device("cuda"))


def _lane_stages(paths, spec, decoder, batch: int) -> dict:
    """The GPU path alone, stage by stage, on the same files: reading (read, hash, header parse in
    4 threads), nvjpeg alone (files already read), nvjpeg + the reduction on the GPU + the copy back
    (`decode_batch`, files already read), and all of it pipelined as the lane runs it (the next
    batch read while this one decodes). The slowest stage is what to work on."""
    import concurrent.futures as cf

    import torch

    from dinoseek.indexer.gpu_jpeg import decode_batch, read_jpeg

    out = {}
    with cf.ThreadPoolExecutor(4) as readers:
        start = time.perf_counter()
        files = [f for f in readers.map(lambda p: read_jpeg(p, spec), paths) if f is not None]
        out["read"] = rate(len(paths), time.perf_counter() - start)
        chunks = [files[i: i + batch] for i in range(0, len(files), batch)]
        start = time.perf_counter()
        for chunk in chunks:
            decoder([f.data for f in chunk])
        if torch.cuda.is_available():  # (the stand-in decoder of a CPU smoke run is synchronous)
            torch.cuda.synchronize()
        out["nvjpeg"] = rate(len(files), time.perf_counter() - start)
        start = time.perf_counter()
        for chunk in chunks:
            decode_batch(chunk, decoder, spec)
        out["decode_batch"] = rate(len(files), time.perf_counter() - start)
        del files, chunks
        start = time.perf_counter()
        done = 0
        chunks = [paths[i: i + batch] for i in range(0, len(paths), batch)]
        ahead = readers.map(lambda p: read_jpeg(p, spec), chunks[0]) if chunks else iter(())
        for k in range(len(chunks)):
            files = list(ahead)
            if k + 1 < len(chunks):  # the next batch is read while this one decodes
                ahead = readers.map(lambda p: read_jpeg(p, spec), chunks[k + 1])
            done += sum(p is not None for p in decode_batch(files, decoder, spec))
        out["pipelined"] = rate(done, time.perf_counter() - start)
    return out


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


def end_to_end(root: Path, weights: Path, precision: str, workers: int, batch: int, device: str,
               decode: str = "cpu") -> dict:
    """Index `root` from scratch in a child process (so peak RSS is per run); time `run_index` only."""
    shutil.rmtree(root / ".dinoseek", ignore_errors=True)
    command = [sys.executable, __file__, "--child", str(root), str(weights), precision, str(workers), str(batch), device,
               decode]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(root: str, weights: str, precision: str, workers: str, batch: str, device: str, decode: str = "cpu") -> None:
    import torch

    from dinoseek.indexer.library import Library
    from dinoseek.indexer.pipeline import Options, run_index
    from dinoseek.model import Encoder

    encoder = Encoder.from_pretrained(weights, precision=precision, device=device)
    # Compiled once per process, for the run's batch size (seconds on CUDA): a library of millions
    # pays it once, so it is timed apart rather than spread over this small collection.
    start = time.perf_counter()
    side = encoder.input_spec.size
    encoder.embed_pixels(np.zeros((int(batch), side, side, 3), np.uint8))
    warmup = time.perf_counter() - start
    lane = _LaneSummary()  # where the GPU lane's time went (logged at INFO when it closes)
    logging.getLogger("dinoseek.indexer.pipeline").addHandler(lane)
    logging.getLogger("dinoseek.indexer.pipeline").setLevel(logging.INFO)
    with Library.open(root, write=True, create=True) as library:
        start = time.perf_counter()
        counts = run_index(library, encoder, Options(workers=int(workers), batch_size=int(batch), decode=decode))
        seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds,
        "warmup_seconds": warmup,
        "embedded": counts["embedded"],
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "lane": lane.line,
    }))


class _LaneSummary(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.line = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("GPU JPEG decoding:"):
            self.line = record.getMessage()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs=2, type=int, default=[48, 144])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-batch", type=int, default=32, help="JPEGs per batched nvjpeg decode.")
    parser.add_argument("--keep", type=Path, help="Reuse/keep the generated collection in this folder.")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="dinoseek-bench-"))
    try:
        measure(args, work)
    finally:  # a failed run (no CUDA, say) leaves no gigabytes of JPEGs behind either
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from encoder import reference_model

    weights = work / "vits14"
    if not (weights / "model.safetensors").exists():
        reference_model("small", weights)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), ViT-S/14 random weights, {args.device}, {args.precision}, batch {args.batch}, "
          f"workers {args.workers}, 12 MP JPEGs")
    largest = max(args.sizes)
    collection = work / "photos"
    existing = sorted(collection.glob("*.jpg")) if collection.exists() else []
    start = time.perf_counter()
    paths = existing if len(existing) >= largest else make_collection(collection, largest)
    print(f"# {largest} JPEGs ready in {time.perf_counter() - start:.1f} s")
    d = measure_decode(paths[: min(args.sizes)], args.workers, args.gpu_batch)
    e = measure_encoder(weights, args.precision, args.batch, args.device)
    bound = min(d["decode_limit"], e)
    shared = 1 / (1 / d["decode_limit"] + 1 / e)  # both stages on the same cores at once
    print(f"{'full decode (1 process)':<36}{d['full_decode_1p']:>10.1f} img/s")
    print(f"{'draft decode (1 process)':<36}{d['draft_decode_1p']:>10.1f} img/s   {d['draft_decode_1p'] / d['full_decode_1p']:.1f}x full")
    print(f"{'decode limit (' + str(args.workers) + ' workers)':<36}{d['decode_limit']:>10.1f} img/s")
    if "both" in d:
        print(f"{'GPU path alone (batch ' + str(args.gpu_batch) + ')':<36}{d['nvjpeg_only']:>10.1f} img/s   "
              f"{d['nvjpeg_only'] / d['decode_limit']:.2f}x workers")
        for stage, what in (("read", "read, hash, parse (4 threads)"), ("nvjpeg", "nvjpeg only, files read"),
                            ("decode_batch", "nvjpeg + reduce + copy, files read")):
            print(f"{'  lane stage: ' + what:<48}{d['lane'][stage]:>10.1f} img/s")
        print(f"{'workers + nvjpeg together':<36}{d['both']:>10.1f} img/s   {d['both'] / d['decode_limit']:.2f}x workers, "
              f"{d['both'] / d['nvjpeg_only']:.2f}x GPU path   peak GPU {d['decode_gpu_mb']:.0f} MB")
    else:
        print(f"{'GPU path alone':<36}{'no CUDA':>10}")
        print(f"{'workers + nvjpeg together':<36}{'no CUDA':>10}")
    print(f"{'encoder limit':<36}{e:>10.1f} img/s")
    print(f"{'shared-core bound 1/(1/d + 1/e)':<36}{shared:>10.1f} img/s")
    for size in sorted(args.sizes):
        root = work / f"lib{size}"
        root.mkdir(exist_ok=True)
        for p in paths[:size]:
            target = root / p.name
            if not target.exists():
                os.link(p, target)
        cpu_speed = None
        for decode in ("cpu", "gpu"):
            label = f"end to end, {size} images, --decode {decode}"
            if decode == "gpu" and "both" not in d:
                print(f"{label:<44}{'no CUDA':>10}")
                continue
            run = end_to_end(root, weights, args.precision, args.workers, args.batch, args.device, decode)
            speed = size / run["seconds"]
            ratio = f"{speed / cpu_speed:.2f}x cpu" if cpu_speed else f"{speed / bound:.0%} of min(decode, encoder)"
            cpu_speed = cpu_speed or speed
            gpu_mb = f", GPU {run['gpu_mb']:.0f} MB" if run.get("gpu_mb") else ""
            print(f"{label:<44}{speed:>10.1f} img/s   {ratio}   peak RSS {run['rss_mb']:.0f} MB "
                  f"(workers {run['worker_rss_mb']:.0f} MB){gpu_mb}; encoder warm-up {run['warmup_seconds']:.1f} s "
                  f"before", flush=True)
            if run.get("lane"):
                print(f"    {run['lane']}", flush=True)


if __name__ == "__main__":
    main()

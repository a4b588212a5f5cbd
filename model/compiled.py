"""The compiled forward of the ViT: `torch.compile` per block, one CUDA graph per batch bucket.

Each transformer block is compiled once and the compiled code is reused by every block of the
model ("regional compilation": the blocks share shapes and code, so ViT-L compiles one block, not
24), with static shapes (`dynamic=False`) and inductor's default mode (no max-autotune, so
compiling stays in seconds). On CUDA the whole forward -- patch embedding, compiled blocks, final
norm -- is then captured as one CUDA graph over static input and output buffers, so a batch is
one graph launch instead of hundreds of kernel launches from Python.

A batch runs at a *bucket* size: the smallest bucket already compiled that holds it, else a new
bucket (the batch rounded up to a multiple of 8). Missing rows are zeros and are dropped from the
output; every image is computed independently of the others in its batch, so they change nothing.
An indexing run thus compiles its batch size once and pads its last, partial batch.

Anything failing while compiling or capturing (no Triton, no C compiler, an op inductor refuses)
logs one warning and the forward runs eagerly for the rest of the process.

References: PyTorch recipe "Reducing torch.compile cold start compilation time with regional
compilation"; `torch.cuda.graph` documentation ("whole-network capture").
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .vit import DinoVisionTransformer

log = logging.getLogger(__name__)

# The inductor backend; tests swap in "eager" (Dynamo only), which needs no compiler.
BACKEND: str | Callable = "inductor"
# A new bucket is the batch rounded up to this: tensor-core friendly, few distinct shapes.
BUCKET_MULTIPLE = 8
# Compiled shapes per model at most; a batch fitting none of them after that runs eagerly.
MAX_BUCKETS = 8
# compile="auto" leaves smaller batches eager: a query of a few images would wait seconds for a
# compile that saves it milliseconds, while an indexing run's batches (32 images by default) pay it once.
AUTO_MIN_BATCH = 16
# Runs before a capture: the first compiles (and autotunes), the second checks nothing recompiles.
WARMUP_RUNS = 2

_failure: str | None = None  # why compiling was given up in this process; None while it works


def compile_failure() -> str | None:
    """Why compiled forwards were given up in this process (None: they were not)."""
    return _failure


def _give_up(error: BaseException) -> None:
    global _failure
    if _failure is None:
        # Dynamo wraps the backend's error (BackendCompilerFailed.inner_exception): name the original.
        while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
            error = inner
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        _failure = f"{type(error).__name__}: {first_line}"[:300]
        log.warning("torch.compile or CUDA graph capture failed (%s); the encoder runs eagerly for the rest of "
                    "this process", _failure)


def bucket_for(batch: int, buckets: Iterable[int], *, multiple: int = BUCKET_MULTIPLE,
               max_buckets: int = MAX_BUCKETS) -> int | None:
    """The batch size a batch of `batch` images runs at, given the `buckets` already compiled:
    the smallest of them that holds it, else a new one (None when no new one may be made)."""
    buckets = sorted(buckets)
    fitting = [b for b in buckets if b >= batch]
    if fitting:
        return fitting[0]
    if len(buckets) >= max_buckets:
        return None
    return -(-batch // multiple) * multiple


def _block_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def _own_copy(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own. Dynamo keeps its cache of compiled code, and counts
    its recompile limit (8), per code object: a copy per model keeps one model's shapes from
    using up another's limit (past it Dynamo runs the frame eagerly without saying so)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@dataclass
class _Captured:
    """One CUDA graph and the static buffers it reads and writes."""

    pixels: torch.Tensor  # (bucket, C, H, W): copy a batch in, then replay
    hidden: torch.Tensor  # (bucket, T, D): overwritten by each replay, so copied out before the next
    graph: torch.cuda.CUDAGraph


class CompiledViT:
    """Calls like the ViT (pixel_values -> final-norm tokens), through compiled blocks and, on
    CUDA, a CUDA graph per bucket. Batches smaller than `min_batch` run eagerly: a query of one
    image would wait seconds for a compile that saves it a millisecond.

    Thread-safe: one batch at a time goes through the static buffers."""

    def __init__(self, vit: DinoVisionTransformer, *, min_batch: int = 1, cuda_graphs: bool | None = None,
                 backend: str | Callable | None = None) -> None:
        """`cuda_graphs` None: on CUDA devices. `backend`: torch.compile's (default `BACKEND`)."""
        self.vit = vit
        self.min_batch = min_batch
        self.cuda_graphs = cuda_graphs
        self._backend = backend
        self._block: Callable | None = None  # the compiled `_block_forward`, made on first use
        self._captured: dict[int, _Captured] = {}
        self._shapes: dict[int, tuple] = {}  # bucket -> (C, H, W, dtype, device) it was compiled for
        self._pool = None  # CUDA graph memory pool shared by this model's buckets (run one at a time)
        self._lock = threading.RLock()
        self.graphs_compiled = 0  # graphs handed to the backend: a recompile shows up here
        self.compile_seconds = 0.0  # time spent compiling and capturing, all buckets together

    @property
    def buckets(self) -> list[int]:
        return sorted(self._shapes)

    @property
    def active(self) -> bool:
        """False once compiling failed in this process: everything runs eagerly."""
        return _failure is None

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = self.vit.check_pixels(pixel_values)  # bad input is the caller's error, not a compile failure
        if pixels.shape[0] < self.min_batch or not self.active:
            with torch.inference_mode():  # eager: nothing shared, concurrent small batches (queries) need no lock
                return self.vit(pixels)
        with torch.inference_mode(), self._lock:
            bucket = self._bucket(pixels)
            if bucket is None:
                return self.vit(pixels)
            try:
                return self._run(pixels, bucket)
            except Exception as error:  # noqa: BLE001 - any failure of the compiler stack means: run eagerly
                _give_up(error)
                self._captured.clear()
                return self.vit(pixels)

    def _bucket(self, pixels: torch.Tensor) -> int | None:
        n = pixels.shape[0]  # at least min_batch, while compiling works: __call__ checked
        shape = (*pixels.shape[1:], pixels.dtype, pixels.device)
        if any(s != shape for s in self._shapes.values()):
            return None  # another input size or device than compiled for: not worth more shapes
        return bucket_for(n, self._shapes)

    def _run(self, pixels: torch.Tensor, bucket: int) -> torch.Tensor:
        n = pixels.shape[0]
        graphs = pixels.device.type == "cuda" if self.cuda_graphs is None else self.cuda_graphs
        new = bucket not in self._shapes
        start = time.perf_counter()
        if new and graphs:
            self._captured[bucket] = self._capture(bucket, pixels)
        elif not graphs:
            hidden = self._forward(self._padded(pixels, bucket))[:n]  # compiles on a bucket's first batch
        if new:
            self._shapes[bucket] = (*pixels.shape[1:], pixels.dtype, pixels.device)
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            log.info("compiled the encoder for batches of %d in %.1f s", bucket, seconds)
        if not graphs:
            return hidden
        captured = self._captured[bucket]
        with torch.cuda.device(pixels.device):  # replay on this device's current stream, after the copy
            captured.pixels[:n].copy_(pixels)
            captured.pixels[n:].zero_()
            captured.graph.replay()
            return captured.hidden[:n].clone()

    @staticmethod
    def _padded(pixels: torch.Tensor, bucket: int) -> torch.Tensor:
        missing = bucket - pixels.shape[0]
        if not missing:
            return pixels
        return torch.cat((pixels, pixels.new_zeros((missing, *pixels.shape[1:]))))

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's forward with each block through the compiled function (same math as `vit`)."""
        if self._block is None:
            self._block = torch.compile(_own_copy(_block_forward), backend=self._counting_backend, dynamic=False)
        x = self.vit.embed_tokens(pixels)  # (B, 1 + R + N, D)
        for block in self.vit.blocks:
            x = self._block(block, x)
        return self.vit.norm(x)

    def _counting_backend(self, graph_module, example_inputs):
        self.graphs_compiled += 1
        backend = BACKEND if self._backend is None else self._backend
        compile_graph = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        return compile_graph(graph_module, example_inputs)

    def _capture(self, bucket: int, pixels: torch.Tensor) -> _Captured:
        """Compile for `bucket` on a side stream (as capture requires), then capture the forward."""
        device = pixels.device
        static = pixels.new_zeros((bucket, *pixels.shape[1:]))
        with torch.cuda.device(device):
            # Fill the position-embedding cache now: a tensor first made inside the capture would
            # live in the graph's private memory.
            self.vit.position_embeddings(static.shape[2], static.shape[3], pixels.dtype)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._forward(static)
            torch.cuda.current_stream(device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # Captured on the side stream (on this device; torch's default capture stream is made
            # once, on whichever device was current). thread_local: decode threads may use the GPU
            # meanwhile (nvJPEG) without breaking the capture.
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                hidden = self._forward(static)
        return _Captured(static, hidden, graph)

"""Decoding and embedding on a Ray cluster, through Ray Data, for `run_index` with `Options.ray`.

The process running `run_index` (the driver) keeps everything that touches the library: the plan,
the catalog transactions, the FAISS checkpoints, the moves and restores. The cluster does the two
expensive steps of the plan's files:

  decode  CPU tasks running the local run's own `_decode_task` (so rows and failures are the same)
  embed   a fixed pool of actors, each building the library's encoder once (one GPU each where the
          cluster has GPUs, CPU actors otherwise)

and streams the results back (`iter_batches`) as the local decoder's results (`Moved`, `Failed`)
or `Embedded` rows with both vectors, which `_BatchWriter` commits exactly as a local run's.

Every node reads the files by the path the driver has: the photo folder (and the weights) must be
on a file system every node mounts at the same path.

Failures: a decode task whose worker dies is retried by Ray (MAX_DECODE_RETRIES); an encoder actor
that dies is restarted and its batch retried (MAX_BATCH_RETRIES). A driver that dies loses nothing
committed: running the same command again resumes from the catalog, as after a local run.

Ray is imported inside functions only: importing dinoseek never needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dinoseek.model import InputSpec

from .errors import ModelMismatchError, RayClusterError, RayUnavailableError, first_line
from .pipeline import Decoded, Embedded, Options, Result, Task, _decode_task

__all__ = ["EncoderRecipe", "RayOptions", "connected", "ray_results", "require_ray"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dinoseek[ray]'"
# `ray start` (Ray 2.5x on) turns token authentication on, and a driver without the token fails with
# a bare "Failed to connect" (the reason only in Ray's log lines).
AUTH_HINT = ("; if the cluster uses token authentication (what `ray start` does by default), set RAY_AUTH_MODE=token "
             "here and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token as on the head node)")
# A file that kills its decode worker (a crashing codec, out of memory) is tried this many more
# times, then the run stops with Ray's error. Ray Data's default (-1) would retry it forever.
MAX_DECODE_RETRIES = 3
# A batch whose encoder actor dies is retried on the restarted actor this many times. The actor
# itself is restarted without limit (Ray Data's default): on a long run, nodes come and go.
MAX_BATCH_RETRIES = 3
# CPU actors: each reserves at most this many CPUs; half the cluster's CPUs are reserved for
# embedding, half for decoding. An actor that reserves a single CPU runs 2 torch threads: on a
# 2-core machine a 1-thread actor left the other core idle whenever decoding kept up (as the local
# pipeline's encoder uses every core beside its decode worker). Larger actors keep their count:
# oversubscribing many cores is unmeasured.
CPU_ACTOR_THREADS = 4


@dataclass(frozen=True)
class RayOptions:
    address: str  # "local": a Ray runtime started on this machine; "auto" or "HOST:PORT": an existing cluster
    cpus: int | None = None  # "local" only: the CPUs the runtime may use (default: all of this machine's)
    actors: int | None = None  # encoder actors (default: one per GPU in the cluster; without GPUs, see _actor_plan)
    decode_batch: int = 8  # files per decode task: small enough to spread, large enough to amortise a task


@dataclass(frozen=True)
class EncoderRecipe:
    """What an encoder actor needs to build the library's encoder on its own node (picklable)."""

    manifest: dict  # the library's: weights sha256, where the weights are, the preprocessing
    root: str  # the library's photo folder: a recorded relative weights path is found from it
    precision: str  # the driver's: the library's vectors all come from one precision

    def build(self, device: str):
        from dinoseek.model import encoder_for_library

        encoder = encoder_for_library(self.manifest, None, root=self.root, device=device, precision=self.precision)
        if encoder.weights_sha256 != self.manifest["weights_sha256"]:
            raise ModelMismatchError(f"the weights a Ray worker found ({(encoder.source or {}).get('path')}) are not "
                                     f"the library's; put the library's weights on the shared file system")
        return encoder


def require_ray():
    """The `ray` module, or RayUnavailableError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra is ray[data]: plain `ray` lacks pyarrow and pandas
    except ImportError as e:
        raise RayUnavailableError(f"running on Ray needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray


@contextlib.contextmanager
def connected(options: RayOptions) -> Iterator[None]:
    """This process connected to the cluster `options.address` (or to a runtime started here for
    "local") for the duration of the block; disconnected (and the local runtime stopped) after.
    A connection made by the caller beforehand is used as it is, and left open."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    # log_to_driver off: the workers' lines would interleave with the CLI's progress; a worker's
    # error still reaches the driver, as the exception of the run.
    settings = dict(include_dashboard=False, log_to_driver=False)
    try:
        if options.address == "local":
            # address="local" always starts a fresh runtime: a bare ray.init() would join any cluster
            # already running on this machine (another user's). Its services listen on loopback only.
            ray.init(address="local", num_cpus=options.cpus, _node_ip_address="127.0.0.1", **settings)
        else:
            ray.init(address=options.address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as e:
        reason = first_line(e)
        with contextlib.suppress(Exception):  # whatever part of a local runtime did start
            ray.shutdown()
        if options.address != "local" and os.environ.get("RAY_AUTH_MODE") != "token":
            reason += AUTH_HINT
        raise RayClusterError(f"could not start or reach the Ray cluster {options.address!r}: {reason}") from e
    try:
        _quiet_ray_data()
        yield
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    """The CLI reports progress itself: no Ray Data progress bars on its terminal."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "enable_operator_progress_bars"):
        context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... nor its warning that they are off (it is this module that turned them off)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ray_results(root: bytes, tasks: list[Task], recipe: EncoderRecipe, spec: InputSpec, options: Options,
                moved: frozenset[str]) -> Iterator[Result]:
    """The plan's files decoded and embedded on the cluster, as they finish (any order)."""
    if not tasks:
        return
    import ray

    settings = options.ray
    assert settings is not None, "ray_results runs a Ray run's tasks"
    actors, actor_resources, device, threads = _actor_plan(settings, ray.cluster_resources())
    log.info("embedding on Ray: %d encoder actor(s) on %s", actors, device)
    items = [{"task": pickle.dumps(task)} for task in tasks]  # bytes paths: pickled, never re-encoded
    blocks = max(1, -(-len(items) // settings.decode_batch))
    dataset = _from_items(ray.data, items, blocks)
    with warnings.catch_warnings():
        # Retry limits are remote args, which recent Ray deprecates with no replacement yet (its
        # own actor pool still documents `map_batches(..., max_restarts=...)`); Ray >= 2.9 takes them.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        dataset = _stages(ray, dataset, settings, options, actors, actor_resources, device, threads, root, spec,
                          moved, recipe)
    try:
        for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
            for blob, embedded, cls_vec, patch_vec in zip(batch["result"], batch["embedded"], batch["cls"],
                                                          batch["patch"]):
                result = pickle.loads(blob)
                yield Embedded(result.task, result.meta, cls_vec, patch_vec) if embedded else result
    except ray.exceptions.RayError as e:
        # Retries spent (a file that kills every decoder, an actor that cannot start): one line;
        # what was committed stays, and the same command resumes after the cause is fixed.
        raise RayClusterError(f"the Ray run failed: {_last_line(e)}") from e


def _stages(ray, dataset, settings: RayOptions, options: Options, actors: int, actor_resources: dict, device: str,
            threads: int, root: bytes, spec: InputSpec, moved: frozenset[str], recipe: EncoderRecipe):
    """decode (CPU tasks) -> embed (the actor pool), lazily: nothing runs until iterated."""
    dataset = dataset.map_batches(_decode_batch, batch_size=settings.decode_batch, batch_format="numpy",
                                  fn_kwargs=dict(root=root, spec=spec, moved=moved),
                                  num_cpus=1, max_retries=MAX_DECODE_RETRIES)
    return dataset.map_batches(_EncodeBatch, batch_size=options.batch_size, batch_format="numpy",
                               fn_constructor_kwargs=dict(recipe=recipe, device=device, threads=threads),
                               compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
                               max_restarts=-1, max_task_retries=MAX_BATCH_RETRIES, **actor_resources)


def _actor_plan(settings: RayOptions, resources: dict) -> tuple[int, dict, str, int]:
    """(how many encoder actors, the resources each reserves, their torch device, their CPU threads)."""
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus:
        return settings.actors or gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda", 1
    # No GPU: half of the CPUs are reserved for embedding, in actors of up to CPU_ACTOR_THREADS
    # (torch scales poorly past a few threads on small batches); the other half decodes.
    actors = settings.actors or max(1, cpus // (2 * CPU_ACTOR_THREADS))
    reserved = max(1, min(CPU_ACTOR_THREADS, cpus // (2 * actors)))
    return actors, {"num_cpus": reserved}, "cpu", 2 if reserved == 1 else reserved


def _from_items(data, items: list[dict], blocks: int):
    """`ray.data.from_items` in `blocks` blocks: `override_num_blocks` since Ray 2.10, `parallelism` before."""
    keyword = "override_num_blocks" if "override_num_blocks" in inspect.signature(data.from_items).parameters \
        else "parallelism"
    return data.from_items(items, **{keyword: blocks})


def _decode_batch(batch: dict, root: bytes, spec: InputSpec, moved: frozenset[str]) -> dict:
    """Ray task: decode a few files with the local path's `_decode_task`. Out: each result pickled
    without its pixels, the pixels apart (zeros where there are none: a column is one shape)."""
    results, pixels, decoded = [], [], []
    blank = np.zeros((spec.size, spec.size, 3), np.uint8)
    for blob in batch["task"]:
        result = _decode_task(root, pickle.loads(blob), spec, moved)
        is_decoded = isinstance(result, Decoded)
        pixels.append(result.pixels if is_decoded else blank)
        results.append(pickle.dumps(dataclasses.replace(result, pixels=None) if is_decoded else result))
        decoded.append(is_decoded)
    return {"result": np.array(results, dtype=object), "decoded": np.array(decoded),
            "pixels": np.stack(pixels)}  # (B, S, S, 3) uint8


class _EncodeBatch:
    """Ray Data actor: builds the library's encoder once, then embeds batches of decoded pixels.
    Rows without pixels (failures, moved files) pass through untouched."""

    def __init__(self, recipe: EncoderRecipe, device: str, threads: int) -> None:
        if device == "cpu":
            import torch

            torch.set_num_threads(threads)  # see _actor_plan
        self.encoder = recipe.build(device)
        log.info("encoder actor ready (pid %d, %s)", os.getpid(), device)

    def __call__(self, batch: dict) -> dict:
        decoded = np.asarray(batch["decoded"], dtype=bool)
        dim = self.encoder.dim
        cls_vecs = np.zeros((len(decoded), dim), np.float32)
        patch_vecs = np.zeros((len(decoded), dim), np.float32)
        if decoded.any():
            vectors = self.encoder.embed_pixels(np.ascontiguousarray(batch["pixels"][decoded]))
            cls_vecs[decoded], patch_vecs[decoded] = vectors.cls, vectors.patch
        return {"result": batch["result"], "embedded": decoded, "cls": cls_vecs, "patch": patch_vecs}


def _last_line(error: BaseException) -> str:
    """The last meaningful line of a Ray error (its message carries the remote traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__

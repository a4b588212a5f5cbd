"""One indexing run: scan, plan (indexer.plan: what changed), decode in worker processes, embed,
commit in batches, sweep.

Crash safety: every batch of rows (with both vectors) is one catalog transaction; FAISS files are
checkpoints that `Library.load_indexes` reconciles with the catalog, so a run killed at any moment
leaves a library that opens, verifies after repair, and is completed by re-running.

Progress: the scan and the reading of the plan's files are reported as steps of
`dinoseek.model.progress` (counts only; the application decides how they are shown). Files that
cannot be read are logged one line each and recorded; Ctrl-C becomes `IndexInterrupted`, which
says how many of the run's files the catalog holds.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dinoseek.model import Embedder, InputSpec
from dinoseek.model.progress import progress

from .catalog import EMBEDDED, TRANSIENT
from .catalog_gateway import blob_from_vector
from .decode import DecodeError, display_path, load_pixels
from .errors import LibraryError
from .gpu_jpeg import (
    BatchDecoder,
    DaemonThreads,
    JpegFile,
    decode_batch,
    is_jpeg_name,
    jpeg_decoder_for,
    quiet_header_warnings,
    read_jpeg,
)
from .library import Library, check_placement
from .plan import Plan, Task, make_plan, path_rank, set_aside, sweep_decision
from .scan import scan

if TYPE_CHECKING:
    from .ray_executor import RayOptions

__all__ = ["Decoded", "Embedded", "Failed", "IndexInterrupted", "Moved", "Options", "Progress", "Task",
           "heif_available", "run_index"]

log = logging.getLogger(__name__)


@dataclass
class Options:
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    batch_size: int = 32
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    allow_mass_delete: bool = False
    checkpoint_seconds: float = 60.0
    # A decode task running longer than this many seconds is recorded as crashed (retried next run)
    # and its worker killed: a hung codec or file system must not stall the run. None: no limit.
    decode_timeout: float | None = 120.0
    # JPEGs decoded in batches on the GPU beside the workers: "auto" (when the encoder is on CUDA
    # and torchvision's nvjpeg works), "gpu" (required: an error where it cannot) or "cpu".
    decode: str = "auto"
    # A batch decoder to use instead of what `decode` picks (tests hand in one made with Pillow).
    jpeg_decoder: BatchDecoder | None = None
    gpu_batch: int = 32  # JPEGs per batched GPU decode
    # Decode and embed on a Ray cluster instead of here (indexer.ray_executor.RayOptions); the
    # catalog and the indexes are still written by this process alone. None: a local run.
    ray: RayOptions | None = None


@dataclass
class Progress:
    total: int  # files to decode this run
    done: int = 0
    counts: dict = field(default_factory=dict)


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after the plan was made: `saved` of the `total` files the run had to read
    are committed to the catalog (every finished batch is kept); re-running does the rest."""

    def __init__(self, saved: int, total: int) -> None:
        super().__init__(f"interrupted: {saved} of {total} files saved in the catalog")
        self.saved, self.total = saved, total


# What reading one of the plan's files gives (in a worker process, so picklable).
@dataclass(frozen=True, eq=False)
class Decoded:
    task: Task
    meta: dict  # the row's columns read from the file: size, mtime_ns, sha256, width, height, ...
    pixels: np.ndarray  # (size, size, 3) uint8, ready for the encoder


@dataclass(frozen=True, eq=False)
class Embedded:
    """A file decoded and embedded elsewhere (a Ray worker): its columns and both vectors."""

    task: Task
    meta: dict
    cls: np.ndarray  # (D,) float32, unit norm
    patch: np.ndarray  # (D,) float32, unit norm


@dataclass(frozen=True)
class Moved:
    """A file whose bytes the catalog already has vectors for (moved, or put back): not decoded."""

    task: Task
    meta: dict


@dataclass(frozen=True)
class Failed:
    task: Task
    status: str  # a catalog status: "unreadable", "crashed", "needs-plugin", ...
    reason: str


DecodeResult = Decoded | Moved | Failed
# What an executor hands the writer: a local run's decoded pixels, or vectors made on a cluster.
Result = DecodeResult | Embedded


def _decode_task(root: bytes, task: Task, spec: InputSpec, moved_hashes: frozenset) -> DecodeResult:
    """Runs in a worker: the file's pixels and columns, or Moved if its hash is in `moved_hashes`."""
    path = os.path.join(root, task.rel)
    try:
        decoded, pixels = load_pixels(path, spec, known=moved_hashes)
    except DecodeError as e:
        return Failed(task, e.status, e.reason)
    except Exception as e:
        return Failed(task, "crashed", f"decoder error: {type(e).__name__}: {e}")
    meta = {
        "size": decoded.size, "mtime_ns": decoded.mtime_ns, "sha256": decoded.sha256, "width": decoded.width,
        "height": decoded.height, "format": decoded.format, "frames": decoded.frames,
        "captured_at": decoded.captured_at, "camera": decoded.camera,
    }
    if pixels is None:
        return Moved(task, meta)
    return Decoded(task, meta, pixels)


def run_index(
    library: Library,
    encoder: Embedder,
    options: Options = Options(),
    on_progress: Callable[[Progress], None] | None = None,
) -> dict:
    """Bring the library up to date with its root folder; returns the run's counts."""
    if options.ray is not None:
        from .ray_executor import connected

        # Connected (or a runtime started) before anything changes: an unreachable cluster, or no
        # Ray installed, fails here with the library untouched. JPEGs are decoded by Ray's CPU tasks.
        with connected(options.ray):
            return _run(library, encoder, dataclasses.replace(options, decode="cpu", jpeg_decoder=None), on_progress)
    if options.jpeg_decoder is None:  # before anything changes: `decode="gpu"` may be impossible here
        decoder = jpeg_decoder_for(options.decode, getattr(encoder, "device", None))
        options = dataclasses.replace(options, jpeg_decoder=decoder, decode="cpu" if decoder is None else "gpu")
    return _run(library, encoder, options, on_progress)


def _run(library: Library, encoder: Embedder, options: Options,
         on_progress: Callable[[Progress], None] | None) -> dict:
    _prepare(library, encoder)
    root = os.fsencode(library.root)
    existing = library.catalog.file_states()
    items = scan(root, include=options.include, exclude=options.exclude, follow_symlinks=options.follow_symlinks,
                 skip=(os.fsencode(library.folder),), rank=path_rank(existing), set_aside=set_aside(existing))
    with progress(None, "scan", unit="files") as scanning:  # a large tree takes a while to walk
        plan = make_plan(existing, scanning.count(items), retry_statuses=retry_statuses(), include=options.include,
                         exclude=options.exclude, allow_mass_delete=options.allow_mass_delete, root=library.root)
    run_id = library.catalog.start_run()
    counts = {"scanned": plan.scanned, "to_decode": len(plan.to_read), "embedded": 0, "failed": 0, "moved": 0,
              "deleted": 0, "restored": 0}
    writer = _BatchWriter(library, encoder, run_id, existing, counts, options.batch_size)
    for problem in plan.problems:
        writer.failure(problem.rel, problem.status, problem.reason, None)
    try:
        moved = _execute(plan, root, library, encoder, options, writer, on_progress)
        writer.flush()
        # The share is taken of the rows the writer has not rewritten this run (`existing` shrinks
        # as batches commit), as it always was.
        ids = sweep_decision(plan, moved, allow_mass_delete=options.allow_mass_delete, catalogued=len(existing),
                             root=library.root)
        library.delete_rows(ids)
        counts["deleted"] = len(ids)
        library.index_set.rebuild_if_outgrown()
        library.index_set.checkpoint()
        _finish(library, run_id, "finished", counts)
    except KeyboardInterrupt as e:
        _finish(library, run_id, "failed", counts)
        raise IndexInterrupted(writer.saved, len(plan.to_read)) from e
    except BaseException:
        _finish(library, run_id, "failed", counts)
        raise
    return counts


def _prepare(library: Library, encoder: Embedder) -> None:
    if not library.root.is_dir():
        raise LibraryError(f"{library.root} is not a folder (unmounted disk?); nothing was changed")
    check_placement(library.root, library.folder)
    library.bind_model(encoder.manifest())
    library.load_indexes()


def _execute(plan: Plan, root: bytes, library: Library, encoder: Embedder, options: Options,
             writer: _BatchWriter, on_progress: Callable[[Progress], None] | None) -> set[bytes]:
    """Read the plan's files and hand each result to the writer, with a checkpoint now and then.
    Returns the old paths of the files matched as moved."""
    moved_from = dict(plan.moved_from)  # each old path is matched once
    reported = Progress(total=len(plan.to_read), counts=writer.counts)
    last_checkpoint = time.monotonic()
    if options.ray is None:
        results = _decoded(root, list(plan.to_read), encoder, options, plan.known_hashes)
    else:
        from .ray_executor import EncoderRecipe, ray_results

        # The workers build the encoder from what the library recorded (bound by _prepare), at
        # this run's precision, and check its weights' sha256 against the library's.
        recipe = EncoderRecipe(library.manifest(), os.fspath(library.root), encoder.manifest()["precision"])
        results = ray_results(root, list(plan.to_read), recipe, encoder.input_spec, options, plan.known_hashes)
    with progress(len(plan.to_read), "index", unit="images") as step:
        for result in results:
            if isinstance(result, Moved) and not _match_move(result, plan.returned, moved_from, writer):
                # a second new copy of one moved file: it needs vectors of its own (rare: on a
                # Ray run too it is decoded and embedded here, by this process's encoder)
                result = _decode_task(root, result.task, encoder.input_spec, frozenset())
            writer.record(result)
            reported.done += 1
            step.update()
            if on_progress:
                on_progress(reported)
            if time.monotonic() - last_checkpoint > options.checkpoint_seconds:
                writer.flush()
                library.index_set.checkpoint(periodic=True)
                last_checkpoint = time.monotonic()
    return set(plan.moved_from.values()) - set(moved_from.values())


def _match_move(result: Moved, returned: Mapping[bytes, str], moved_from: dict[str, bytes],
                writer: _BatchWriter) -> bool:
    """Record a file whose bytes the catalog has: put back where it was quarantined, or moved from
    a missing path not matched yet. False when neither (it must be decoded after all)."""
    rel, sha256 = result.task.rel, result.meta["sha256"]
    if returned.get(rel) == sha256:
        writer.restore(rel, result.meta)  # put back unchanged: its row and vectors are good
        return True
    old_path = moved_from.pop(sha256, None)
    if old_path is None:
        return False
    writer.move(old_path, rel, result.meta)
    return True


def retry_statuses() -> frozenset[str]:
    """The recorded failures a run tries again: transient ones, and files that needed a plugin
    once the plugin is installed."""
    return frozenset(TRANSIENT | ({"needs-plugin"} if heif_available() else set()))


def heif_available() -> bool:
    """Whether HEIC files recorded as needing pillow-heif can be read now."""
    import importlib.util

    return importlib.util.find_spec("pillow_heif") is not None


def _decoded(root: bytes, tasks: list[Task], encoder: Embedder, options: Options,
             moved: frozenset) -> Iterator[DecodeResult]:
    """Decode results as they finish; at most `workers * 4` in flight so memory stays flat.

    A worker that dies costs the files in flight with it; a task running past
    `options.decode_timeout` costs that file alone. Either way the files are recorded as crashed
    (retried next run) and a fresh pool decodes the rest.
    """
    args = (encoder.input_spec, moved)
    decoder = options.jpeg_decoder  # run_index chose it (`decode`)
    queue = collections.deque(tasks)
    lane = _JpegLane(root, queue, decoder, encoder.input_spec, moved, options) if decoder is not None else None
    try:
        yield from _decode_with_workers(root, queue, options, lambda t: (root, t, *args), lane)
    finally:
        if lane is not None:
            lane.close()


def _decode_with_workers(root: bytes, queue: collections.deque, options: Options, call_args: Callable,
                         lane: _JpegLane | None) -> Iterator[DecodeResult]:
    if options.workers <= 0:
        # In-process nothing can be stopped from outside; read_image refusing FIFOs and devices
        # unopened is what keeps this from blocking.
        yield from _drain(_InProcess(), {}, queue, 1, None, call_args, lane)
        return
    context = multiprocessing.get_context(worker_start_method(threads=lane is not None))
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])  # the workers' code, imported once by the server
    window = max(options.workers * 4, options.batch_size)
    while True:
        pool = cf.ProcessPoolExecutor(options.workers, mp_context=context, initializer=_worker_init)
        pending: dict[cf.Future, Task] = {}
        try:
            yield from _drain(pool, pending, queue, window, options.decode_timeout, call_args, lane)
            return
        except cf.process.BrokenProcessPool:
            # A worker died (out of memory, a crashing codec): the files in flight are recorded and
            # the rest of the run goes on in a fresh pool.
            log.warning("a decode worker died; %d files in flight recorded as crashed", len(pending))
            for task in pending.values():
                yield Failed(task, "crashed", "decoder process died while reading this file")
        except _Overdue as overdue:
            log.warning("%d decode tasks took longer than %g s; restarting the decode workers",
                        len(overdue.tasks), options.decode_timeout)
            _kill_workers(pool)
            queue.extendleft(reversed(list(pending.values())))  # never ran to the end: decoded again
            for task in overdue.tasks:
                yield Failed(task, "crashed", f"decoding took longer than {options.decode_timeout:g} s")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class _Overdue(Exception):
    """Decode tasks ran past the time limit (they are no longer in `pending`)."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(f"{len(tasks)} decode tasks overdue")
        self.tasks = tasks


def _drain(pool: cf.Executor, pending: dict, queue: collections.deque, window: int,
           timeout: float | None, call_args: Callable[[Task], tuple],
           lane: _JpegLane | None = None) -> Iterator[DecodeResult]:
    """Keep `window` tasks submitted and yield their results until `queue` and `pending` are empty
    (and the JPEG lane, if any, has finished: the workers take its JPEGs too once `queue` is empty).

    Raises BrokenProcessPool (pending then holds every task in flight, the failed one included) or
    _Overdue. A task's clock starts when the pool hands it to its workers (`running()`), seen at
    the next poll: a long queue in front of it never counts against it.
    """
    started: dict[cf.Future, float] = {}
    poll = None if timeout is None else min(1.0, timeout / 4)
    if lane is not None:
        poll = min(poll or 1.0, 1.0)  # a safety net: the lane's signal wakes this loop
    while queue or pending or (lane is not None and lane.busy()):
        while len(pending) < window and (task := queue.popleft() if queue else lane.take() if lane else None):
            try:
                pending[pool.submit(_decode_task, *call_args(task))] = task
            except cf.process.BrokenProcessPool:
                queue.appendleft(task)  # never submitted: the fresh pool decodes it
                raise
        waiting = list(pending) + (lane.futures() if lane is not None else [])
        done, _ = cf.wait(waiting, timeout=poll, return_when=cf.FIRST_COMPLETED)
        if lane is not None:
            yield from lane.collect()
        for future in done:
            if future not in pending:
                continue  # the lane's
            result = future.result()  # BrokenProcessPool: the task stays in pending, recorded as lost
            pending.pop(future)
            started.pop(future, None)
            yield result
        if timeout is None:
            continue
        now = time.monotonic()
        for future in pending:
            if future not in started and future.running():
                started[future] = now
        overdue = [f for f, t in started.items() if now - t > timeout and not f.done()]
        if overdue:
            # The pool queues one task more than it has workers; if every worker hangs at once,
            # that spare one is counted as overdue with them (recorded as crashed, retried next run).
            raise _Overdue([pending.pop(f) for f in overdue])


def _kill_workers(pool: cf.ProcessPoolExecutor) -> None:
    """SIGKILL the pool's worker processes: a hung one never returns to take a shutdown request."""
    kill = getattr(pool, "kill_workers", None)  # Python 3.14+
    if kill is not None:
        kill()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.kill()
        except (OSError, ValueError):  # already gone, or closed
            pass


class _InProcess(cf.Executor):
    """`workers=0`: each task runs when submitted, in this process, through the same loop as a pool."""

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(fn(*args, **kwargs))  # _decode_task returns every failure as Failed
        return future


@dataclass
class LaneTimes:
    """Where the GPU JPEG lane's time went in a run, logged when it closes (`index -v`). The
    decoding thread's busy share of the lane's life says what limits it: near 100%, decoding
    itself; well below, it waited for reads (short batches) or for the run to take its results."""

    files: int = 0  # decoded on the GPU
    batches: int = 0
    short_batches: int = 0  # started with less than a full batch: reads had not kept up (or the last)
    decoder_seconds: float = 0.0  # in the batch decoder (nvjpeg), in the decoding thread
    reduce_seconds: float = 0.0  # the reduction, resize and copy back after it, same thread
    reads: int = 0
    read_seconds: float = 0.0  # reading, hashing and header parsing, summed over the reader threads

    def summary(self, seconds: float, readers: int) -> str:
        busy = self.decoder_seconds + self.reduce_seconds
        return (f"GPU JPEG decoding: {self.files} files in {self.batches} batches ({self.short_batches} short) over "
                f"{seconds:.1f} s; decoding thread busy {busy / max(seconds, 1e-9):.0%} (decoder "
                f"{self.decoder_seconds:.1f} s, reduction and copy back {self.reduce_seconds:.1f} s); reads "
                f"{1000 * self.read_seconds / max(self.reads, 1):.1f} ms a file in {readers} threads")


class _JpegLane:
    """JPEGs decoded in batches by a BatchDecoder (nvjpeg on the GPU), beside the CPU workers.

    The lane takes JPEG tasks (by name) from the front of its own queue; the workers take from the
    shared queue and, once it is empty, from the lane's too, so neither idles. Files are read,
    hashed and their headers parsed in a few threads (hashlib and reads release the GIL), then
    decoded `batch` at a time in one thread. At most `4 * batch` files are between reading and
    decoding (their bytes are held), and no read or decode starts while `4 * batch` results wait
    for the run to take them. Whatever the lane does not take (not really a JPEG, CMYK, a
    damaged file, a known hash, a decoder error) goes to the front of the shared queue: the CPU
    path decodes it or records it exactly as without the lane. A batch whose decode raises is
    handed to the CPU path whole; after MAX_CRASHES, or a read or decode running past the decode
    timeout (its thread cannot be stopped, and is abandoned), the lane stops and the CPU path
    takes every file it held.

    The lane drives itself: its own thread starts reads and decodes as the ones before finish, so
    the GPU goes on decoding while the run embeds and commits (the run's thread only takes what is
    done, in `collect`). Everything below `self.lock` is the lane's state; the run's thread touches
    it only through busy(), take(), futures() and collect(), under the lock, and only it touches
    the shared queue.
    """

    MAX_CRASHES = 2
    READERS = 4
    POLL = 0.25  # seconds between the lane's looks at its clock while nothing finishes

    def __init__(self, root: bytes, queue: collections.deque, decoder: BatchDecoder, spec: InputSpec,
                 moved: frozenset, options: Options) -> None:
        self.root, self.queue, self.decoder, self.spec, self.moved = root, queue, decoder, spec, moved
        self.batch, self.timeout = max(1, options.gpu_batch), options.decode_timeout
        jpegs = [t for t in queue if is_jpeg_name(t.rel)]
        others = [t for t in queue if not is_jpeg_name(t.rel)]
        queue.clear()
        queue.extend(others)  # the workers start on what only they can decode
        self.lock = threading.Lock()
        self.jpegs = collections.deque(jpegs)
        self.reading: dict[cf.Future, Task] = {}
        self.ready: list[tuple[Task, JpegFile]] = []
        self.decoding: dict[cf.Future, list[tuple[Task, JpegFile]]] = {}
        self.started: dict[cf.Future, float] = {}
        self.done: collections.deque[DecodeResult] = collections.deque()  # for the run to take
        self.handed_back: list[Task] = []  # for the CPU path, in order
        self.signal: cf.Future = cf.Future()  # set when there is something to collect
        self.room: cf.Future = cf.Future()  # set when the run has taken results (the lane may go on)
        self.crashes = 0
        self.enabled, self.closing = True, False
        self.times, self.times_lock = LaneTimes(), threading.Lock()
        self.opened, self.done_at = time.monotonic(), None
        self.notes: list[str] = []  # warnings made under the lock, logged by the lane's thread after it
        quiet_header_warnings()
        self.reader_count = min(self.READERS, os.cpu_count() or 1)
        self.readers = DaemonThreads(self.reader_count, "jpeg-read")
        self.gpu = DaemonThreads(1, "jpeg-decode")
        self._feed()  # before the run's thread can take() any: the lane's first reads are its own
        self.driver = threading.Thread(target=self._drive, name="jpeg-lane", daemon=True)
        self.driver.start()

    # ---- the run's thread --------------------------------------------------------------------
    def busy(self) -> bool:
        with self.lock:
            return bool(self.done or self.handed_back) or self._holding()

    def futures(self) -> list[cf.Future]:
        """What the run's thread waits on besides its workers: set when there is a result."""
        return [self.signal]

    def take(self) -> Task | None:
        """A JPEG for a CPU worker (the shared queue is empty)."""
        with self.lock:
            return self.jpegs.popleft() if self.enabled and self.jpegs else None

    def collect(self) -> Iterator[DecodeResult]:
        """What the lane has finished; the files it hands back go to the front of the shared queue."""
        with self.lock:
            if self.signal.done():
                self.signal = cf.Future()  # before taking: anything added after sets the new one
            done, self.done = list(self.done), collections.deque()
            self.queue.extendleft(reversed(self.handed_back))
            self.handed_back = []
            if done and not self.room.done():
                self.room.set_result(None)
        yield from done

    def close(self) -> None:
        with self.lock:
            self.closing = True
            for future in [*self.reading, *self.decoding]:
                future.cancel()
        self.driver.join(timeout=2 * self.POLL + 1.0)
        self.readers.shutdown()
        self.gpu.shutdown(wait=5.0)  # a decode under way finishes before the process moves on
        if self.times.batches:
            log.info("%s", self.times.summary((self.done_at or time.monotonic()) - self.opened, self.reader_count))

    # ---- the lane's thread -------------------------------------------------------------------
    def _drive(self) -> None:
        try:
            while True:
                with self.lock:
                    if self.closing or not self._holding():
                        break
                    waiting = [*self.reading, *self.decoding, self.room]
                cf.wait(waiting, timeout=self.POLL, return_when=cf.FIRST_COMPLETED)
                with self.lock:
                    if self.closing:
                        break
                    if self.room.done():
                        self.room = cf.Future()
                    self._advance()
                    self._check_clock()
                    self._feed()
                    if (self.done or self.handed_back) and not self.signal.done():
                        self.signal.set_result(None)
                self._log_notes()  # outside the lock: a slow stderr never holds up the run's thread
        except BaseException as e:  # a bug here must not leave the run waiting for the lane
            log.exception("the GPU JPEG lane failed")
            with self.lock:
                self._stop(f"{type(e).__name__}: {e}")
                if not self.signal.done():
                    self.signal.set_result(None)
        self.done_at = time.monotonic()  # the end of the lane's work, for its times
        self._log_notes()

    def _log_notes(self) -> None:
        while self.notes:
            log.warning("%s", self.notes.pop(0))

    def _holding(self) -> bool:
        return self.enabled and bool(self.jpegs or self.reading or self.ready or self.decoding)

    def _feed(self) -> None:
        """Start reads while there is room, and a decode when a batch is ready (or nothing more
        will come for a while); two decodes queued, so the GPU never waits for this thread."""
        if not self.enabled or len(self.done) >= 4 * self.batch:  # the run is busy: results wait enough
            return
        held = lambda: len(self.reading) + len(self.ready) + self.batch * len(self.decoding)
        while self.jpegs and held() < 4 * self.batch:
            task = self.jpegs.popleft()
            self.reading[self.readers.submit(self._read, task)] = task
        while self.ready and len(self.decoding) < 2 and (len(self.ready) >= self.batch or not self.reading):
            files, self.ready = self.ready[: self.batch], self.ready[self.batch:]
            self.times.short_batches += len(files) < self.batch
            self.decoding[self.gpu.submit(self._decode, [f for _, f in files])] = files

    def _advance(self) -> None:
        """Finished reads become ready files (or go back, or are recorded as unread); finished
        decodes become results (or go back)."""
        for future in [f for f in self.reading if f.done()]:
            task = self.reading.pop(future)
            self.started.pop(future, None)
            try:
                result = future.result()  # _read returns its failures
            except BaseException:  # noqa: BLE001 - anything else: the CPU path reads the file
                result = None
            if isinstance(result, Failed):
                self.done.append(result)
            elif result is None:
                self.handed_back.append(task)
            else:
                self.ready.append((task, result))
        for future in [f for f in self.decoding if f.done()]:
            if future not in self.decoding:  # _stop() below handed its files to the CPU path already
                continue
            files = self.decoding.pop(future)
            self.started.pop(future, None)
            try:  # every file of the batch ends up in exactly one place, whatever raises
                results = [(task, None if image is None else Decoded(task, file.meta, image))
                           for (task, file), image in zip(files, future.result(), strict=True)]
            except Exception as e:
                self.crashes += 1
                self.notes.append(f"GPU JPEG decoding failed ({type(e).__name__}: {e}); its {len(files)} files go "
                                  f"to the CPU decoders")
                self.handed_back.extend(task for task, _ in files)
                if self.crashes >= self.MAX_CRASHES:
                    self._stop(f"it failed {self.crashes} times")
                continue
            self.times.batches += 1
            for task, decoded in results:
                if decoded is None:
                    self.handed_back.append(task)
                else:
                    self.times.files += 1
                    self.done.append(decoded)

    def _check_clock(self) -> None:
        if self.timeout is None or not self.enabled:
            return
        now = time.monotonic()
        for future in [*self.reading, *self.decoding]:
            if future not in self.started and future.running():
                self.started[future] = now
        if any(now - t > self.timeout for f, t in self.started.items() if not f.done()):
            self._stop(f"a read or decode took longer than {self.timeout:g} s")

    def _stop(self, why: str) -> None:
        """Hand every file the lane holds to the CPU path, and take no more."""
        self.notes.append(f"GPU JPEG decoding stopped ({why}); the CPU decoders read the rest")
        self.enabled = False
        held = [*self.reading.values(), *(t for t, _ in self.ready),
                *(t for files in self.decoding.values() for t, _ in files), *self.jpegs]
        for future in [*self.reading, *self.decoding]:
            future.cancel()
        self.reading, self.ready, self.decoding, self.started = {}, [], {}, {}
        self.jpegs.clear()
        self.handed_back.extend(held)

    def _decode(self, files: list[JpegFile]) -> list[np.ndarray | None]:
        """decode_batch, timed (in the one decoding thread: only it writes these two times)."""
        started, in_decoder = time.perf_counter(), 0.0

        def decoder(datas: list[bytes]) -> list:
            nonlocal in_decoder
            start = time.perf_counter()
            try:
                return self.decoder(datas)
            finally:
                in_decoder += time.perf_counter() - start

        try:
            return decode_batch(files, decoder, self.spec)
        finally:
            self.times.decoder_seconds += in_decoder
            self.times.reduce_seconds += time.perf_counter() - started - in_decoder

    def _read(self, task: Task) -> JpegFile | Failed | None:
        started = time.perf_counter()
        try:
            file = read_jpeg(os.path.join(self.root, task.rel), self.spec)
        except DecodeError as e:
            return Failed(task, e.status, e.reason)  # unread: what read_image records for it
        except Exception:
            return None
        finally:
            with self.times_lock:
                self.times.reads += 1
                self.times.read_seconds += time.perf_counter() - started
        # A known hash (a moved file) is checked by the CPU path, which also decodes it.
        return None if file is None or file.meta["sha256"] in self.moved else file


def worker_start_method(threads: bool = False) -> str:
    """fork on Linux: workers start instantly and only run Pillow/numpy code (never torch's thread
    pools). Elsewhere (macOS) forking a process that loaded torch and Apple's frameworks is unsafe.
    With `threads` (the GPU JPEG lane's readers and decoder run while the pool starts, and restarts
    after a crash) forking could copy a lock one of them holds into the child: forkserver forks the
    workers from a clean single-threaded server instead."""
    if sys.platform != "linux":
        return "spawn"
    return "forkserver" if threads else "fork"


def _worker_init() -> None:
    """Decode workers die with the indexer (Linux): a killed run leaves no orphans behind."""
    import signal

    # Ctrl-C reaches the whole process group: the indexer alone handles it (one line, pool shut
    # down); a worker would print a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _BatchWriter:
    """Collects decoded images into batches; each flush embeds them and commits one transaction."""

    def __init__(self, library: Library, encoder: Embedder, run_id: int, existing: dict, counts: dict, batch_size: int) -> None:
        self.library, self.encoder, self.run_id, self.batch_size = library, encoder, run_id, batch_size
        self.existing, self.counts = existing, counts
        # (path, pixels to embed or None, columns, (cls, patch) made elsewhere or None)
        self.images: list[tuple[bytes, np.ndarray | None, dict, tuple[np.ndarray, np.ndarray] | None]] = []
        self.rows: list[dict] = []  # failure rows waiting for the next commit
        self.moves: list[tuple[bytes, bytes, dict]] = []
        self.restores: list[tuple[bytes, dict]] = []  # quarantined rows whose file is back, unchanged
        # The plan's files handed over (`unsaved`) and committed (`saved`): what Ctrl-C reports.
        self.unsaved = self.saved = 0

    def image(self, rel: bytes, pixels: np.ndarray | None, meta: dict,
              vectors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """An image joins the batch: its pixels (embedded at the flush), or its (cls, patch)
        vectors when they were computed elsewhere (a Ray worker)."""
        self.images.append((rel, pixels, meta, vectors))
        if len(self.images) >= self.batch_size:
            self.flush()

    def record(self, result: Result) -> None:
        """A decoded or embedded image joins the batch, a failure becomes a row; a Moved one was
        matched already."""
        if isinstance(result, Decoded):
            self.unsaved += 1  # before image(): a full batch is committed, this file with it
            self.image(result.task.rel, result.pixels, result.meta)
        elif isinstance(result, Embedded):
            self.unsaved += 1
            self.image(result.task.rel, None, result.meta, (result.cls, result.patch))
        elif isinstance(result, Failed):
            self.unsaved += 1
            self.failure(result.task.rel, result.status, result.reason, result.task)

    def failure(self, rel: bytes, status: str, reason: str, task: Task | None) -> None:
        # One line per file (the run goes on): progress shows counts only, this says which file and why.
        log.info("skipped %s: %s (%s)", display_path(rel), reason, status)
        self.rows.append(_row(rel, status=status, reason=reason, run_id=self.run_id,
                              size=task.size if task else 0, mtime_ns=task.mtime_ns if task else 0))
        self.counts["failed"] += 1

    def move(self, old: bytes, new: bytes, meta: dict) -> None:
        self.moves.append((old, new, meta))
        self.counts["moved"] += 1
        self.unsaved += 1

    def restore(self, rel: bytes, meta: dict) -> None:
        self.restores.append((rel, meta))
        self.counts["restored"] += 1
        self.unsaved += 1

    def _vectors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(cls, patch) of each image of the batch: those with pixels embedded here, in one call."""
        local = [i for i, (_, pixels, _, _) in enumerate(self.images) if pixels is not None]
        vectors = [v for _, _, _, v in self.images]
        if local:
            out = self.encoder.embed_pixels(np.stack([self.images[i][1] for i in local]))  # (B, S, S, 3) uint8
            for i, cls_vec, patch_vec in zip(local, out.cls, out.patch):
                vectors[i] = (cls_vec, patch_vec)
        return vectors

    def flush(self) -> None:
        if not (self.images or self.rows or self.moves or self.restores):
            return
        new_rows = list(self.rows)
        if self.images:
            for (rel, _, meta, _), (cls_vec, patch_vec) in zip(self.images, self._vectors()):
                new_rows.append(_row(rel, status=EMBEDDED, run_id=self.run_id, **meta,
                                     cls=blob_from_vector(cls_vec), patch=blob_from_vector(patch_vec)))
            self.counts["embedded"] += len(self.images)
        paths = [r["path"] for r in new_rows] + [new for _, new, _ in self.moves]
        replaced = [self.existing[p].id for p in paths if p in self.existing]
        # One transaction. Changed files get fresh ids (their old rows are deleted), so stale
        # vectors can't linger; restored rows keep their id and vectors: back in the indexes below.
        ids, vectors = self.library.catalog.write_batch(
            delete_ids=replaced,
            moves=[(old, {"path": new, "path_text": display_path(new), "folder": _folder(new), "size": meta["size"],
                          "mtime_ns": meta["mtime_ns"], "run_id": self.run_id}) for old, new, meta in self.moves],
            inserts=new_rows,
            restores=[(rel, {"status": EMBEDDED, "reason": None, "run_id": self.run_id, "size": meta["size"],
                             "mtime_ns": meta["mtime_ns"]}) for rel, meta in self.restores])
        self.saved, self.unsaved = self.saved + self.unsaved, 0  # committed: they survive a Ctrl-C from here on
        self.library.index_set.remove(replaced)
        for p in paths + [rel for rel, _ in self.restores]:
            self.existing.pop(p, None)
        if len(ids):
            for kind, kind_vectors in vectors.items():
                self.library.indexes[kind].add(ids, kind_vectors)
        self.images, self.rows, self.moves, self.restores = [], [], [], []


def _folder(rel: bytes) -> str:
    return display_path(os.path.dirname(rel))


def _row(rel: bytes, **values) -> dict:
    values.setdefault("sha256", None)
    return {"path": rel, "path_text": display_path(rel), "folder": _folder(rel), **values}


def _finish(library: Library, run_id: int, status: str, counts: dict) -> None:
    try:
        library.catalog.finish_run(run_id, status, counts)
    except Exception:
        log.exception("could not record the end of run %d", run_id)

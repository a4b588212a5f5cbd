"""One indexing run: scan, decide what changed, decode in worker processes, embed, commit in batches.

Crash safety: every batch of rows (with both vectors) is one catalog transaction; FAISS files are
checkpoints that `Library.load_indexes` reconciles with the catalog, so a run killed at any moment
leaves a library that opens, verifies after repair, and is completed by re-running.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from model import Embedder, InputSpec

from .catalog import EMBEDDED, QUARANTINED, TRANSIENT
from .decode import DecodeError, display_path, load_pixels
from .errors import LibraryError, SweepRefusedError
from .library import Library, check_placement
from .scan import ScanProblem, included, scan

log = logging.getLogger(__name__)

# Which path of a file with several paths (hard links, followed symlinks) keeps its row: the one the
# catalog embeds, then new paths, last a path dedup set aside — where it left a link to the keeper.
_PATH_RANK = {EMBEDDED: 0, QUARANTINED: 2}
# A sweep that would delete more than this share of a library stops: the disk is probably unmounted.
MASS_DELETE_FRACTION = 0.5
MASS_DELETE_MIN = 20  # small libraries may legitimately lose most files


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


@dataclass
class Progress:
    total: int  # files to decode this run
    done: int = 0
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    rel: bytes
    size: int
    mtime_ns: int


def _decode_task(root: bytes, task: Task, spec: InputSpec, moved_hashes: frozenset) -> tuple:
    """Runs in a worker: ("moved", ...), ("image", ..., uint8 pixels) or ("failed", ...)."""
    path = os.path.join(root, task.rel)
    try:
        decoded, pixels = load_pixels(path, spec)
        if decoded.sha256 in moved_hashes:
            pixels = None
    except DecodeError as e:
        return ("failed", task, e.status, e.reason, None)
    except Exception as e:  # noqa: BLE001 - one bad file must never end the run
        return ("failed", task, "crashed", f"decoder error: {type(e).__name__}: {e}", None)
    meta = {
        "size": decoded.size, "mtime_ns": decoded.mtime_ns, "sha256": decoded.sha256, "width": decoded.width,
        "height": decoded.height, "format": decoded.format, "frames": decoded.frames,
        "captured_at": decoded.captured_at, "camera": decoded.camera,
    }
    if pixels is None:
        return ("moved", task, None, None, meta)
    return ("image", task, None, pixels, meta)  # pixels: (size, size, 3) uint8


def run_index(
    library: Library,
    encoder: Embedder,
    options: Options = Options(),
    on_progress: Callable[[Progress], None] | None = None,
) -> dict:
    """Bring the library up to date with its root folder; returns the run's counts."""
    if not library.root.is_dir():
        raise LibraryError(f"{library.root} is not a folder (unmounted disk?); nothing was changed")
    check_placement(library.root, library.folder)
    library.bind_model(encoder.manifest())
    library.load_indexes()
    root = os.fsencode(library.root)

    existing = library.catalog.file_states()
    retry = TRANSIENT | ({"needs-plugin"} if heif_available() else set())
    seen: set[bytes] = set()
    tasks: list[Task] = []
    problems: list[ScanProblem] = []  # to record (new, or changed since last run)
    unlisted: list[bytes] = []  # folders that could not be read
    returned: dict[bytes, str] = {}  # quarantined path -> sha256 of its row: a file there again

    def rank(rel: bytes) -> int:
        return _PATH_RANK.get(existing[rel].status, 1) if rel in existing else 1

    for item in scan(root, include=options.include, exclude=options.exclude,
                     follow_symlinks=options.follow_symlinks, skip=(os.fsencode(library.folder),), rank=rank):
        seen.add(item.rel)
        if isinstance(item, ScanProblem):
            if item.rel == b"":
                raise LibraryError(f"cannot read {library.root}: {item.reason}")
            if item.status == "unreadable":
                unlisted.append(item.rel + b"/")
            row = existing.get(item.rel)
            if row is not None and row.status == QUARANTINED and item.status == "linked":
                continue  # the link dedup left at a duplicate's old path: the row stays quarantined
            if row is None or row.status != item.status:  # already recorded: leave the row alone
                problems.append(item)
            continue
        row = existing.get(item.rel)
        if not _needs_reading(row, item, retry):
            continue
        if row is not None and row.status == QUARANTINED and row.sha256 and row.usable:
            returned[item.rel] = row.sha256  # the same bytes get their row and vectors back
        tasks.append(Task(item.rel, item.size, item.mtime_ns))
    if existing and not seen and not options.allow_mass_delete:
        raise SweepRefusedError(f"{library.root} is empty but the library knows {len(existing)} files; is the disk "
                                f"mounted? Nothing was changed")
    # Only paths this run looked for can be missing: not those under folders that could not be
    # listed, nor those the --include/--exclude filters leave out.
    missing = {
        path: row for path, row in existing.items()
        if path not in seen and not path.startswith(tuple(unlisted) or (b"\0",))
        and included(path, options.include, options.exclude)
    }
    moved_from = {row.sha256: path for path, row in missing.items()
                  if row.status == EMBEDDED and row.sha256 and row.usable}

    run_id = library.catalog.start_run()
    counts = {"scanned": len(seen), "to_decode": len(tasks), "embedded": 0, "failed": 0, "moved": 0, "deleted": 0,
              "restored": 0}
    progress = Progress(total=len(tasks), counts=counts)
    writer = _BatchWriter(library, encoder, run_id, existing, counts, options.batch_size)
    for problem in problems:
        writer.failure(problem.rel, problem.status, problem.reason, None)
    last_checkpoint = time.monotonic()
    try:
        known = frozenset(moved_from) | frozenset(returned.values())  # hashes whose pixels need no decoding
        for kind, task, status, payload, meta in _decoded(root, tasks, encoder, options, known):
            if kind == "moved" and returned.get(task.rel) == meta["sha256"]:
                writer.restore(task.rel, meta)  # put back unchanged: its row and vectors are good
            elif kind == "moved":
                old_path = moved_from.pop(meta["sha256"], None)
                if old_path is not None:
                    writer.move(old_path, task.rel, meta)
                    missing.pop(old_path, None)
                else:  # a second new copy of one moved file: it needs vectors of its own
                    kind, task, status, payload, meta = _decode_task(root, task, encoder.input_spec, frozenset())
            if kind == "image":
                writer.image(task.rel, payload, meta)
            elif kind == "failed":
                writer.failure(task.rel, status, payload, task)
            progress.done += 1
            if on_progress:
                on_progress(progress)
            if time.monotonic() - last_checkpoint > options.checkpoint_seconds:
                writer.flush()
                for index_kind in library.indexes:
                    library.index_set.save(index_kind)
                last_checkpoint = time.monotonic()
        writer.flush()
        # The guard runs after moves were matched: reorganising folders is not a mass deletion.
        # Files dedup set aside are expected to be gone and do not count towards it.
        vanished = sum(1 for row in missing.values() if row.status != QUARANTINED)
        if (vanished > MASS_DELETE_FRACTION * len(existing) and vanished >= MASS_DELETE_MIN
                and not options.allow_mass_delete):
            raise SweepRefusedError(
                f"{vanished} of {len(existing)} catalogued files are gone from {library.root}; is the disk "
                f"mounted? Nothing was deleted"
            )
        ids = [row.id for row in missing.values()]
        library.delete_rows(ids)
        counts["deleted"] = len(ids)
        library.index_set.rebuild_if_outgrown()
        for index_kind in library.indexes:
            library.index_set.save(index_kind)
        _finish(library, run_id, "finished", counts)
    except BaseException:
        _finish(library, run_id, "failed", counts)
        raise
    return counts


def _needs_reading(row, item, retry: set[str]) -> bool:
    """Whether a scanned file must be decoded: it is new or changed (size, mtime), its last failure
    may have gone away, its row lost its vectors, or it is a quarantined path that is a file of its
    own again — put back by hand (a rename keeps size and mtime), so its row must be re-checked."""
    if row is None or (row.size, row.mtime_ns) != (item.size, item.mtime_ns):
        return True
    if row.status == EMBEDDED:
        return not row.usable
    return row.status in retry or row.status == QUARANTINED


def heif_available() -> bool:
    """Whether HEIC files recorded as needing pillow-heif can be read now."""
    import importlib.util

    return importlib.util.find_spec("pillow_heif") is not None


def _decoded(root: bytes, tasks: list[Task], encoder: Embedder, options: Options, moved: frozenset) -> Iterator[tuple]:
    """Decode results as they finish; at most `workers * 4` in flight so memory stays flat.

    A worker that dies costs the files in flight with it; a task running past
    `options.decode_timeout` costs that file alone. Either way the files are recorded as crashed
    (retried next run) and a fresh pool decodes the rest.
    """
    args = (encoder.input_spec, moved)
    if options.workers <= 0:
        # In-process nothing can be stopped from outside; read_image refusing FIFOs and devices
        # unopened is what keeps this from blocking.
        for task in tasks:
            yield _decode_task(root, task, *args)
        return
    # fork: workers start instantly and only run Pillow/numpy code (never torch's thread pools).
    context = multiprocessing.get_context("fork")
    window = max(options.workers * 4, options.batch_size)
    queue = collections.deque(tasks)
    while True:
        pool = cf.ProcessPoolExecutor(options.workers, mp_context=context, initializer=_worker_init)
        pending: dict[cf.Future, Task] = {}
        try:
            yield from _drain(pool, pending, queue, window, options.decode_timeout, lambda t: (root, t, *args))
            return
        except cf.process.BrokenProcessPool:
            # A worker died (out of memory, a crashing codec): the files in flight are recorded and
            # the rest of the run goes on in a fresh pool.
            log.warning("a decode worker died; %d files in flight recorded as crashed", len(pending))
            for task in pending.values():
                yield ("failed", task, "crashed", "decoder process died while reading this file", None)
        except _Overdue as overdue:
            log.warning("%d decode tasks took longer than %g s; restarting the decode workers",
                        len(overdue.tasks), options.decode_timeout)
            _kill_workers(pool)
            queue.extendleft(reversed(list(pending.values())))  # never ran to the end: decoded again
            for task in overdue.tasks:
                yield ("failed", task, "crashed", f"decoding took longer than {options.decode_timeout:g} s", None)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class _Overdue(Exception):
    """Decode tasks ran past the time limit (they are no longer in `pending`)."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(f"{len(tasks)} decode tasks overdue")
        self.tasks = tasks


def _drain(pool: cf.ProcessPoolExecutor, pending: dict, queue: collections.deque, window: int,
           timeout: float | None, call_args: Callable[[Task], tuple]) -> Iterator[tuple]:
    """Keep `window` tasks submitted and yield their results until `queue` and `pending` are empty.

    Raises BrokenProcessPool (pending then holds every task in flight, the failed one included) or
    _Overdue. A task's clock starts when the pool hands it to its workers (`running()`), seen at
    the next poll: a long queue in front of it never counts against it.
    """
    started: dict[cf.Future, float] = {}
    poll = None if timeout is None else min(1.0, timeout / 4)
    while queue or pending:
        while queue and len(pending) < window:
            task = queue.popleft()
            try:
                pending[pool.submit(_decode_task, *call_args(task))] = task
            except cf.process.BrokenProcessPool:
                queue.appendleft(task)  # never submitted: the fresh pool decodes it
                raise
        done, _ = cf.wait(pending, timeout=poll, return_when=cf.FIRST_COMPLETED)
        for future in done:
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
        self.images: list[tuple[bytes, np.ndarray, dict]] = []
        self.rows: list[dict] = []  # failure rows waiting for the next commit
        self.moves: list[tuple[bytes, bytes, dict]] = []
        self.restores: list[tuple[bytes, dict]] = []  # quarantined rows whose file is back, unchanged

    def image(self, rel: bytes, pixels: np.ndarray, meta: dict) -> None:
        self.images.append((rel, pixels, meta))
        if len(self.images) >= self.batch_size:
            self.flush()

    def failure(self, rel: bytes, status: str, reason: str, task: Task | None) -> None:
        self.rows.append(_row(rel, status=status, reason=reason, run_id=self.run_id,
                              size=task.size if task else 0, mtime_ns=task.mtime_ns if task else 0))
        self.counts["failed"] += 1

    def move(self, old: bytes, new: bytes, meta: dict) -> None:
        self.moves.append((old, new, meta))
        self.counts["moved"] += 1

    def restore(self, rel: bytes, meta: dict) -> None:
        self.restores.append((rel, meta))
        self.counts["restored"] += 1

    def flush(self) -> None:
        if not (self.images or self.rows or self.moves or self.restores):
            return
        new_rows = list(self.rows)
        if self.images:
            vectors = self.encoder.embed_pixels(np.stack([p for _, p, _ in self.images]))  # (B, S, S, 3) uint8
            for (rel, _, meta), cls_vec, patch_vec in zip(self.images, vectors.cls, vectors.patch):
                new_rows.append(_row(rel, status=EMBEDDED, run_id=self.run_id, **meta,
                                     cls=cls_vec.astype(np.float16).tobytes(), patch=patch_vec.astype(np.float16).tobytes()))
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
    except Exception:  # noqa: BLE001 - never mask the error that ended the run
        log.exception("could not record the end of run %d", run_id)

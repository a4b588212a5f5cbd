"""FAISS vector stores: one index per vector kind, ids = catalog row ids, files written atomically.

A store is a derived, checkpointed copy of the catalog's vectors. Files are written to a temp name,
fsynced and renamed; their sha256 is recorded in the catalog afterwards, so a file killed mid-write,
truncated, bit-flipped or left from another state is recognised on open and rebuilt or reconciled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from dinoseek.model.files import FileTooLargeError, NotRegularFileError, open_regular

from . import ondisk, torch_search
from .budget import exact_fits
from .errors import InvalidArgumentError, first_line
from .reader_changes import ReaderChanges
from .tuning import FLAT_LIMIT, PQ_FROM, TRAIN_PER_LIST

log = logging.getLogger(__name__)


def ivf_lists(count: int) -> int:
    """~4 sqrt(N) inverted lists (a power of two, at most 65536), with at least 39 vectors per
    list to train on (faiss's minimum)."""
    wanted = round(math.log2(4 * math.sqrt(max(count, 1))))
    return 1 << max(0, min(16, wanted, int(math.log2(max(1, count // 39)))))


def auto_factory(count: int, dim: int) -> str:
    """Exact search for small libraries (within the memory budget, see indexer.budget); IVF with
    SQ8, then PQ as they grow (inner product)."""
    if count <= FLAT_LIMIT and exact_fits(count, dim):
        return "Flat"
    nlist = ivf_lists(count)
    if count < PQ_FROM:
        return f"IVF{nlist},SQ8"
    m = next(m for m in (dim // 4, dim // 8, dim // 16) if dim % m == 0)
    return f"IVF{nlist},PQ{m}x8"


def is_exact_index(inner: faiss.Index) -> bool:
    """Flat, or a scalar quantizer to float16: the catalog's vectors are float16, so SQfp16 keeps
    them bit for bit and its search is exact."""
    return isinstance(inner, faiss.IndexFlat) or (
        isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16)


@functools.cache
def gpu_available() -> bool:
    """faiss-gpu with a CUDA device (asked once: search calls it on every query)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class VectorIndex:
    """A FAISS index whose ids are catalog row ids, plus how it was built.

    Flat and SQ indexes are wrapped in IndexIDMap2. IVF indexes store the row ids in their lists
    themselves: IndexIDMap2 renumbers its id list on remove_ids as if positions shifted (true for
    Flat only), so over IVF it returned wrong ids after the first removal."""

    index: faiss.IndexIDMap2 | faiss.IndexIVF
    factory: str  # what was built
    requested: str  # "auto" or the factory string asked for (built once there is enough to train)
    nprobe: int | None
    trained_on: int
    version: int = 0  # bumped on every add/remove, so a GPU copy is refreshed when stale
    saved_version: int | None = None  # the version the catalog's record holds (None: never saved)
    lists: ondisk.ListsFile | None = None  # the IVF lists file, for an index whose lists live on disk
    # (version, GPU index or this index, GPU resources): the copy searches use, made on first need.
    _gpu: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # FAISS GPU indexes must not be searched from several threads at once (the server's threadpool
    # does), and the copy must be made once: building and searching the GPU copy hold this lock.
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    # ((version, device), torch_search.TorchExactIndex or None where making it failed): the copy exact
    # searches go through on a CUDA machine without faiss-gpu (see _torch_exact); also under _gpu_lock.
    _torch: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # A reader's changes to on-disk lists it must not write (indexer.reader_changes), made on first change.
    _side: ReaderChanges | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def count(self) -> int:
        return self.index.ntotal + (self._side.delta if self._side else 0)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def inner(self) -> faiss.Index:
        """The index that holds the vectors (the one IndexIDMap2 wraps, or the IVF index itself)."""
        return faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap2) else self.index

    def ids(self) -> np.ndarray:
        if isinstance(self.index, faiss.IndexIDMap2):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if self._side is not None:
            return self._side.ids()
        return self._stored_ids()

    def _stored_ids(self) -> np.ndarray:
        lists = self.index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(no), lists.list_size(no)).copy()
                 for no in range(lists.nlist) if lists.list_size(no)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._before_write()
            self.version += 1
            if self._side is not None:
                self._side.add(ids, vectors)
                return
            with ondisk.quiet_stdout() if self.lists else contextlib.nullcontext():
                self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                        np.asarray(ids, dtype=np.int64))
            self.release_pages()

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype=np.int64)
        if not len(ids):
            return 0
        self._before_write()
        self.version += 1
        if self._side is not None:
            return self._side.remove(ids)
        removed = int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        self.release_pages()
        return removed

    def release_pages(self) -> None:
        """Drop the process's pages of the on-disk lists (ondisk.release_pages); nothing in memory.
        An add moves a grown list to a new slot, a remove reads every list's ids, nprobe tuning
        scans many lists: without this, every page they touched stayed resident (a build's second
        kind ran beside the first one's tuning pages)."""
        if self.lists is not None:
            ondisk.release_pages(ondisk.ondisk_lists(self.index))

    def _before_write(self) -> None:
        """A checkpointed lists file is never changed. A writer moves to a copy of it first (see
        indexer.ondisk); a reader must not write in the library folder at all (that copy's name may be
        the writer's live file), so its changes are kept in memory beside the file (indexer.reader_changes)."""
        if self.lists is None or not self.lists.checkpointed:
            return
        if self.lists.read_only:
            if self._side is None:
                self._side = ReaderChanges(self.index, self._stored_ids)
        else:
            self.index, self.lists = ondisk.next_generation(self.index, self.lists)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best inner products; ids are catalog row ids (-1 pads)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = self._through_torch(lambda exact: exact.search(queries, k))
        if found is not None:
            return found
        if not gpu_available() or self.count == 0:
            return self._search(self.index, queries, k)
        with self._gpu_lock:
            return self._search(self._searchable(), queries, k)

    def _search(self, index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._side is not None:
            return self._side.search(self.index, queries, k, self.nprobe or self.index.nprobe)
        if self.nprobe:
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
            return index.search(queries, k, params=params)
        return index.search(queries, k)

    def range_search(self, queries: np.ndarray, threshold: float, nprobe: int | None = None):
        """(lims, scores, ids): every stored vector with inner product >= threshold, per query.
        IVF indexes probe `nprobe` lists (default: the tuned search value)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = self._through_torch(lambda exact: exact.range_search(queries, threshold))
        if found is not None:
            return found
        if self._side is not None:
            nprobe = min(nprobe or self.nprobe or self.index.nprobe, self.index.nlist)
            return self._side.range_search(self.index, queries, threshold, nprobe)
        if self.nprobe:
            nprobe = min(nprobe or self.nprobe, faiss.extract_index_ivf(self.inner).nlist)
            return self.index.range_search(queries, threshold, params=faiss.SearchParametersIVF(nprobe=nprobe))
        return self.index.range_search(queries, threshold)

    def search_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search among the ids in `allowed` only (FAISS id selector; IVF probes every list it needs)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._side is not None:
            return self._side.search(self.index, queries, k, faiss.extract_index_ivf(self.inner).nlist, allowed)
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        if self.nprobe:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(self.inner).nlist)
        else:
            params = faiss.SearchParameters(sel=selector)
        return self.index.search(queries, k, params=params)

    def _through_torch(self, search):
        """search(the torch copy) for an exact index where torch_search.search_device names a device
        (CUDA without faiss-gpu), else None: the caller searches with FAISS. A copy that cannot be
        made or fails (out of GPU memory even in the smallest blocks) is logged once and dropped
        until the index changes: FAISS on the CPU answers meanwhile."""
        faiss_gpu_exact = gpu_available() and self._exact_on_faiss_gpu()
        device = torch_search.search_device(faiss_gpu_exact, self.count)
        if device is None or self.count == 0 or not self.is_exact():
            return None
        with self._gpu_lock:
            exact = self._torch_exact(device)
            if exact is None:
                return None
            try:
                return search(exact)
            except RuntimeError as e:
                log.warning("exact search on %s failed, FAISS on the CPU takes over: %s", device,
                            first_line(e))
                self._torch = (self._torch[0], None)
                return None

    def _torch_exact(self, device):
        """The torch copy of this exact index's vectors on `device`, made on first need and remade
        when the index changed (version); None where it could not be made. Hold _gpu_lock."""
        key = (self.version, device)
        if self._torch is None or self._torch[0] != key:
            self._torch = None  # let go of the stale copy's GPU memory first
            try:
                # The flat index's positions line up with the id map, so row i has id ids()[i].
                # SQfp16's codes are the float16 vectors: viewed as they are, never a float32 copy.
                inner = self.inner
                vectors = (faiss.vector_to_array(inner.codes).view(np.float16).reshape(-1, self.dim)
                           if isinstance(inner, faiss.IndexScalarQuantizer) else inner.reconstruct_n(0, self.count))
                self._torch = (key, torch_search.TorchExactIndex(self.ids(), vectors, device))
            except RuntimeError as e:
                log.warning("exact search stays on FAISS: no copy on %s: %s", device, first_line(e))
                self._torch = (key, None)
        return self._torch[1]

    def _searchable(self):
        """The GPU copy of the index where faiss-gpu and CUDA are present (made once), else itself.
        With a GPU, call it holding _gpu_lock (see search)."""
        if not gpu_available() or self.count == 0 or self.lists is not None:
            return self.index  # on-disk lists stay on disk: a GPU copy would load them whole
        if self.is_exact() and not self._exact_on_faiss_gpu():
            return self.index  # SQfp16 where torch could not take it
        cached = self._gpu
        if cached is None or cached[0] != self.version:
            try:
                resources = faiss.StandardGpuResources()
                cached = (self.version, faiss.index_cpu_to_gpu(resources, 0, self.index), resources)
            except RuntimeError as e:  # an index type without a GPU implementation (e.g. HNSW)
                log.info("searching on the CPU: %s", str(e).splitlines()[-1])
                cached = (self.version, self.index, None)
            self._gpu = cached
        return cached[1]

    def _exact_on_faiss_gpu(self) -> bool:
        """Whether faiss-gpu's copy of this index searches as exactly as it does: Flat's does. Its copy
        of SQfp16 is a float16 GPU index that neither keeps float32 products nor re-scores, so SQfp16
        goes through torch (which re-scores in float32) even beside faiss-gpu, else stays on the CPU."""
        return isinstance(self.inner, faiss.IndexFlat)

    def is_exact(self) -> bool:
        """Whether the index stores the vectors themselves (Flat, SQfp16): `reconstruct` then returns
        every stored vector exactly as the catalog holds it."""
        return is_exact_index(self.inner)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n, dim) float32: the stored vectors of `ids`, which must all be in the index."""
        return self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def serialize(self) -> bytes:
        assert self._side is None, "a reader's view (mapped lists plus changes in memory) is never saved"
        return faiss.serialize_index(self.index).tobytes()


# Index classes that do everything the library asks of them once wrapped in IndexIDMap2:
# add_with_ids, remove_ids (incremental runs), search with an id selector (filters), range_search
# (dedup) and nprobe through SearchParametersIVF. Exact classes, not subclasses: IndexIVFFlatDedup
# is an IndexIVFFlat without range search. HNSW, NSG and refine indexes cannot remove vectors; a
# plain PQ index cannot search a subset; the additive quantizers (RQ, LSQ) cannot range-search.
_SUPPORTED_INDEXES = tuple(
    getattr(faiss, name) for name in (
        "IndexFlat", "IndexFlatIP", "IndexScalarQuantizer", "IndexIVFFlat", "IndexIVFScalarQuantizer",
        "IndexIVFPQ", "IndexIVFPQFastScan", "IndexIVFRaBitQ",
    ) if hasattr(faiss, name)
)
_SUPPORTED_HINT = "use auto, Flat, SQfp16, SQ8, or IVF<n>,Flat / IVF<n>,SQ8 / IVF<n>,PQ<m>"


def check_factory(factory: str, dim: int) -> faiss.Index:
    """The untrained index a FAISS factory string makes, if the library can use it; else InvalidArgumentError.

    Cheap (nothing is trained or added), so the CLI calls it before a library is created.
    """
    if not isinstance(factory, str) or not factory.strip():
        raise InvalidArgumentError(f"a FAISS factory string is needed ({_SUPPORTED_HINT}), got {factory!r}")
    if "IDMap" in factory:
        # Ours would wrap theirs, and IDMap's plain add() refuses the vectors at the first batch.
        raise InvalidArgumentError(f"FAISS factory {factory!r} must not contain IDMap: the library maps ids itself "
                                   f"(catalog row ids); {_SUPPORTED_HINT}")
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        # faiss prefixes its reason with the C++ function and source line: keep the reason.
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).splitlines()[-1])
        raise InvalidArgumentError(f"invalid FAISS factory string {factory!r}: {reason}; {_SUPPORTED_HINT}") from e
    if isinstance(inner, faiss.IndexPreTransform):
        # PCA drops part of each vector's norm, so inner products stop being the cosine similarities
        # that --threshold and the dedup groups compare; OPQ/RR rotations keep them but add nothing
        # the library tunes or tests. Refused rather than half supported.
        raise InvalidArgumentError(f"FAISS factory {factory!r} starts with a vector transform (PCA, OPQ, RR, ...), "
                                   f"which the library does not support: scores must stay cosine similarities; "
                                   f"{_SUPPORTED_HINT}")
    try:  # incremental runs delete vectors of changed and removed files
        faiss.IndexIDMap2(inner).remove_ids(faiss.IDSelectorBatch(np.zeros(0, dtype=np.int64)))
    except RuntimeError as e:
        raise InvalidArgumentError(f"FAISS index {factory!r} ({type(inner).__name__}) cannot remove vectors, which "
                                   f"incremental indexing needs; {_SUPPORTED_HINT}") from e
    if type(inner) not in _SUPPORTED_INDEXES:
        raise InvalidArgumentError(f"FAISS index {factory!r} ({type(inner).__name__}) cannot do what the library "
                                   f"needs (search a filtered subset, range search for dedup); {_SUPPORTED_HINT}")
    return inner


def _min_training(inner: faiss.Index) -> int:
    """Vectors needed before `inner` can be trained: 4 per IVF list, and for product quantizers one
    per centroid of a sub-quantizer (256 for 8 bits), which faiss's k-means refuses to go below."""
    nlist = inner.nlist if isinstance(inner, faiss.IndexIVF) else 1
    pq = getattr(inner, "pq", None)
    return max(nlist * 4, pq.ksub if pq is not None else 1)


def training_sample(count: int, nlist: int, needed: int = 0) -> np.ndarray:
    """Sorted positions, among `count` vectors, of the sample an index with `nlist` lists trains
    on: TRAIN_PER_LIST per list (training time grows with it), at least `needed`, the same sample
    for the same count every time (seeded)."""
    size = min(count, max(TRAIN_PER_LIST * max(nlist, 1), needed))
    return np.sort(np.random.default_rng(0).choice(count, size, replace=False))


def trained_ivf_flat(dim: int, nlist: int, sample: np.ndarray, *, nprobe: int, requested: str,
                     trained_on: int) -> VectorIndex:
    """An empty IVF-Flat index trained on `sample` (see training_sample), for the caller to fill
    block by block with `add`: only the sample and the index are ever in memory."""
    factory = f"IVF{nlist},Flat"
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    inner.train(np.ascontiguousarray(sample, dtype=np.float32))
    return VectorIndex(faiss.IndexIDMap2(inner), factory, requested, nprobe, trained_on)


def build_index(factory: str, dim: int, vectors: np.ndarray, ids: np.ndarray, *, requested: str) -> VectorIndex:
    """Create, train (on a sample) and fill an index from arrays in memory; tune nprobe for IVF
    indexes. Libraries build from the catalog block by block instead (indexer.build)."""
    from .build import ArraySource, build_streamed  # build imports this module

    return build_streamed(factory, ArraySource(ids, vectors, dim), requested=requested)


def write_index_atomic(index: faiss.Index, folder: Path, kind: str, name_for) -> tuple[Path, str]:
    """Write `index` to a temp file (streamed by faiss: no bytes copy of it in memory), fsync it,
    and rename it to name_for(its sha256); returns (that path, the sha256)."""
    tmp = folder / f".{kind}.new.faiss.{os.getpid()}.tmp"  # a name remove_temp_files recognises
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
        digest = hashlib.sha256()
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    checksum = digest.hexdigest()
    path = name_for(checksum)
    os.replace(tmp, path)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path, checksum


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path via temp file + fsync + rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def max_index_bytes(count: int, dim: int) -> int:
    """A generous bound on the size of a checkpoint of `count` vectors of `dim` floats.

    Twice an exact (Flat) index with its ids, the largest per vector of any index we build, plus
    room for 2^20 rows of trained parameters (IVF centroids, PQ codebooks, PCA/OPQ matrices). Only
    there to stop a reader from loading a file that cannot be ours (a huge or endless one).
    """
    return 2 * count * (4 * dim + 16) + (1 << 20) * 4 * dim


def read_index(path: Path, checksum: str, *, max_bytes: int | None = None,
               on_disk: bool = False) -> faiss.IndexIDMap2 | faiss.IndexIVF | None:
    """The index at path if its bytes match `checksum`, else None (missing, truncated, corrupt).

    With `on_disk` (the record names a lists file) the IVF lists are described but not mapped: the
    caller checks the lists file first (indexer.ondisk.lists_problem) and then maps it.

    The path must be a regular file, not a symlink, of at most `max_bytes`: a FIFO put there would
    block the reader and a link to /dev/zero would be read until memory runs out. Such a file is
    treated like a damaged one (the caller rebuilds from the catalog), with a warning naming it.
    """
    # Hashed, then read by faiss from the same descriptor in chunks: never a bytes copy of the
    # whole file beside the index (three copies of a 1.5 GB exact index at once, before).
    try:
        with open_regular(path, max_bytes=max_bytes, follow_symlinks=False) as f:
            digest, size = hashlib.sha256(), 0
            while chunk := f.read(1 << 22):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    return None  # grew while being read
                digest.update(chunk)
            if digest.hexdigest() != checksum:
                return None
            f.seek(0)
            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read, 1 << 22),
                                         faiss.IO_FLAG_SKIP_IVF_DATA if on_disk else 0)
            except RuntimeError:
                return None
    except (NotRegularFileError, FileTooLargeError) as e:
        log.warning("%s %s: not read", path.name, e.strerror)
        return None
    except OSError:
        return None
    # read_index already returns the concrete class; a second downcast would make a proxy that
    # does not own the index, which is then freed under it.
    if on_disk != (ondisk.ondisk_lists(index) is not None):
        return None
    if isinstance(index, faiss.IndexIDMap2):
        if isinstance(faiss.downcast_index(index.index), faiss.IndexIVF):
            log.warning("%s: an IVF index in IndexIDMap2 (before ids moved into the lists): rebuilding", path.name)
            return None
        return index
    return index if isinstance(index, faiss.IndexIVF) else None


def remove_temp_files(folder: Path) -> int:
    """Delete the temp files of index checkpoints a killed writer left behind (only ours)."""
    removed = 0
    for tmp in [*folder.glob(".cls.*.faiss.*.tmp"), *folder.glob(".patch.*.faiss.*.tmp")]:
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed

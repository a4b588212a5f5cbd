"""IVF inverted lists in a file on disk, memory-mapped (faiss OnDiskInvertedLists).

A large IVF index keeps only its trained parts (centroids, codebooks) and the lists' table of
contents in its checkpoint (`<kind>.<sha>.faiss`, read whole and checksummed like every index); the
codes and ids live in `<kind>.g<generation>.ivfdata` beside it, mapped, so a search reads the pages
of the lists it probes and memory follows nprobe, not the library.

Integrity rule for the lists file (it is opened by path, never read whole on open):
- At checkpoint: the file is flushed, a 16-byte trailer (b"DSIVFGEN" + the generation, uint64 LE)
  appended and fsynced; its size, sha256 and generation are recorded in the catalog's index_files
  row in the same write as the checkpoint's own checksum. The file name carries the generation.
- On open: the file must be a regular file (not a symlink), its size must equal the recorded size
  and the table of contents' length plus the trailer, and the trailer must name the recorded
  generation. Any disagreement (missing, truncated, grown, another generation) and the index is
  rebuilt from the catalog, like a damaged checkpoint. The sha256 is checked by `verify`, which
  reads the file through, not on every open.
- A checkpointed generation is never written again: the first change after opening (add or remove)
  copies it to generation + 1 and changes the copy, so a writer killed mid-change leaves the
  recorded generation intact. Old generations are deleted once the catalog points past them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import shutil
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from dinoseek.model.files import sha256_file

from .tuning import LIST_HEADROOM

log = logging.getLogger(__name__)

MAGIC = b"DSIVFGEN"
TRAILER = struct.Struct("<8sQ")  # magic, generation


@dataclass
class ListsFile:
    """The on-disk lists an index has open: which file, which generation, and whether that file is a
    recorded checkpoint (then it must not be written: copy first, see VectorIndex.add/remove)."""

    path: Path
    generation: int
    checkpointed: bool
    size: int = 0  # bytes on disk with the trailer, once checkpointed
    checksum: str = ""  # sha256 of the file with the trailer, once checkpointed
    read_only: bool = False  # opened by a reader: never copied either (see indexer.reader_changes)


def lists_path(folder: Path, kind: str, generation: int) -> Path:
    return folder / f"{kind}.g{generation:06d}.ivfdata"


def ondisk_lists(ivf: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    if not isinstance(ivf, faiss.IndexIVF):
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


@contextlib.contextmanager
def quiet_stdout():
    """faiss printf()s "resizing <file> to N bytes" to stdout whenever on-disk lists grow; stdout
    belongs to the CLI (--json output), so fd 1 points to /dev/null meanwhile (C buffers flushed
    before it is restored, so nothing leaks out later)."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _append_shard(shard: faiss.ArrayInvertedLists, target: faiss.OnDiskInvertedLists) -> None:
    for no in range(shard.nlist):
        n = shard.list_size(no)
        if n:
            target.add_entries(no, n, shard.get_ids(no), shard.get_codes(no))
    shard.reset()
    release_pages(target)


def fill_on_disk(ivf: faiss.IndexIVF, blocks, lists: ListsFile, shard_size: int) -> None:
    """Fill a trained, empty IVF index (ids are catalog row ids) from (ids, vectors) blocks, its
    lists written to `lists.path`: vectors are encoded into the in-memory lists, moved to the file every
    `shard_size` vectors, and the index then switched to the file's lists."""
    target = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists.path))
    total = 0
    with quiet_stdout():
        target.update_totsize(max(4096, ivf.code_size + 8))  # creates the file: an empty index is still a file
        shard = faiss.downcast_InvertedLists(ivf.invlists)
        for ids, vectors in blocks:
            ivf.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if ivf.ntotal >= shard_size:
                _append_shard(shard, target)
                ivf.ntotal = 0
        _append_shard(shard, target)
        target = _compacted(target, lists.path)
    ivf.replace_invlists(target, True)
    target.this.disown()  # the index owns it now
    ivf.ntotal = total


def _mapped(lists: faiss.OnDiskInvertedLists) -> np.ndarray:
    """The lists' whole mapping as a uint8 array (a view: writes go to the file)."""
    return faiss.rev_swig_ptr(lists.ptr, lists.totsize)


def release_pages(lists: faiss.OnDiskInvertedLists) -> None:
    """Drop this process's pages of the lists' mapping (resident memory), keeping the data.

    The mapping is shared, so MADV_DONTNEED only unmaps the pages: their contents (written ones
    included) stay in the page cache, written back to the file as usual (at the latest by the
    checkpoint's fsync), and the next access maps them again. Without it every page a build touched
    counted in its resident memory until the end (6.3 GB of 7.8 GB at 5M)."""
    if lists.ptr is None or not lists.totsize or not hasattr(mmap, "MADV_DONTNEED"):
        return
    address = _mapped(lists).ctypes.data
    if _LIBC.madvise(ctypes.c_void_p(address), ctypes.c_size_t(lists.totsize), mmap.MADV_DONTNEED) != 0:
        log.debug("madvise on %s: %s", lists.filename, os.strerror(ctypes.get_errno()))  # only a hint


_LIBC = ctypes.CDLL(None, use_errno=True)
RELEASE_EVERY = 256 << 20  # bytes copied between two release_pages while compacting


def _slot_capacity(size: int) -> int:
    """Entries a compacted list's slot holds: its size plus headroom (see tuning.LIST_HEADROOM), at
    most size + 1 extra: FAISS keeps a list in its slot only while it fills more than half of it."""
    return size + min(max(size // LIST_HEADROOM, 8), size + 1) if size else 0


def _compacted(lists: faiss.OnDiskInvertedLists, path: Path) -> faiss.OnDiskInvertedLists:
    """`lists` copied into a file sized to them, which then takes the name `path`.

    Appended shard by shard, a list that outgrows its slot moves to a new one (a power of two of
    entries) at the end of the file, and FAISS reuses little of the old: the file held 2.5 times its
    codes at 5M vectors (4.9 GB of disk for 2 GB of IVF-SQ8 codes, 8.6 GB apparent). The copy is
    written once, in list order, each list in a slot of its size plus headroom (_slot_capacity), in
    FAISS's layout (the codes, then the ids at capacity x code_size); pages of both files are
    released every RELEASE_EVERY bytes, so the copy's resident memory stays flat
    (merge_from_multiple, one call, touched both files whole). The file ends in a free tail of
    1/LIST_HEADROOM of the lists (sparse until used) where lists that outgrow their slot move: with
    no free space, FAISS would double the file at the first move. Its temp name is one
    remove_temp_files clears after a kill."""
    total = lists.compute_ntotal()
    if total == 0:
        return lists  # nothing to compact (and FAISS cannot map an empty file)
    entry = lists.code_size + 8
    table = faiss.OnDiskOneListVector()
    size = 0
    for no in range(lists.nlist):
        one = faiss.OnDiskOneList()  # an empty list keeps no slot
        one.size = lists.list_size(no)
        if one.size:
            one.capacity, one.offset = _slot_capacity(one.size), size
            size += one.capacity * entry
        table.push_back(one)
    tmp = path.with_name(f".{path.name}.faiss.{os.getpid()}.tmp")
    try:
        compact = faiss.OnDiskInvertedLists(lists.nlist, lists.code_size, str(tmp))
        compact.update_totsize(size + size // LIST_HEADROOM)  # the new file (sparse), one free slot...
        if compact.allocate_slot(size) != 0:  # ...that the lists now fill, but for the tail
            raise RuntimeError("faiss sized the compacted lists file differently than expected")
        if hasattr(os, "posix_fallocate"):  # a full disk: an OSError here, not SIGBUS in the copy
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        compact.lists.swap(table)
        copied = 0
        for no in range(lists.nlist):
            n = lists.list_size(no)
            if n:
                codes = n * lists.code_size
                faiss.rev_swig_ptr(compact.get_codes(no), codes)[:] = faiss.rev_swig_ptr(lists.get_codes(no), codes)
                faiss.rev_swig_ptr(compact.get_ids(no), n)[:] = faiss.rev_swig_ptr(lists.get_ids(no), n)
                copied += n * entry
            if copied >= RELEASE_EVERY:
                release_pages(lists)
                release_pages(compact)
                copied = 0
        release_pages(lists)
        release_pages(compact)
        os.replace(tmp, path)  # the mapping follows the file; later growth reopens it by name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    compact.filename = str(path)
    return compact


def checkpoint(ivf: faiss.IndexIVF, lists: ListsFile) -> None:
    """Make `lists` a checkpoint: contents synced, the generation trailer appended, size and sha256
    taken (see the module docstring). Call before serializing the index that points to it."""
    od = ondisk_lists(ivf)
    with open(lists.path, "r+b") as f:
        f.truncate(od.totsize)  # a trailer from the generation it was copied from goes first
        f.seek(od.totsize)
        f.write(TRAILER.pack(MAGIC, lists.generation))
        f.flush()
        os.fsync(f.fileno())  # also writes back the pages faiss changed through its shared mapping
    lists.size = os.path.getsize(lists.path)
    lists.checksum = sha256_file(lists.path)
    lists.checkpointed = True


def deserialize(data: bytes, *, skip_lists: bool) -> faiss.Index:
    """A serialized index; with skip_lists, on-disk lists are described but not mapped yet, so a
    damaged lists file is never touched before open_lists has checked it."""
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(data, dtype=np.uint8), reader.data)
    return faiss.read_index(reader, faiss.IO_FLAG_SKIP_IVF_DATA if skip_lists else 0)


def lists_problem(od: faiss.OnDiskInvertedLists, path: Path, generation: int, size: int | None) -> str | None:
    """Why the lists file at `path` cannot be the one recorded (see the integrity rule), or None."""
    try:
        info = os.lstat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if size is None or info.st_size != size or info.st_size != od.totsize + TRAILER.size:
        return f"{info.st_size} bytes, expected {size}"
    with open(path, "rb") as f:
        f.seek(od.totsize)
        magic, found = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC or found != generation:
        return f"generation {found if magic == MAGIC else 'unknown'}, expected {generation}"
    return None


def open_lists(ivf: faiss.IndexIVF, path: Path, *, writable: bool) -> None:
    """Map the (checked) lists file at `path` for `ivf`, read-only unless `writable`."""
    od = ondisk_lists(ivf)
    od.filename = str(path)
    od.read_only = not writable
    od.do_mmap()


def _copy_file(source: Path, target: Path) -> None:
    """`source` copied to a new file `target` by copy_file_range where the kernel has it: the
    filesystem shares the blocks where it can (a reflink on XFS, Btrfs: no data written), else copies
    them in the kernel. shutil.copyfile (sendfile on Linux) writes every byte, GBs per incremental
    run at 5M; it is the fallback where copy_file_range is refused."""
    if hasattr(os, "copy_file_range"):
        try:
            with open(source, "rb") as src, open(target, "wb") as dst:
                left = os.fstat(src.fileno()).st_size
                while left > 0:
                    copied = os.copy_file_range(src.fileno(), dst.fileno(), left)
                    if copied == 0:
                        raise OSError(errno.EIO, "copy_file_range stopped short")
                    left -= copied
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EIO):
                raise
            log.debug("copy_file_range refused (%s): copying %s by reading it", e, source.name)
    shutil.copyfile(source, target)


def next_generation(ivf: faiss.IndexIVF, lists: ListsFile) -> tuple[faiss.IndexIVF, ListsFile]:
    """A writable copy of a checkpointed lists file as generation + 1, and the index mapped on it.

    The copy is a new file (a kill meanwhile leaves the recorded one as it was); the index is
    re-read from its own metadata so that the old mapping is released with the old object."""
    kind = lists.path.name.split(".")[0]
    new = ListsFile(lists_path(lists.path.parent, kind, lists.generation + 1), lists.generation + 1, checkpointed=False)
    totsize = ondisk_lists(ivf).totsize
    _copy_file(lists.path, new.path)
    os.truncate(new.path, totsize)  # drop the old trailer
    copy = deserialize(faiss.serialize_index(ivf).tobytes(), skip_lists=True)
    open_lists(copy, new.path, writable=True)
    return copy, new

"""Walking a photo collection: candidate files, losslessly named, loop-safe, problems recorded."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .paths import display_path

IMAGE_EXTENSIONS = frozenset(
    {b".jpg", b".jpeg", b".jpe", b".jfif", b".png", b".webp", b".gif", b".tif", b".tiff", b".bmp",
     b".heic", b".heif", b".avif"}
)
# Image files we do not decode: recorded as unsupported without being read.
UNSUPPORTED_EXTENSIONS = frozenset(
    {b".psd", b".psb", b".eps", b".fits", b".fit", b".svg", b".jxl", b".cr2", b".cr3", b".nef", b".arw", b".dng",
     b".raf", b".orf", b".rw2", b".pef", b".srw", b".x3f"}
)
# Files without any extension are sniffed: exports and phone backups often drop it.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"II*\x00", b"MM\x00*", b"BM", b"RIFF")


@dataclass(frozen=True)
class ScanEntry:
    rel: bytes  # path relative to the root, raw bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanProblem:
    rel: bytes
    status: str  # "unreadable" | "linked" | "unsupported"
    reason: str


def scan(
    root: bytes | str | os.PathLike,
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    follow_symlinks: bool = False,
    skip: tuple[bytes, ...] = (),
    rank: Callable[[bytes], int] = lambda rel: 0,
    set_aside: Callable[[bytes], bool] = lambda rel: False,
) -> Iterator[ScanEntry | ScanProblem]:
    """Yield image candidates under root, depth-first in sorted order.

    Hidden files and folders are skipped, as are `skip` folders (the library's own), by path and by
    inode (a bind mount or followed link to them too). Symlinks are ignored unless `follow_symlinks`;
    then each real folder is entered once (loops end). Each real file is yielded once — a second
    path to the same inode (hard or symbolic link) is reported as "linked", so a file can never be
    its own duplicate. Which path of an inode is the file is decided by `rank` (lower wins, ties to
    the first in scan order), not by the sort order alone: the indexer ranks the path the catalog
    already embeds first, so a link that dedup left at a duplicate's old path never displaces the
    kept photo. Files that may still lose to a better-ranked path (rank above 0) are yielded at the
    end; by default every path ranks 0, and the first path seen is the file. A symlink that is not
    followed but sits at a path `set_aside` names (where dedup left a link to the kept copy) is
    reported as "linked", so the row dedup set aside there is not mistaken for a vanished file.

    Memory: one entry per folder, and one per file only for files a second path can reach (several
    hard links, a file bind-mounted under the root, or any file once symlinks are followed); an
    ordinary file is yielded without being remembered, so a walk over many files holds no
    per-file state.
    """
    root_bytes = os.fsencode(root)
    seen_dirs: set[tuple[int, int]] = set()
    files = _Inodes(rank)
    mounted = _mounted_files(root_bytes)
    skip_real = {os.path.realpath(s) for s in skip}
    skip_keys = {key for s in skip if (key := _inode(s)) is not None}
    stack = [b""]
    try:
        st = os.stat(root_bytes)
        seen_dirs.add((st.st_dev, st.st_ino))
    except OSError as e:
        yield ScanProblem(b"", "unreadable", f"library root: {e.strerror}")
        return
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(root_bytes, rel_dir) if rel_dir else root_bytes
        try:
            with os.scandir(full_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield ScanProblem(rel_dir, "unreadable", f"folder: {e.strerror or e}")
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith(b"."):
                continue
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                is_link = entry.is_symlink()
                if is_link and not follow_symlinks:
                    if set_aside(rel):
                        yield ScanProblem(rel, "linked", "symbolic link left by dedup, not followed")
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as e:
                if not entry.is_symlink():  # a dangling link is no photo; anything else is a problem
                    yield ScanProblem(rel, "unreadable", e.strerror or str(e))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if key in seen_dirs or key in skip_keys or os.path.realpath(entry.path) in skip_real:
                    continue
                seen_dirs.add(key)
                subdirs.append(rel)
                continue
            if not stat.S_ISREG(st.st_mode) or not included(rel, include, exclude):
                continue
            ext = os.path.splitext(rel)[1].lower()
            if ext in UNSUPPORTED_EXTENSIONS:
                yield ScanProblem(rel, "unsupported", f"{ext.decode()[1:].upper()} files are not supported")
                continue
            if not _is_candidate(ext, entry.path):
                continue
            # Only these files can meet a second path to themselves in the walk: several hard links,
            # a file mounted over another path (one link, two names), or anything once symlinks are
            # followed. A folder reached twice (a bind mount) is entered once: see seen_dirs above.
            shared = follow_symlinks or st.st_nlink > 1 or key in mounted
            yield from files.offer(key, ScanEntry(rel, st.st_size, st.st_mtime_ns), shared)
        stack.extend(reversed(subdirs))
    yield from files.held()


class _Inodes:
    """Which path of each inode is the file (best rank, then first seen); the others are "linked".

    Only inodes offered as `shared` (a second path may reach them) are remembered; a path that a
    better-ranked one may still displace is held back until the walk ends.
    """

    def __init__(self, rank: Callable[[bytes], int]) -> None:
        self.rank = rank
        self.best: dict[tuple[int, int], tuple[bytes, int]] = {}  # shared inode -> (path, its rank)
        self.waiting: dict[tuple[int, int], ScanEntry] = {}  # inode -> entry held back

    def offer(self, key: tuple[int, int], entry: ScanEntry, shared: bool) -> Iterator[ScanEntry | ScanProblem]:
        if not shared and key not in self.best:
            # No other path leads here: the file is this path, and nothing needs remembering. (An
            # inode already remembered lost a link during the walk: still its earlier path's.)
            yield entry
            return
        rank = self.rank(entry.rel)
        if key not in self.best:
            self.best[key] = (entry.rel, rank)
            if rank <= 0 or not shared:  # nothing can displace it: yield at once
                yield entry
            else:
                self.waiting[key] = entry
            return
        best, best_rank = self.best[key]
        if rank < best_rank and key in self.waiting:  # the held path loses to this one
            loser = self.waiting.pop(key)
            self.best[key] = (entry.rel, rank)
            yield _linked(loser.rel, entry.rel)
            if rank <= 0:
                yield entry
            else:
                self.waiting[key] = entry
            return
        yield _linked(entry.rel, best)

    def held(self) -> Iterator[ScanEntry]:
        yield from self.waiting.values()
        self.waiting.clear()


def _linked(rel: bytes, same_as: bytes) -> ScanProblem:
    return ScanProblem(rel, "linked", f"same file as {display_path(same_as)}")


_MOUNTINFO = "/proc/self/mountinfo"


def _mounted_files(root: bytes, mountinfo: str = _MOUNTINFO) -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of the regular files mounted at or under `root`.

    `mount --bind FILE OTHER` shows one file, with one link, at two paths: its inode is the only
    sign, so these few files are remembered like hard links. Folders need nothing of the kind (the
    walk enters each folder inode once). Linux lists mounts in /proc/self/mountinfo (proc(5): the
    5th field is the mount point, with space, tab, newline and backslash written as \\ooo). Without
    that file (macOS, BSD) none are found: there a file reached through a file mount is walked twice.
    """
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    real_root = os.path.realpath(root)
    under = real_root.rstrip(b"/") + b"/"
    keys = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        if point != real_root and not point.startswith(under):
            continue
        try:
            st = os.stat(point)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            keys.add((st.st_dev, st.st_ino))
    return frozenset(keys)


def _inode(path: bytes) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def included(rel: bytes, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether the --include/--exclude globs let this relative path through."""
    text = display_path(rel)
    if include and not any(fnmatch.fnmatch(text, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(text, p) for p in exclude)


def _is_candidate(ext: bytes, full: bytes) -> bool:
    if ext in IMAGE_EXTENSIONS:
        return True
    if ext:
        return False
    from dinoseek.model.files import open_regular  # here: importing `model` loads torch, which planning does without

    try:
        with open_regular(full) as f:  # a file swapped for a FIFO since the listing must not block
            head = f.read(16)
    except OSError:
        return True  # let the decoder record why it cannot be read
    return head.startswith(_MAGIC) or head[4:8] == b"ftyp"

"""Acting on duplicate groups safely: plan, journal every step before it happens, apply, undo.

Nothing is ever deleted here (only `dinoseek purge`, retrieval.purge, empties the quarantine on
purpose). `move` puts a duplicate into the quarantine folder (relative path kept);
`hardlink` / `symlink` do the same and then leave a link to the kept copy at the old path. Every
apply is recorded in the catalog, and every step is written (and fsynced) to a journal, with its
final destination, before it happens and marked done after, so `undo` can restore the files byte
for byte even after a crash mid-step. Undo trusts no journal: it checks all of it first against
itself (retrieval.journal) and against the catalog, then only ever moves bytes between this
library's photo folder and its recorded quarantine, after checking them.

Sidecars (retrieval.sidecars: XMP, AAE, a same-stem RAW, a Live Photo's MOV) travel with a moved
photo: each is its own journaled step (with its sha256, `sidecar_of` the photo's step), set aside
right after its photo and restored by undo under the same checks. With `hardlink` / `symlink` they
stay where they are, beside the link: the link stands in for the photo at its old path, so the
edits in its XMP, its Live Photo video and its RAW stay paired by name with what is shown there,
and nothing about them changes (nothing to undo). A sidecar of a *removed* duplicate describes that
copy, not the kept one, so it is never merged into or swapped for the kept copy's sidecars.
A RAW is the one sidecar that may be the only copy of a picture: a duplicate whose RAW partner
would move is moved only if the kept copy has a RAW with the same bytes beside it; otherwise that
duplicate is left where it is, JPEG and RAW (`only_raw`), since `purge` would delete its RAW for
good. A photo given a free name in the quarantine (``IMG_1~1.JPG``) gives its sidecars the same
new stem (``IMG_1~1.xmp``), so no sidecar ever sits there beside another photo of its old name.
Each folder is listed once per command (sidecars.FolderIndex), not once per duplicate in it.

Apply and undo report their progress in files (model.progress). Ctrl-C takes effect between two
steps, never inside one (a photo and its sidecars are one step here): ApplyInterrupted and
UndoInterrupted then carry what was done, all of it journaled, recorded in the catalog and
consistent, so `undo` or the same command again picks up from there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED
from dinoseek.indexer.decode import printable
from dinoseek.indexer.library import Library
from dinoseek.indexer.paths import display_path
from dinoseek.model.files import NotRegularFileError, open_regular, sha256_file
from dinoseek.model.progress import Step as Shown
from dinoseek.model.progress import progress

from . import journal as journals_
from .dedup import Group
from .errors import ActionError, InvalidArgumentError, JournalError
from .journal import Intent, Journal, JournalWriter, check_quarantine
from .sidecars import RAW_SUFFIXES, FolderIndex, folder_index, raw_files, renamed, sidecars_of

ACTIONS = ("report", "move", "hardlink", "symlink")
PAST = {"move": "moved", "hardlink": "hard-linked", "symlink": "symlinked"}
TEMP_PREFIX, TEMP_SUFFIX = ".dsk-", ".tmp"  # short: a 255-byte file name must still fit beside it
# What undo may do at a step's src, from the catalog's row there (never from the journal alone):
RESTORE = "restore"  # set aside by this apply (or a step it left half done): its bytes may go back
CREATE = "create"  # no row (an index run dropped it): src may be created, or our symlink replaced
SETTLE = "settle"  # in place according to the catalog: only spare copies are cleaned up, src untouched


class FileChangedError(OSError):
    """A file is no longer the one that was checked (swapped or written since): nothing was moved."""


class Missing(str):
    """Why a file was not restored, when its quarantined copy is gone: nothing can ever restore it,
    so `undo(accept_missing=True)` may close the journal over it."""

    def __new__(cls, text: str, src: Path):
        self = super().__new__(cls, text)
        self.src = src
        return self


@dataclass(frozen=True)
class Step:
    op: str  # move | hardlink | symlink
    src: Path  # the duplicate, absolute
    dst: Path  # where its bytes went, absolute (inside the quarantine)
    keeper: Path  # the copy that stays, absolute
    sha256: str
    size: int
    row_id: int


@dataclass
class ApplyResult:
    journal: Path | None  # None: nothing was done, so no journal was written
    done: list[Step] = field(default_factory=list)
    skipped: list[tuple[Group, str]] = field(default_factory=list)  # group, why
    skipped_files: list[tuple[Path, str]] = field(default_factory=list)  # one duplicate, why (its group went on)
    sidecars: list[tuple[Path, Path]] = field(default_factory=list)  # (sidecar, where it went) moved with a photo
    sidecars_left: list[tuple[Path, str]] = field(default_factory=list)  # a sidecar left beside its moved photo, why

    def to_dict(self, root: Path) -> dict:
        """For `dedup --apply --json`: the journal, what moved where, and each duplicate left alone
        with why (paths relative to `root` where they are under it, printable as in the plan)."""
        def shown(path: Path) -> str:
            return display_path(path.relative_to(root)) if root in path.parents else display_path(path)

        left = [{"path": shown(root / os.fsdecode(m.raw_path)), "reason": why}
                for group, why in self.skipped for m in group.others]
        left += [{"path": shown(path), "reason": why} for path, why in self.skipped_files]
        return {"journal": None if self.journal is None else display_path(self.journal),
                "files": [{"path": shown(step.src), "to": display_path(step.dst)} for step in self.done],
                "sidecars": [{"path": shown(src), "to": display_path(dst)} for src, dst in self.sidecars],
                "skipped": left,
                "sidecars_left": [{"path": shown(path), "reason": why} for path, why in self.sidecars_left]}


@dataclass
class UndoResult:
    restored: list[str]  # photos
    not_in_catalog: int  # restored files whose rows an index run dropped meanwhile: re-index them
    problems: list[str] = field(default_factory=list)  # one line per file not restored (left in quarantine)
    journal: Path | None = None
    accepted: list[str] = field(default_factory=list)  # files given up on (accept_missing): their copies are gone
    sidecars: list[str] = field(default_factory=list)  # sidecars restored beside their photos


class UndoIncomplete(JournalError):
    """Some files could not be restored; they stay in the quarantine and the journal stays pending."""

    def __init__(self, result: UndoResult):
        self.result = result
        first = result.problems[0] + (f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else "")
        super().__init__(f"undo of {printable(result.journal.name)} incomplete: {len(result.problems)} file(s) not "
                         f"restored, {len(result.restored)} restored: {first}")


class ApplyInterrupted(KeyboardInterrupt):
    """Ctrl-C during an apply, between two steps: `result` holds the steps done (journaled in
    `result.journal`, None if none began, and set aside in the catalog) of the `planned` files."""

    def __init__(self, result: ApplyResult, planned: int) -> None:
        super().__init__(f"interrupted: {len(result.done)} of {planned} files done")
        self.result, self.planned = result, planned


class UndoInterrupted(KeyboardInterrupt):
    """Ctrl-C during an undo, between two steps: `result` holds the files restored so far, of the
    `to_restore` this undo set out to put back; the journal stays pending, so undo again finishes it."""

    def __init__(self, result: UndoResult, to_restore: int) -> None:
        super().__init__(f"interrupted: {len(result.restored)} of {to_restore} files restored")
        self.result, self.to_restore = result, to_restore


@contextlib.contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], None]]:
    """Ctrl-C lands between steps, not inside one: yields `checkpoint()`, to call before each step,
    which raises the KeyboardInterrupt of a Ctrl-C pressed meanwhile (and so does leaving the block).

    A step cut short is still safe (the journal lets undo finish it backwards), but then the
    catalog and the disk disagree about that file until undo runs, and a re-run skips its group;
    a step is short (one file's hash, link or copy), so waiting for it costs little. A second
    Ctrl-C interrupts at once, for a step stuck on a slow disk. Only where Python's own handler is
    installed, in the main thread: a server's or a caller's own handler is left alone.
    """
    pressed = False

    def on_interrupt(signum, frame) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    def checkpoint() -> None:
        if pressed:
            raise KeyboardInterrupt

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield checkpoint  # never pressed: Ctrl-C behaves as the caller set it up
        return
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield checkpoint
    finally:
        signal.signal(signal.SIGINT, previous)
    checkpoint()  # pressed during the last step


# ---- checking files -------------------------------------------------------------------------------

def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Which file, in which state: a write since changes mtime or ctime, a swap the inode."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def fingerprint(path: Path) -> tuple[str, os.stat_result]:
    """sha256 of a regular file, and its fstat from before the read. Opened with model.files:
    a FIFO swapped in is refused at once (never waited on), a symlink at `path` is not followed."""
    with open_regular(path, follow_symlinks=False) as f:
        st = os.fstat(f.fileno())
        return sha256_file(f), st


def sha256_of(path: Path) -> str:
    return fingerprint(path)[0]


def _check(path: Path, size: int, sha256: str) -> os.stat_result | str:
    """The stat of `path` if it is still the regular file the catalog knows, reached without any
    symlink; else why not."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{printable(path)}: {e.strerror}"
    if os.path.realpath(path) != str(path):
        return f"{printable(path)} is now reached through a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{printable(path)} is no longer a regular file"
    if st.st_size != size:
        return f"{printable(path)} changed size since it was indexed"
    try:
        digest, st = fingerprint(path)
    except OSError as e:  # swapped for a FIFO or removed just now
        return f"{printable(path)} cannot be read: {e.strerror or e}"
    if digest != sha256:
        return f"{printable(path)} changed content since it was indexed"
    return st


def free_name(path: Path) -> Path:
    """`path`, or `name~1.ext`, `name~2.ext`, ... : the first that does not exist."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}~{n}{path.suffix}")
    return candidate


# ---- moving bytes ---------------------------------------------------------------------------------

def place(src: Path, target: Path, expect: os.stat_result | None = None, sha256: str | None = None) -> None:
    """Give src's bytes the name `target` (which must not exist) and remove src; never overwrites.

    src is opened once, as a regular file and not through a symlink, and that file is the one
    moved: it must still be the file `expect` describes (when it was checked), a hard link must land
    on its inode, and a copy is read from that same descriptor (and checked against `sha256` on the
    way). Otherwise FileChangedError, with nothing moved.

    Same filesystem: a hard link, then unlink (owner, mode and times are the inode's). Across
    filesystems: a copy under a short temp name, fsynced, given src's owner (where permitted), mode,
    extended attributes and times, hard-linked to `target`, then src removed — so `target` is never
    a partial file, and a failed copy (disk full) leaves no temp file behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_regular(src, follow_symlinks=False) as f:
        st = os.fstat(f.fileno())
        if expect is not None and _identity(st) != _identity(expect):
            raise FileChangedError(errno.ESTALE, "changed since it was checked", os.fsdecode(src))
        try:
            os.link(src, target, follow_symlinks=False)  # FileExistsError if target appeared: never overwrites
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_across(src, f, st, target, sha256)
        else:
            if not _same_file(os.lstat(target), st):  # src was swapped between the open and the link
                os.unlink(target)
                raise FileChangedError(errno.ESTALE, "was replaced while being moved", os.fsdecode(src))
    try:
        now = os.lstat(src)
    except FileNotFoundError:
        return  # removed meanwhile: its bytes are at target all the same
    if not _same_file(now, st):
        raise OSError(errno.ESTALE, f"was replaced while being moved; its checked bytes are in {printable(target)}",
                      os.fsdecode(src))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src)


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def _copy_across(src: Path, fin, st: os.stat_result, target: Path, sha256: str | None) -> None:
    """Copy from `fin`, the descriptor place() checked, never from src's name again."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(_Hashing(fin, digest), fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
            _copy_metadata(fin.fileno(), st, fout.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise FileChangedError(errno.ESTALE, "changed since it was checked (sha256 differs)", os.fsdecode(src))
        os.link(tmp, target)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _copy_metadata(src_fd: int, st: os.stat_result, dst_fd: int) -> None:
    """src's owner and group on dst, or as much of it as this user may set (its own files; a group
    it belongs to); then mode (after chown, which may clear set-id bits), extended attributes where
    permitted, and times last."""
    for uid, gid in ((st.st_uid, st.st_gid), (-1, st.st_gid)):
        try:
            os.fchown(dst_fd, uid, gid)
            break
        except PermissionError:
            continue
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    if hasattr(os, "listxattr"):
        with contextlib.suppress(OSError):
            for name in os.listxattr(src_fd):
                with contextlib.suppress(OSError):  # e.g. security.* needs privileges
                    os.setxattr(dst_fd, name, os.getxattr(src_fd, name))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---- links ----------------------------------------------------------------------------------------

def link_target(keeper: Path, link: Path) -> str:
    """What a symlink at `link` should hold to reach `keeper`: a path relative to the link's folder
    (the library can then be moved or mounted elsewhere as a whole), or the absolute path when no
    relative one exists (another drive on Windows)."""
    try:
        return os.path.relpath(keeper, link.parent)
    except ValueError:
        return os.fsdecode(keeper)


def links_to(link: Path, keeper: Path) -> bool:
    """Does the symlink at `link` name `keeper`, as apply writes it (relative to the link's folder,
    or absolute as older applies did)? Compared as paths, without following any link."""
    target = os.readlink(link)
    return os.path.normpath(os.path.join(os.fsdecode(link.parent), target)) == os.path.normpath(os.fsdecode(keeper))


# ---- apply ----------------------------------------------------------------------------------------

def planned_sidecars(library: Library, group: Group, action: str,
                     index: FolderIndex | None = None) -> dict[bytes, list[Path]]:
    """For a dry run: raw path of each duplicate -> the sidecars that would move with it (only
    `move` moves sidecars; links leave them beside the link). Folders are read through `index`
    (by default the command's: sidecars.one_listing_per_folder)."""
    if action != "move":
        return {}
    index = index or folder_index()
    return {m.raw_path: sidecars_of(library.root / os.fsdecode(m.raw_path), index) for m in group.others}


def hold_back_only_raws(library: Library, groups: list[Group],
                        action: str) -> tuple[list[Group], dict[int, str]]:
    """For a plan: the groups with every duplicate that holds the only copy of a RAW (see only_raw)
    kept where it is (among `protected_ids`, its reason saying why), and member id -> that reason.
    Only `move` takes RAWs along (the `report` dry run previews a move); links leave them in place.
    apply() checks again on the files as they are then, whatever groups it is given."""
    if action not in ("report", "move"):
        return groups, {}
    index, hashes = folder_index(), {}
    held: dict[int, str] = {}
    out = []
    for group in groups:
        keeper = library.root / os.fsdecode(group.keeper.raw_path)
        mine = {}
        for member in group.others:
            photo = library.root / os.fsdecode(member.raw_path)
            why = only_raw(photo, keeper, sidecars_of(photo, index), index, hashes)
            if why is not None:
                mine[member.id] = why
        if mine:
            group = replace(group, protected_ids=group.protected_ids | frozenset(mine),
                            reasons={**group.reasons, **mine})
            held.update(mine)
        out.append(group)
    return out, held


def only_raw(photo: Path, keeper: Path, companions: list[Path], index: FolderIndex,
             hashes: dict) -> str | None:
    """Why moving `photo` with its `companions` (sidecars_of) would take away the only copy of a
    RAW, or None. A RAW goes with a duplicate only when the kept copy has a RAW partner with the
    same bytes (sha256); `purge` would otherwise delete the negative for good. `hashes` caches
    sha256 by path and stat across calls."""
    kept = None
    for raw in companions:
        if raw.suffix.lower() not in RAW_SUFFIXES:
            continue
        kept = raw_files(keeper, index) if kept is None else kept
        if not kept:
            return f"holds the only RAW ({raw.name}); the kept copy has none"
        if not any(_same_bytes(raw, other, hashes) for other in kept):
            return f"holds the only RAW ({raw.name}); the kept copy's RAW ({kept[0].name}) has other bytes"
    return None


def _same_bytes(a: Path, b: Path, hashes: dict) -> bool:
    """Do two regular files hold the same bytes? Sizes first (no read when they differ); a file that
    cannot be read counts as different (the RAW then stays where it is)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
        if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_size != sb.st_size:
            return False
        return _sha256_cached(a, sa, hashes) == _sha256_cached(b, sb, hashes)
    except OSError:
        return False


def _sha256_cached(path: Path, st: os.stat_result, hashes: dict) -> str:
    key = (path, _identity(st))
    if key not in hashes:
        hashes[key] = sha256_of(path)
    return hashes[key]


class _NotMoved(Exception):
    """A duplicate changed or vanished just before its move: nothing moved, the apply goes on."""


def apply(library: Library, groups: list[Group], action: str, quarantine: Path | str | None = None) -> ApplyResult:
    """Carry out `action` on every group; groups whose files changed since indexing are skipped, and
    so is a duplicate with other hard links (moving one name of a file frees nothing) or one that
    changes or vanishes during the apply; the rest of its group goes on. The journal is written (and
    recorded in the catalog) only if at least one step begins.

    Reported as the step "apply", in files (the duplicates planned). Ctrl-C raises ApplyInterrupted
    once the step under way is done (see interrupts_between_steps)."""
    if action not in ACTIONS[1:]:
        raise InvalidArgumentError(f"must be one of {', '.join(ACTIONS[1:])}, got {action!r}", argument="action")
    root = library.root
    quarantine = Path(quarantine or library.folder / journals_.QUARANTINE).resolve()
    check_quarantine(root, library.folder, quarantine)
    keepers = {root / os.fsdecode(group.keeper.raw_path) for group in groups}
    result = ApplyResult(None)
    planned = sum(len(group.others) for group in groups)
    log = None
    index, hashes = folder_index(), {}  # each folder listed once; RAWs hashed once

    def record(path: Path) -> None:  # committed before the first step can move anything
        library.catalog.record_journal(path.name, os.fsencode(root), os.fsencode(quarantine), action)

    try:
        with (JournalWriter(library.folder / "journals", action, root, quarantine, on_start=record) as log,
              progress(planned, "apply", unit="files") as shown, interrupts_between_steps() as checkpoint):
            for group in groups:
                handled = shown.done + len(group.others)
                _apply_group(library, group, action, quarantine, log, result, keepers, shown, checkpoint,
                             index, hashes)
                shown.update(handled - shown.done)  # a group skipped whole (or cut short) is handled too
    except KeyboardInterrupt as e:
        result.journal = log.path if log is not None and log.started else None
        raise ApplyInterrupted(result, planned) from e
    finally:  # also after an apply that stopped part-way: what was set aside so far
        if result.done:
            library.index_set.sync()  # set-aside rows leave the indexes with the catalog (verify agrees)
    result.journal = log.path if log.started else None
    return result


def _apply_group(library: Library, group: Group, action: str, quarantine: Path, log: JournalWriter,
                 result: ApplyResult, keepers: set[Path], shown: Shown, checkpoint: Callable[[], None],
                 index: FolderIndex, hashes: dict) -> None:
    root = library.root
    keeper = root / os.fsdecode(group.keeper.raw_path)
    others = [(m, root / os.fsdecode(m.raw_path)) for m in group.others]
    checked = _check_group(keeper, group, others, action)
    if isinstance(checked, str):  # the group is skipped whole: the plan no longer describes these files
        result.skipped.append((group, checked))
        return
    for member, src in shown.count(others):
        checkpoint()  # a photo and its sidecars are one step: Ctrl-C waits until all of it is done
        st = checked[src]
        if st.st_nlink > 1:
            result.skipped_files.append((src, "has other hard links: moving it would free nothing"))
            continue
        if src in keepers:  # groups passed in that overlap: moving it would pull a kept copy away
            result.skipped_files.append((src, "is the kept copy of another group"))
            continue
        if not os.path.isfile(keeper):  # paranoia: the copy that stays must still be there
            result.skipped.append((group, f"{printable(keeper)} vanished during the apply"))
            return
        # Listed before the photo moves: what is beside it now is what belongs with it.
        companions = sidecars_of(src, index) if action == "move" else []
        held = only_raw(src, keeper, companions, index, hashes) if companions else None
        if held is not None:  # JPEG and RAW both stay: the RAW must never reach purge alone
            result.skipped_files.append((src, held))
            continue
        wanted = _free_with_sidecars(quarantine / os.fsdecode(member.raw_path), companions)
        step_no = log.new_step()
        try:
            final = _move_journaled(log, step_no, action, src, wanted, keeper, group.keeper.sha256, member,
                                    checked[keeper], st)
        except _NotMoved as e:
            result.skipped_files.append((src, str(e)))
            continue
        except OSError as e:
            raise ActionError(f"stopped at {printable(src)} ({e.strerror or e}); {len(result.done)} files were set "
                              f"aside, journal {printable(log.path)} records them") from e
        # The row is set aside before the step is marked done: a done step's row was quarantined
        # (undo relies on it), an unfinished one may still be embedded.
        library.catalog.set_status(member.id, QUARANTINED, f"dedup {action}: bytes in {printable(final)}")
        log.write({"type": "done", "step": step_no})
        result.done.append(Step(action, src, final, keeper, member.sha256, member.size, member.id))
        index.moved(src)
        for sidecar in companions:
            # The photo's new stem, if it got a free name (IMG_1~1.JPG): IMG_1~1.xmp pairs with it there.
            name = renamed(sidecar.name, src.name, final.name)
            if _move_sidecar(log, step_no, sidecar, final.parent / name, keeper, member, result, hashes):
                index.moved(sidecar)


def _free_with_sidecars(wanted: Path, companions: list[Path]) -> Path:
    """`wanted`, or `name~1.ext`, `name~2.ext`, ...: the first name free in the quarantine together
    with the names its sidecars take with that stem (see sidecars.renamed)."""
    candidate, n = wanted, 0
    while os.path.lexists(candidate) or any(
            os.path.lexists(candidate.parent / renamed(c.name, wanted.name, candidate.name)) for c in companions):
        n += 1
        candidate = wanted.with_name(f"{wanted.stem}~{n}{wanted.suffix}")
    return candidate


def _move_sidecar(log: JournalWriter, photo_step: int, sidecar: Path, wanted: Path, keeper: Path, member,
                  result: ApplyResult, hashes: dict) -> bool:
    """One sidecar step, journaled like a photo's: hashed now (it has no catalog row), moved only if
    still those bytes. One that changes or vanishes meanwhile stays where it is and is reported.
    A RAW must still be the bytes only_raw found beside the kept copy too. True if it moved."""
    try:
        sha256, st = fingerprint(sidecar)
    except OSError as e:
        result.sidecars_left.append((sidecar, f"cannot be read ({e.strerror or e}): left where it is"))
        return False
    if sidecar.suffix.lower() in RAW_SUFFIXES and hashes.get((sidecar, _identity(st))) != sha256:
        why = "changed since it was compared with the kept copy's RAW: left where it is"
        result.sidecars_left.append((sidecar, why))
        return False
    step_no = log.new_step()
    record = {"type": "intent", "step": step_no, "op": "move", "src": os.fsdecode(sidecar), "keeper": os.fsdecode(keeper),
              "sha256": sha256, "size": st.st_size, "row_id": member.id, "sidecar_of": photo_step}
    try:
        final = _place_journaled(log, step_no, record, sidecar, wanted, st, sha256)
    except _NotMoved as e:
        result.sidecars_left.append((sidecar, str(e)))
        return False
    except OSError as e:
        raise ActionError(f"stopped at {printable(sidecar)} ({e.strerror or e}); {len(result.done)} files were set "
                          f"aside, journal {printable(log.path)} records them") from e
    log.write({"type": "done", "step": step_no})
    result.sidecars.append((sidecar, final))
    return True


def _check_group(keeper: Path, group: Group, others, action: str) -> dict[Path, os.stat_result] | str:
    """Every file of the group checked (path -> its stat when hashed), or why the group is skipped."""
    checked = {keeper: _check(keeper, group.keeper.size, group.keeper.sha256)}
    for member, path in others:
        checked[path] = _check(path, member.size, member.sha256)
    problem = next((c for c in checked.values() if isinstance(c, str)), None)
    if problem:
        return problem
    kept = checked[keeper]
    for _, path in others:
        st = checked[path]
        if _same_file(st, kept):
            return f"{printable(path)} is the kept file itself (a hard link): nothing to free"
        if action == "hardlink" and st.st_dev != kept.st_dev:
            return f"{printable(path)} and the kept copy are on different filesystems: no hard link possible"
    return checked


_VANISHED = (FileChangedError, NotRegularFileError, FileNotFoundError)  # raised before anything moved


def _move_journaled(log: JournalWriter, step_no: int, action: str, src: Path, wanted: Path, keeper: Path,
                    keeper_sha256: str, member, kept: os.stat_result, st: os.stat_result) -> Path:
    """One step: intent (with the final name) -> move -> link. Returns where the bytes went; the
    caller marks it done. _NotMoved if src changed or vanished since it was checked. The kept
    copy's sha256 is journaled so that purge can tell it still holds the photo (retrieval.purge)."""
    record = {"type": "intent", "step": step_no, "op": action, "src": os.fsdecode(src), "keeper": os.fsdecode(keeper),
              "keeper_id": [kept.st_dev, kept.st_ino], "keeper_sha256": keeper_sha256, "sha256": member.sha256,
              "size": member.size, "row_id": member.id}
    final = _place_journaled(log, step_no, record, src, wanted, st, member.sha256)
    try:
        if action == "hardlink":
            os.link(keeper, src, follow_symlinks=False)
        elif action == "symlink":
            os.symlink(link_target(keeper, src), src)
    except OSError as e:
        place(final, src, sha256=member.sha256)  # put the file back before reporting the failure
        log.write({"type": "rolled-back", "step": step_no})
        if isinstance(e, FileNotFoundError):  # the kept copy vanished: the rest of its group is skipped
            raise _NotMoved(f"not linked: {printable(keeper)} vanished during the apply; left where it is") from e
        raise
    return final


def _place_journaled(log: JournalWriter, step_no: int, record: dict, src: Path, wanted: Path, st: os.stat_result,
                     sha256: str) -> Path:
    """Intent (with the final name) -> move. Returns where the bytes went; _NotMoved (after a
    rolled-back record) if src changed or vanished since it was checked."""
    while True:
        final = free_name(wanted)
        log.write({**record, "dst": os.fsdecode(final)})
        try:
            place(src, final, expect=st, sha256=sha256)
            return final
        except FileExistsError:
            continue  # the name was taken meanwhile: a new intent names the next free one
        except _VANISHED as e:
            log.write({"type": "rolled-back", "step": step_no})
            raise _NotMoved(f"changed or vanished during the apply ({e.strerror or e}): left where it is") from e


# ---- undo -----------------------------------------------------------------------------------------

def journals(library: Library) -> list[Path]:
    return journals_.all_journals(library.folder)


def pending_journals(library: Library) -> list:
    """Journals not yet undone nor purged, oldest first (see retrieval.journal.pending)."""
    return journals_.pending(library.folder, _undone_names(library.catalog.journal_records()))


def listed_journals(library: Library) -> list:
    """What `undo --list` shows, oldest first: the pending journals, and the purged ones (their
    `purged` set from the catalog too, which outranks the file) so the user sees why those cannot
    be undone."""
    rows = library.catalog.journal_records()
    purged = []
    for path in journals_.all_journals(library.folder):
        row = rows.get(path.name)
        if row is not None and row[3] is not None:
            continue  # undone: its files are back
        try:
            journal = journals_.read(path)
        except JournalError:
            continue  # pending() reports a damaged one already
        if journal.purged or (row is not None and row[4] is not None):
            journal.purged = True
            purged.append(journal)
    listed = pending_journals(library) + purged
    return sorted(listed, key=lambda j: (j[0] if isinstance(j, tuple) else j.path).name)


def undo(library: Library, journal: Path | None = None, accept_missing: bool = False) -> UndoResult:
    """Restore every file of a journal (by default the newest one not yet undone).

    The whole journal is checked first; a malformed or forged one (paths outside this library's
    root and quarantine, a header other than the catalog recorded, another library's root, steps
    sharing files) raises JournalError and changes nothing. Each step may only do what the catalog's
    row at its src allows (see _right). Then each step is judged by what is on disk, so half-finished
    steps of a killed run are completed backwards too. A quarantined copy is checked against the
    journal's sha256 before it moves back; anything that cannot be restored exactly stays where it is
    and is reported (UndoIncomplete), and the journal is marked undone only when nothing is left —
    or, with `accept_missing`, when all that is left are files whose quarantined copy is gone: they
    are recorded (journal, catalog) and the journal is closed.

    Reported as the step "undo", in files. Ctrl-C raises UndoInterrupted once the file under way is
    back; the journal stays pending, and undo again finishes it (the files already back are settled,
    the catalog having them in place).
    """
    recorded = library.catalog.journal_records()
    path = Path(journal) if journal is not None else journals_.newest_pending(library.folder, _undone_names(recorded))
    record = journals_.read(path)
    row = recorded.get(path.name)
    if record.purged or (row is not None and row[4] is not None):
        raise JournalError(f"{printable(path)} was purged: its quarantined copies were deleted, nothing to undo")
    if record.undone or (row is not None and row[3] is not None):
        raise JournalError(f"{printable(path)} was already undone")
    journals_.check_places(record, library.root, library.folder)  # before any file is touched
    journals_.check_recorded(record, row and row[:3], library.folder)
    rights = _rights(library, record)
    result = UndoResult([], 0, journal=path)
    # rolled-back steps: written only once the file was back (or had never moved); restored ones:
    # put back by an earlier, partial undo. Their dst may since hold another journal's copy of the
    # same file (a later apply set it aside again): never touched again.
    steps = [step for step in record.steps_backwards()
             if step.step not in record.rolled_back and step.step not in record.restored]
    to_restore = sum(step.sidecar_of is None and rights[step.step] in (RESTORE, CREATE) for step in steps)
    try:
        with progress(len(steps), "undo", unit="files") as shown, interrupts_between_steps() as checkpoint:
            for step in shown.count(steps):
                checkpoint()
                if _undo_step(step, library, record, rights[step.step], result):
                    journals_.mark_restored(path, step.step)  # nothing of this step is left in the quarantine
    except KeyboardInterrupt as e:
        raise UndoInterrupted(result, to_restore) from e
    finally:
        if result.restored:
            library.index_set.sync()  # restored rows are searchable again
    remove_emptied_folders(record, record.header.quarantine)
    if result.problems:
        if not (accept_missing and all(isinstance(p, Missing) for p in result.problems)):
            raise UndoIncomplete(result)
        result.accepted, result.problems = result.problems, []
    _close_journal(library, record, result.accepted)  # the catalog first: it decides what is pending
    journals_.mark_undone(path, result.accepted)
    return result


def _undo_step(step: Intent, library: Library, record: Journal, right: str, result: UndoResult) -> bool:
    """One file back (a photo with its catalog row, or a sidecar), or the reason it is not in `result`.
    True when the step is settled: its file is back at src (or never left it)."""
    try:
        outcome = _restore(step, library, record.header.quarantine, right)
    except OSError as e:
        outcome = f"{printable(step.src)} not restored: {e.strerror or e}"
    if isinstance(outcome, str):
        result.problems.append(outcome)
        return False
    if step.sidecar_of is not None:  # no row of its own (a RAW's "unsupported" row was never set aside)
        if outcome:
            result.sidecars.append(os.fsdecode(step.src))
        return True
    in_catalog = library.catalog.unquarantine(_relative(library, step.src))  # also for steps a killed run left half done
    if outcome:
        result.restored.append(os.fsdecode(step.src))
        result.not_in_catalog += not in_catalog
    return True


def _right(step: Intent, row: tuple[str, str] | None, done: frozenset[int]) -> str:
    """What undo may do at step.src (RESTORE, CREATE, SETTLE), or why nothing (a problem line).

    The journal's sha256 is only the journal's word; the catalog's row at src says which bytes the
    library had there. Whatever a step then does, src ends up with those bytes or is left alone."""
    if row is None:  # an index run drops the row of a moved file: restoring it creates a file, never replaces one
        return CREATE
    sha256, status = row
    if sha256 != step.sha256:
        return (f"{printable(step.src)} not restored: the catalog knows other bytes at that path than the journal "
                f"(replaced since the apply?); {printable(step.dst)} left in place")
    if status == QUARANTINED:
        return RESTORE
    if status == EMBEDDED:  # a step a killed apply left half done, or one already put back
        return SETTLE if step.step in done else RESTORE
    return f"{printable(step.src)} not restored: the catalog has it as {printable(status)}, not set aside; left alone"


def _rights(library: Library, record: Journal) -> dict[int, str]:
    steps = record.steps_backwards()
    photos = [step for step in steps if step.sidecar_of is None]
    rows = library.catalog.rows_at([_relative(library, step.src) for step in photos])
    rights = {step.step: _right(step, rows.get(os.fsencode(step.src.relative_to(library.root))), record.done)
              for step in photos}
    for step in steps:
        if step.sidecar_of is not None:
            rights[step.step] = _sidecar_right(step, rights[step.sidecar_of])
    return rights


def _sidecar_right(step: Intent, photo_right: str) -> str:
    """A sidecar has no row: it may come back wherever its photo's row allows anything at all, and
    only as CREATE (its old name is free, or a spare copy is cleaned up; an existing file there is
    never replaced). Where the catalog refuses its photo, the sidecar stays in quarantine too."""
    if photo_right in (RESTORE, CREATE, SETTLE):
        return CREATE
    return f"{printable(step.src)} not restored: it is a sidecar of a photo that is not restored; left in place"


def _restore(step: Intent, library: Library, quarantine: Path, right: str) -> bool | str:
    """Put the quarantined bytes back at src. True: restored; False: nothing to restore (the step
    never moved anything, or a killed step was completed backwards); a string: why it was not
    restored (the quarantined copy is left where it is, src is never overwritten)."""
    if right not in (RESTORE, CREATE, SETTLE):
        return right
    # Checked again right before acting: folders may have been swapped for links since the journal was read.
    problem = journals_.place_problem(step, library.root, library.folder, quarantine)
    if problem:
        return f"{printable(step.src)} not restored: {problem}"
    src, dst = step.src, step.dst
    if os.path.lexists(src):
        if step.op != "move" and _is_our_link(step):
            if right == SETTLE or (right == CREATE and step.op != "symlink"):  # a symlink holds no bytes
                return (f"{printable(src)} not restored: the catalog does not have it as set aside; "
                        f"{printable(dst)} left in place")
            return _replace_link(step)
        return _finish_backwards(step)  # never changes src
    if not os.path.lexists(dst):
        return Missing(f"{printable(src)} not restored: its quarantined copy {printable(dst)} is missing", src)
    if right == SETTLE:
        return (f"{printable(src)} not restored: the catalog has it in place, not set aside; "
                f"{printable(dst)} left in place")
    checked = _quarantined(step)
    if isinstance(checked, str):
        return checked
    place(dst, src, expect=checked, sha256=step.sha256)
    return True


def _replace_link(step: Intent) -> bool | str:
    """src is the link apply left: swap it for the quarantined bytes, once they are checked."""
    if not os.path.lexists(step.dst):
        return Missing(f"{printable(step.src)} not restored: its quarantined copy {printable(step.dst)} is missing "
                       f"(the link to the kept copy stays)", step.src)
    checked = _quarantined(step)
    if isinstance(checked, str):
        return checked
    os.unlink(step.src)  # only the link we made; the kept copy keeps its bytes
    try:
        place(step.dst, step.src, expect=checked, sha256=step.sha256)
    except OSError:
        _relink(step)  # leave things as they were: the link back, the bytes in quarantine
        raise
    return True


def _relink(step: Intent) -> None:
    try:
        if step.op == "hardlink":
            os.link(step.keeper, step.src, follow_symlinks=False)
        else:
            os.symlink(link_target(step.keeper, step.src), step.src)
    except OSError:
        pass  # the bytes are still in the quarantine; the problem is reported either way


def _finish_backwards(step: Intent) -> bool | str:
    """src exists and is not our link: either the step never moved anything, or a killed run left
    it half done (two names for one file, or a whole copy on each side of a filesystem boundary).
    src is never changed here; at most dst goes, when src holds the same bytes."""
    src, dst = step.src, step.dst
    if not os.path.lexists(dst):
        return False  # the step never moved anything
    s, d = os.lstat(src), os.lstat(dst)
    if _same_file(s, d):
        # Killed between link and unlink: src is whole. Two names of one file must show two links;
        # one name seen twice (a bind mount) shows one, and unlinking it would drop the only copy.
        if s.st_nlink < 2:
            return (f"{printable(src)} not restored: it is the same file as {printable(dst)} seen through a mount; "
                    f"left alone")
        os.unlink(dst)
        return False
    if _is_whole(src, s, step):
        if _is_whole(dst, d, step):
            os.unlink(dst)  # killed mid cross-filesystem move: src is whole, dst our spare copy
        return False  # (a dst with other bytes is not ours: left alone)
    if step.op != "move":  # e.g. the kept copy was deleted or renamed since: src is its last name now
        return (f"{printable(src)} was replaced since the apply (it is not the link to {printable(step.keeper)} the "
                f"apply left); its old bytes stay in {printable(dst)}")
    return f"{printable(src)} was replaced since the apply; its old bytes stay in {printable(dst)}"


def remove_emptied_folders(record: Journal, quarantine: Path) -> None:
    """The folders apply made inside the quarantine for this journal's steps, where undo (or purge)
    left them empty: removed, deepest first, up to (never including) the quarantine itself. A folder holding
    anything (a copy not restored, someone else's file) stays, and so do those above it."""
    folders = {parent for step in record.steps_backwards() for parent in step.dst.parents
               if quarantine in parent.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if os.path.islink(folder):
            continue  # never follow a link out of the quarantine
        with contextlib.suppress(OSError):  # not empty, or gone already
            os.rmdir(folder)


def _is_whole(path: Path, st: os.stat_result, step: Intent) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size == step.size and sha256_of(path) == step.sha256


def _quarantined(step: Intent) -> os.stat_result | str:
    """The quarantined copy's stat when it was hashed, if it may go back; else why not (checked
    before anything moves)."""
    where = f"{printable(step.src)} not restored: its quarantined copy {printable(step.dst)}"
    st = os.lstat(step.dst)
    if not stat.S_ISREG(st.st_mode):
        return f"{where} is no longer a regular file"
    try:
        digest, st = fingerprint(step.dst) if st.st_size == step.size else (None, st)
    except OSError as e:  # swapped for a FIFO or removed just now
        return f"{where} cannot be read: {e.strerror or e}"
    if digest != step.sha256:
        return f"{where} changed since the apply (sha256 differs); left in place"
    return st


def _is_our_link(step: Intent) -> bool:
    """Is src the link apply left to the kept copy? A hard link counts only while the kept copy
    still exists under its name, as the same file: unlinking src then never drops the last name
    of any bytes."""
    src = step.src
    if step.op == "symlink":
        return os.path.islink(src) and links_to(src, step.keeper)
    st = os.lstat(src)
    try:
        kept = os.lstat(step.keeper)
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(st.st_mode) and stat.S_ISREG(kept.st_mode) and st.st_nlink >= 2 and _same_file(st, kept))


# ---- the catalog's side of applies and undos --------------------------------------------------

def _undone_names(rows: dict) -> frozenset[str]:
    """Journals the catalog records as closed, undone or purged: nothing left to undo."""
    return frozenset(name for name, row in rows.items() if row[3] is not None or row[4] is not None)


def _relative(library: Library, path: Path) -> bytes:
    return os.fsencode(path.relative_to(library.root))


def _close_journal(library: Library, record: Journal, accepted: list[Missing]) -> None:
    header = record.header
    given_up = {_relative(library, lost.src): str(lost) for lost in accepted}
    library.catalog.close_journal(record.path.name, os.fsencode(header.root), os.fsencode(header.quarantine),
                                  header.action, given_up)

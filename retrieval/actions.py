"""Acting on duplicate groups safely: plan, journal every step before it happens, apply, undo.

Nothing is ever deleted. `move` puts a duplicate into the quarantine folder (relative path kept);
`hardlink` / `symlink` do the same and then leave a link to the kept copy at the old path. Every
step is written (and fsynced) to a journal, with its final destination, before it happens and
marked done after, so `undo` can restore the files byte for byte even after a crash mid-step.
Undo trusts no journal: it checks all of it first (retrieval.journal), then only ever moves bytes
between this library's photo folder and its quarantine, after checking them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from indexer.catalog import QUARANTINED
from indexer.library import Library

from . import journal as journals_
from .dedup import Group
from .errors import ActionError, InvalidArgumentError, JournalError
from .journal import Intent, JournalWriter, check_quarantine, shown

ACTIONS = ("report", "move", "hardlink", "symlink")
PAST = {"move": "moved", "hardlink": "hard-linked", "symlink": "symlinked"}
TEMP_PREFIX, TEMP_SUFFIX = ".dsk-", ".tmp"  # short: a 255-byte file name must still fit beside it


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


@dataclass
class UndoResult:
    restored: list[str]
    not_in_catalog: int  # restored files whose rows an index run dropped meanwhile: re-index them
    problems: list[str] = field(default_factory=list)  # one line per file not restored (left in quarantine)
    journal: Path | None = None


class UndoIncomplete(JournalError):
    """Some files could not be restored; they stay in the quarantine and the journal stays pending."""

    def __init__(self, result: UndoResult):
        self.result = result
        first = result.problems[0] + (f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else "")
        super().__init__(f"undo of {shown(result.journal.name)} incomplete: {len(result.problems)} file(s) not "
                         f"restored, {len(result.restored)} restored: {first}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, size: int, sha256: str) -> str | None:
    """None if `path` is still the regular file the catalog knows, reached without any symlink."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{shown(path)}: {e.strerror}"
    if os.path.realpath(path) != str(path):
        return f"{shown(path)} is now reached through a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{shown(path)} is no longer a regular file"
    if st.st_size != size:
        return f"{shown(path)} changed size since it was indexed"
    if sha256_of(path) != sha256:
        return f"{shown(path)} changed content since it was indexed"
    return None


def free_name(path: Path) -> Path:
    """`path`, or `name~1.ext`, `name~2.ext`, ... : the first that does not exist."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}~{n}{path.suffix}")
    return candidate


# ---- moving bytes ---------------------------------------------------------------------------------

def place(src: Path, target: Path) -> None:
    """Give src's bytes the name `target` (which must not exist) and remove src; never overwrites.

    Same filesystem: a hard link, then unlink (owner, mode and times are the inode's). Across
    filesystems: a copy under a short temp name, fsynced, given src's owner (where permitted), mode
    and times, hard-linked to `target`, then src removed — so `target` is never a partial file, and a
    failed copy (disk full) leaves no temp file behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, target)  # FileExistsError if target appeared: never overwrites
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        _copy_across(src, target)
    os.unlink(src)


def _copy_across(src: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fout, open(src, "rb") as fin:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        _copy_owner(src, tmp)
        shutil.copystat(src, tmp)  # after chown, which may clear set-id bits
        os.link(tmp, target)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _copy_owner(src: Path, dst: str) -> None:
    """src's owner and group on dst, or as much of it as this user may set (a group it belongs to)."""
    st = os.stat(src)
    for uid, gid in ((st.st_uid, st.st_gid), (-1, st.st_gid)):
        try:
            os.chown(dst, uid, gid)
            return
        except PermissionError:
            continue


# ---- apply ----------------------------------------------------------------------------------------

def apply(library: Library, groups: list[Group], action: str, quarantine: Path | str | None = None) -> ApplyResult:
    """Carry out `action` on every group; groups whose files changed since indexing are skipped, and
    so is a duplicate with other hard links (moving one name of a file frees nothing); the rest of
    its group goes on. The journal is written only if at least one step begins."""
    if action not in ACTIONS[1:]:
        raise InvalidArgumentError(f"must be one of {', '.join(ACTIONS[1:])}, got {action!r}", argument="action")
    root = library.root
    quarantine = Path(quarantine or library.folder / journals_.QUARANTINE).resolve()
    check_quarantine(root, library.folder, quarantine)
    result = ApplyResult(None)
    with JournalWriter(library.folder / "journals", action, root, quarantine) as log:
        for group in groups:
            _apply_group(library, group, action, quarantine, log, result)
    result.journal = log.path if log.started else None
    return result


def _apply_group(library: Library, group: Group, action: str, quarantine: Path, log: JournalWriter,
                 result: ApplyResult) -> None:
    root = library.root
    keeper = root / os.fsdecode(group.keeper.raw_path)
    others = [(m, root / os.fsdecode(m.raw_path)) for m in group.others]
    problem = _group_problem(keeper, group, others, action)
    if problem:  # the group is skipped whole: the plan no longer describes these files
        result.skipped.append((group, problem))
        return
    keeper_stat = os.stat(keeper)
    for member, src in others:
        if os.lstat(src).st_nlink > 1:
            result.skipped_files.append((src, "has other hard links: moving it would free nothing"))
            continue
        if not os.path.isfile(keeper):  # paranoia: the copy that stays must still be there
            result.skipped.append((group, f"{shown(keeper)} vanished during the apply"))
            return
        try:
            final = _move_journaled(log, len(result.done) + 1, action, src, quarantine / os.fsdecode(member.raw_path),
                                    keeper, member, (keeper_stat.st_dev, keeper_stat.st_ino))
        except OSError as e:
            raise ActionError(f"stopped at {shown(src)} ({e.strerror or e}); {len(result.done)} files were set "
                              f"aside, journal {shown(log.path)} records them") from e
        library.catalog.set_status(member.id, QUARANTINED, f"dedup {action}: bytes in {shown(final)}")
        result.done.append(Step(action, src, final, keeper, member.sha256, member.size, member.id))


def _group_problem(keeper: Path, group: Group, others, action: str) -> str | None:
    problem = _check(keeper, group.keeper.size, group.keeper.sha256)
    problem = problem or next((p for m, path in others if (p := _check(path, m.size, m.sha256))), None)
    if problem:
        return problem
    kept = os.stat(keeper)
    for _, path in others:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (kept.st_dev, kept.st_ino):
            return f"{shown(path)} is the kept file itself (a hard link): nothing to free"
        if action == "hardlink" and st.st_dev != kept.st_dev:
            return f"{shown(path)} and the kept copy are on different filesystems: no hard link possible"
    return None


def _move_journaled(log: JournalWriter, step_no: int, action: str, src: Path, wanted: Path, keeper: Path, member,
                    keeper_id) -> Path:
    """One step: intent (with the final name) -> move -> link -> done. Returns where the bytes went."""
    while True:
        final = free_name(wanted)
        log.write({"type": "intent", "step": step_no, "op": action, "src": os.fsdecode(src), "dst": os.fsdecode(final),
                   "keeper": os.fsdecode(keeper), "keeper_id": list(keeper_id), "sha256": member.sha256,
                   "size": member.size, "row_id": member.id})
        try:
            place(src, final)
            break
        except FileExistsError:
            continue  # the name was taken meanwhile: a new intent names the next free one
    try:
        if action == "hardlink":
            os.link(keeper, src)
        elif action == "symlink":
            os.symlink(keeper, src)
    except OSError:
        place(final, src)  # put the file back before reporting the failure
        log.write({"type": "rolled-back", "step": step_no})
        raise
    log.write({"type": "done", "step": step_no})
    return final


# ---- undo -----------------------------------------------------------------------------------------

def journals(library: Library) -> list[Path]:
    return journals_.all_journals(library.folder)


def pending_journals(library: Library) -> list:
    """Journals not yet undone, oldest first (see retrieval.journal.pending)."""
    return journals_.pending(library.folder)


def undo(library: Library, journal: Path | None = None) -> UndoResult:
    """Restore every file of a journal (by default the newest one not yet undone).

    The whole journal is checked first; a malformed or forged one (paths outside this library's
    root and quarantine, another library's root) raises JournalError and changes nothing. Then each
    step is judged by what is on disk, so half-finished steps of a killed run are completed backwards
    too. A quarantined copy is checked against the journal's sha256 before it moves back; anything
    that cannot be restored exactly stays where it is and is reported (UndoIncomplete), and the
    journal is marked undone only when nothing is left.
    """
    path = Path(journal) if journal is not None else journals_.newest_pending(library.folder)
    record = journals_.read(path)
    if record.undone:
        raise JournalError(f"{shown(path)} was already undone")
    journals_.check_places(record, library.root, library.folder)  # before any file is touched
    result = UndoResult([], 0, journal=path)
    for step in record.steps_backwards():
        try:
            outcome = _restore(step, library, record.header.quarantine)
        except OSError as e:
            outcome = f"{shown(step.src)} not restored: {e.strerror or e}"
        if isinstance(outcome, str):
            result.problems.append(outcome)
            continue
        in_catalog = _mark_restored(library, step.src)  # also for steps a killed run left half done
        if outcome:
            result.restored.append(os.fsdecode(step.src))
            result.not_in_catalog += not in_catalog
    if result.problems:
        raise UndoIncomplete(result)
    journals_.mark_undone(path)
    return result


def _restore(step: Intent, library: Library, quarantine: Path) -> bool | str:
    """Put the quarantined bytes back at src. True: restored; False: nothing to restore (the step
    never moved anything, or a killed step was completed backwards); a string: why it was not
    restored (the quarantined copy is left where it is, src is never overwritten)."""
    # Checked again right before acting: folders may have been swapped for links since the journal was read.
    problem = journals_.place_problem(step, library.root, library.folder, quarantine)
    if problem:
        return f"{shown(step.src)} not restored: {problem}"
    src, dst = step.src, step.dst
    if os.path.lexists(src):
        if step.op != "move" and _is_our_link(step):
            return _replace_link(step)
        return _finish_backwards(step)
    if not os.path.lexists(dst):
        return f"{shown(src)} not restored: its quarantined copy {shown(dst)} is missing"
    problem = _quarantined_problem(step)
    if problem:
        return problem
    place(dst, src)
    return True


def _replace_link(step: Intent) -> bool | str:
    """src is the link apply left: swap it for the quarantined bytes, once they are checked."""
    if not os.path.lexists(step.dst):
        return (f"{shown(step.src)} not restored: its quarantined copy {shown(step.dst)} is missing "
                f"(the link to the kept copy stays)")
    problem = _quarantined_problem(step)
    if problem:
        return problem
    os.unlink(step.src)  # only the link we made; the kept copy keeps its bytes
    try:
        place(step.dst, step.src)
    except OSError:
        _relink(step)  # leave things as they were: the link back, the bytes in quarantine
        raise
    return True


def _relink(step: Intent) -> None:
    try:
        if step.op == "hardlink":
            os.link(step.keeper, step.src)
        else:
            os.symlink(step.keeper, step.src)
    except OSError:
        pass  # the bytes are still in the quarantine; the problem is reported either way


def _finish_backwards(step: Intent) -> bool | str:
    """src exists and is not our link: either the step never moved anything, or a killed run left
    it half done (two names for one file, or a whole copy on each side of a filesystem boundary)."""
    src, dst = step.src, step.dst
    if not os.path.lexists(dst):
        return False  # the step never moved anything
    s, d = os.lstat(src), os.lstat(dst)
    if (s.st_dev, s.st_ino) == (d.st_dev, d.st_ino):
        # Killed between link and unlink: src is whole. Two names of one file must show two links;
        # one name seen twice (a bind mount) shows one, and unlinking it would drop the only copy.
        if s.st_nlink < 2:
            return f"{shown(src)} not restored: it is the same file as {shown(dst)} seen through a mount; left alone"
        os.unlink(dst)
        return False
    if _is_whole(src, s, step):
        if _is_whole(dst, d, step):
            os.unlink(dst)  # killed mid cross-filesystem move: src is whole, dst our spare copy
        return False  # (a dst with other bytes is not ours: left alone)
    if step.op != "move":  # e.g. the kept copy was deleted or renamed since: src is its last name now
        return (f"{shown(src)} was replaced since the apply (it is not the link to {shown(step.keeper)} the apply "
                f"left); its old bytes stay in {shown(dst)}")
    return f"{shown(src)} was replaced since the apply; its old bytes stay in {shown(dst)}"


def _is_whole(path: Path, st: os.stat_result, step: Intent) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size == step.size and sha256_of(path) == step.sha256


def _quarantined_problem(step: Intent) -> str | None:
    """Why the quarantined copy may not go back (checked before anything moves), or None."""
    st = os.lstat(step.dst)
    if not stat.S_ISREG(st.st_mode):
        return f"{shown(step.src)} not restored: its quarantined copy {shown(step.dst)} is no longer a regular file"
    if not _is_whole(step.dst, st, step):
        return (f"{shown(step.src)} not restored: its quarantined copy {shown(step.dst)} changed since the apply "
                f"(sha256 differs); left in place")
    return None


def _is_our_link(step: Intent) -> bool:
    """Is src the link apply left to the kept copy? A hard link counts only while the kept copy
    still exists under its name, as the same file: unlinking src then never drops the last name
    of any bytes."""
    src = step.src
    if step.op == "symlink":
        return os.path.islink(src) and os.readlink(src) == os.fsdecode(step.keeper)
    st = os.lstat(src)
    try:
        kept = os.lstat(step.keeper)
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(st.st_mode) and stat.S_ISREG(kept.st_mode) and st.st_nlink >= 2
            and (st.st_dev, st.st_ino) == (kept.st_dev, kept.st_ino))


def _mark_restored(library: Library, src: Path) -> bool:
    """quarantined -> embedded for this library's row at src (by path, never by a journal's row id:
    another library's journal must not touch unrelated rows). True if a row for src exists."""
    return library.catalog.unquarantine(os.fsencode(src.relative_to(library.root)))

"""Acting on duplicate groups safely: plan, journal every step before it happens, apply, undo.

Nothing is ever deleted. `move` puts a duplicate into the quarantine folder (relative path kept);
`hardlink` / `symlink` do the same and then leave a link to the kept copy at the old path. Every
step is written (and fsynced) to a journal, with its final destination, before it happens and
marked done after, so `undo` can restore the files byte for byte even after a crash mid-step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import update

from indexer.catalog import EMBEDDED, QUARANTINED, ImageRow
from indexer.decode import display_path
from indexer.library import Library

from .dedup import Group
from .errors import JournalError, RetrievalError

ACTIONS = ("report", "move", "hardlink", "symlink")


class ActionError(RetrievalError):
    """An apply stopped part-way; the steps done so far are journaled and can be undone."""


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
    journal: Path | None
    done: list[Step] = field(default_factory=list)
    skipped: list[tuple[Group, str]] = field(default_factory=list)  # group, why


@dataclass
class UndoResult:
    restored: list[str]
    not_in_catalog: int  # restored files whose rows an index run dropped meanwhile: re-index them


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
        return f"{display_path(path)}: {e.strerror}"
    if os.path.realpath(path) != str(path):
        return f"{display_path(path)} is now reached through a symbolic link"
    if not os.path.isfile(path) or os.path.islink(path):
        return f"{display_path(path)} is no longer a regular file"
    if st.st_size != size:
        return f"{display_path(path)} changed size since it was indexed"
    if sha256_of(path) != sha256:
        return f"{display_path(path)} changed content since it was indexed"
    return None


def _fsync_write(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def free_name(path: Path) -> Path:
    """`path`, or `name~1.ext`, `name~2.ext`, ... : the first that does not exist."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}~{n}{path.suffix}")
    return candidate


def place(src: Path, target: Path) -> None:
    """Give src's bytes the name `target` (which must not exist) and remove src; never overwrites.

    Same filesystem: a hard link, then unlink. Across filesystems: a copy under a temp name,
    fsynced, hard-linked to `target`, then src removed — so `target` is never a partial file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, target)  # FileExistsError if target appeared: never overwrites
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = target.with_name(f".{target.name}.dinoseek-copy")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        try:
            os.link(tmp, target)
        finally:
            os.unlink(tmp)
    os.unlink(src)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def apply(library: Library, groups: list[Group], action: str, quarantine: Path | str | None = None) -> ApplyResult:
    """Carry out `action` on every group; groups whose files changed since indexing are skipped."""
    if action not in ACTIONS[1:]:
        raise ValueError(f"action must be one of {', '.join(ACTIONS[1:])}, got {action!r}")
    root = library.root
    quarantine = Path(quarantine or library.folder / "quarantine").resolve()
    if _inside(quarantine, root) and not _inside(quarantine, library.folder):
        raise ValueError(f"quarantine {quarantine} is inside the photo folder; the next index run would "
                         f"embed its files again: choose a folder outside {root}")
    journals_dir = library.folder / "journals"
    journals_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
    journal = journals_dir / f"{stamp}Z-{os.getpid():08d}.jsonl"  # sorts by time
    result = ApplyResult(journal)
    with open(journal, "x") as log:
        _fsync_write(log, {"type": "header", "version": 1, "action": action, "root": os.fsdecode(root),
                           "quarantine": os.fsdecode(quarantine), "created": stamp})
        step_no = 0
        for group in groups:
            keeper = root / os.fsdecode(group.keeper.raw_path)
            others = [(m, root / os.fsdecode(m.raw_path)) for m in group.others]
            problem = _group_problem(keeper, group, others, action)
            if problem:  # the group is skipped whole: the plan no longer describes these files
                result.skipped.append((group, problem))
                continue
            keeper_stat = os.stat(keeper)
            for member, src in others:
                if not os.path.isfile(keeper):  # paranoia: the copy that stays must still be there
                    result.skipped.append((group, f"{display_path(keeper)} vanished during the apply"))
                    break
                step_no += 1
                try:
                    final = _move_journaled(log, step_no, action, src, quarantine / os.fsdecode(member.raw_path),
                                            keeper, member, (keeper_stat.st_dev, keeper_stat.st_ino))
                except OSError as e:
                    raise ActionError(f"stopped at {display_path(src)} ({e.strerror or e}); {len(result.done)} files "
                                      f"were set aside, journal {journal}: `dinoseek undo` restores them") from e
                _set_status(library, member.id, QUARANTINED, f"dedup {action}: bytes in {display_path(final)}")
                result.done.append(Step(action, src, final, keeper, member.sha256, member.size, member.id))
    return result


def _group_problem(keeper: Path, group: Group, others, action: str) -> str | None:
    problem = _check(keeper, group.keeper.size, group.keeper.sha256)
    problem = problem or next((p for m, path in others if (p := _check(path, m.size, m.sha256))), None)
    if problem:
        return problem
    kept = os.stat(keeper)
    for _, path in others:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (kept.st_dev, kept.st_ino):
            return f"{display_path(path)} is the kept file itself (a hard link): nothing to free"
        if action == "hardlink" and st.st_dev != kept.st_dev:
            return f"{display_path(path)} and the kept copy are on different filesystems: no hard link possible"
    return None


def _move_journaled(log, step_no: int, action: str, src: Path, wanted: Path, keeper: Path, member, keeper_id) -> Path:
    """One step: intent (with the final name) -> move -> link -> done. Returns where the bytes went."""
    while True:
        final = free_name(wanted)
        _fsync_write(log, {"type": "intent", "step": step_no, "op": action, "src": os.fsdecode(src),
                           "dst": os.fsdecode(final), "keeper": os.fsdecode(keeper), "keeper_id": list(keeper_id),
                           "sha256": member.sha256, "size": member.size, "row_id": member.id})
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
        _fsync_write(log, {"type": "rolled-back", "step": step_no})
        raise
    _fsync_write(log, {"type": "done", "step": step_no})
    return final


def _set_status(library: Library, row_id: int, status: str, reason: str | None) -> bool:
    """True if the row still exists (an index run since the apply may have dropped it)."""
    with library.session() as s, s.begin():
        return s.execute(update(ImageRow).where(ImageRow.id == row_id).values(status=status, reason=reason)).rowcount > 0


def journals(library: Library) -> list[Path]:
    return sorted((library.folder / "journals").glob("*.jsonl"))


def _read_journal(journal: Path) -> list[dict]:
    try:
        lines = Path(journal).read_text().splitlines()
    except OSError as e:
        raise JournalError(f"cannot read journal {journal}: {e.strerror}") from e
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) - 1:
                break  # a last record torn by a crash: the step it began is judged from the disk
            raise JournalError(f"{journal}: line {number + 1} is damaged") from None
        if not isinstance(record, dict) or "type" not in record:
            raise JournalError(f"{journal}: line {number + 1} is not a journal record")
        records.append(record)
    if not records or records[0]["type"] != "header":
        raise JournalError(f"{journal} is not a dinoseek dedup journal")
    return records


def undo(library: Library, journal: Path | None = None) -> UndoResult:
    """Restore every file of a journal (the latest by default).

    Each step is judged by what is on disk, so half-finished steps of a killed run are completed
    backwards too. Restored bytes are checked against the journal's sha256; anything that cannot
    be restored exactly stays in the quarantine and is reported, and the journal stays open.
    """
    if journal is None:
        candidates = journals(library)
        if not candidates:
            raise JournalError(f"no dedup journal in {library.folder / 'journals'}: nothing to undo")
        journal = candidates[-1]
    records = _read_journal(journal)
    if any(r["type"] == "undone" for r in records):
        raise JournalError(f"{journal} was already undone")
    steps: dict[int, list[dict]] = {}  # step -> its intents (a retried name adds one)
    try:
        for record in records[1:]:
            if record["type"] == "intent":
                steps.setdefault(record["step"], []).append(record)
    except KeyError as e:
        raise JournalError(f"{journal}: a record lacks {e}") from e
    restored, problems, not_in_catalog = [], [], 0
    for number in sorted(steps, reverse=True):
        for step in reversed(steps[number]):  # the last intent of a step is the name it really used
            try:
                outcome = _restore(step)
            except OSError as e:
                problems.append(f"{step['src']}: {e.strerror or e}")
                break
            if isinstance(outcome, str):
                problems.append(outcome)
                break
            if outcome:
                restored.append(step["src"])
                not_in_catalog += not _set_status(library, step["row_id"], EMBEDDED, None)
                break  # earlier intents of this step named files that were never ours
    if problems:
        raise JournalError(f"undo of {Path(journal).name} incomplete ({len(restored)} restored): " + "; ".join(problems[:5]))
    with open(journal, "a") as log:
        _fsync_write(log, {"type": "undone", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return UndoResult(restored, not_in_catalog)


def _restore(step: dict) -> bool | str:
    """Put the quarantined bytes back at src. True: restored; False: the step never moved anything;
    a string: why it could not be restored (the quarantined copy is left where it is)."""
    src, dst, keeper = Path(step["src"]), Path(step["dst"]), Path(step["keeper"])
    dst_exists = os.path.lexists(dst)
    if os.path.lexists(src):
        if step["op"] in ("hardlink", "symlink") and dst_exists and _is_our_link(src, keeper, step):
            os.unlink(src)  # only the link we made; the kept copy is untouched
        elif dst_exists and os.path.samefile(src, dst):
            os.unlink(dst)  # killed between link and unlink: src is whole
            return False
        elif not dst_exists:
            return False  # the step never moved anything
        elif os.path.isfile(src) and not os.path.islink(src) and sha256_of(src) == step["sha256"]:
            if os.path.isfile(dst) and sha256_of(dst) == step["sha256"]:
                os.unlink(dst)  # killed mid cross-filesystem move: src is whole, dst our spare copy
            return False  # (a dst with other bytes is not ours: left alone)
        else:
            return f"{src} was replaced since the apply; its old bytes stay in {dst}"
    if not dst_exists:
        return f"{src}: the quarantined copy {dst} is missing"
    place(dst, src)
    if sha256_of(src) != step["sha256"]:
        return f"{src}: restored bytes differ from the journal"
    return True


def _is_our_link(path: Path, keeper: Path, step: dict) -> bool:
    if os.path.islink(path):
        return Path(os.readlink(path)) == keeper
    keeper_id = step.get("keeper_id")
    st = os.stat(path)
    return keeper_id is not None and [st.st_dev, st.st_ino] == keeper_id  # even if the keeper was deleted since

"""Acting on duplicate groups safely: plan, journal every step before it happens, apply, undo.

Nothing is ever deleted. `move` puts a duplicate into the quarantine folder (relative path kept);
`hardlink` / `symlink` do the same and then leave a link to the kept copy at the old path. Every
step is written (and fsynced) to a journal before it happens and marked done after, so `undo` can
restore the files byte for byte even after a crash in the middle of a step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import update

from indexer.catalog import EMBEDDED, QUARANTINED, ImageRow
from indexer.library import Library

from .dedup import Group
from .errors import JournalError

ACTIONS = ("report", "move", "hardlink", "symlink")


@dataclass(frozen=True)
class Step:
    op: str  # move | hardlink | symlink
    src: Path  # the duplicate, absolute
    dst: Path  # where its bytes go, absolute (inside the quarantine)
    keeper: Path  # the copy that stays, absolute
    sha256: str
    size: int
    row_id: int


@dataclass
class ApplyResult:
    journal: Path | None
    done: list[Step] = field(default_factory=list)
    skipped: list[tuple[Group, str]] = field(default_factory=list)  # group, why


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, size: int, sha256: str) -> str | None:
    """None if `path` is still the regular file the catalog knows, else what changed."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path.name}: {e.strerror}"
    if not os.path.isfile(path) or os.path.islink(path):
        return f"{path.name} is no longer a regular file"
    if st.st_size != size:
        return f"{path.name} changed size since it was indexed"
    if sha256_of(path) != sha256:
        return f"{path.name} changed content since it was indexed"
    return None


def _fsync_write(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _free_name(path: Path) -> Path:
    """`path`, or `name~1.ext`, `name~2.ext`, ... : the first that does not exist."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}~{n}{path.suffix}")
    return candidate


def move_no_overwrite(src: Path, dst: Path) -> Path:
    """Move src to dst (or a free variant of it) without ever replacing an existing file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    while True:
        target = _free_name(dst)
        try:
            os.link(src, target)  # fails if target appeared meanwhile: never overwrites
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno != 18:  # EXDEV: another filesystem; copy exclusively instead
                raise
            with open(src, "rb") as fin, open(target, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            shutil.copystat(src, target)
        os.unlink(src)
        return target


def apply(library: Library, groups: list[Group], action: str, quarantine: Path | None = None) -> ApplyResult:
    """Carry out `action` on every group; groups whose files changed since indexing are skipped."""
    if action not in ACTIONS[1:]:
        raise ValueError(f"action must be one of {', '.join(ACTIONS[1:])}, got {action!r}")
    root = library.root
    quarantine = (quarantine or library.folder / "quarantine").resolve()
    journals = library.folder / "journals"
    journals.mkdir(exist_ok=True)
    journal = journals / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
    result = ApplyResult(journal)
    with open(journal, "x") as log:
        _fsync_write(log, {"type": "header", "version": 1, "action": action, "root": os.fsdecode(root),
                           "quarantine": os.fsdecode(quarantine), "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        step_no = 0
        for group in groups:
            keeper = root / os.fsdecode(group.keeper.raw_path)
            problem = _check(keeper, group.keeper.size, group.keeper.sha256)
            others = [(m, root / os.fsdecode(m.raw_path)) for m in group.others]
            problem = problem or next((p for m, path in others if (p := _check(path, m.size, m.sha256))), None)
            if problem:  # the group is skipped whole: the plan no longer describes these files
                result.skipped.append((group, problem))
                continue
            for member, src in others:
                step = Step(action, src, quarantine / os.fsdecode(member.raw_path), keeper, member.sha256,
                            member.size, member.id)
                step_no += 1
                intent = {"type": "intent", "step": step_no, "op": action, "src": os.fsdecode(src),
                          "dst": os.fsdecode(step.dst), "keeper": os.fsdecode(keeper), "sha256": member.sha256,
                          "size": member.size, "row_id": member.id}
                _fsync_write(log, intent)
                final = move_no_overwrite(src, step.dst)
                if final != step.dst:  # name collision in the quarantine: record where it really went
                    _fsync_write(log, {"type": "renamed", "step": step_no, "dst": os.fsdecode(final)})
                    step = Step(action, src, final, keeper, member.sha256, member.size, member.id)
                if action == "hardlink":
                    os.link(keeper, src)
                elif action == "symlink":
                    os.symlink(keeper, src)
                _fsync_write(log, {"type": "done", "step": step_no})
                _set_status(library, member.id, QUARANTINED, f"dedup {action}: bytes in {final}")
                result.done.append(step)
    return result


def _set_status(library: Library, row_id: int, status: str, reason: str | None) -> bool:
    """True if the row still exists (an index run since the apply may have dropped it)."""
    with library.session() as s, s.begin():
        return s.execute(update(ImageRow).where(ImageRow.id == row_id).values(status=status, reason=reason)).rowcount > 0


def journals(library: Library) -> list[Path]:
    return sorted((library.folder / "journals").glob("*.jsonl"))


@dataclass
class UndoResult:
    restored: list[str]
    not_in_catalog: int  # restored files whose rows an index run dropped meanwhile: re-index them


def undo(library: Library, journal: Path | None = None) -> UndoResult:
    """Restore every file of a journal (the latest by default).

    Each step is judged by what is on disk, so half-finished steps of a killed run are completed
    backwards too. The restored bytes are checked against the journal's sha256.
    """
    if journal is None:
        candidates = journals(library)
        if not candidates:
            raise JournalError(f"no dedup journal in {library.folder / 'journals'}: nothing to undo")
        journal = candidates[-1]
    try:
        records = [json.loads(line) for line in Path(journal).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise JournalError(f"cannot read journal {journal}: {e}") from e
    if not records or records[0].get("type") != "header":
        raise JournalError(f"{journal} is not a dinoseek dedup journal")
    if any(r["type"] == "undone" for r in records):
        raise JournalError(f"{journal} was already undone")
    steps: dict[int, dict] = {}
    for record in records[1:]:
        if record["type"] == "intent":
            steps[record["step"]] = dict(record)
        elif record["type"] == "renamed":
            steps[record["step"]]["dst"] = record["dst"]
    restored = []
    problems = []
    not_in_catalog = 0
    for number in sorted(steps, reverse=True):
        step = steps[number]
        src, dst, keeper = Path(step["src"]), Path(step["dst"]), Path(step["keeper"])
        try:
            if _restore(src, dst, keeper, step["op"]):
                if sha256_of(src) != step["sha256"]:
                    problems.append(f"{src}: restored bytes differ from the journal")
                restored.append(step["src"])
                not_in_catalog += not _set_status(library, step["row_id"], EMBEDDED, None)
        except OSError as e:
            problems.append(f"{src}: {e.strerror or e}")
    if problems:
        raise JournalError(f"undo of {journal.name} incomplete: " + "; ".join(problems[:5]))
    with open(journal, "a") as log:
        _fsync_write(log, {"type": "undone", "at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return UndoResult(restored, not_in_catalog)


def _restore(src: Path, dst: Path, keeper: Path, op: str) -> bool:
    """Put dst's bytes back at src. True if something was restored, False if the step never happened."""
    dst_exists = os.path.lexists(dst)
    if os.path.lexists(src):
        if op in ("hardlink", "symlink") and dst_exists and _is_link_to(src, keeper):
            os.unlink(src)  # only the link we made; the kept copy is untouched
        elif dst_exists and os.path.samefile(src, dst):
            os.unlink(dst)  # killed between link and unlink: src is intact
            return False
        else:
            return False  # the step never moved anything (or src was replaced by the user: keep it)
    if not dst_exists:
        raise OSError(f"quarantined copy {dst} is missing")
    move_no_overwrite(dst, src)
    return True


def _is_link_to(path: Path, keeper: Path) -> bool:
    if os.path.islink(path):
        return Path(os.readlink(path)) == keeper
    try:
        return os.path.samefile(path, keeper)
    except OSError:
        return False

"""Emptying the quarantine on purpose: `dinoseek purge`.

The only code that deletes bytes for good, so it is as suspicious as undo: a journal is purged only
if all of it passes undo's checks (retrieval.journal: its paths, and the catalog's record of its
apply), only the quarantined copies its finished steps name are deleted (never anything outside
the quarantine, never a folder reached through a symbolic link), and each copy must still be the
regular file with the sha256 the journal recorded. The copy that stayed must still be there too:
each step's kept copy a regular file inside the root, with the sha256 the journal recorded for it
(byte-identical copies) or embedded in the catalog (near duplicates, whose bytes differ by design),
else the quarantined copy may be the last one. A step undo put back is not this journal's any more
(a later apply may have set the same file aside to the same name), and a copy another pending
journal also names is never deleted. Every copy of a journal is checked before the first one is
deleted; one that fails keeps the whole journal (still undoable) and is reported.

Order, so that a killed purge is finished by running it again: delete the copies (a copy already
gone is fine), then in one catalog transaction delete their rows and mark the journal purged (undo
then refuses it), then append a "purged" record to the journal, then remove emptied folders.

Progress is reported as the step "purge", in quarantined copies checked (hashing them is the long
part). Ctrl-C takes effect before a journal's copies are checked or between two checks, never
while a journal's copies are being deleted: a journal is purged whole or not at all, and
PurgeInterrupted says how many were.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dinoseek.indexer.catalog import EMBEDDED
from dinoseek.indexer.decode import printable
from dinoseek.indexer.library import Library
from dinoseek.model.progress import Step as Shown
from dinoseek.model.progress import progress

from . import journal as journals_
from .actions import _identity, fingerprint, interrupts_between_steps, pending_journals, remove_emptied_folders
from .errors import ActionError, InvalidArgumentError, JournalError
from .journal import Intent, Journal


@dataclass(frozen=True)
class QuarantinedCopy:
    step: Intent  # the step that put it there: src (where it was), dst (the copy), sha256
    size: int  # on disk now (0 when already gone)
    present: bool  # False: already gone (a killed purge, or deleted by hand): nothing to delete


@dataclass
class JournalPurge:
    journal: Journal
    applied_at: datetime
    copies: list[QuarantinedCopy]

    @property
    def files(self) -> int:
        return sum(c.present for c in self.copies)

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.copies)


@dataclass
class PurgePlan:
    journals: list[JournalPurge] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # journal, why it is not purged

    @property
    def files(self) -> int:
        return sum(j.files for j in self.journals)

    @property
    def bytes(self) -> int:
        return sum(j.bytes for j in self.journals)


@dataclass
class PurgeResult:
    journals: list[Path] = field(default_factory=list)  # purged
    files: int = 0  # quarantined copies deleted
    bytes: int = 0
    rows: int = 0  # catalog rows removed
    problems: list[str] = field(default_factory=list)  # one line per journal not purged (kept, still undoable)


class PurgeInterrupted(KeyboardInterrupt):
    """Ctrl-C during a purge: `result` holds the journals purged whole (of the `planned`); the
    others are as they were, still undoable."""

    def __init__(self, result: PurgeResult, planned: int) -> None:
        super().__init__(f"interrupted: {len(result.journals)} of {planned} journals purged")
        self.result, self.planned = result, planned


def plan_purge(library: Library, older_than_days: float | None = None, now: datetime | None = None) -> PurgePlan:
    """Which quarantined copies a purge would delete: those of every journal not undone nor purged
    (applied more than `older_than_days` ago, when given). Reads the disk, changes nothing; copies
    are checked by size here (the sha256 is checked by `purge` itself, before deleting)."""
    if older_than_days is not None and (not isinstance(older_than_days, (int, float)) or older_than_days < 0):
        raise InvalidArgumentError(f"must be a number of days >= 0, got {older_than_days!r}", argument="older_than")
    now = now or datetime.now(timezone.utc)
    applied_at = library.catalog.journal_applied_at()
    recorded = library.catalog.journal_records()
    plan = PurgePlan()
    pending = pending_journals(library)
    claims = _claims(pending)
    for journal in pending:
        if isinstance(journal, tuple):  # unreadable: not ours to judge, and never deleted from
            plan.skipped.append(journal)
            continue
        when = applied_at.get(journal.path.name) or _header_time(journal)
        if older_than_days is not None and (when is None or now - when <= timedelta(days=older_than_days)):
            continue
        try:
            journals_.check_places(journal, library.root, library.folder)
            row = recorded.get(journal.path.name)
            journals_.check_recorded(journal, row and row[:3], library.folder)
            copies = _copies(journal, claims)
            problem = _keepers_problem(library, journal, copies, check_bytes=False)  # hashed before deleting
            if problem:
                raise JournalError(f"journal {printable(journal.path.name)} not purged: {problem}")
        except JournalError as e:
            plan.skipped.append((journal.path, str(e)))
            continue
        plan.journals.append(JournalPurge(journal, when, copies))
    return plan


def purge(library: Library, plan: PurgePlan) -> PurgeResult:
    """Delete the quarantined copies of each planned journal, remove their rows, record the purge.
    Needs the library opened for writing (the writer lock: no apply, undo or index meanwhile)."""
    if not library.writable:
        raise ActionError("purge needs the library opened for writing (it holds the writer lock)")
    result = PurgeResult()
    recorded = library.catalog.journal_records()
    try:
        with (progress(sum(len(item.copies) for item in plan.journals), "purge", unit="copies") as shown,
              interrupts_between_steps() as checkpoint):
            for item in plan.journals:
                handled = shown.done + len(item.copies)
                _purge_journal(library, item, recorded.get(item.journal.path.name), result, shown, checkpoint)
                shown.update(handled - shown.done)  # a journal left whole is handled too
    except KeyboardInterrupt as e:
        raise PurgeInterrupted(result, len(plan.journals)) from e
    finally:
        if result.rows:
            library.index_set.sync()  # the catalog and its indexes agree again (verify)
    return result


def _purge_journal(library: Library, item: JournalPurge, row, result: PurgeResult, shown: Shown,
                   checkpoint: Callable[[], None]) -> None:
    journal = item.journal
    name = printable(journal.path.name)
    if row is not None and (row[3] is not None or row[4] is not None):
        result.problems.append(f"journal {name} was undone or purged since the plan: left alone")
        return
    checked = []
    for copy in shown.count(item.copies):  # all of them before the first deletion
        checkpoint()  # checking changes nothing: Ctrl-C may stop it
        problem = journals_.place_problem(copy.step, library.root, library.folder, journal.header.quarantine)
        outcome = f"{printable(copy.step.dst)}: {problem}" if problem else _still_ours(copy.step)
        if isinstance(outcome, str):
            result.problems.append(f"journal {name} not purged: {outcome}")
            return
        checked.append((copy.step, outcome))
    problem = _keepers_problem(library, journal, item.copies, check_bytes=True)
    if problem:
        result.problems.append(f"journal {name} not purged: {problem}")
        return
    checkpoint()  # the last chance: from here on the journal is purged whole (no checkpoint below)
    files = size = 0
    for step, st in checked:
        if st is None:
            continue  # already gone
        try:
            now = os.lstat(step.dst)
            if _identity(now) != _identity(st):
                raise OSError(f"{printable(step.dst)} changed while being purged; left in place")
            os.unlink(step.dst)  # a regular file's own name: unlink follows no link
        except OSError as e:
            result.problems.append(f"journal {name} not purged: {printable(step.dst)}: {e.strerror or e} "
                                   f"({files} of its copies deleted so far; run purge again)")
            result.files, result.bytes = result.files + files, result.bytes + size
            return
        files, size = files + 1, size + st.st_size
    header = journal.header
    photos = [(os.fsencode(s.src.relative_to(library.root)), s.sha256) for s in journal.live_steps()
              if s.sidecar_of is None and s.step in journal.done]
    result.rows += library.catalog.purge_journal(journal.path.name, os.fsencode(header.root),
                                                 os.fsencode(header.quarantine), header.action, photos)
    journals_.mark_purged(journal.path, files, size)
    remove_emptied_folders(journal, header.quarantine)
    result.journals.append(journal.path)
    result.files, result.bytes = result.files + files, result.bytes + size


def _claims(pending: list) -> dict[Path, set[str]]:
    """dst -> the pending journals whose live steps name it (see Journal.live_steps)."""
    claims: dict[Path, set[str]] = {}
    for journal in pending:
        if isinstance(journal, Journal):
            for step in journal.live_steps():
                claims.setdefault(step.dst, set()).add(journal.path.name)
    return claims


def _copies(journal: Journal, claims: dict[Path, set[str]]) -> list[QuarantinedCopy]:
    """The quarantined copy of each finished step not put back by undo. A step neither done nor
    rolled back was left half done by a killed apply (its bytes may be the only copy, in either
    place): such a journal is not purged; `undo` finishes it backwards. Nor is one whose copy
    another pending journal names too: after a partial undo recorded by an older version, a later
    apply may have set the same file aside under the same name, and those bytes are that journal's."""
    copies = []
    for step in journal.live_steps():
        others = sorted(claims.get(step.dst, set()) - {journal.path.name})
        if others:
            raise JournalError(f"journal {printable(journal.path.name)} not purged: {printable(step.dst)} is also "
                               f"named by journal {printable(others[0])}, not undone nor purged; left in place")
        if step.step not in journal.done:
            raise JournalError(f"journal {printable(journal.path.name)} not purged: an interrupted apply left "
                               f"{printable(step.src)} half done (undo it first)")
        try:
            st = os.lstat(step.dst)
        except FileNotFoundError:
            copies.append(QuarantinedCopy(step, 0, False))
            continue
        except OSError as e:
            raise JournalError(f"journal {printable(journal.path.name)} not purged: {printable(step.dst)}: "
                               f"{e.strerror}") from e
        if not stat.S_ISREG(st.st_mode) or st.st_size != step.size:
            raise JournalError(f"journal {printable(journal.path.name)} not purged: {printable(step.dst)} is not "
                               f"the copy the apply put there (changed since); left in place")
        copies.append(QuarantinedCopy(step, st.st_size, True))
    return copies


def _keepers_problem(library: Library, journal: Journal, copies: list[QuarantinedCopy],
                     check_bytes: bool) -> str | None:
    """Why some copy this journal would delete may be the last one of its photo (its kept copy is
    gone, moved, a link, or other bytes), or None. `check_bytes`: hash byte-identical kept copies
    (purge itself, right before deleting); the dry run checks the rest only."""
    photo_steps: dict[int, Intent] = {}
    for copy in copies:
        if copy.present:
            n = copy.step.sidecar_of if copy.step.sidecar_of is not None else copy.step.step
            photo_steps[n] = journal.intents[n][-1]  # a sidecar's photo step has the same keeper
    if not photo_steps:
        return None
    root = library.root
    rows = library.catalog.rows_at(sorted({os.fsencode(s.keeper.relative_to(root)) for s in photo_steps.values()}))
    seen: dict[tuple[Path, str | None, str], str | None] = {}
    for step in sorted(photo_steps.values(), key=lambda s: s.step):
        key = (step.keeper, step.keeper_sha256, step.sha256)
        if key not in seen:
            seen[key] = _keeper_problem(step, rows.get(os.fsencode(step.keeper.relative_to(root))), check_bytes)
        if seen[key]:
            return seen[key]
    return None


def _keeper_problem(step: Intent, row: tuple[str | None, str] | None, check_bytes: bool) -> str | None:
    """Why the kept copy of one photo step may no longer hold the photo, or None. It must be a regular
    file, reached without a symbolic link (journal.place_problem checked it lies inside the root).
    Byte-identical (keeper_sha256 == sha256): it must still have those bytes. A near duplicate's
    kept copy differs by design: it must be embedded in the catalog. A journal from before
    keeper_sha256 was recorded: the same bytes as the copy, or else embedded."""
    keeper, where = step.keeper, f"its kept copy {printable(step.keeper)}"
    last = f"the quarantined copy {printable(step.dst)} may be the last one; left in place"
    try:
        st = os.lstat(keeper)
    except FileNotFoundError:
        return f"{where} is gone ({last})"
    except OSError as e:
        return f"{where}: {e.strerror or e} ({last})"
    if not stat.S_ISREG(st.st_mode):
        return f"{where} is no longer a regular file ({last})"
    problem = journals_.symlinked_folder(keeper)
    if problem:
        return f"{problem} ({last})"
    exact = step.keeper_sha256 is not None and step.keeper_sha256 == step.sha256
    if check_bytes and (exact or step.keeper_sha256 is None):
        try:
            digest = fingerprint(keeper)[0] if st.st_size == step.size else None
        except OSError as e:
            return f"{where} cannot be read: {e.strerror or e} ({last})"
        if digest == step.sha256:
            return None
        if exact:
            return f"{where} changed since the apply (sha256 differs; {last})"
    elif exact:
        return None  # the dry run: purge hashes it before deleting anything
    if row is None or row[1] != EMBEDDED:
        status = "not in the catalog" if row is None else f"{printable(row[1])} in the catalog, not embedded"
        return f"{where} is {status} ({last})"
    return None


def _still_ours(step: Intent) -> os.stat_result | None | str:
    """The stat of the quarantined copy when hashed, if it still holds the journal's bytes; None if
    it is gone; else why it is not deleted."""
    try:
        st = os.lstat(step.dst)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{printable(step.dst)}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{printable(step.dst)} is no longer a regular file; left in place"
    try:
        digest, st = fingerprint(step.dst)
    except OSError as e:
        return f"{printable(step.dst)} cannot be read: {e.strerror or e}"
    if digest != step.sha256:
        return f"{printable(step.dst)} changed since the apply (sha256 differs); left in place"
    return st


def _header_time(journal: Journal) -> datetime | None:
    """When a journal written before the catalog recorded applies (revision 0003) was made."""
    try:
        return datetime.strptime(journal.header.created[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None

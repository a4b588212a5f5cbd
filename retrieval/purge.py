"""Emptying the quarantine on purpose: `dinoseek purge`.

The only code that deletes bytes for good, so it is as suspicious as undo: a journal is purged only
if all of it passes undo's checks (retrieval.journal: its paths, and the catalog's record of its
apply), only the quarantined copies its finished steps name are deleted (never anything outside
the quarantine, never a folder reached through a symbolic link), and each copy must still be the
regular file with the sha256 the journal recorded. Every copy of a journal is checked before the
first one is deleted; one that fails keeps the whole journal (still undoable) and is reported.

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
    for journal in pending_journals(library):
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
            copies = _copies(journal)
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
    photos = [(os.fsencode(s.src.relative_to(library.root)), s.sha256) for s in journal.steps_backwards()
              if s.sidecar_of is None and s.step in journal.done]
    result.rows += library.catalog.purge_journal(journal.path.name, os.fsencode(header.root),
                                                 os.fsencode(header.quarantine), header.action, photos)
    journals_.mark_purged(journal.path, files, size)
    remove_emptied_folders(journal, header.quarantine)
    result.journals.append(journal.path)
    result.files, result.bytes = result.files + files, result.bytes + size


def _copies(journal: Journal) -> list[QuarantinedCopy]:
    """The quarantined copy of each finished step. A step neither done nor rolled back was left half
    done by a killed apply (its bytes may be the only copy, in either place): such a journal is
    not purged; `undo` finishes it backwards."""
    copies = []
    for step in journal.steps_backwards():
        if step.step in journal.rolled_back:
            continue
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

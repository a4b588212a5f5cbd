"""Dedup journals: the append-only record of an apply, read back strictly before `undo` acts on it.

A journal lives in the library folder, which more people may be able to write than the photos; so
nothing in it is trusted. Every record is checked for shape, and every path in it for place (inside
the journal's root or quarantine, which must be this library's, reached without symbolic links),
before `undo` touches a single file: a forged or damaged journal changes nothing at all. What the
catalog recorded of each apply (retrieval.actions) is checked against it there too.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dinoseek.indexer.decode import printable
from dinoseek.model.files import read_regular

from .errors import InvalidArgumentError, JournalError
from .sidecars import is_sidecar_name

VERSION = 1
OPS = ("move", "hardlink", "symlink")
RECORD_TYPES = ("header", "intent", "done", "rolled-back", "restored", "undone", "purged")
QUARANTINE = "quarantine"  # the default quarantine: a folder of the library folder
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A step takes about 600 bytes: this is well over a million files, and still a bounded read.
MAX_JOURNAL_BYTES = 1 << 30


def inside(path: Path, folder: Path) -> bool:
    """Lexically: `path` is `folder` or below it (both absolute and normalised)."""
    return path == folder or folder in path.parents


def check_quarantine(root: Path, library_folder: Path, quarantine: Path) -> None:
    """InvalidArgumentError unless `quarantine` (resolved) is a place apply may move copies to."""
    where = printable(quarantine)
    if inside(root, quarantine):  # `/`, the root itself, a folder above it: undo would reach the photos
        what = "is the photo folder itself" if quarantine == root else f"contains the photo folder {printable(root)}"
        raise InvalidArgumentError(f"{where} {what}: choose a folder outside it", argument="quarantine")
    if inside(library_folder, quarantine):
        raise InvalidArgumentError(f"{where} contains the library folder {printable(library_folder)}: choose another "
                                   f"folder", argument="quarantine")
    if inside(quarantine, library_folder) and quarantine != library_folder / QUARANTINE:
        raise InvalidArgumentError(f"{where} is inside the library folder next to its catalog and journals: "
                                   f"use {printable(library_folder / QUARANTINE)} or a folder outside it",
                                   argument="quarantine")
    if inside(quarantine, root) and not inside(quarantine, library_folder):
        raise InvalidArgumentError(f"{where} is inside the photo folder; the next index run would embed its files "
                                   f"again: choose a folder outside {printable(root)}", argument="quarantine")


@dataclass(frozen=True)
class Header:
    action: str
    root: Path
    quarantine: Path
    created: str  # YYYYmmddTHHMMSS.ffffff, UTC


@dataclass(frozen=True)
class Intent:
    """One step as apply announced it, before doing it: the duplicate at `src` goes to `dst`."""

    step: int
    op: str
    src: Path
    dst: Path
    keeper: Path
    sha256: str
    size: int
    line: int  # in the journal file, for messages
    # A sidecar (XMP, AAE, RAW, Live Photo MOV) moved with the photo of step `sidecar_of`; None for a photo.
    sidecar_of: int | None = None
    # The kept copy's sha256 at the apply (photo steps of journals written since it was recorded):
    # equal to `sha256` for byte-identical copies; purge checks the kept copy still has it.
    keeper_sha256: str | None = None


@dataclass
class Journal:
    path: Path
    header: Header
    intents: dict[int, list[Intent]]  # step -> its intents (a name taken meanwhile adds one)
    undone: bool
    done: frozenset[int] = frozenset()  # steps apply finished (their catalog row was set aside first)
    rolled_back: frozenset[int] = frozenset()  # steps apply undid itself (or that never moved): nothing to undo
    purged: bool = False  # `dinoseek purge` deleted its quarantined copies: nothing left to undo
    # steps a (partial) undo put back: nothing of theirs is left in the quarantine, and their dst may
    # since hold another journal's copy of the same file. Journals from before this record have none.
    restored: frozenset[int] = frozenset()

    @property
    def photos(self) -> int:
        """Photos still set aside (sidecars that moved with them not counted)."""
        return sum(1 for n, steps in self.intents.items()
                   if steps[0].sidecar_of is None and n not in self.rolled_back and n not in self.restored)

    @property
    def files(self) -> int:
        return len(self.intents) - len((self.rolled_back | self.restored).intersection(self.intents))

    def live_steps(self) -> list[Intent]:
        """The last intent of each step that may still have bytes in the quarantine: neither rolled
        back by apply nor restored by undo."""
        return [step for step in self.steps_backwards()
                if step.step not in self.rolled_back and step.step not in self.restored]

    def steps_backwards(self) -> list[Intent]:
        """The last intent of each step, latest step first. Only the last one can have moved
        anything: an earlier one named a file that already existed (FileExistsError), never ours."""
        return [self.intents[n][-1] for n in sorted(self.intents, reverse=True)]

    @property
    def date(self) -> str:
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.strptime(self.header.created[:15], "%Y%m%dT%H%M%S"))
        except ValueError:
            return self.header.created


# ---- writing ------------------------------------------------------------------------------------

def new_name(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
    return folder / f"{stamp}Z-{os.getpid():08d}.jsonl"  # sorts by time


class JournalWriter:
    """Appends fsynced records; the file (and its header) appear only with the first step, so an
    apply that does nothing leaves no journal for `undo` to pick instead of the real one.
    `on_start(path)` runs just before the file is made (apply records the journal in the catalog)."""

    def __init__(self, folder: Path, action: str, root: Path, quarantine: Path,
                 on_start: Callable[[Path], None] | None = None):
        self.path = new_name(folder)
        self._header = {"type": "header", "version": VERSION, "action": action, "root": os.fsdecode(root),
                        "quarantine": os.fsdecode(quarantine), "created": self.path.name[:22]}
        self._file = None
        self._on_start = on_start
        self.steps = 0  # step numbers handed out; a step that moved nothing keeps its number

    def new_step(self) -> int:
        self.steps += 1
        return self.steps

    @property
    def started(self) -> bool:
        return self._file is not None

    def write(self, record: dict) -> None:
        if self._file is None:
            if self._on_start is not None:
                self._on_start(self.path)
            self.path.parent.mkdir(exist_ok=True)
            self._file = open(self.path, "x")
            self._append(self._header)
        self._append(record)

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mark_purged(journal: Path, files: int, size: int) -> None:
    """The last record: `dinoseek purge` deleted the quarantined copies (`files`, `size` bytes)."""
    _append_last(journal, {"type": "purged", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "files": files, "bytes": size})


def _append_last(journal: Path, record: dict) -> None:
    with open(journal, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def mark_restored(journal: Path, step: int) -> None:
    """Undo put step `step` back (or found it never moved): later undos and purges leave its dst
    alone, which a later apply may have reused for another copy of the same file."""
    _append_last(journal, {"type": "restored", "step": step})


def mark_undone(journal: Path, not_restored: list[str] = ()) -> None:
    """The last record: nothing left to undo (`not_restored`: files the user gave up on, and why)."""
    record = {"type": "undone", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not_restored:
        record["not_restored"] = list(not_restored)
    _append_last(journal, record)


# ---- reading: shape ------------------------------------------------------------------------------

def read(path: Path) -> Journal:
    """Parse and check the shape of every record; JournalError (one line) on the first bad one."""
    path = Path(path)
    lines = _lines(path)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # a last record torn by a crash: the step it began is judged from the disk
            raise _refused(path, number, "damaged (not JSON)") from None
        records.append((number, record))
    if not records or not isinstance(records[0][1], dict) or records[0][1].get("type") != "header":
        raise JournalError(f"{printable(path)} is not a dinoseek dedup journal")
    header = _header(path, *records[0])
    intents: dict[int, list[Intent]] = {}
    undone = purged = False
    done: set[int] = set()
    rolled_back: set[int] = set()
    restored: set[int] = set()
    for number, record in records[1:]:
        if not isinstance(record, dict):
            raise _refused(path, number, f"a record must be an object, got {_kind(record)}")
        record_type = _field(path, number, record, "type", str)
        if record_type not in RECORD_TYPES or record_type == "header":
            raise _refused(path, number, f"unknown record type {record_type[:40]!r}")
        if record_type == "intent":
            intent = _intent(path, number, record)
            if intent.op != header.action:
                raise _refused(path, number, f"a {intent.op} step in a {header.action} journal")
            if intent.sidecar_of is not None and header.action != "move":  # links leave sidecars in place
                raise _refused(path, number, f"a sidecar step in a {header.action} journal")
            earlier = intents.setdefault(intent.step, [])
            if earlier and earlier[0].src != intent.src:
                raise _refused(path, number, f"step {intent.step} names two different files")
            earlier.append(intent)
        elif record_type == "done":
            done.add(_field(path, number, record, "step", int))
        elif record_type == "rolled-back":
            rolled_back.add(_field(path, number, record, "step", int))
        elif record_type == "restored":
            restored.add(_field(path, number, record, "step", int))
        elif record_type == "purged":
            purged = True
        else:
            undone = True
    _check_sidecar_steps(path, intents)
    return Journal(path, header, intents, undone, frozenset(done - rolled_back), frozenset(rolled_back), purged,
                   frozenset(restored))


def _check_sidecar_steps(path: Path, intents: dict[int, list[Intent]]) -> None:
    """A sidecar step belongs to an earlier photo step of the same journal: beside that photo (same
    folder, a sidecar's name for it), moved into the folder that photo went to, with the same kept
    copy. So a forged step can name no file but a companion of a photo this apply set aside."""
    for steps in intents.values():
        for intent in steps:
            if intent.sidecar_of is None:
                continue
            photos = intents.get(intent.sidecar_of)
            if intent.sidecar_of >= intent.step or not photos or photos[0].sidecar_of is not None:
                raise _refused(path, intent.line, f"'sidecar_of' names no earlier photo step ({intent.sidecar_of})")
            photo = photos[-1]
            if (intent.src.parent != photo.src.parent or intent.dst.parent != photo.dst.parent
                    or intent.keeper != photo.keeper or not is_sidecar_name(photo.src.name, intent.src.name)):
                raise _refused(path, intent.line, f"{printable(intent.src)} is not a sidecar of "
                                                  f"{printable(photo.src)} moved with it")


def _lines(path: Path) -> list[str]:
    try:  # a FIFO or device named like a journal must not hang us, nor a huge file exhaust memory
        data = read_regular(path, max_bytes=MAX_JOURNAL_BYTES)
    except OSError as e:
        raise JournalError(f"cannot read journal {printable(path)}: {e.strerror or e}") from e
    try:
        return data.decode("ascii").splitlines()  # json.dumps escapes everything else
    except UnicodeDecodeError:
        raise JournalError(f"{printable(path)} is not a dinoseek dedup journal (not text)") from None


def _header(path: Path, number: int, record: dict) -> Header:
    if record.get("version") != VERSION or type(record.get("version")) is not int:
        raise _refused(path, number, f"unknown journal version {str(record.get('version'))[:20]!r}")
    action = _field(path, number, record, "action", str)
    if action not in OPS:
        raise _refused(path, number, f"unknown action {action[:40]!r}")
    return Header(action, _path(path, number, record, "root"), _path(path, number, record, "quarantine"),
                  _field(path, number, record, "created", str))


def _intent(path: Path, number: int, record: dict) -> Intent:
    step = _field(path, number, record, "step", int)
    op = _field(path, number, record, "op", str)
    if op not in OPS:
        raise _refused(path, number, f"unknown op {op[:40]!r}")
    sha256 = _field(path, number, record, "sha256", str)
    if not _SHA256.fullmatch(sha256):
        raise _refused(path, number, "'sha256' is not a sha256 hex digest")
    size = _field(path, number, record, "size", int)
    if size < 0:
        raise _refused(path, number, "'size' is negative")
    _field(path, number, record, "row_id", int)
    keeper_id = record.get("keeper_id")
    if keeper_id is not None and not (isinstance(keeper_id, list) and len(keeper_id) == 2
                                      and all(type(v) is int for v in keeper_id)):
        raise _refused(path, number, "'keeper_id' must be two integers")
    sidecar_of = record.get("sidecar_of")
    if sidecar_of is not None and type(sidecar_of) is not int:
        raise _refused(path, number, f"'sidecar_of' must be an integer, got {_kind(sidecar_of)}")
    keeper_sha256 = record.get("keeper_sha256")
    if keeper_sha256 is not None and not (isinstance(keeper_sha256, str) and _SHA256.fullmatch(keeper_sha256)):
        raise _refused(path, number, "'keeper_sha256' is not a sha256 hex digest")
    return Intent(step, op, _path(path, number, record, "src"), _path(path, number, record, "dst"),
                  _path(path, number, record, "keeper"), sha256, size, number, sidecar_of, keeper_sha256)


def _field(path: Path, number: int, record: dict, name: str, expected: type):
    if name not in record:
        raise _refused(path, number, f"{name!r} is missing")
    value = record[name]
    if type(value) is not expected:  # exact: a bool is no step number, a list no path
        raise _refused(path, number, f"{name!r} must be {'an integer' if expected is int else 'a string'}, "
                                     f"got {_kind(value)}")
    return value


def _path(path: Path, number: int, record: dict, name: str) -> Path:
    text = _field(path, number, record, name, str)
    if "\0" in text or not os.path.isabs(text) or os.path.normpath(text) != text or text.startswith("//"):
        raise _refused(path, number, f"{name!r} is not an absolute, normalised path: {printable(text[:200])}")
    return Path(text)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(value), type(value).__name__)


def _refused(path: Path, number: int, what: str) -> JournalError:
    return JournalError(f"journal {printable(path.name)} refused, nothing was changed: line {number}: {what}")


# ---- reading: places ----------------------------------------------------------------------------

def check_recorded(journal: Journal, recorded: tuple[bytes, bytes, str] | None, library_folder: Path) -> None:
    """JournalError unless the catalog recorded this journal's apply (`recorded`: its root,
    quarantine and action) with the root and quarantine its header names. The header alone proves
    nothing: anyone who can write the library folder can write one naming any folder as quarantine.

    Journals written before the catalog recorded applies (libraries migrated from revision 0002)
    have no row. They are accepted only when they name this library's default quarantine, the one
    folder such a journal may name that lies in no place apply did not create itself."""
    header = journal.header
    if recorded is None:
        if header.quarantine == library_folder / QUARANTINE:
            return
        raise JournalError(f"journal {printable(journal.path.name)} refused, nothing was changed: not a journal of "
                           f"this library (its catalog has no record of it, and it names the quarantine "
                           f"{printable(header.quarantine)})")
    root, quarantine, action = recorded
    if (root, quarantine, action) != (os.fsencode(header.root), os.fsencode(header.quarantine), header.action):
        raise JournalError(f"journal {printable(journal.path.name)} refused, nothing was changed: not a journal of "
                           f"this library (its header differs from what the catalog recorded of it: root "
                           f"{printable(root)}, quarantine {printable(quarantine)}, {action})")


def check_places(journal: Journal, root: Path, library_folder: Path) -> None:
    """JournalError unless every path the journal names is one undo may touch: this library's root
    and a quarantine apply could have used, each reached without a symbolic link on the way."""
    header = journal.header
    if header.root != root:
        raise JournalError(f"journal {printable(journal.path.name)} refused, nothing was changed: it belongs to the "
                           f"photo folder {printable(header.root)}, not {printable(root)}")
    try:
        check_quarantine(root, library_folder, header.quarantine)
    except InvalidArgumentError as e:
        raise JournalError(f"journal {printable(journal.path.name)} refused, nothing was changed: {e}") from None
    problem = symlinked(header.quarantine)
    if problem:
        raise JournalError(f"journal {printable(journal.path.name)} refused, nothing was changed: {problem}")
    for steps in journal.intents.values():
        for intent in steps:
            problem = place_problem(intent, root, library_folder, header.quarantine)
            if problem:
                raise _refused(journal.path, intent.line, problem)
    _check_steps_apart(journal)


def _check_steps_apart(journal: Journal) -> None:
    """Steps of one apply never share a file: each moves its own duplicate to its own new name, and
    no duplicate is another group's kept copy. A step naming another's kept copy as its src could
    otherwise swap the bytes of a photo that stays for those of its "quarantined copy"."""
    keepers = {intent.keeper for steps in journal.intents.values() for intent in steps}
    srcs: set[Path] = set()
    dsts: set[Path] = set()
    for intent in journal.steps_backwards():
        if intent.src in keepers:
            raise _refused(journal.path, intent.line, f"src {printable(intent.src)} is the kept copy of another step")
        if intent.src in srcs or intent.dst in dsts:
            name, path = ("src", intent.src) if intent.src in srcs else ("dst", intent.dst)
            raise _refused(journal.path, intent.line, f"{name} {printable(path)} is named by another step too")
        srcs.add(intent.src)
        dsts.add(intent.dst)


def place_problem(intent: Intent, root: Path, library_folder: Path, quarantine: Path) -> str | None:
    """Why one step's paths are not ones undo may touch, or None."""
    for name, path in (("src", intent.src), ("keeper", intent.keeper)):
        if path == root or not inside(path, root) or inside(path, library_folder) or inside(path, quarantine):
            return f"{name} {printable(path)} is not a photo inside {printable(root)}"
    if intent.dst == quarantine or not inside(intent.dst, quarantine):
        return f"dst {printable(intent.dst)} is not inside the quarantine {printable(quarantine)}"
    if intent.src == intent.keeper:
        return f"src and keeper are the same file {printable(intent.src)}"
    for path in (intent.src, intent.dst, intent.keeper):
        problem = symlinked_folder(path)
        if problem:
            return problem
    return None


def symlinked_folder(path: Path) -> str | None:
    """Why `path` is reached through a symbolic link to a folder (through which a journal's paths
    could point anywhere), or None. `path` itself may be a link: symlink steps leave one."""
    return symlinked(path.parent, path)


def symlinked(folder: Path, named: Path | None = None) -> str | None:
    """Why `folder` is not its own resolved path, or None. Folders that do not exist yet are fine
    (undo creates them)."""
    text = os.fsdecode(folder)
    real = os.path.realpath(text)
    if real != text:
        return f"{printable(named or folder)} is reached through a symbolic link (really {printable(real)})"
    return None


# ---- which journals -----------------------------------------------------------------------------

def all_journals(library_folder: Path) -> list[Path]:
    return sorted((library_folder / "journals").glob("*.jsonl"))


def pending(library_folder: Path, undone: frozenset[str] = frozenset()) -> list[Journal | tuple[Path, str]]:
    """Journals with steps not yet undone (nor purged), oldest first; one that cannot be read as
    (path, why). `undone`: names the catalog records as undone or purged (whatever their file says)."""
    out: list[Journal | tuple[Path, str]] = []
    for path in all_journals(library_folder):
        if path.name in undone:
            continue
        try:
            journal = read(path)
        except JournalError as e:
            out.append((path, str(e)))
            continue
        if journal.intents and not journal.undone and not journal.purged:  # without steps: nothing to undo
            out.append(journal)
    return out


def newest_pending(library_folder: Path, undone: frozenset[str] = frozenset()) -> Path:
    paths = all_journals(library_folder)
    for path in reversed(paths):
        if path.name in undone:
            continue
        journal = read(path)  # the newest pending one damaged: say so rather than skip to an older one
        if journal.intents and not journal.undone and not journal.purged:
            return path
    folder = printable(library_folder / "journals")
    if paths:
        raise JournalError(f"every dedup journal in {folder} was already undone or purged: nothing left to undo")
    raise JournalError(f"no dedup journal in {folder}: nothing to undo")

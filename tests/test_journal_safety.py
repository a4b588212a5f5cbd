"""Dedup journals are not trusted: forged or malformed ones change nothing, undo reports what it could
not restore, cross-filesystem moves keep names, owners and modes, and a killed undo finishes on re-run.

The libraries here need no model: their catalogs are written directly (exact duplicates by sha256).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner

from dinoseek.indexer import migrate
from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED, ImageRow, JournalRow
from dinoseek.indexer.decode import printable
from dinoseek.indexer.library import Library
from dinoseek.retrieval import actions
from dinoseek.retrieval import journal as journal_module
from dinoseek.retrieval.actions import UndoIncomplete, apply, place, undo
from dinoseek.retrieval.cli import _shown, main
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.errors import JournalError

from conftest import deadline


# ---- a model-free library -------------------------------------------------------------------------

def make_photos(root: Path, n: int = 3, size: int = 4096, folder: str = "b") -> None:
    """n distinct files under a/, an exact copy of each under `folder`/."""
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / folder).mkdir(exist_ok=True)
    for i in range(n):
        data = random.Random(i).randbytes(size)
        (root / "a" / f"p{i}.jpg").write_bytes(data)
        (root / folder / f"p{i}-copy.jpg").write_bytes(data)


VECTOR = bytes(8)  # 4 float16 zeros: exact dedup only needs the rows to carry vectors


def catalog(root: Path, folder: Path | None = None, reverse: bool = False) -> None:
    """Catalog every file under root as an embedded image (no model: exact dedup groups by sha256)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".dinoseek" not in p.parts)
    with (Library.open(root, folder=folder, write=True, create=True) as library, library.catalog.session() as s,
          s.begin()):
        for path in reversed(files) if reverse else files:
            rel = path.relative_to(root)
            st = path.stat()
            s.add(ImageRow(path=os.fsencode(rel), path_text=str(rel), folder=str(rel.parent), size=st.st_size,
                           mtime_ns=st.st_mtime_ns, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                           width=10, height=10, format="JPEG", status=EMBEDDED, cls=VECTOR, patch=VECTOR))


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "photos"
    make_photos(root)
    catalog(root)
    return root


def groups_of(library):
    return find_duplicates(library, exact_only=True, protected=("a",))


def applied(root, action="move", count=None, **kwargs):
    with Library.open(root, write=True, **kwargs) as library:
        groups = groups_of(library)
        return apply(library, groups[:count] if count else groups, action)


def snapshot(top: Path) -> dict:
    """Everything under `top` (files by content, links by target), except the catalog's own files."""
    out = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, top)
            if name.startswith(("catalog.sqlite", "lock")):
                continue
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                out[rel] = ("file", hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_ino)
            else:
                out[rel] = ("dir",)
    return out


def records(journal: Path) -> list:
    return [json.loads(line) for line in journal.read_text().splitlines()]


def rewrite(journal: Path, recs: list) -> None:
    journal.write_text("".join(json.dumps(r) + "\n" for r in recs))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- forged journals: refused whole, nothing touched -----------------------------------------------

def _forge_src_outside(tmp_path, root, recs):
    victim = tmp_path / "outside" / "victim.jpg"  # was deleted while undo printed "restored 0 files"
    shutil.copy(root / "a/p0.jpg", victim)
    shutil.copy(root / "a/p0.jpg", root / ".dinoseek/quarantine/b/spare.jpg")
    recs[1].update(src=str(victim), dst=str(root / ".dinoseek/quarantine/b/spare.jpg"))


def _forge_dst_outside(tmp_path, root, recs):
    recs[1]["dst"] = str(tmp_path / "outside" / "planted.jpg")  # was moved into the photos
    (tmp_path / "outside" / "planted.jpg").write_bytes(b"x")


def _forge_src_is_dst(tmp_path, root, recs):
    recs[1].update(src=str(root / "a/p1.jpg"), dst=str(root / "a/p1.jpg"))  # samefile -> unlink: gone


def _forge_keeper_outside(tmp_path, root, recs):
    recs[1]["keeper"] = str(tmp_path / "outside" / "victim.jpg")


def _forge_src_in_library_folder(tmp_path, root, recs):
    recs[1]["src"] = str(root / ".dinoseek" / "catalog.sqlite")


def _forge_dotdot(tmp_path, root, recs):
    recs[1]["src"] = str(root / ".." / "outside" / "victim.jpg")


def _forge_relative(tmp_path, root, recs):
    recs[1]["dst"] = "b/p0-copy.jpg"


def _forge_dst_is_quarantine(tmp_path, root, recs):
    recs[1]["dst"] = str(root / ".dinoseek" / "quarantine")


def _forge_src_is_keeper(tmp_path, root, recs):
    recs[1].update(src=str(root / "a/p1.jpg"), keeper=str(root / "a/p1.jpg"))  # a forged "hardlink" to itself


def _forge_other_root(tmp_path, root, recs):
    recs[0]["root"] = str(tmp_path / "outside")


def _forge_quarantine_slash(tmp_path, root, recs):
    recs[0]["quarantine"] = "/"


def _forge_quarantine_in_photos(tmp_path, root, recs):
    recs[0]["quarantine"] = str(root / "b")


def _forge_quarantine_is_library_folder(tmp_path, root, recs):
    recs[0]["quarantine"] = str(root / ".dinoseek")


def _forge_quarantine_journals(tmp_path, root, recs):
    recs[0]["quarantine"] = str(root / ".dinoseek" / "journals")


def _forge_symlinked_quarantine_folder(tmp_path, root, recs):
    """quarantine/b -> photos/a: dst would be src itself, reached through the link."""
    shutil.rmtree(root / ".dinoseek/quarantine/b")
    os.symlink(root / "a", root / ".dinoseek/quarantine/b")
    recs[1].update(src=str(root / "a/p1.jpg"), dst=str(root / ".dinoseek/quarantine/b/p1.jpg"))


def _forge_symlinked_photo_folder(tmp_path, root, recs):
    os.symlink(tmp_path / "outside", root / "elsewhere")
    recs[1]["src"] = str(root / "elsewhere" / "victim.jpg")


FORGERIES = [f for name, f in sorted(globals().items()) if name.startswith("_forge_")]


@pytest.mark.parametrize("action", ["move", "hardlink"])
@pytest.mark.parametrize("forge", FORGERIES, ids=lambda f: f.__name__[7:])
def test_forged_journal_is_refused_whole_and_changes_nothing(tmp_path, root, action, forge):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.jpg").write_bytes(b"a file of someone else")
    result = applied(root, action)
    recs = records(result.journal)
    forge(tmp_path, root, recs)
    rewrite(result.journal, recs)
    before = snapshot(tmp_path)
    with Library.open(root, write=True) as library:
        with pytest.raises(JournalError, match="refused, nothing was changed") as e:
            undo(library)
        with library.catalog.session() as s:
            assert {r.status for r in s.query(ImageRow) if r.path.startswith(b"b/")} == {QUARANTINED}
    assert "\n" not in str(e.value) and not isinstance(e.value, UndoIncomplete)
    assert snapshot(tmp_path) == before


def test_forged_journal_through_the_cli_is_one_error_line(tmp_path, root):
    result = applied(root)
    recs = records(result.journal)
    recs[1]["src"] = "passwd\n\x1b[2Jrestored 3 files"
    rewrite(result.journal, recs)
    out = invoke("undo", root)
    assert out.exit_code == 1
    assert out.output == (f"Error: journal {result.journal.name} refused, nothing was changed: line 2: "
                          f"'src' is not an absolute, normalised path: passwd\\x0a\\x1b[2Jrestored 3 files\n")
    recs[1]["src"] = "/etc/passwd"
    rewrite(result.journal, recs)
    assert invoke("undo", root).output == (f"Error: journal {result.journal.name} refused, nothing was changed: "
                                           f"line 2: src /etc/passwd is not a photo inside {root}\n")


def forged_step(recs: list, src: Path, keeper: Path, dst: Path, step: int = 9) -> None:
    """A step appended to a real journal: `src` is "our link" to `keeper`, its bytes are `dst`."""
    recs.append({**recs[1], "step": step, "src": str(src), "keeper": str(keeper), "dst": str(dst),
                 "sha256": sha(dst), "size": dst.stat().st_size})


def test_forged_hardlink_step_cannot_replace_a_photo(tmp_path, root):
    """A step claiming a1 (kept by another step) is our link to a2 and its bytes are in the quarantine."""
    result = applied(root, "hardlink")
    evil = root / ".dinoseek/quarantine/evil.jpg"
    evil.write_bytes(b"forged bytes")
    recs = records(result.journal)
    forged_step(recs, root / "a/p1.jpg", root / "a/p2.jpg", evil)
    rewrite(result.journal, recs)
    before = snapshot(tmp_path)
    with Library.open(root, write=True) as library:
        with pytest.raises(JournalError, match=f"line 8: src {re.escape(str(root))}/a/p1.jpg is the kept copy of "
                                               f"another step$"):
            undo(library)
    assert snapshot(tmp_path) == before


def test_forged_step_swapping_a_hardlink_and_its_kept_copy_is_refused(tmp_path, root):
    """After a real hardlink apply, duplicate and keeper are one inode: a step naming the kept copy
    as src and the duplicate's link as keeper passed the link test and replaced the kept photo."""
    result = applied(root, "hardlink")
    real = next(s for s in result.done if s.src == root / "b/p0-copy.jpg")
    evil = root / ".dinoseek/quarantine/evil.jpg"
    evil.write_bytes(b"forged bytes")
    recs = records(result.journal)
    forged_step(recs, real.keeper, real.src, evil)
    rewrite(result.journal, recs)
    before = snapshot(tmp_path)
    with Library.open(root, write=True) as library:
        with pytest.raises(JournalError, match="refused, nothing was changed: line 8: src .*/a/p0.jpg is the kept "
                                               "copy of another step"):
            undo(library)
    assert snapshot(tmp_path) == before


def test_forged_step_on_two_names_of_one_photo_cannot_replace_it(tmp_path):
    """a/p1.jpg and album/p1.jpg are the user's own hard links (so "our link" to each other), and
    no step keeps either: only the catalog knows the step's sha256 is not a/p1.jpg's."""
    root = tmp_path / "photos"
    make_photos(root)
    (root / "album").mkdir()
    os.link(root / "a/p1.jpg", root / "album/p1.jpg")
    catalog(root)
    result = applied(root, "hardlink")
    assert {s.src.name for s in result.done} == {"p0-copy.jpg", "p2-copy.jpg"}  # p1's group: one inode, skipped
    evil = root / ".dinoseek/quarantine/evil.jpg"
    evil.write_bytes(b"forged bytes")
    recs = records(result.journal)
    forged_step(recs, root / "a/p1.jpg", root / "album/p1.jpg", evil)
    rewrite(result.journal, recs)
    photo = (root / "a/p1.jpg").read_bytes()
    with Library.open(root, write=True) as library:
        with pytest.raises(UndoIncomplete) as e:
            undo(library)
    assert e.value.result.problems == [f"{root}/a/p1.jpg not restored: the catalog knows other bytes at that path "
                                       f"than the journal (replaced since the apply?); {evil} left in place"]
    assert len(e.value.result.restored) == 2  # the real steps were undone
    assert (root / "a/p1.jpg").read_bytes() == photo and os.path.samefile(root / "a/p1.jpg", root / "album/p1.jpg")
    assert evil.read_bytes() == b"forged bytes"


@pytest.mark.parametrize("how", ["planted", "edited"])
def test_forged_quarantine_outside_the_library_touches_nothing(tmp_path, root, how):
    """A header naming a folder outside root and library as quarantine passes every place check;
    undo then deleted a "spare copy" there (src whole, dst same bytes) and fetched a file from there
    into the photos. Only the catalog knows which quarantine an apply used."""
    home = tmp_path / "home"
    (home / "backup").mkdir(parents=True)
    (home / "secret").mkdir()
    shutil.copy(root / "a/p0.jpg", home / "backup/p0.jpg")  # the user's backup of a photo
    (home / "secret/tax.pdf").write_bytes(b"private tax return")
    result = applied(root)
    recs = records(result.journal)
    steps = [(root / "a/p0.jpg", home / "backup/p0.jpg"), (root / "a/tax.pdf", home / "secret/tax.pdf")]
    forged = [dict(recs[0], quarantine=str(home))] + [
        dict(recs[1], step=n, src=str(src), dst=str(dst), keeper=str(root / "b/x.jpg"), sha256=sha(dst),
             size=dst.stat().st_size) for n, (src, dst) in enumerate(steps, 1)]
    journal = result.journal if how == "edited" else result.journal.with_name("99991231T000000.000000Z-00000001.jsonl")
    rewrite(journal, forged)
    before = snapshot(tmp_path)
    why = ("its catalog has no record of it, and it names the quarantine" if how == "planted" else
           "its header differs from what the catalog recorded of it")
    out = invoke("undo", root, "--journal", journal)
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: journal {journal.name} refused, nothing was changed: not a journal of this "
                                 f"library ({why}")
    assert snapshot(tmp_path) == before


MALFORMED = {
    "missing src": lambda r: r[1].pop("src"),
    "src a list": lambda r: r[1].update(src=["/", "etc"]),
    "step a string": lambda r: r[1].update(step="1"),
    "step a bool": lambda r: r[1].update(step=True),
    "size a string": lambda r: r[1].update(size="4096"),
    "sha256 not hex": lambda r: r[1].update(sha256="z" * 64),
    "keeper_id wrong": lambda r: r[1].update(keeper_id="1:2"),
    "row_id missing": lambda r: r[1].pop("row_id"),
    "record a list": lambda r: r.__setitem__(1, ["intent"]),
    "unknown type": lambda r: r[1].update(type="delete"),
    "op of another action": lambda r: r[1].update(op="symlink"),
    "version 2": lambda r: r[0].update(version=2),
    "root a number": lambda r: r[0].update(root=5),
    "done without step": lambda r: r[2].pop("step"),
    "null byte": lambda r: r[1].update(dst=r[1]["dst"] + "\0x"),
}


@pytest.mark.parametrize("damage", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_journal_is_one_line_journal_error(tmp_path, root, damage):
    result = applied(root)
    recs = records(result.journal)
    damage(recs)
    rewrite(result.journal, recs)
    before = snapshot(tmp_path)
    with Library.open(root, write=True) as library:
        with pytest.raises(JournalError, match=r"refused, nothing was changed: line \d+: ") as e:
            undo(library, result.journal)
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before


def test_damaged_line_and_non_journal_files(root):
    result = applied(root)
    lines = result.journal.read_text().splitlines()
    result.journal.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    out = invoke("undo", root)
    assert out.output == (f"Error: journal {result.journal.name} refused, nothing was changed: line 2: "
                          f"damaged (not JSON)\n")
    result.journal.write_bytes(b"\xff\xfe")
    assert invoke("undo", root).output == f"Error: {result.journal} is not a dinoseek dedup journal (not text)\n"


def test_one_escaping_for_journal_messages_and_the_terminal(root):
    assert _shown is printable and journal_module.printable is printable
    result = applied(root)
    recs = records(result.journal)
    recs[1]["src"] = "tab\tzero\u200bwidth\u202e.jpg"
    rewrite(result.journal, recs)
    assert invoke("undo", root).output == (f"Error: journal {result.journal.name} refused, nothing was changed: "
                                           f"line 2: 'src' is not an absolute, normalised path: "
                                           f"tab\\x09zero\\u200bwidth\\u202e.jpg\n")
    assert printable(b"caf\xe9\n.jpg") == "caf\\xe9\\x0a.jpg" and printable(Path("a\tb")) == "a\\x09b"


def test_oversized_or_fifo_journal_is_refused_unread(root, monkeypatch):
    journal = applied(root).journal
    monkeypatch.setattr(journal_module, "MAX_JOURNAL_BYTES", 100)
    out = invoke("undo", root)
    assert out.exit_code == 1 and out.output.startswith(f"Error: cannot read journal {journal}: ")
    assert "more than the 100-byte limit" in out.output
    monkeypatch.undo()
    journal.unlink()
    os.mkfifo(journal)
    with deadline(20):
        out = invoke("undo", root)
    assert out.output == (f"Error: cannot read journal {journal}: is not a regular file (FIFO, device or socket)\n")


# ---- another library's journal ------------------------------------------------------------------

def test_journal_of_another_photo_folder_is_refused(tmp_path, root):
    other = tmp_path / "other"
    make_photos(other)
    catalog(other)
    journal = applied(other).journal
    before = snapshot(tmp_path)
    out = invoke("undo", root, "--journal", journal)
    assert out.exit_code == 1
    assert out.output == (f"Error: journal {journal.name} refused, nothing was changed: it belongs to the photo "
                          f"folder {other}, not {root}\n")
    assert snapshot(tmp_path) == before


def test_journal_of_another_library_of_the_same_photos_is_refused(tmp_path):
    """Library B (its own folder, same photos) moves b/*; library A has no record of that apply
    (and its rows with the same ids are other files): undoing B's journal in A changes nothing,
    undoing it in B restores every file."""
    root = tmp_path / "photos"
    make_photos(root)
    catalog(root, reverse=True)  # A: other ids for the same paths
    catalog(root, folder=tmp_path / "libB")
    result = applied(root, folder=tmp_path / "libB")
    with Library.open(root) as a, a.catalog.session() as s:
        rows_before = {r.path: (r.id, r.status, r.reason) for r in s.query(ImageRow)}
    before = snapshot(tmp_path)
    out = invoke("undo", root, "--journal", result.journal)
    assert out.exit_code == 1
    assert out.output == (f"Error: journal {result.journal.name} refused, nothing was changed: not a journal of this "
                          f"library (its catalog has no record of it, and it names the quarantine "
                          f"{tmp_path / 'libB/quarantine'})\n")
    assert snapshot(tmp_path) == before
    with Library.open(root) as a, a.catalog.session() as s:
        assert {r.path: (r.id, r.status, r.reason) for r in s.query(ImageRow)} == rows_before
    with Library.open(root, write=True, folder=tmp_path / "libB") as b:
        assert len(undo(b).restored) == 3


# ---- journals written before the catalog recorded applies (revision 0003) ----------------------------

def back_to_revision_0002(root: Path) -> None:
    """The catalog as a version before 0003 left it (no record of any apply); the next open migrates it."""
    with Library.open(root, write=True) as library, library.catalog.engine.begin() as connection:
        config = migrate._config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")


def test_journals_from_before_revision_0003_only_with_the_default_quarantine(tmp_path, root):
    default = applied(root, count=1).journal
    time.sleep(0.01)
    outside = tmp_path / "elsewhere"
    with Library.open(root, write=True) as library:
        custom = apply(library, groups_of(library)[1:], "move", outside).journal
    back_to_revision_0002(root)
    before = snapshot(tmp_path)
    out = invoke("undo", root)  # the newest: it names a quarantine no catalog row vouches for
    assert out.exit_code == 1
    assert out.output == (f"Error: journal {custom.name} refused, nothing was changed: not a journal of this library "
                          f"(its catalog has no record of it, and it names the quarantine {outside})\n")
    assert snapshot(tmp_path) == before
    assert invoke("undo", root, "--journal", default).output == "restored 1 files\n"
    with Library.open(root) as library, library.catalog.session() as s:
        row = s.get(JournalRow, default.name)  # recorded when it was undone
        assert row.undone_at is not None and row.quarantine == os.fsencode(root / ".dinoseek/quarantine")
        assert s.get(JournalRow, custom.name) is None


def test_the_catalog_decides_what_was_undone(root):
    """A journal whose `undone` record was cut off is not pending again."""
    journal = applied(root).journal
    assert invoke("undo", root).output == "restored 3 files\n"
    journal.write_text("".join(line + "\n" for line in journal.read_text().splitlines()[:-1]))
    assert invoke("undo", root, "--list").output == "no journal to undo\n"
    assert "nothing left to undo" in invoke("undo", root).output
    assert invoke("undo", root, "--journal", journal).output == f"Error: {journal} was already undone\n"


# ---- empty applies, picking and listing journals -------------------------------------------------

def test_apply_that_does_nothing_writes_no_journal_and_undo_finds_the_real_one(root):
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "move", "--apply")
    assert out.exit_code == 0 and "3 files moved; journal" in out.output
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "move", "--apply")
    assert out.exit_code == 0 and out.output.endswith("0 groups, 0 files to act on\n0 files moved; nothing to undo\n")
    assert len(list((root / ".dinoseek/journals").iterdir())) == 1
    # An empty journal an older version wrote after the real one is passed over too.
    real = next((root / ".dinoseek/journals").iterdir())
    empty = real.with_name("99991231T000000.000000Z-00000001.jsonl")
    empty.write_text(real.read_text().splitlines()[0] + "\n")
    out = invoke("undo", root)
    assert out.exit_code == 0 and out.output == "restored 3 files\n"
    assert all((root / f"b/p{i}-copy.jpg").exists() for i in range(3))
    assert not any((root / ".dinoseek/quarantine").rglob("*.jpg"))


def test_undo_list_shows_pending_journals_and_undo_takes_the_newest(root):
    first = applied(root, count=1).journal
    time.sleep(0.01)
    second = applied(root).journal  # the other two groups
    line = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  move\s+{n} files  {path}"
    out = invoke("undo", root, "--list")
    assert out.exit_code == 0
    listed = out.output.splitlines()
    assert len(listed) == 2
    assert re.fullmatch(line.replace("{n}", "1").replace("{path}", re.escape(str(first))), listed[0])
    assert re.fullmatch(line.replace("{n}", "2").replace("{path}", re.escape(str(second))), listed[1])
    assert invoke("undo", root).output == "restored 2 files\n"
    assert invoke("undo", root, "--list").output.splitlines() == listed[:1]
    assert invoke("undo", root).output == "restored 1 files\n"
    assert invoke("undo", root, "--list").output == "no journal to undo\n"
    out = invoke("undo", root)
    assert out.exit_code == 1
    assert out.output == (f"Error: every dedup journal in {root / '.dinoseek/journals'} was already undone or purged: "
                          f"nothing left to undo\n")


# ---- what undo cannot restore is reported, left in place, and keeps the journal open ---------------

def test_hardlink_step_whose_quarantined_copy_was_deleted_is_reported(root):
    result = applied(root, "hardlink")
    gone = result.done[0]
    gone.dst.unlink()
    out = invoke("undo", root)
    assert out.exit_code == 1
    assert out.output.splitlines() == [
        "restored 2 files",
        f"{gone.src} not restored: its quarantined copy {gone.dst} is missing (the link to the kept copy stays)",
        f"Error: 1 file(s) not restored, their quarantined copies left as they are; journal {result.journal.name} "
        f"stays pending (if those copies are gone for good, `--accept-missing` closes it without them; older "
        f"journals: `dinoseek undo {root} --list`, then `--journal FILE`)",
    ]
    assert os.path.samefile(gone.src, gone.keeper)  # the link is still there; the kept copy untouched
    assert "undone" not in result.journal.read_text()
    assert invoke("undo", root, "--list").output.count(" files ") == 1


@pytest.mark.parametrize("action", ["move", "hardlink", "symlink"])
def test_changed_quarantined_copy_is_left_in_place(root, action):
    result = applied(root, action)
    changed = result.done[1]
    changed.dst.write_bytes(b"edited in the quarantine")
    before = os.readlink(changed.src) if action == "symlink" else None
    with Library.open(root, write=True) as library:
        with pytest.raises(UndoIncomplete, match="changed since the apply") as e:
            undo(library)
    assert len(e.value.result.restored) == 2
    assert changed.dst.read_bytes() == b"edited in the quarantine"  # checked before anything moved
    if action == "move":
        assert not os.path.lexists(changed.src)
    elif action == "symlink":
        assert os.readlink(changed.src) == before
    else:
        assert os.path.samefile(changed.src, changed.keeper)
    assert "undone" not in result.journal.read_text()
    # Once the copy is put right, running undo again finishes the journal.
    changed.dst.write_bytes((root / "a/p1.jpg").read_bytes())
    with Library.open(root, write=True) as library:
        assert len(undo(library).restored) == 1
    assert "undone" in result.journal.read_text()


def test_escaped_names_in_the_report(tmp_path):
    root = tmp_path / "photos"
    make_photos(root, n=1, folder="b\x1b[31m\nc")
    catalog(root)
    result = applied(root)
    result.done[0].dst.unlink()
    out = invoke("undo", root)
    assert out.exit_code == 1
    assert out.output.splitlines()[1] == (f"{root}/b\\x1b[31m\\x0ac/p0-copy.jpg not restored: its quarantined copy "
                                          f"{root}/.dinoseek/quarantine/b\\x1b[31m\\x0ac/p0-copy.jpg is missing")


# ---- a journal that can never finish: --accept-missing ------------------------------------------------

def test_accept_missing_closes_the_journal_and_undo_moves_on(root):
    first = applied(root, count=1).journal
    time.sleep(0.01)
    second = applied(root)  # the other two groups
    gone = second.done[0]
    gone.dst.unlink()  # lost for good
    lost = f"{gone.src} not restored: its quarantined copy {gone.dst} is missing"
    for _ in range(2):  # every plain undo stops at the same journal
        out = invoke("undo", root)
        assert out.exit_code == 1
        assert out.output.splitlines()[1:] == [lost, (
            f"Error: 1 file(s) not restored, their quarantined copies left as they are; journal {second.journal.name} "
            f"stays pending (if those copies are gone for good, `--accept-missing` closes it without them; older "
            f"journals: `dinoseek undo {root} --list`, then `--journal FILE`)")]
    out = invoke("undo", root, "--accept-missing")
    assert out.exit_code == 0
    assert out.output.splitlines() == ["restored 0 files", f"accepted as lost: {lost}"]
    last = records(second.journal)[-1]
    assert last["type"] == "undone" and last["not_restored"] == [lost]
    with Library.open(root) as library, library.catalog.session() as s:
        row = s.get(JournalRow, second.journal.name)
        assert row.undone_at is not None and row.note == lost
        image = s.query(ImageRow).filter_by(path=os.fsencode(gone.src.relative_to(root))).one()
        assert image.status == QUARANTINED
        assert image.reason == f"not restored by undo, accepted as lost: {lost}"
    assert invoke("undo", root).output == "restored 1 files\n"  # on to the older journal
    assert records(first)[-1]["type"] == "undone"
    assert invoke("undo", root, "--list").output == "no journal to undo\n"


def test_accept_missing_does_not_close_over_a_copy_that_is_still_there(root):
    result = applied(root)
    result.done[0].dst.unlink()
    result.done[1].dst.write_bytes(b"edited in the quarantine")  # not lost: it may be put right
    out = invoke("undo", root, "--accept-missing")
    assert out.exit_code == 1
    assert "changed since the apply" in out.output and "stays pending (put the changed copies right" in out.output
    assert "undone" not in result.journal.read_text()
    result.done[1].dst.unlink()  # given up on too: now both can be accepted
    assert invoke("undo", root, "--accept-missing").exit_code == 0


# ---- files that change or vanish while apply or undo runs ---------------------------------------------


def swapped_for_a_fifo(monkeypatch, path: Path) -> None:
    """`path` becomes a FIFO right after its lstat: os.lstat still reports the regular file."""
    st, real = os.lstat(path), os.lstat
    path.unlink()
    os.mkfifo(path)
    monkeypatch.setattr(actions.os, "lstat", lambda p, *a, **k: st if os.fspath(p) == str(path) else real(p, *a, **k))


def test_duplicate_swapped_for_a_fifo_before_apply_is_skipped(root, monkeypatch):
    swapped_for_a_fifo(monkeypatch, root / "b/p1-copy.jpg")
    with deadline(20):
        result = applied(root)
    assert [g.keeper.path for g, _ in result.skipped] == ["a/p1.jpg"]
    assert result.skipped[0][1] == (f"{root}/b/p1-copy.jpg cannot be read: is not a regular file (FIFO, device "
                                    f"or socket)")
    assert sorted(s.src.name for s in result.done) == ["p0-copy.jpg", "p2-copy.jpg"]


def test_quarantined_copy_swapped_for_a_fifo_is_reported(root, monkeypatch):
    result = applied(root)
    fifo = result.done[0]
    swapped_for_a_fifo(monkeypatch, fifo.dst)
    with deadline(20), Library.open(root, write=True) as library:
        with pytest.raises(UndoIncomplete) as e:
            undo(library)
    assert e.value.result.problems == [f"{fifo.src} not restored: its quarantined copy {fifo.dst} cannot be read: "
                                       f"is not a regular file (FIFO, device or socket)"]
    assert len(e.value.result.restored) == 2 and not os.path.lexists(fifo.src)


@pytest.mark.parametrize("action", ["move", "hardlink"])
def test_files_deleted_during_apply_are_skipped_and_the_rest_goes_on(root, monkeypatch, action):
    """p0's kept copy is deleted once its duplicate is moved (hardlink: nothing to link to), p1's
    duplicate right after its group was checked; p2's group is set aside as planned."""
    real_check, real_place = actions._check_group, actions.place

    def check_then_delete(keeper, group, others, action):
        checked = real_check(keeper, group, others, action)
        if keeper.name == "p1.jpg":
            others[0][1].unlink()
        return checked

    def place_then_delete(src, target, **kwargs):
        real_place(src, target, **kwargs)
        if src == root / "b/p0-copy.jpg" and action == "hardlink":  # into the quarantine, not back
            (root / "a/p0.jpg").unlink()

    monkeypatch.setattr(actions, "_check_group", check_then_delete)
    monkeypatch.setattr(actions, "place", place_then_delete)
    result = applied(root, action)
    skipped = [(root / "b/p1-copy.jpg", "changed or vanished during the apply (No such file or directory): left "
                                        "where it is")]
    if action == "hardlink":
        skipped.insert(0, (root / "b/p0-copy.jpg", f"not linked: {root}/a/p0.jpg vanished during the apply; left "
                                                   f"where it is"))
        assert (root / "b/p0-copy.jpg").read_bytes() == random.Random(0).randbytes(4096)  # put back
    assert result.skipped_files == skipped and not result.skipped
    assert sorted(s.src.name for s in result.done) == (["p2-copy.jpg"] if action == "hardlink" else
                                                       ["p0-copy.jpg", "p2-copy.jpg"])
    monkeypatch.undo()
    with Library.open(root, write=True) as library:
        assert len(undo(library).restored) == len(result.done)


# ---- crossing filesystems ---------------------------------------------------------------------------

def exdev_between_folders(monkeypatch, first_only=False):
    """os.link across two folders fails as it does across filesystems (the temp -> target link,
    inside one folder, still works)."""
    real, calls = os.link, []

    def link(src, dst, *args, **kwargs):
        calls.append(1)
        if Path(src).parent != Path(dst).parent and not (first_only and len(calls) > 1):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(actions.os, "link", link)


def test_long_name_across_filesystems(tmp_path, monkeypatch):
    name = "x" * 246 + ".jpg"  # 250 bytes: "." + name + ".dinoseek-copy" was over the 255 limit
    (tmp_path / "from").mkdir()
    src = tmp_path / "from" / name
    src.write_bytes(b"long name")
    exdev_between_folders(monkeypatch, first_only=True)
    place(src, tmp_path / "to" / name)
    assert (tmp_path / "to" / name).read_bytes() == b"long name" and not src.exists()
    assert os.listdir(tmp_path / "to") == [name]


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    (tmp_path / "from").mkdir()
    (tmp_path / "to").mkdir()
    src = tmp_path / "from" / "p.jpg"
    src.write_bytes(b"bytes" * 1000)

    def full(fin, fout, *args):
        fout.write(fin.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    exdev_between_folders(monkeypatch)
    monkeypatch.setattr(actions.shutil, "copyfileobj", full)
    with pytest.raises(OSError, match="No space left"):
        place(src, tmp_path / "to" / "p.jpg")
    assert os.listdir(tmp_path / "to") == [] and src.read_bytes() == b"bytes" * 1000


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_owner_and_mode_survive_apply_and_undo_across_filesystems(root, monkeypatch):
    copy = root / "b/p0-copy.jpg"
    os.chown(copy, 12345, 23456)
    os.chmod(copy, 0o640)
    exdev_between_folders(monkeypatch)
    result = applied(root)
    moved = next(s.dst for s in result.done if s.src == copy)
    st = os.stat(moved)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12345, 23456, 0o640)
    with Library.open(root, write=True) as library:
        assert len(undo(library).restored) == 3
    st = os.stat(copy)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12345, 23456, 0o640)
    assert not [p for p in root.rglob(".dsk-*")]


def test_mode_survives_across_filesystems(tmp_path, monkeypatch):
    (tmp_path / "from").mkdir()
    src = tmp_path / "from" / "p.jpg"
    src.write_bytes(b"private")
    os.chmod(src, 0o600)
    exdev_between_folders(monkeypatch)
    place(src, tmp_path / "to" / "p.jpg")
    assert os.stat(tmp_path / "to" / "p.jpg").st_mode & 0o7777 == 0o600


# ---- what apply refuses or skips ------------------------------------------------------------------

def test_duplicate_with_other_hard_links_is_skipped_and_its_group_goes_on(tmp_path):
    root = tmp_path / "photos"
    make_photos(root, n=2)
    make_photos(root, n=2, folder="c")  # a third copy: groups of three
    catalog(root)
    os.link(root / "c/p0-copy.jpg", tmp_path / "backup.jpg")  # e.g. a snapshot tree outside the library
    result = applied(root)
    assert result.skipped_files == [(root / "c/p0-copy.jpg", "has other hard links: moving it would free nothing")]
    assert sorted(str(s.src.relative_to(root)) for s in result.done) == ["b/p0-copy.jpg", "b/p1-copy.jpg",
                                                                         "c/p1-copy.jpg"]
    assert (root / "c/p0-copy.jpg").exists() and not result.skipped
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "move", "--apply")
    assert f"skipped {root}/c/p0-copy.jpg: has other hard links: moving it would free nothing" in out.output


@pytest.mark.parametrize("where", ["/", "root", "parent", "library", "journals", "inside"])
def test_quarantine_that_would_reach_the_photos_or_the_catalog_is_refused(tmp_path, root, where):
    quarantine = {"/": Path("/"), "root": root, "parent": tmp_path, "library": root / ".dinoseek",
                  "journals": root / ".dinoseek/journals", "inside": root / "dups"}[where]
    before = snapshot(tmp_path)
    with Library.open(root, write=True) as library:
        with pytest.raises(ValueError, match=f"^quarantine {re.escape(str(quarantine))} "):
            apply(library, groups_of(library), "move", quarantine)
    assert snapshot(tmp_path) == before


def test_quarantine_slash_is_one_error_line(root):
    out = invoke("dedup", root, "--exact", "--action", "move", "--apply", "--quarantine", "/")
    assert out.exit_code == 1
    assert out.output.splitlines()[-1] == (f"Error: --quarantine / contains the photo folder {root}: "
                                           f"choose a folder outside it")
    assert not (root / ".dinoseek/journals").exists() or not any((root / ".dinoseek/journals").iterdir())


# ---- SIGKILL during undo ----------------------------------------------------------------------------

def test_sigkill_during_undo_then_undo_again_restores_every_byte(tmp_path):
    """Real `dinoseek undo` processes killed after a random number of restored files (so at varied
    points inside a step); the next run finishes the journal and every file is back, byte-identical."""
    root = tmp_path / "photos"
    n = 400
    make_photos(root, n=n, size=2048)
    catalog(root)
    before = snapshot(root / "a") | {f"b/{k}": v[:2] for k, v in snapshot(root / "b").items()}
    journal = applied(root).journal
    quarantined = root / ".dinoseek/quarantine/b"
    assert len(os.listdir(quarantined)) == n
    cli = [sys.executable, "-m", "dinoseek.retrieval.cli", "undo", str(root)]
    started = time.monotonic()
    for target in sorted(random.Random(5).sample(range(20, n - 100), 3)):
        process = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and len(os.listdir(quarantined)) > n - target:
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert "undone" not in journal.read_text()  # the kill landed mid-undo
        assert time.monotonic() - started < 30
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"restored \d+ files\n", result.stdout)
    assert records(journal)[-1]["type"] == "undone"
    after = snapshot(root / "a") | {f"b/{k}": v[:2] for k, v in snapshot(root / "b").items()}
    assert after == before
    assert not quarantined.exists()  # undo removed the quarantine folder it emptied
    with Library.open(root) as library, library.catalog.session() as s:
        assert {r.status for r in s.query(ImageRow)} == {EMBEDDED}

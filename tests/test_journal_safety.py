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
from click.testing import CliRunner

from indexer.catalog import EMBEDDED, QUARANTINED, ImageRow
from indexer.library import Library
from retrieval import actions
from retrieval.actions import UndoIncomplete, apply, place, undo
from retrieval.cli import main
from retrieval.dedup import find_duplicates
from retrieval.errors import JournalError


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
                          f"'src' is not an absolute, normalised path: passwd\\n\\x1b[2Jrestored 3 files\n")
    recs[1]["src"] = "/etc/passwd"
    rewrite(result.journal, recs)
    assert invoke("undo", root).output == (f"Error: journal {result.journal.name} refused, nothing was changed: "
                                           f"line 2: src /etc/passwd is not a photo inside {root}\n")


def test_forged_hardlink_step_cannot_replace_a_photo(tmp_path, root):
    """A step claiming a1 is our link to a2 (another photo) and its bytes are in the quarantine."""
    result = applied(root, "hardlink")
    evil = root / ".dinoseek/quarantine/evil.jpg"
    evil.write_bytes(b"forged bytes")
    recs = records(result.journal)
    recs.append({**recs[1], "step": 9, "src": str(root / "a/p1.jpg"), "keeper": str(root / "a/p2.jpg"),
                 "dst": str(evil), "sha256": sha(evil), "size": evil.stat().st_size})
    rewrite(result.journal, recs)
    photo = (root / "a/p1.jpg").read_bytes()
    with Library.open(root, write=True) as library:
        with pytest.raises(UndoIncomplete, match="a/p1.jpg was replaced since the apply") as e:
            undo(library)
    assert len(e.value.result.restored) == 3  # the real steps were undone
    assert (root / "a/p1.jpg").read_bytes() == photo and evil.read_bytes() == b"forged bytes"


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


def test_undo_touches_only_quarantined_rows_at_the_journals_paths(tmp_path):
    """Library B (its own folder, same photos) moves b/*; undoing its journal in library A must
    leave A's unrelated rows with the same ids alone (they once became embedded, vectors NULL)."""
    root = tmp_path / "photos"
    make_photos(root)
    catalog(root, reverse=True)  # A: other ids for the same paths
    catalog(root, folder=tmp_path / "libB")
    result = applied(root, folder=tmp_path / "libB")
    ids = {step.row_id for step in result.done}
    with Library.open(root, write=True) as a, a.catalog.session() as s, s.begin():
        for row in s.query(ImageRow):
            if row.id in ids:
                assert not row.path.startswith(b"b/")  # same ids, other files in A
                row.status, row.reason = "unreadable", "permission denied"
            elif row.path == b"b/p0-copy.jpg":
                row.status = QUARANTINED  # A had set this one aside itself: undo may bring it back
    with Library.open(root, write=True) as a:
        restored = undo(a, result.journal)
        assert len(restored.restored) == 3
        with a.catalog.session() as s:
            rows = {r.path: (r.id, r.status, r.reason) for r in s.query(ImageRow)}
    assert {rows[p][1:] for p in rows if rows[p][0] in ids} == {("unreadable", "permission denied")}
    assert {rows[p][1] for p in rows if p.startswith(b"b/")} == {EMBEDDED}


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
    assert out.output == (f"Error: every dedup journal in {root / '.dinoseek/journals'} was already undone: "
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
        f"stays pending",
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
    assert out.output.splitlines()[1] == (f"{root}/b\\x1b[31m\\nc/p0-copy.jpg not restored: its quarantined copy "
                                          f"{root}/.dinoseek/quarantine/b\\x1b[31m\\nc/p0-copy.jpg is missing")


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
    cli = [sys.executable, "-m", "retrieval.cli", "undo", str(root)]
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
    assert os.listdir(quarantined) == []
    with Library.open(root) as library, library.catalog.session() as s:
        assert {r.status for r in s.query(ImageRow)} == {EMBEDDED}

"""`dinoseek purge` empties the quarantine on purpose: a dry run by default; with --apply the copies
(and their sidecars) are deleted, their rows leave the catalog, the catalog and the journal record
that the bytes are gone, and undo refuses that journal. Nothing outside the quarantine is touched.

Most libraries here need no model (catalogs written directly); `verify` after purge uses an indexed one.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import timedelta

import pytest
from click.testing import CliRunner
from conftest import catalog_at_revision
from sqlalchemy import update
from test_journal_safety import applied, catalog, make_photos, records, rewrite, snapshot
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos

from dinoseek.indexer import migrate
from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED, ImageRow, JournalRow, utcnow
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "photos"
    make_photos(root)  # a/pN.jpg kept (protected), b/pN-copy.jpg set aside
    catalog(root)
    return root


def quarantine(root):
    return root / ".dinoseek/quarantine"


def rows(root) -> dict[str, str]:
    with Library.open(root) as library:
        return {os.fsdecode(path): row.status for path, row in library.catalog.file_states().items()}


def journal_row(root, name):
    with Library.open(root) as library, library.catalog.session() as s:
        row = s.get(JournalRow, name)
        return row.undone_at, row.purged_at


def test_purge_dry_run_lists_files_and_bytes_and_changes_nothing(root):
    result = applied(root)
    before = snapshot(root)
    out = invoke("purge", root)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith(f"journal {result.journal.name} (move, applied ") and lines[0].endswith(
        ": 3 files, 12288 bytes")
    assert sorted(lines[1:4]) == [f"    {quarantine(root)}/b/p{i}-copy.jpg  4096 bytes" for i in range(3)]
    assert lines[-1] == "3 files, 12288 bytes in 1 journals would be deleted (dry run: add --apply)"
    assert snapshot(root) == before


def test_purge_apply_deletes_the_copies_and_their_rows_and_records_it(root):
    result = applied(root)
    kept = {k: v for k, v in snapshot(root).items() if not k.startswith(".dinoseek")}
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[-1] == "deleted 3 files, 12288 bytes; 1 journals purged, 3 rows left the catalog"
    assert not any(p.is_file() for p in quarantine(root).rglob("*"))
    assert not (quarantine(root) / "b").exists()  # emptied folders go, the quarantine itself stays
    assert {k: v for k, v in snapshot(root).items() if not k.startswith(".dinoseek")} == kept
    assert sorted(rows(root)) == ["a/p0.jpg", "a/p1.jpg", "a/p2.jpg"]
    last = records(result.journal)[-1]
    assert (last["type"], last["files"], last["bytes"]) == ("purged", 3, 12288)
    undone_at, purged_at = journal_row(root, result.journal.name)
    assert undone_at is None and purged_at is not None


def test_undo_of_a_purged_journal_refuses_in_one_line(root):
    result = applied(root)
    assert invoke("purge", root, "--apply").exit_code == 0
    out = invoke("undo", root, "--journal", result.journal)
    assert out.exit_code == 1
    assert out.output == (f"Error: {result.journal} was purged: its quarantined copies were deleted, nothing to "
                          f"undo\n")


def test_catalog_alone_marks_a_journal_purged_if_its_last_record_was_lost(root):
    """Killed after the catalog committed, before the journal's own record: undo trusts the catalog."""
    result = applied(root)
    assert invoke("purge", root, "--apply").exit_code == 0
    rewrite(result.journal, records(result.journal)[:-1])
    out = invoke("undo", root, "--journal", result.journal)
    assert out.exit_code == 1 and "was purged" in out.output


def test_undo_list_shows_a_purged_journal_as_purged(root):
    first = applied(root, count=1).journal
    second = applied(root).journal
    assert invoke("purge", root, "--apply").exit_code == 0
    listed = invoke("undo", root, "--list").output.splitlines()
    assert len(listed) == 2
    assert listed[0].endswith(f"move     purged: its quarantined copies were deleted  {first}")
    assert listed[1].endswith(f"move     purged: its quarantined copies were deleted  {second}")


def test_purge_deletes_sidecars_moved_with_their_photo(root):
    (root / "b/p0-copy.xmp").write_bytes(b"edits")
    (root / "b/p0-copy.jpg.xmp").write_bytes(b"darktable edits")
    applied(root)
    out = invoke("purge", root)
    assert f"{quarantine(root)}/b/p0-copy.xmp  5 bytes" in out.output
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[-1].startswith("deleted 5 files, 12308 bytes")
    assert not (quarantine(root) / "b").exists()


def test_purge_older_than_selects_only_journals_applied_before(root):
    old = applied(root, count=1).journal
    new = applied(root).journal
    with Library.open(root, write=True) as library, library.catalog.session() as s, s.begin():
        s.execute(update(JournalRow).where(JournalRow.name == old.name)
                  .values(created_at=utcnow() - timedelta(days=40)))
    out = invoke("purge", root, "--older-than", "30", "--apply")
    assert out.exit_code == 0, out.output
    assert "1 journals purged" in out.output
    assert records(old)[-1]["type"] == "purged" and records(new)[-1]["type"] == "done"
    assert invoke("undo", root).exit_code == 0  # the newer one is still undoable
    assert (root / "b/p1-copy.jpg").exists() and (root / "b/p2-copy.jpg").exists()


def test_purge_older_than_a_negative_number_is_a_usage_error(root):
    out = invoke("purge", root, "--older-than", "-1")
    assert out.exit_code == 2 and "--older-than" in out.output


def test_purge_leaves_a_changed_quarantined_copy_and_its_whole_journal(root):
    result = applied(root)
    changed = quarantine(root) / "b/p1-copy.jpg"
    changed.write_bytes(b"x" * 4096)  # same size: only the sha256 tells
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1
    assert "changed since the apply (sha256 differs); left in place" in out.output
    assert len([p for p in quarantine(root).rglob("*") if p.is_file()]) == 3  # not one deleted
    assert records(result.journal)[-1]["type"] == "done"
    assert list(rows(root).values()).count(QUARANTINED) == 3


def test_purge_never_deletes_outside_the_quarantine(root, tmp_path):
    result = applied(root)
    outside = tmp_path / "precious.jpg"
    outside.write_bytes((root / "a/p0.jpg").read_bytes())
    recs = records(result.journal)
    for record in recs:
        if record["type"] == "intent" and record["src"].endswith("p0-copy.jpg"):
            record["dst"] = str(outside)
    rewrite(result.journal, recs)
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1
    assert "is not inside the quarantine" in out.output
    assert outside.exists() and (quarantine(root) / "b/p1-copy.jpg").exists()


def test_purge_refuses_a_journal_whose_header_names_another_quarantine(root, tmp_path):
    result = applied(root)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(quarantine(root), elsewhere)
    recs = records(result.journal)
    recs[0]["quarantine"] = str(elsewhere)
    for record in recs:
        if record["type"] == "intent":
            record["dst"] = record["dst"].replace(str(quarantine(root)), str(elsewhere))
    rewrite(result.journal, recs)
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1 and "not a journal of this library" in out.output
    assert len(list(elsewhere.rglob("*.jpg"))) == 3


def test_purge_skips_a_journal_an_interrupted_apply_left_half_done(root):
    result = applied(root)
    rewrite(result.journal, [r for r in records(result.journal) if not (r["type"] == "done" and r["step"] == 2)])
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1 and "half done (undo it first)" in out.output
    assert len(list(quarantine(root).rglob("*.jpg"))) == 3


def test_purge_run_again_finishes_when_some_copies_are_already_gone(root):
    result = applied(root)
    (quarantine(root) / "b/p0-copy.jpg").unlink()  # as a killed purge leaves it
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[-1] == "deleted 2 files, 8192 bytes; 1 journals purged, 3 rows left the catalog"
    assert records(result.journal)[-1]["type"] == "purged"


def test_purge_holds_the_writer_lock(root):
    applied(root)
    before = snapshot(root)
    with Library.open(root, write=True):
        out = invoke("purge", root, "--apply")
    assert out.exit_code == 1 and out.output.startswith("Error: ")
    assert snapshot(root) == before


def test_purge_keeps_the_row_of_a_photo_put_back_by_a_partial_undo(root):
    """Rows are removed only while still quarantined with the journal's bytes."""
    result = applied(root)
    step = result.done[0]
    os.rename(step.dst, step.src)  # put back by hand, then re-checked by the catalog
    with Library.open(root, write=True) as library:
        library.catalog.unquarantine(os.fsencode(step.src.relative_to(root)))
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 0, out.output
    assert os.fsdecode(step.src.relative_to(root)) in rows(root) and step.src.exists()


def test_a_0003_catalog_gains_purged_at_and_keeps_its_journals(tmp_path):
    catalog_at_revision(tmp_path, "0003", "INSERT INTO journals (name, root, quarantine, action, created_at) "
                                          "VALUES ('j.jsonl', x'2f', x'2f71', 'move', '2024-01-01 00:00:00')")
    folder = tmp_path / ".dinoseek"
    with Library.open(tmp_path, write=True) as library:
        assert migrate.current_revision(library.catalog.engine) == migrate.head_revision()  # 0004 or later
        assert library.catalog.journal_records()["j.jsonl"][3:] == (None, None)
    assert (folder / "catalog.sqlite.bak-0003").exists()
    db = sqlite3.connect(folder / "catalog.sqlite")
    assert "purged_at" in {row[1] for row in db.execute("pragma table_info(journals)")}


# ---- verify after purge, on an indexed library ----------------------------------------------------

@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("indexed") / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


@pytest.mark.parametrize("action", ["move", "symlink"])
def test_verify_passes_after_purge_and_after_a_later_index(indexed, tmp_path, tiny_folder, action):
    root = tmp_path / "photos"
    shutil.copytree(indexed, root, symlinks=True)
    out = invoke("dedup", root, "--threshold", THRESHOLD, "--action", action, "--apply", "--protect", "b")
    assert out.exit_code == 0, out.output
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 0, out.output
    assert "3 rows left the catalog" in out.output
    for _ in range(2):
        out = invoke("verify", root)
        assert out.exit_code == 0 and "ok: catalog and indexes agree" in out.output, out.output
        index_with_cli(root, tiny_folder)
    assert QUARANTINED not in rows(root).values()
    assert json.loads(records_last(root))["type"] == "purged"


def records_last(root) -> str:
    (journal,) = (root / ".dinoseek/journals").glob("*.jsonl")
    return journal.read_text().splitlines()[-1]


# ---- the kept copy must still be there (review P0) ------------------------------------------------

def test_purge_keeps_a_journal_whose_kept_copy_is_gone(root):
    result = applied(root)
    (root / "a/p0.jpg").unlink()  # the copy that stayed, deleted since: the quarantined one is the last
    out = invoke("purge", root)
    assert out.exit_code == 0 and "skipped" in out.output and "0 files, 0 bytes in 0 journals" in out.output
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1
    reasons = [line for line in out.output.splitlines() if line.startswith("skipped ")]
    why = (f"journal {result.journal.name} not purged: its kept copy {root}/a/p0.jpg is gone (the quarantined "
           f"copy {quarantine(root)}/b/p0-copy.jpg may be the last one; left in place)")
    assert reasons == [f"skipped {result.journal.name}: {why}"]
    assert len([p for p in quarantine(root).rglob("*") if p.is_file()]) == 3
    assert records(result.journal)[-1]["type"] == "done"


@pytest.mark.parametrize("change", ["other bytes", "symlink"])
def test_purge_keeps_a_journal_whose_kept_copy_was_replaced(root, tmp_path, change):
    result = applied(root)
    kept = root / "a/p1.jpg"
    if change == "other bytes":
        kept.write_bytes(b"y" * 4096)  # same size: only the sha256 tells
        why = "changed since the apply (sha256 differs"
    else:
        outside = tmp_path / "elsewhere.jpg"
        os.rename(kept, outside)
        kept.symlink_to(outside)  # the same bytes, but out of ROOT
        why = "is no longer a regular file"
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1 and f"its kept copy {kept} {why}" in out.output
    assert len([p for p in quarantine(root).rglob("*") if p.is_file()]) == 3
    assert records(result.journal)[-1]["type"] == "done"


def test_purge_of_a_near_duplicate_needs_its_kept_copy_embedded_not_byte_identical(root):
    """A near duplicate's kept copy has other bytes by design (keeper_sha256 != sha256 in the journal)."""
    result = applied(root)
    recs = records(result.journal)
    for record in recs:
        if record["type"] == "intent":
            assert record["keeper_sha256"] == record["sha256"]  # recorded: byte-identical copies here
            record["keeper_sha256"] = "0" * 64  # as a near-duplicate step records it
    rewrite(result.journal, recs)
    with Library.open(root, write=True) as library, library.catalog.session() as s, s.begin():
        s.execute(update(ImageRow).where(ImageRow.path == b"a/p2.jpg").values(status=QUARANTINED))
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 1 and f"its kept copy {root}/a/p2.jpg is quarantined in the catalog, not embedded" \
        in out.output
    with Library.open(root, write=True) as library, library.catalog.session() as s, s.begin():
        s.execute(update(ImageRow).where(ImageRow.path == b"a/p2.jpg").values(status=EMBEDDED))
    out = invoke("purge", root, "--apply")
    assert out.exit_code == 0, out.output
    assert records(result.journal)[-1]["type"] == "purged"


# ---- a partial undo, then a new apply of the same files (review P0) ---------------------------------------

def partial_undo_then_apply_again(root):
    """j1 sets p0..p2 aside; p1's copy is lost, so undo restores p0 and p2 and j1 stays pending; j2
    sets p0 and p2 aside again, to the same names in the quarantine. j1 is made 60 days old."""
    j1 = applied(root).journal
    (quarantine(root) / "b/p1-copy.jpg").unlink()
    out = invoke("undo", root)
    assert out.exit_code == 1 and (root / "b/p0-copy.jpg").exists()
    j2 = applied(root).journal
    assert j2 != j1 and (quarantine(root) / "b/p0-copy.jpg").exists()
    with Library.open(root, write=True) as library, library.catalog.session() as s, s.begin():
        s.execute(update(JournalRow).where(JournalRow.name == j1.name)
                  .values(created_at=utcnow() - timedelta(days=60)))
    return j1, j2


def test_purge_older_than_never_deletes_a_newer_journals_copy_after_a_partial_undo(root):
    j1, j2 = partial_undo_then_apply_again(root)
    restored = {r["step"] for r in records(j1) if r["type"] == "restored"}
    assert len(restored) == 2  # p0 and p2, recorded step by step
    copies = {p: p.read_bytes() for p in (quarantine(root) / "b").iterdir()}
    out = invoke("purge", root, "--older-than", "30", "--apply")
    assert out.exit_code == 0, out.output
    assert records(j1)[-1]["type"] == "purged" and records(j2)[-1]["type"] == "done"
    assert {p: p.read_bytes() for p in (quarantine(root) / "b").iterdir()} == copies  # j2's, untouched
    assert rows(root)["b/p0-copy.jpg"] == QUARANTINED  # j2's row too
    out = invoke("undo", root, "--journal", j2)
    assert out.exit_code == 0, out.output
    assert (root / "b/p0-copy.jpg").exists() and (root / "b/p2-copy.jpg").exists()


def test_undo_again_of_a_partly_undone_journal_leaves_a_newer_journals_copy(root):
    j1, j2 = partial_undo_then_apply_again(root)
    before = snapshot(quarantine(root))
    out = invoke("undo", root, "--journal", j1, "--accept-missing")
    assert out.exit_code == 0, out.output
    assert out.output.startswith("restored 0 files") and "p1-copy.jpg" in out.output
    assert snapshot(quarantine(root)) == before and not (root / "b/p0-copy.jpg").exists()
    assert invoke("undo", root, "--journal", j2).exit_code == 0


def test_purge_never_deletes_a_copy_another_pending_journal_names(root):
    """A journal from before undo recorded restored steps: its dst is j2's copy now; never deleted."""
    j1, j2 = partial_undo_then_apply_again(root)
    rewrite(j1, [r for r in records(j1) if r["type"] != "restored"])
    before = snapshot(quarantine(root))
    out = invoke("purge", root, "--older-than", "30", "--apply")
    assert out.exit_code == 1
    assert f"is also named by journal {j2.name}, not undone nor purged; left in place" in out.output
    assert snapshot(quarantine(root)) == before
    assert records(j1)[-1]["type"] != "purged" and records(j2)[-1]["type"] == "done"

"""Sidecars travel with their photo: XMP (both namings), AAE, a same-stem RAW beside a JPEG/HEIC and a
Live Photo's MOV are found by name (any suffix case), moved and journaled with it, and restored by
undo under the same checks; link actions leave them beside the link.

The libraries here need no model: their catalogs are written directly (exact duplicates by sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_journal_safety import catalog, records, rewrite, snapshot

from dinoseek.indexer.library import Library
from dinoseek.retrieval.actions import apply, undo
from dinoseek.retrieval.cli import main
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.errors import JournalError
from dinoseek.retrieval.sidecars import RAW_SUFFIXES, one_listing_per_folder, raw_partner, sidecars_of


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode() * 3)


def names(paths) -> list[str]:
    return sorted(p.name for p in paths)


# ---- finding sidecars by name -----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".dng", ".CR2", ".cr3", ".NEF", ".Arw", ".raf", ".ORF", ".rw2", ".pef", ".SRW"])
def test_raw_partner_is_found_in_any_letter_case(tmp_path, suffix):
    touch(tmp_path, "IMG_1.JPG", f"IMG_1{suffix}", "IMG_2.dng")
    assert raw_partner(tmp_path / "IMG_1.JPG") == tmp_path / f"IMG_1{suffix}"
    assert suffix.lower() in RAW_SUFFIXES


def test_raw_partner_is_none_without_a_raw_or_for_a_png(tmp_path):
    touch(tmp_path, "IMG_1.jpg", "IMG_2.png", "IMG_2.CR2", "IMG_3.heic", "IMG_3.NEF")
    assert raw_partner(tmp_path / "IMG_1.jpg") is None
    assert raw_partner(tmp_path / "IMG_2.png") is None  # only a JPEG/HEIC is the rendered half of a pair
    assert raw_partner(tmp_path / "IMG_3.heic") == tmp_path / "IMG_3.NEF"


def test_xmp_sidecars_in_both_namings_and_any_case(tmp_path):
    touch(tmp_path, "IMG_1.JPG", "IMG_1.XMP", "IMG_1.JPG.xmp", "IMG_10.xmp", "IMG_1.txt")
    assert names(sidecars_of(tmp_path / "IMG_1.JPG")) == ["IMG_1.JPG.xmp", "IMG_1.XMP"]


def test_apple_aae_and_live_photo_mov_are_sidecars(tmp_path):
    touch(tmp_path, "IMG_1.HEIC", "IMG_1.AAE", "IMG_O1.AAE", "IMG_1.MOV")
    assert names(sidecars_of(tmp_path / "IMG_1.HEIC")) == ["IMG_1.AAE", "IMG_1.MOV", "IMG_O1.AAE"]


def test_raw_beside_a_jpeg_travels_with_its_own_xmp(tmp_path):
    touch(tmp_path, "IMG_1.jpg", "IMG_1.CR2", "IMG_1.CR2.xmp")
    assert names(sidecars_of(tmp_path / "IMG_1.jpg")) == ["IMG_1.CR2", "IMG_1.CR2.xmp"]


def test_only_one_raw_goes_when_two_are_beside_the_jpeg(tmp_path):
    touch(tmp_path, "IMG_1.jpg", "IMG_1.CR2", "IMG_1.DNG", "IMG_1.DNG.xmp")
    assert names(sidecars_of(tmp_path / "IMG_1.jpg")) == ["IMG_1.CR2"]


def test_indexed_images_are_never_sidecars(tmp_path):
    """A same-stem PNG and Apple's edited render IMG_E1.JPG are photos with rows of their own."""
    touch(tmp_path, "IMG_1.jpg", "IMG_E1.JPG", "IMG_1.PNG", "IMG_1.xmp")
    assert names(sidecars_of(tmp_path / "IMG_1.jpg")) == []  # the PNG shares the stem: IMG_1.xmp is shared
    touch(tmp_path / "other", "IMG_1.jpg", "IMG_E1.JPG", "IMG_1.xmp")
    assert names(sidecars_of(tmp_path / "other/IMG_1.jpg")) == ["IMG_1.xmp"]


def test_sidecars_shared_by_two_same_stem_photos_stay(tmp_path):
    """IMG_1.JPG + IMG_1.HEIC: the MOV, AAE and plain XMP belong to both, so neither takes them."""
    touch(tmp_path, "IMG_1.JPG", "IMG_1.HEIC", "IMG_1.MOV", "IMG_1.xmp", "IMG_1.AAE", "IMG_1.JPG.xmp")
    assert names(sidecars_of(tmp_path / "IMG_1.JPG")) == ["IMG_1.JPG.xmp"]
    assert names(sidecars_of(tmp_path / "IMG_1.HEIC")) == []


def test_symlink_or_folder_named_like_a_sidecar_is_not_one(tmp_path):
    touch(tmp_path, "IMG_1.jpg", "target.bin")
    os.symlink(tmp_path / "target.bin", tmp_path / "IMG_1.xmp")
    (tmp_path / "IMG_1.MOV").mkdir()
    assert sidecars_of(tmp_path / "IMG_1.jpg") == []


# ---- applying and undoing ---------------------------------------------------------------------------

SIDECARS = ["IMG_1.xmp", "IMG_1.JPG.xmp", "IMG_1.CR2", "IMG_1.MOV", "IMG_O1.AAE"]


@pytest.fixture
def root(tmp_path):
    """a/IMG_1.JPG (kept, protected) and its exact copy b/IMG_1.JPG with every kind of sidecar."""
    root = tmp_path / "photos"
    data = random.Random(1).randbytes(4096)
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "IMG_1.JPG").write_bytes(data)
    catalog(root)  # before the sidecars: they are not indexed images
    for name in SIDECARS:
        (root / "b" / name).write_bytes(random.Random(name).randbytes(777))
    (root / "a" / "IMG_1.xmp").write_bytes(b"the kept copy's own edits")
    # the kept copy's own RAW, the same bytes: only then may the duplicate's RAW go (and be purged)
    (root / "a" / "IMG_1.CR2").write_bytes((root / "b" / "IMG_1.CR2").read_bytes())
    return root


def applied(root, action="move"):
    with Library.open(root, write=True) as library:
        return apply(library, find_duplicates(library, exact_only=True, protected=("a",)), action)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_move_takes_sidecars_into_quarantine_and_undo_restores_them_byte_identical(root):
    before = snapshot(root / "b"), snapshot(root / "a")
    result = applied(root)
    quarantine = root / ".dinoseek/quarantine/b"
    assert sorted(os.listdir(root / "b")) == []
    assert sorted(os.listdir(quarantine)) == sorted(SIDECARS + ["IMG_1.JPG"])
    assert [src.name for src, _ in result.sidecars] == sorted(SIDECARS)
    with Library.open(root, write=True) as library:
        restored = undo(library)
    assert restored.restored == [str(root / "b/IMG_1.JPG")] and sorted(Path(p).name for p in restored.sidecars) == \
        sorted(SIDECARS)
    assert (snapshot(root / "b"), snapshot(root / "a")) == before  # same bytes, same inodes
    assert not quarantine.exists()


def test_sidecar_moves_are_journaled_with_their_sha256(root):
    result = applied(root)
    intents = [r for r in records(result.journal) if r["type"] == "intent"]
    photo = next(r for r in intents if "sidecar_of" not in r)
    sidecars = [r for r in intents if "sidecar_of" in r]
    assert len(sidecars) == len(SIDECARS)
    for record in sidecars:
        assert record["sidecar_of"] == photo["step"] and record["op"] == "move"
        assert record["sha256"] == hashlib.sha256(Path(record["dst"]).read_bytes()).hexdigest()
    done = {r["step"] for r in records(result.journal) if r["type"] == "done"}
    assert {r["step"] for r in intents} == done


@pytest.mark.parametrize("action", ["hardlink", "symlink"])
def test_link_actions_leave_sidecars_beside_the_link(root, action):
    before = snapshot(root / "b")
    result = applied(root, action)
    assert len(result.done) == 1 and result.sidecars == []
    assert sorted(os.listdir(root / "b")) == sorted(SIDECARS + ["IMG_1.JPG"])
    assert {k: v for k, v in snapshot(root / "b").items() if k != "IMG_1.JPG"} == \
        {k: v for k, v in before.items() if k != "IMG_1.JPG"}
    assert all("sidecar_of" not in r for r in records(result.journal))


def test_dry_run_lists_sidecars_that_would_move(root):
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "move")
    assert out.exit_code == 0, out.output
    listed = [line.strip() for line in out.output.splitlines() if "with sidecar" in line]
    assert listed == [f"with sidecar: {name}" for name in sorted(SIDECARS)]
    assert sorted(os.listdir(root / "b")) == sorted(SIDECARS + ["IMG_1.JPG"])  # nothing moved
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "symlink")
    assert "with sidecar" not in out.output  # links leave them where they are


def test_apply_and_undo_output_count_the_sidecars(root):
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "move", "--apply")
    assert out.exit_code == 0, out.output
    assert f"1 files moved (with {len(SIDECARS)} sidecars); journal" in out.output
    out = invoke("undo", root)
    assert out.exit_code == 0, out.output
    assert out.output == f"restored 1 files\nrestored {len(SIDECARS)} sidecars beside them\n"


def test_undo_leaves_a_changed_sidecar_copy_in_quarantine_and_reports_it(root):
    applied(root)
    changed = root / ".dinoseek/quarantine/b/IMG_1.xmp"
    changed.write_bytes(b"edited in the quarantine")
    out = invoke("undo", root)
    assert out.exit_code == 1
    assert f"its quarantined copy {changed} changed since the apply" in out.output
    assert changed.read_bytes() == b"edited in the quarantine" and not (root / "b/IMG_1.xmp").exists()
    assert (root / "b/IMG_1.JPG").exists() and (root / "b/IMG_1.CR2").exists()  # the rest came back


def test_undo_never_overwrites_a_file_now_at_a_sidecars_old_name(root):
    applied(root)
    (root / "b/IMG_1.xmp").write_bytes(b"written since the apply")
    out = invoke("undo", root)
    assert out.exit_code == 1
    assert (root / "b/IMG_1.xmp").read_bytes() == b"written since the apply"
    assert (root / ".dinoseek/quarantine/b/IMG_1.xmp").exists()


def test_forged_sidecar_step_naming_another_file_is_refused_and_changes_nothing(root):
    result = applied(root)
    (root / "b/notes.txt").write_bytes(b"not a sidecar")
    recs = records(result.journal)
    for record in recs:
        if record.get("sidecar_of") and record["src"].endswith("IMG_1.xmp"):
            record["src"] = str(root / "b/notes.txt")
    rewrite(result.journal, recs)
    before = snapshot(root)
    with Library.open(root, write=True) as library, pytest.raises(JournalError, match="is not a sidecar of"):
        undo(library)
    assert snapshot(root) == before


def test_sidecar_step_pointing_at_no_photo_step_is_refused(root):
    result = applied(root)
    recs = records(result.journal)
    for record in recs:
        if record.get("sidecar_of"):
            record["sidecar_of"] = 99
    rewrite(result.journal, recs)
    with Library.open(root, write=True) as library, pytest.raises(JournalError, match="names no earlier photo step"):
        undo(library)


def test_sidecar_step_in_a_link_journal_is_refused(root):
    result = applied(root, "symlink")
    recs = records(result.journal)
    photo = next(r for r in recs if r["type"] == "intent")
    forged = dict(photo, step=photo["step"] + 1, src=str(root / "b/IMG_1.xmp"), dst=str(Path(photo["dst"]).parent /
                  "IMG_1.xmp"), sidecar_of=photo["step"])
    rewrite(result.journal, recs + [forged])
    with Library.open(root, write=True) as library, pytest.raises(JournalError, match="a sidecar step in a symlink"):
        undo(library)


def test_sidecar_whose_quarantined_copy_is_gone_can_be_accepted_as_missing(root):
    applied(root)
    (root / ".dinoseek/quarantine/b/IMG_1.MOV").unlink()
    assert invoke("undo", root).exit_code == 1
    out = invoke("undo", root, "--accept-missing")
    assert out.exit_code == 0, out.output
    assert "accepted as lost" in out.output and (root / "b/IMG_1.CR2").exists()


def test_journal_lists_photos_not_sidecars(root):
    result = applied(root)
    out = invoke("undo", root, "--list")
    assert out.exit_code == 0
    assert f"move          1 files  {result.journal}" in out.output
    assert json.loads(result.journal.read_text().splitlines()[0])["type"] == "header"


# ---- a RAW is never set aside as the only copy (review P0) ------------------------------------------

@pytest.fixture
def pair(tmp_path):
    """a/p0.jpg (kept, protected) and its exact copy b/p0-copy.jpg, which alone has a RAW beside it."""
    from test_journal_safety import make_photos

    root = tmp_path / "photos"
    make_photos(root, n=1)
    catalog(root)
    (root / "b/p0-copy.CR2").write_bytes(random.Random("raw").randbytes(5000))
    return root


def test_a_duplicate_holding_the_only_raw_is_left_in_place_and_survives_purge(pair):
    raw = pair / "b/p0-copy.CR2"
    why = "holds the only RAW (p0-copy.CR2); the kept copy has none"
    out = invoke("dedup", pair, "--exact", "--protect", "a", "--action", "move")
    assert out.exit_code == 0, out.output
    assert f"    left in place: b/p0-copy.jpg — {why}" in out.output.splitlines()
    assert "with sidecar" not in out.output and "0 files to act on" in out.output
    plan = json.loads(invoke("dedup", pair, "--exact", "--protect", "a", "--action", "move", "--json").output)
    (member,) = [m for m in plan["groups"][0]["members"] if m["path"] == "b/p0-copy.jpg"]
    assert member["keep"] is True and member["reason"] == why
    out = invoke("dedup", pair, "--exact", "--protect", "a", "--action", "move", "--apply", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["applied"]["skipped"] == [{"path": "b/p0-copy.jpg", "reason": why}]
    assert invoke("purge", pair, "--apply").exit_code == 0
    assert raw.exists() and (pair / "b/p0-copy.jpg").exists()  # the negative is still beside its JPEG


def test_apply_itself_leaves_a_duplicate_whose_raw_differs_from_the_kept_copys(pair):
    """Called from Python with the groups as found (no plan step): apply checks the RAWs itself."""
    (pair / "a/p0.CR2").write_bytes(b"another exposure")
    result = applied(pair)
    assert result.done == [] and result.journal is None
    why = "holds the only RAW (p0-copy.CR2); the kept copy's RAW (p0.CR2) has other bytes"
    assert result.skipped_files == [(pair / "b/p0-copy.jpg", why)]
    assert sorted(os.listdir(pair / "b")) == ["p0-copy.CR2", "p0-copy.jpg"]


def test_a_raw_identical_to_the_kept_copys_raw_moves_with_its_duplicate_and_undo_restores_it(pair):
    raw = pair / "b/p0-copy.CR2"
    (pair / "a/p0.CR2").write_bytes(raw.read_bytes())
    before = snapshot(pair / "b")
    result = applied(pair)
    assert [src for src, _ in result.sidecars] == [raw] and not raw.exists()
    assert (pair / ".dinoseek/quarantine/b/p0-copy.CR2").exists()
    with Library.open(pair, write=True) as library:
        undo(library)
    assert snapshot(pair / "b") == before


# ---- a sidecar takes its photo's free name in the quarantine ------------------------------------------

def test_sidecars_take_the_free_name_their_photo_gets_in_the_quarantine_and_undo_restores_their_names(root):
    taken = root / ".dinoseek/quarantine/b"
    taken.mkdir(parents=True)
    (taken / "IMG_1.JPG").write_bytes(b"another journal's photo")
    before = snapshot(root / "b")
    result = applied(root)
    assert result.done[0].dst == taken / "IMG_1~1.JPG"
    assert sorted(dst.name for _, dst in result.sidecars) == sorted(
        ["IMG_1~1.xmp", "IMG_1~1.JPG.xmp", "IMG_1~1.CR2", "IMG_1~1.MOV", "IMG_O1~1.AAE"])
    assert sorted(os.listdir(taken)) == sorted(["IMG_1.JPG", "IMG_1~1.JPG", "IMG_1~1.xmp", "IMG_1~1.JPG.xmp",
                                                "IMG_1~1.CR2", "IMG_1~1.MOV", "IMG_O1~1.AAE"])
    with Library.open(root, write=True) as library:
        undo(library)
    assert snapshot(root / "b") == before
    assert os.listdir(taken) == ["IMG_1.JPG"]


def test_a_photo_whose_sidecars_name_is_taken_in_the_quarantine_moves_to_a_stem_free_for_both(root):
    taken = root / ".dinoseek/quarantine/b"
    taken.mkdir(parents=True)
    (taken / "IMG_1.xmp").write_bytes(b"another journal's sidecar")
    result = applied(root)
    assert result.done[0].dst == taken / "IMG_1~1.JPG"
    assert (taken / "IMG_1~1.xmp").exists() and (taken / "IMG_1.xmp").read_bytes() == b"another journal's sidecar"


# ---- one listing per folder ----------------------------------------------------------------------------

def counting_scandir(monkeypatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    real = os.scandir

    def scandir(path="."):
        calls[os.fsdecode(path)] = calls.get(os.fsdecode(path), 0) + 1
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return calls


def test_sidecar_lookups_list_a_folder_once_for_all_its_photos(tmp_path, monkeypatch):
    photos = [f"IMG_{i}.JPG" for i in range(300)]
    touch(tmp_path, *photos, *[f"IMG_{i}.xmp" for i in range(300)], "IMG_7.CR2", *[f"other_{i}.txt" for i in range(300)])
    calls = counting_scandir(monkeypatch)
    with one_listing_per_folder():
        for name in photos:
            sidecars_of(tmp_path / name)
            raw_partner(tmp_path / name)
        assert names(sidecars_of(tmp_path / "IMG_7.JPG")) == ["IMG_7.CR2", "IMG_7.xmp"]
        assert raw_partner(tmp_path / "IMG_7.JPG") == tmp_path / "IMG_7.CR2"
    assert calls == {str(tmp_path): 1}
    sidecars_of(tmp_path / "IMG_1.JPG")  # outside a command: a listing of its own, never a stale one
    assert calls == {str(tmp_path): 2}


def test_dedup_dry_run_and_apply_list_the_duplicates_folder_a_bounded_number_of_times(tmp_path, monkeypatch):
    from test_journal_safety import make_photos

    root = tmp_path / "photos"
    make_photos(root, n=60, size=64)
    catalog(root)
    for i in range(60):
        (root / f"b/p{i}-copy.xmp").write_bytes(b"edits %d" % i)
    calls = counting_scandir(monkeypatch)
    out = invoke("dedup", root, "--exact", "--protect", "a", "--action", "move", "--apply")
    assert out.exit_code == 0, out.output
    assert "60 files moved (with 60 sidecars)" in out.output
    # One listing by the shared FolderIndex (keep rules, plan, summary, apply) and, until dedup.py's
    # _RawFolders uses it too, one by that pre-scan: never one per duplicate.
    assert calls[str(root / "b")] <= 2


# ---- smaller things --------------------------------------------------------------------------------------

def test_indexed_image_suffixes_are_the_scanners_own():
    from dinoseek.indexer.scan import IMAGE_EXTENSIONS
    from dinoseek.retrieval.sidecars import INDEXED_IMAGE_SUFFIXES

    assert INDEXED_IMAGE_SUFFIXES == {os.fsdecode(e) for e in IMAGE_EXTENSIONS}


def test_report_dry_run_lists_the_sidecars_a_move_would_take(root):
    out = invoke("dedup", root, "--exact", "--protect", "a")
    assert out.exit_code == 0, out.output
    listed = [line.strip() for line in out.output.splitlines() if "with sidecar" in line]
    assert listed == [f"with sidecar: {name}" for name in sorted(SIDECARS)]
    assert f"and {len(SIDECARS)} sidecar files" in out.output  # the summary counts the same ones

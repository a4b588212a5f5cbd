"""State stays consistent after normal use: `verify` passes after every action, after an index run
or `verify --repair` between apply and undo; undo leaves no empty quarantine folders; symlink
actions leave relative links that undo still recognises."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos, tree_hashes

from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main

ACTIONS = ["move", "hardlink", "symlink"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_folder):
    """One indexed library, copied for each test (indexing is the slow part)."""
    root = tmp_path_factory.mktemp("indexed") / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


@pytest.fixture
def root(indexed, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(indexed, root, symlinks=True)
    return root


def apply(root, action):
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", action, "--apply", "--protect", "b")
    assert result.exit_code == 0, result.output
    assert not (root / "a/p0.jpg").is_file() or os.path.islink(root / "a/p0.jpg") or action == "hardlink"
    return result


def assert_verify_ok(root):
    result = invoke("verify", root)
    assert result.exit_code == 0, result.output
    assert "ok: catalog and indexes agree" in result.output


def index(root, tiny_folder):
    index_with_cli(root, tiny_folder)


def undo(root):
    result = invoke("undo", root)
    assert result.exit_code == 0, result.output
    assert "restored 3 files" in result.output


def statuses(root):
    with Library.open(root) as library:
        return {os.fsdecode(path): row.status for path, row in library.catalog.file_states().items()}


def quarantine_leftovers(root):
    quarantine = root / ".dinoseek" / "quarantine"
    return sorted(os.path.relpath(folder, quarantine) for folder, _, _ in os.walk(quarantine)
                  if os.path.realpath(folder) != os.path.realpath(quarantine)) if quarantine.exists() else []


@pytest.mark.parametrize("action", ACTIONS)
def test_verify_passes_after_each_action_and_its_undo(root, action):
    before = tree_hashes(root)
    apply(root, action)
    assert_verify_ok(root)
    undo(root)
    assert tree_hashes(root) == before
    assert_verify_ok(root)
    assert quarantine_leftovers(root) == []  # undo removed the folders it emptied


@pytest.mark.parametrize("action", ACTIONS)
def test_index_between_apply_and_undo(root, tiny_folder, action):
    before = tree_hashes(root)
    apply(root, action)
    index(root, tiny_folder)
    assert_verify_ok(root)
    rows = statuses(root)
    # the kept copies stay embedded; the replaced paths stay in the catalog, set aside, so undo restores them
    assert rows["b/p0-copy.jpg"] == EMBEDDED and rows["b/p1-small.jpg"] == EMBEDDED
    for replaced in ("a/p0.jpg", "a/p1.jpg", "a/p2.jpg"):
        assert rows.get(replaced) == QUARANTINED or (action == "move" and replaced not in rows), (replaced, rows)
    undo(root)
    assert tree_hashes(root) == before
    assert_verify_ok(root)
    index(root, tiny_folder)
    assert_verify_ok(root)
    assert set(statuses(root).values()) == {EMBEDDED}


@pytest.mark.parametrize("action", ACTIONS)
def test_repair_between_apply_and_undo(root, action):
    before = tree_hashes(root)
    apply(root, action)
    result = invoke("verify", root, "--repair")
    assert result.exit_code == 0, result.output
    undo(root)
    assert tree_hashes(root) == before
    assert_verify_ok(root)


def test_symlink_action_writes_relative_links_that_undo_recognises(root):
    before = tree_hashes(root)
    apply(root, "symlink")
    link = root / "a/p0.jpg"
    target = os.readlink(link)
    assert not os.path.isabs(target) and target == os.path.join("..", "b", "p0-copy.jpg")
    assert (root / "a" / target).resolve() == (root / "b/p0-copy.jpg").resolve()
    undo(root)
    assert tree_hashes(root) == before and not os.path.islink(link)


def test_undo_removes_only_the_quarantine_folders_it_emptied(root):
    quarantine = root / ".dinoseek" / "quarantine"
    (quarantine / "mine").mkdir(parents=True)  # a folder undo did not empty: left alone
    apply(root, "move")
    assert (quarantine / "a" / "p0.jpg").is_file()
    undo(root)
    assert quarantine_leftovers(root) == ["mine"]
    assert quarantine.is_dir()  # the quarantine itself stays


def test_undo_still_recognises_an_absolute_link_of_an_older_apply(root):
    before = tree_hashes(root)
    apply(root, "symlink")
    link = root / "a/p0.jpg"
    keeper = (link.parent / os.readlink(link)).resolve()
    link.unlink()
    link.symlink_to(keeper)  # as applies before relative links wrote it
    undo(root)
    assert tree_hashes(root) == before and not os.path.islink(link)


def test_scan_reports_only_set_aside_symlinks():
    from dinoseek.indexer.scan import ScanProblem, scan

    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "keep.jpg").write_bytes(b"x")
        os.symlink("keep.jpg", Path(folder) / "dup.jpg")
        os.symlink("keep.jpg", Path(folder) / "other.jpg")
        items = [i for i in scan(folder, set_aside=lambda rel: rel == b"dup.jpg") if isinstance(i, ScanProblem)]
        assert [(i.rel, i.status) for i in items] == [(b"dup.jpg", "linked")]  # other.jpg: ignored as before

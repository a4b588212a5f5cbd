"""State stays consistent after normal use: `verify` passes after every action, after an index run
or `verify --repair` between apply and undo; undo leaves no empty quarantine folders; symlink
actions leave relative links that undo still recognises."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import url_args
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos, tree_hashes

from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main

ACTIONS = ["move", "hardlink", "symlink"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_folder, catalog_url_module):
    """One indexed library per backend, copied for each test (indexing is the slow part)."""
    root = tmp_path_factory.mktemp("indexed") / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder, catalog_url_module)
    return root, catalog_url_module


@pytest.fixture
def url(indexed, request) -> str | None:
    """This test's copy of the module's catalog: None (the SQLite file travels with the folder), or a
    PostgreSQL database copied from the module's."""
    source = indexed[1]
    if source is None:
        return None
    server = request.getfixturevalue("postgres_server")
    copy = server.copy_database(source)
    request.addfinalizer(lambda: server.drop_database(copy))
    return copy


@pytest.fixture
def root(indexed, tmp_path):
    """This test's copy of the library (at another path: the same library id, another mount path)."""
    root = tmp_path / "photos"
    shutil.copytree(indexed[0], root, symlinks=True)
    return root


def apply(root, url, action):
    result = invoke("dedup", root, *url_args(url), "--threshold", THRESHOLD, "--action", action, "--apply",
                    "--protect", "b")
    assert result.exit_code == 0, result.output
    assert not (root / "a/p0.jpg").is_file() or os.path.islink(root / "a/p0.jpg") or action == "hardlink"
    return result


def assert_verify_ok(root, url):
    result = invoke("verify", root, *url_args(url))
    assert result.exit_code == 0, result.output
    assert "ok: catalog and indexes agree" in result.output


def index(root, url, tiny_folder):
    index_with_cli(root, tiny_folder, url)


def undo(root, url):
    result = invoke("undo", root, *url_args(url))
    assert result.exit_code == 0, result.output
    assert "restored 3 files" in result.output


def statuses(root, url):
    with Library.open(root, url=url) as library:
        return {os.fsdecode(path): row.status for path, row in library.catalog.file_states().items()}


def quarantine_leftovers(root):
    quarantine = root / ".dinoseek" / "quarantine"
    return sorted(os.path.relpath(folder, quarantine) for folder, _, _ in os.walk(quarantine)
                  if os.path.realpath(folder) != os.path.realpath(quarantine)) if quarantine.exists() else []


@pytest.mark.parametrize("action", ACTIONS)
def test_verify_passes_after_each_action_and_its_undo(root, url, action):
    before = tree_hashes(root)
    apply(root, url, action)
    assert_verify_ok(root, url)
    undo(root, url)
    assert tree_hashes(root) == before
    assert_verify_ok(root, url)
    assert quarantine_leftovers(root) == []  # undo removed the folders it emptied


@pytest.mark.parametrize("action", ACTIONS)
def test_index_between_apply_and_undo(root, url, tiny_folder, action):
    before = tree_hashes(root)
    apply(root, url, action)
    index(root, url, tiny_folder)
    assert_verify_ok(root, url)
    rows = statuses(root, url)
    # the kept copies stay embedded; the replaced paths stay in the catalog, set aside, so undo restores them
    assert rows["b/p0-copy.jpg"] == EMBEDDED and rows["b/p1-small.jpg"] == EMBEDDED
    for replaced in ("a/p0.jpg", "a/p1.jpg", "a/p2.jpg"):
        assert rows.get(replaced) == QUARANTINED or (action == "move" and replaced not in rows), (replaced, rows)
    undo(root, url)
    assert tree_hashes(root) == before
    assert_verify_ok(root, url)
    index(root, url, tiny_folder)
    assert_verify_ok(root, url)
    assert set(statuses(root, url).values()) == {EMBEDDED}


@pytest.mark.parametrize("action", ACTIONS)
def test_repair_between_apply_and_undo(root, url, action):
    before = tree_hashes(root)
    apply(root, url, action)
    result = invoke("verify", root, *url_args(url), "--repair")
    assert result.exit_code == 0, result.output
    undo(root, url)
    assert tree_hashes(root) == before
    assert_verify_ok(root, url)


def test_symlink_action_writes_relative_links_that_undo_recognises(root, url):
    before = tree_hashes(root)
    apply(root, url, "symlink")
    link = root / "a/p0.jpg"
    target = os.readlink(link)
    assert not os.path.isabs(target) and target == os.path.join("..", "b", "p0-copy.jpg")
    assert (root / "a" / target).resolve() == (root / "b/p0-copy.jpg").resolve()
    undo(root, url)
    assert tree_hashes(root) == before and not os.path.islink(link)


def test_undo_removes_only_the_quarantine_folders_it_emptied(root, url):
    quarantine = root / ".dinoseek" / "quarantine"
    (quarantine / "mine").mkdir(parents=True)  # a folder undo did not empty: left alone
    apply(root, url, "move")
    assert (quarantine / "a" / "p0.jpg").is_file()
    undo(root, url)
    assert quarantine_leftovers(root) == ["mine"]
    assert quarantine.is_dir()  # the quarantine itself stays


def test_undo_still_recognises_an_absolute_link_of_an_older_apply(root, url):
    before = tree_hashes(root)
    apply(root, url, "symlink")
    link = root / "a/p0.jpg"
    keeper = (link.parent / os.readlink(link)).resolve()
    link.unlink()
    link.symlink_to(keeper)  # as applies before relative links wrote it
    undo(root, url)
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

""""Not a duplicate" marks: kept by content in the catalog, refused for identical bytes, applied to
dedup's candidate pairs, and set from the terminal with `dinoseek mark-distinct`."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from click.testing import CliRunner
from sqlalchemy import event
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.catalog_file import url_engine
from dinoseek.indexer.catalog_gateway import Catalog
from dinoseek.indexer.errors import InvalidArgumentError as CatalogArgumentError
from dinoseek.indexer.errors import LibraryLockedError
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.errors import InvalidArgumentError
from dinoseek.retrieval.marks import drop_marked, ids_to_sha_pairs, paths_to_sha_pairs


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


A, B, C, D = sorted(sha(n) for n in "abcd")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def rows_library(tmp_path):
    """A library without vectors whose catalog holds photos 1..5: 1 and 2 are byte copies (A), then B, C, D."""
    with Library.open(tmp_path, write=True, create=True) as library, library.catalog.session() as s, s.begin():
        for row_id, (name, digest) in enumerate([("a.jpg", A), ("a-copy.jpg", A), ("b.jpg", B), ("c.jpg", C),
                                                 ("d.jpg", D)], 1):
            s.add(ImageRow(id=row_id, path=name.encode(), path_text=name, folder=".", size=1, mtime_ns=0,
                           status=EMBEDDED, sha256=digest))
    with Library.open(tmp_path) as library:  # a reader, as the review page and mark-distinct open it
        yield library


@pytest.fixture
def indexed(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


def test_marks_are_stored_once_per_pair_in_order_and_counted(rows_library):
    catalog = rows_library.catalog
    assert catalog.mark_not_duplicate([(B, A), (C, A)]) == 2  # any order in, sorted pairs stored
    assert catalog.mark_not_duplicate([(A, B), (B.upper(), D)]) == 1  # (A, B) was there already
    assert catalog.not_duplicate_pairs() == {(A, B), (A, C), (B, D)}
    assert catalog.marked_among({A, B, D}) == {(A, B), (B, D)}  # only marks with both contents given
    assert catalog.unmark_not_duplicate([(B, A), (C, D)]) == 1  # (C, D) was never marked
    assert catalog.not_duplicate_pairs() == {(A, C), (B, D)}


def test_marking_identical_contents_is_refused(rows_library):
    with pytest.raises(CatalogArgumentError, match="byte-identical copies are always duplicates"):
        rows_library.catalog.mark_not_duplicate([(A, B), (A, A)])
    with pytest.raises(InvalidArgumentError, match="^a-copy.jpg and a.jpg have identical bytes"):
        ids_to_sha_pairs(rows_library, [1, 2, 3])
    assert rows_library.catalog.not_duplicate_pairs() == set()  # refused whole: not even (A, B)


@pytest.mark.parametrize("pairs,message", [
    ([(A, "not-a-hash")], "expected a sha256 as 64 hex digits, got 'not-a-hash'"),
    ([(A, B, C)], "expected pairs of two sha256 digests"),
    ([A], "expected pairs of two sha256 digests"),
])
def test_malformed_pairs_are_refused_in_one_line(rows_library, pairs, message):
    with pytest.raises(CatalogArgumentError, match=message) as caught:
        rows_library.catalog.mark_not_duplicate(pairs)
    assert "\n" not in str(caught.value)


def test_ids_to_sha_pairs_names_every_pair_of_contents_among_the_ids(rows_library):
    assert ids_to_sha_pairs(rows_library, [3, 4, 5, 3]) == [(B, C), (B, D), (C, D)]
    # Removing marks of a whole group that holds byte copies: the copies' own pair is simply not one.
    assert ids_to_sha_pairs(rows_library, [1, 2, 3], refuse_identical=False) == [(A, B)]
    with pytest.raises(InvalidArgumentError, match="no embedded photo with id 9"):
        ids_to_sha_pairs(rows_library, [3, 9])
    with pytest.raises(InvalidArgumentError, match="at least two different photos, got 1"):
        ids_to_sha_pairs(rows_library, [3, 3])
    with pytest.raises(InvalidArgumentError, match="photo ids are integers, got '3'"):
        ids_to_sha_pairs(rows_library, ["3", 4])


def test_drop_marked_removes_exactly_the_marked_pairs(rows_library):
    rows_library.catalog.mark_not_duplicate([(A, B), (C, D)])
    candidates = [(1, 3, 0.99), (1, 2, 1.0), (2, 3, 0.98), (3, 4, 0.97), (4, 5, 0.96), (1, 4, 0.95), (5, 99, 0.9)]
    kept = list(drop_marked(iter(candidates), rows_library, batch=3))  # batches cut across the marked pairs
    # (1,3) and (2,3): A~B, through either byte copy of A; (4,5): C~D. The byte copies (1,2), unmarked
    # pairs and a pair whose row is gone (99) pass, in their order.
    assert kept == [(1, 2, 1.0), (3, 4, 0.97), (1, 4, 0.95), (5, 99, 0.9)]


def test_drop_marked_without_any_mark_reads_no_rows(rows_library, monkeypatch):
    monkeypatch.setattr(Catalog, "contents_by_id", lambda *a: pytest.fail("looked up rows with no mark at all"))
    candidates = [(1, 3, 0.99), (3, 4, 0.97)]
    assert list(drop_marked(candidates, rows_library)) == candidates


def test_marks_survive_a_rename_followed_by_index(indexed, tiny_folder):
    with Library.open(indexed) as library:
        pairs = paths_to_sha_pairs(library, ["a/p1.jpg", indexed / "b/p1-small.jpg"])
        assert library.catalog.mark_not_duplicate(pairs) == 1
    (indexed / "b/p1-small.jpg").rename(indexed / "a/renamed.jpg")
    index_with_cli(indexed, tiny_folder)
    with Library.open(indexed) as library:
        assert paths_to_sha_pairs(library, ["a/p1.jpg", "a/renamed.jpg"]) == pairs  # the same contents
        assert library.catalog.not_duplicate_pairs() == set(pairs)
        ids = {r.path_text: r.id for r in library.catalog.members(library.catalog.embedded_ids().tolist())}
        candidate = (ids["a/p1.jpg"], ids["a/renamed.jpg"], 0.99)
        assert list(drop_marked([candidate], library)) == []


def test_find_duplicates_no_longer_groups_marked_pairs(indexed):
    def groups(library):
        return sorted(sorted(m.path for m in g.members) for g in find_duplicates(library, threshold=THRESHOLD))

    with Library.open(indexed) as library:
        assert ["a/p1.jpg", "b/p1-small.jpg"] in groups(library)
        library.catalog.mark_not_duplicate(paths_to_sha_pairs(library, ["a/p1.jpg", "b/p1-small.jpg"]))
        assert groups(library) == [["a/p0.jpg", "b/p0-copy.jpg"], ["a/p2.jpg", "b/p2-reencoded.jpg"]]


def test_mark_distinct_marks_and_unmarks_and_says_what_it_did(indexed, monkeypatch):
    result = invoke("mark-distinct", indexed / "a/p1.jpg", "b/p1-small.jpg", "b/p2-reencoded.jpg", "--root", indexed)
    assert result.exit_code == 0, result.output
    assert result.output == "3 pairs marked not duplicates (3 new, 0 already marked); dedup no longer groups them\n"
    monkeypatch.chdir(indexed / "a")  # no --root: the library found from here upwards, paths from here
    result = invoke("mark-distinct", "p1.jpg", "../b/p1-small.jpg")
    assert result.output == "1 pairs marked not duplicates (0 new, 1 already marked); dedup no longer groups them\n"
    with Library.open(indexed) as library:
        assert len(library.catalog.not_duplicate_pairs()) == 3
    result = invoke("mark-distinct", "p1.jpg", "../b/p1-small.jpg", "p3.jpg", "--remove")
    assert result.exit_code == 0, result.output
    assert result.output == "1 of 3 pairs unmarked (2 were not marked); dedup may group them again\n"
    with Library.open(indexed) as library:
        assert library.catalog.not_duplicate_pairs() == set(paths_to_sha_pairs(
            library, ["a/p1.jpg", "b/p2-reencoded.jpg", "b/p1-small.jpg"])) - set(paths_to_sha_pairs(
                library, ["a/p1.jpg", "b/p1-small.jpg"]))


@pytest.mark.parametrize("paths,message", [
    (["a/p0.jpg", "b/p0-copy.jpg"], ("Error: a/p0.jpg and b/p0-copy.jpg have identical bytes: byte-identical copies "
                                     "are always duplicates and cannot be marked as not duplicates\n")),
    (["a/p1.jpg"], "Error: marking needs at least two different photos, got 1\n"),
    (["a/p1.jpg", "a/nope.jpg"], "Error: a/nope.jpg is not an indexed photo of {root}\n"),
])
def test_mark_distinct_refuses_in_one_line(indexed, paths, message):
    result = invoke("mark-distinct", *paths, "--root", indexed)
    assert result.exit_code == 1 and result.output == message.format(root=indexed)
    with Library.open(indexed) as library:
        assert library.catalog.not_duplicate_pairs() == set()


def test_marking_works_while_another_process_holds_the_writer_lock(rows_library):
    with Library.open(rows_library.root, write=True):  # an index run holds the library's lock
        assert rows_library.catalog.mark_not_duplicate([(B, C)]) == 1
        assert rows_library.catalog.unmark_not_duplicate([(B, C)]) == 1


def test_marking_a_catalog_kept_busy_is_refused_in_one_line(rows_library):
    engine = url_engine(f"sqlite:///{rows_library.folder / 'catalog.sqlite'}")
    # The library waits 30 s for SQLite's one writer; this test does not.
    event.listen(engine, "connect", lambda connection, _: connection.execute("PRAGMA busy_timeout=100"))
    catalog = Catalog(engine, rows_library.folder / "catalog.sqlite")
    writer = sqlite3.connect(rows_library.folder / "catalog.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # what an index batch holds while it writes
    try:
        with pytest.raises(LibraryLockedError, match="^the catalog is busy: .*; try the marks again in a moment$"):
            catalog.mark_not_duplicate([(B, C)])
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        engine.dispose()
    assert rows_library.catalog.not_duplicate_pairs() == set()


def test_mark_distinct_help_says_what_it_does_with_an_example():
    result = invoke("mark-distinct", "--help")
    assert result.exit_code == 0
    assert "dinoseek mark-distinct " in result.output.split("Example:")[1]
    assert "--remove" in result.output and "writer lock" in result.output

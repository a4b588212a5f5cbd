"""The catalog gateway against the rows it was given: chunked id lists, vectors by id and in blocks,
status changes confined to their path, and an indexing batch that commits whole or not at all.
Every test runs on SQLite and on a real PostgreSQL server (tests/pg.py)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, NoResultFound

import dinoseek.indexer.catalog_gateway as gateway
from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED, ImageRow, RunRow
from dinoseek.indexer.catalog_gateway import Filters, chunks
from dinoseek.indexer.errors import LibraryError
from dinoseek.indexer.library import Library

DIM = 4
MANIFEST = {"arch": {"test": True}, "weights_sha256": "0" * 64, "preprocess": {"mode": "crop", "size": 224},
            "precision": "fp32", "dim": DIM}


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """(n, DIM) unit vectors that float16 stores exactly enough to compare after a round trip."""
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16).astype(np.float32)


def row(i: int, *, status=EMBEDDED, folder="a", cls=None, patch=None, **values) -> dict:
    path = f"{folder}/{i}.jpg"
    return {"path": path.encode(), "path_text": path, "folder": folder, "size": 1000 + i, "mtime_ns": i,
            "sha256": f"{i:064x}", "status": status, "cls": cls, "patch": patch, **values}


@pytest.fixture
def library(tmp_path, catalog_url):
    """A new library on each backend: its own SQLite file, or a fresh PostgreSQL database."""
    with Library.open(tmp_path, url=catalog_url, write=True, create=True) as library:
        library.bind_model(MANIFEST)
        yield library


@pytest.fixture
def filled(library):
    """20 embedded rows (ids 1..20) with known vectors, plus a failed row and one with no vectors."""
    cls, patch = unit_vectors(20, 1), unit_vectors(20, 2)
    rows = [row(i, folder="a" if i < 10 else "b/c", cls=cls[i].astype(np.float16).tobytes(),
                patch=patch[i].astype(np.float16).tobytes()) for i in range(20)]
    rows += [row(20, status="unreadable"), row(21)]  # ids 21, 22: a failed row, an embedded one without vectors
    with library.catalog.session() as s, s.begin():
        s.add_all(ImageRow(**values) for values in rows)
    return library, cls, patch


def statement_sizes(library):
    """How many bound parameters each statement the catalog sends carries (recorded as they run)."""
    sizes = []
    event.listen(library.catalog.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, parameters, context, many: sizes.append(len(parameters or ())))
    return sizes


def test_chunks_cut_id_lists_at_the_one_chunk_size(monkeypatch):
    monkeypatch.setattr(gateway, "ID_CHUNK", 3)
    assert list(chunks(range(7))) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([])) == []
    assert list(chunks(iter([5, 6, 7]))) == [[5, 6, 7]]


def test_vectors_by_ids_across_chunks(filled, monkeypatch):
    library, cls, patch = filled
    monkeypatch.setattr(gateway, "ID_CHUNK", 3)
    sizes = statement_sizes(library)
    wanted = [17, 2, 9, 3, 14, 5, 11, 21, 22, 999]  # unordered; 21 failed, 22 has no vectors, 999 is no row
    ids, vectors = library.catalog.vectors("cls", wanted)
    assert ids.tolist() == [2, 3, 5, 9, 11, 14, 17]
    np.testing.assert_array_equal(vectors, cls[ids - 1])
    ids, (c, p) = library.catalog.vector_sets(("cls", "patch"), np.array(wanted))
    np.testing.assert_array_equal(c, cls[ids - 1])
    np.testing.assert_array_equal(p, patch[ids - 1])
    assert max(sizes) <= 3 + 4  # a chunk of ids plus the searchable condition's few constants
    all_ids, all_vectors = library.catalog.vectors("patch")
    assert all_ids.tolist() == list(range(1, 21))  # no failed row, no row without vectors
    np.testing.assert_array_equal(all_vectors, patch)
    assert sorted(library.catalog.embedded_ids().tolist()) == list(range(1, 21))


def test_vector_blocks_page_through_every_searchable_row(filled):
    library, cls, _ = filled
    blocks = list(library.catalog.vector_blocks("cls", 6))
    assert [len(ids) for ids, _ in blocks] == [6, 6, 6, 2]
    ids = np.concatenate([ids for ids, _ in blocks])
    assert ids.tolist() == list(range(1, 21))
    np.testing.assert_array_equal(np.concatenate([v for _, v in blocks]), cls)


def test_row_lookups_are_chunked_and_skip_rows_not_embedded(filled, monkeypatch):
    library, cls, _ = filled
    monkeypatch.setattr(gateway, "ID_CHUNK", 4)
    sizes = statement_sizes(library)
    wanted = list(range(1, 23))
    assert sorted(r.id for r in library.catalog.hit_rows(wanted)) == [*range(1, 21), 22]  # 21 failed
    assert sorted(r.id for r in library.catalog.members(wanted)) == list(range(1, 21))  # members must be searchable
    paths = library.catalog.embedded_paths(reversed(wanted))  # rerank's lookup: once unbounded
    assert list(paths) == [*range(1, 21), 22] and paths[1] == b"a/0.jpg"
    assert max(sizes) <= 4 + 4
    found = library.catalog.row_vectors(path=b"a/3.jpg")
    assert found[0] == 4
    np.testing.assert_array_equal(found[1]["cls"], cls[3])
    assert library.catalog.row_vectors(row_id=999) is None
    with pytest.raises(LibraryError, match="no usable vectors"):  # embedded, but its vectors are gone
        library.catalog.row_vectors(row_id=22)


def test_filtered_ids_and_exact_hash_groups(filled):
    library, _, _ = filled
    assert sorted(library.catalog.filtered_ids(Filters(folder="b")).tolist()) == list(range(11, 21))
    assert sorted(library.catalog.filtered_ids(Filters(folder="b/c/")).tolist()) == list(range(11, 21))
    assert library.catalog.filtered_ids(Filters(folder="b/", camera="EOS")).tolist() == []
    assert sorted(library.catalog.filtered_ids(Filters(min_bytes=1015)).tolist()) == list(range(16, 21)) + [22]
    with library.catalog.session() as s, s.begin():
        s.add(ImageRow(**row(30, sha256=f"{3:064x}")))
    assert library.catalog.exact_hash_groups() == [[4, 23]]


def test_unquarantine_touches_only_the_row_quarantined_at_that_path(filled):
    library, _, _ = filled
    catalog = library.catalog
    assert catalog.set_status(5, QUARANTINED, "dedup move") and catalog.set_status(6, QUARANTINED, "dedup move")
    assert not catalog.set_status(999, QUARANTINED, "gone")
    assert catalog.unquarantine(b"a/4.jpg") is True  # row 5
    assert catalog.unquarantine(b"a/0.jpg") is True  # embedded already: left as it is
    assert catalog.unquarantine(b"u/20.jpg") is False  # no row at that path
    assert catalog.unquarantine(b"a/20.jpg") is True  # a failed row there (id 21) is not made embedded
    with catalog.session() as s:
        rows = {r.id: (r.status, r.reason) for r in s.query(ImageRow)}
    assert rows[5] == (EMBEDDED, None)
    assert rows[6] == (QUARANTINED, "dedup move")  # another path: untouched
    assert rows[21] == ("unreadable", None)


def test_a_batch_commits_whole(filled):
    library, cls, patch = filled
    catalog = library.catalog
    catalog.set_status(8, QUARANTINED, "dedup move")
    new = row(40, cls=cls[0].astype(np.float16).tobytes(), patch=patch[0].astype(np.float16).tobytes())
    ids, vectors = catalog.write_batch(
        delete_ids=[1, 2],
        moves=[(b"a/2.jpg", {"path": b"z/2.jpg", "path_text": "z/2.jpg", "folder": "z"})],
        inserts=[new, row(41, status="truncated")],
        restores=[(b"a/7.jpg", {"status": EMBEDDED, "reason": None})])
    assert ids.tolist() == [23, 8]  # the new embedded row, then the restored one (the failed one has no vectors)
    np.testing.assert_array_equal(vectors["cls"], cls[[0, 7]])
    np.testing.assert_array_equal(vectors["patch"], patch[[0, 7]])
    with catalog.session() as s:
        rows = {r.id: r for r in s.query(ImageRow)}
    assert 1 not in rows and 2 not in rows
    assert rows[3].path == b"z/2.jpg" and rows[8].status == EMBEDDED and rows[24].status == "truncated"


def test_a_failing_batch_changes_nothing(filled):
    library, cls, _ = filled
    catalog = library.catalog
    with catalog.session() as s:
        before = {r.id: (r.path, r.status) for r in s.query(ImageRow)}
    with pytest.raises(NoResultFound):  # the last step fails: a restore of a row that is not there
        catalog.write_batch(delete_ids=[1, 2], moves=[(b"a/2.jpg", {"path": b"z/2.jpg"})],
                            inserts=[row(40, status="truncated")], restores=[(b"nowhere.jpg", {"status": EMBEDDED})])
    with catalog.session() as s:
        assert {r.id: (r.path, r.status) for r in s.query(ImageRow)} == before


def test_runs_and_index_file_records(library):
    catalog = library.catalog
    first, second = catalog.start_run(), catalog.start_run()
    catalog.finish_run(first, "finished", {"embedded": 3})
    catalog.close_interrupted_runs()  # what a writer does on open: the other one died
    with catalog.session() as s:
        runs = {r.id: (r.status, r.counts, r.finished_at is not None) for r in s.query(RunRow)}
    assert runs == {first: ("finished", {"embedded": 3}, True), second: ("interrupted", {}, False)}
    assert catalog.summary()[2].id == second
    catalog.record_index_file("cls", factory="Flat", requested="auto", nprobe=None, count=0, dim=DIM,
                              checksum="ab" * 32, trained_on=0)
    record = catalog.index_records()["cls"]
    assert (record.factory, record.auto, record.checksum) == ("Flat", 1, "ab" * 32)


def test_a_path_longer_than_a_btree_entry_stays_unique(library):
    """Paths of any length are stored and stay unique. PostgreSQL's btree refuses an entry over ~2.7 kB,
    so the unique index is on a hash of the path (revision 0007); inserts, moves and restores keep it."""
    long = "/".join(os.urandom(60).hex() for _ in range(30)).encode()  # 3.6 kB that no compression shrinks
    catalog = library.catalog
    catalog.write_batch(delete_ids=[], moves=[], inserts=[row(0, path=long, status="truncated")], restores=[])
    assert catalog.rows_at([long]) == {long: (f"{0:064x}", "truncated")}
    with pytest.raises(IntegrityError):
        catalog.write_batch(delete_ids=[], moves=[], inserts=[row(1, path=long, status="truncated")], restores=[])
    moved = long + b"/moved.jpg"  # a move writes the new path's hash: found there, no longer at the old one
    catalog.write_batch(delete_ids=[], moves=[(long, {"path": moved, "path_text": moved.decode()})], inserts=[],
                        restores=[])
    assert catalog.rows_at([long, moved]) == {moved: (f"{0:064x}", "truncated")}
    with pytest.raises(IntegrityError):  # the moved row's hash is unique too
        catalog.write_batch(delete_ids=[], moves=[], inserts=[row(2, path=moved)], restores=[])
    catalog.write_batch(delete_ids=[], moves=[], restores=[(moved, {"status": QUARANTINED})], inserts=[])
    assert catalog.unquarantine(moved) and catalog.rows_at([moved]) == {moved: (f"{0:064x}", EMBEDDED)}
    with catalog.session() as s:
        assert [(r.path, r.path_sha256) for r in s.query(ImageRow)] == [(moved, hashlib.sha256(moved).digest())]


def test_a_lookup_by_path_compares_the_path_not_only_its_hash(library, monkeypatch):
    """The hash finds the row; the path decides. A (simulated) sha256 collision never selects another row."""
    catalog = library.catalog
    catalog.write_batch(delete_ids=[], moves=[], inserts=[row(0, status=QUARANTINED)], restores=[])  # at a/0.jpg
    monkeypatch.setattr(gateway, "path_digest", lambda path: hashlib.sha256(b"a/0.jpg").digest())
    assert catalog.rows_at([b"a/0.jpg", b"other.jpg"]) == {b"a/0.jpg": (f"{0:064x}", QUARANTINED)}
    assert not catalog.unquarantine(b"other.jpg") and catalog.row_vectors(path=b"other.jpg") is None
    with pytest.raises(NoResultFound):
        catalog.write_batch(delete_ids=[], moves=[], inserts=[], restores=[(b"other.jpg", {"status": EMBEDDED})])
    assert catalog.rows_at([b"a/0.jpg"]) == {b"a/0.jpg": (f"{0:064x}", QUARANTINED)}  # untouched

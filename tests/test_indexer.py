"""Indexing a collection: every file accounted for, incremental runs, consistency and repair."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from collection import make_collection
from conftest import synthetic_photo

from sqlalchemy import update

from dinoseek.indexer.catalog import EMBEDDED, ImageRow, IndexFileRow
from dinoseek.indexer.errors import LibraryLockedError, ModelMismatchError, SweepRefusedError
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, run_index
from dinoseek.indexer.pipeline import _decode_task as _real_decode_task
from dinoseek.model import Encoder

LINKED_OR_HIDDEN = {".hidden/secret.jpg"}


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


def index(root, encoder, url=None, **options):
    options.setdefault("workers", 0)
    with Library.open(root, url=url, write=True, create=True) as library:
        return run_index(library, encoder, Options(**options))


def rows(root, url=None) -> dict[bytes, ImageRow]:
    with Library.open(root, url=url) as library, library.catalog.session() as s:
        return {r.path: r for r in s.query(ImageRow).all()}


def check_consistent(root, url=None):
    with Library.open(root, url=url) as library:
        assert library.verify() == []
        ids = library.catalog.embedded_ids()
        library.load_indexes()
        for kind in ("cls", "patch"):
            assert sorted(library.indexes[kind].ids()) == sorted(ids)


@pytest.fixture
def collection(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    return root, make_collection(root)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_file_embedded_or_recorded(collection, encoder, workers, catalog_url):
    root, expected = collection
    counts = index(root, encoder, url=catalog_url, workers=workers)
    catalog = rows(root, catalog_url)
    for rel, status in expected.items():
        row = catalog[os.fsencode(rel)]
        assert row.status == (EMBEDDED if status == "ok" else status), (rel, row.reason)
        if status != "ok":
            assert row.reason
    assert os.fsencode(".hidden/secret.jpg") not in catalog  # hidden folders skipped
    assert not any(p.startswith(b".dinoseek") for p in catalog)
    assert counts["embedded"] == sum(s == "ok" for s in expected.values())
    embedded = [r for r in catalog.values() if r.status == EMBEDDED]
    for row in embedded:
        cls = np.frombuffer(row.cls, np.float16).astype(np.float32)
        assert cls.shape == (128,) and abs(np.linalg.norm(cls) - 1) < 2e-3
    gif = catalog[b"anim/loop.gif"]
    assert gif.frames == 3 and gif.format == "GIF"
    rotated = catalog[b"camera/rotated6.jpg"]
    assert rotated.captured_at == "2021-07-04 12:30:00" and rotated.camera == "Canon EOS 5D"
    weird = os.fsencode(os.fsdecode(b"odd-\xff\xfe-name.jpg"))
    assert catalog[weird].path == b"odd-\xff\xfe-name.jpg"  # raw bytes round-trip
    assert catalog[weird].path_text == "odd-\\xff\\xfe-name.jpg"
    check_consistent(root, catalog_url)


def test_incremental_runs(collection, encoder, catalog_url):
    root, expected = collection
    index(root, encoder, url=catalog_url)
    before = rows(root, catalog_url)
    assert index(root, encoder, url=catalog_url)["embedded"] == 0  # nothing changed: nothing read

    beach = root / "holiday/beach.jpg"
    synthetic_photo(640, 480, seed=99).save(beach, quality=90)  # content changed
    os.utime(beach, ns=(before[b"holiday/beach.jpg"].mtime_ns + 10**9,) * 2)
    counts = index(root, encoder, url=catalog_url)
    assert counts["embedded"] == 1 and counts["moved"] == 0
    after = rows(root, catalog_url)
    assert after[b"holiday/beach.jpg"].id != before[b"holiday/beach.jpg"].id  # fresh id, fresh vectors

    os.rename(root / "holiday/dune.webp", root / "holiday/dune-renamed.webp")
    counts = index(root, encoder, url=catalog_url)
    assert counts["embedded"] == 0 and counts["moved"] == 1 and counts["deleted"] == 0
    moved = rows(root, catalog_url)[b"holiday/dune-renamed.webp"]
    assert moved.id == before[b"holiday/dune.webp"].id  # kept its row and vectors

    (root / "holiday/nested/deep/sunset.png").unlink()
    counts = index(root, encoder, url=catalog_url)
    assert counts["deleted"] == 1 and b"holiday/nested/deep/sunset.png" not in rows(root, catalog_url)
    check_consistent(root, catalog_url)
    with Library.open(root, url=catalog_url) as library:
        assert before[b"holiday/nested/deep/sunset.png"].id not in library.load_indexes()["cls"].ids()


def test_transient_failures_are_retried(collection, encoder, catalog_url):
    root, _ = collection
    index(root, encoder, url=catalog_url)
    truncated = rows(root, catalog_url)[b"broken/truncated.jpg"]
    assert index(root, encoder, url=catalog_url)["to_decode"] == 0  # permanent failures are not retried unchanged
    synthetic_photo(300, 200, seed=3).save(root / "broken/truncated.jpg", quality=90)  # the copy finished
    index(root, encoder, url=catalog_url)
    fixed = rows(root, catalog_url)[b"broken/truncated.jpg"]
    assert truncated.status == "truncated" and fixed.status == EMBEDDED


def test_second_writer_is_refused(collection, encoder, catalog_url):
    root, _ = collection
    with Library.open(root, url=catalog_url, write=True, create=True):
        with pytest.raises(LibraryLockedError, match=f"being written by pid {os.getpid()}"):
            Library.open(root, url=catalog_url, write=True)
        with pytest.raises(LibraryLockedError):  # making (or upgrading, adopting) a library is writing too
            Library.open(root, url=catalog_url, create=True)
        with Library.open(root, url=catalog_url) as reader:  # readers are never blocked
            assert reader.info()["total"] == 0


def test_other_model_is_refused(collection, encoder, tmp_path, catalog_url):
    from conftest import random_hf_model, save_hf

    root, _ = collection
    index(root, encoder, url=catalog_url)
    other = Encoder.from_pretrained(save_hf(random_hf_model(seed=5), tmp_path / "other"), precision="fp32")
    with pytest.raises(ModelMismatchError, match="weights_sha256"):
        index(root, other, url=catalog_url)


def indexed_photos(tmp_path, encoder, url=None, count=24):
    """`count` small PNGs p0..p{count-1} in a fresh folder, indexed once."""
    root = tmp_path / "many"
    root.mkdir()
    for i in range(count):
        synthetic_photo(64, 48, seed=i).save(root / f"p{i}.png")
    index(root, encoder, url=url)
    return root


def test_unmounted_disk_sweep_is_refused(tmp_path, encoder, catalog_url):
    root = indexed_photos(tmp_path, encoder, catalog_url)
    for i in range(20):
        (root / f"p{i}.png").unlink()
    with pytest.raises(SweepRefusedError, match="20 of 24 catalogued files are gone.*Nothing was deleted"):
        index(root, encoder, url=catalog_url)
    assert len(rows(root, catalog_url)) == 24  # nothing deleted
    assert index(root, encoder, url=catalog_url, allow_mass_delete=True)["deleted"] == 20


def test_reorganising_everything_is_a_move_not_a_mass_deletion(tmp_path, encoder, catalog_url):
    root = indexed_photos(tmp_path, encoder, catalog_url)
    (root / "sorted").mkdir()
    for i in range(24):
        os.rename(root / f"p{i}.png", root / "sorted" / f"p{i}.png")
    counts = index(root, encoder, url=catalog_url)
    assert counts["moved"] == 24 and counts["deleted"] == 0 and counts["embedded"] == 0


def test_empty_root_never_wipes_a_small_library(tmp_path, encoder, catalog_url):
    root = tmp_path / "mount"
    root.mkdir()
    for i in range(3):
        synthetic_photo(64, 48, seed=i).save(root / f"p{i}.png")
    folder = tmp_path / "lib"
    with Library.open(root, url=catalog_url, folder=folder, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    for i in range(3):
        (root / f"p{i}.png").unlink()  # the disk is not mounted: an empty mount point
    with Library.open(root, url=catalog_url, folder=folder, write=True) as library:
        with pytest.raises(SweepRefusedError, match="is empty but the library knows 3 files"):
            run_index(library, encoder, Options(workers=0))


def test_filters_do_not_sweep_what_they_leave_out(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    for year in ("2023", "2024"):
        (root / year).mkdir(parents=True)
        for i in range(3):
            synthetic_photo(64, 48, seed=i + int(year)).save(root / year / f"p{i}.png")
    index(root, encoder, url=catalog_url)
    counts = index(root, encoder, url=catalog_url, include=("2024/*",))
    assert counts["deleted"] == 0 and len(rows(root, catalog_url)) == 6


def test_corrupt_truncated_and_missing_index_files_are_rebuilt(collection, encoder, catalog_url):
    root, _ = collection
    index(root, encoder, url=catalog_url)
    folder = root / ".dinoseek"
    with Library.open(root, url=catalog_url) as library:
        cls_file, patch_file = library.index_set.file("cls"), library.index_set.file("patch")
    data = bytearray(cls_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cls_file.write_bytes(bytes(data))
    patch_file.write_bytes(patch_file.read_bytes()[:100])
    leftover = folder / f".{cls_file.name}.999.tmp"
    leftover.write_bytes(b"half a checkpoint")  # a killed writer's leftover
    with Library.open(root, url=catalog_url) as library:
        problems = library.verify()
    assert any(f"{cls_file.name} is missing or fails its checksum" in p for p in problems)
    assert any(f"{patch_file.name} is missing or fails its checksum" in p for p in problems)
    with Library.open(root, url=catalog_url, write=True) as library:
        library.load_indexes()
    assert not leftover.exists()
    check_consistent(root, catalog_url)
    with Library.open(root, url=catalog_url) as library:
        library.index_set.file("cls").unlink()
    with Library.open(root, url=catalog_url, write=True) as library:
        library.load_indexes()
    check_consistent(root, catalog_url)


def test_stale_index_is_reconciled(collection, encoder, catalog_url):
    root, _ = collection
    index(root, encoder, url=catalog_url)
    with Library.open(root, url=catalog_url) as library, library.catalog.session() as s:
        saved = {k: library.index_set.file(k).read_bytes() for k in ("cls", "patch")}
        records = {r.kind: (r.checksum, r.count) for r in s.query(IndexFileRow)}
    synthetic_photo(200, 100, seed=77).save(root / "new.png")
    index(root, encoder, url=catalog_url)
    # Put the old checkpoint back, as if the run had been killed before saving its indexes.
    with Library.open(root, url=catalog_url) as library, library.catalog.session() as s, s.begin():
        for kind, (checksum, count) in records.items():
            library.index_set.path(kind, checksum).write_bytes(saved[kind])
            s.execute(update(IndexFileRow).where(IndexFileRow.kind == kind).values(checksum=checksum, count=count))
    with Library.open(root, url=catalog_url) as library:
        assert any("1 embedded images missing from the index" in p for p in library.verify())
        indexes = library.load_indexes()  # readers reconcile in memory
        assert sorted(indexes["cls"].ids()) == sorted(library.catalog.embedded_ids())
    with Library.open(root, url=catalog_url, write=True) as library:
        library.load_indexes()
        assert library.verify() == []


def test_explicit_factory_is_remembered_and_built_once_trainable(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        synthetic_photo(80, 60, seed=i).save(root / f"{i}.jpg")
    folder = tmp_path / "lib"
    with Library.open(root, url=catalog_url, folder=folder, write=True, create=True,
                      index_choice="IVF4,Flat") as library:
        run_index(library, encoder, Options(workers=0))
    assert not (root / ".dinoseek").exists()
    with Library.open(root, url=catalog_url, folder=folder) as library:
        info = library.info()["indexes"]["cls"]
        assert (info["factory"], info["requested"]) == ("Flat", "IVF4,Flat")  # 6 vectors cannot train 4 lists
        assert library.verify() == []
    for i in range(6, 20):
        synthetic_photo(80, 60, seed=i).save(root / f"{i}.jpg")
    with Library.open(root, url=catalog_url, folder=folder, write=True) as library:  # no --index: as asked before
        run_index(library, encoder, Options(workers=0))
    with Library.open(root, url=catalog_url, folder=folder) as library:
        info = library.info()["indexes"]["cls"]
        assert (info["factory"], info["requested"]) == ("IVF4,Flat", "IVF4,Flat")
        assert library.verify() == []
    with Library.open(root, url=catalog_url, folder=folder, write=True, index_choice="HNSW16") as library:
        with pytest.raises(ValueError, match="cannot remove vectors"):
            library.load_indexes()


def test_permission_denied_folder_keeps_its_rows(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    (root / "private").mkdir(parents=True)
    synthetic_photo(80, 60).save(root / "private/a.jpg")
    synthetic_photo(80, 60, seed=1).save(root / "b.jpg")
    index(root, encoder, url=catalog_url)
    os.chmod(root / "private", 0)
    try:
        if os.access(root / "private", os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        counts = index(root, encoder, url=catalog_url)
        assert counts["deleted"] == 0
        assert rows(root, catalog_url)[b"private"].status == "unreadable"
        assert rows(root, catalog_url)[b"private/a.jpg"].status == EMBEDDED
    finally:
        os.chmod(root / "private", 0o755)


def test_hard_links_and_followed_symlinks(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    synthetic_photo(80, 60).save(root / "a/x.jpg")
    os.link(root / "a/x.jpg", root / "a/x-hardlink.jpg")
    os.symlink(root / "a", root / "a/loop")
    os.symlink(root / "a/x.jpg", root / "alias.jpg")
    index(root, encoder, url=catalog_url, follow_symlinks=True)
    catalog = rows(root, catalog_url)
    statuses = sorted(r.status for r in catalog.values())
    assert statuses == [EMBEDDED, "linked", "linked"]  # one inode, three paths, loop not entered


def test_root_missing(tmp_path, encoder, catalog_url):
    from dinoseek.indexer.errors import LibraryError

    root = tmp_path / "photos"
    root.mkdir()
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        shutil.rmtree(root)
        with pytest.raises(LibraryError, match="not a folder"):
            run_index(library, encoder, Options(workers=0))


def test_readers_work_while_a_writer_holds_a_transaction(collection, encoder, catalog_url):
    root, _ = collection
    index(root, encoder, url=catalog_url)
    with Library.open(root, url=catalog_url, write=True) as writer, writer.catalog.session() as s:
        s.begin()
        s.execute(update(ImageRow).values(reason="in flight"))  # uncommitted write, lock held
        with Library.open(root, url=catalog_url) as reader:  # WAL (SQLite), MVCC (PostgreSQL): the last commit
            assert reader.info()["counts"][EMBEDDED] > 0
            assert reader.verify() == []
        s.rollback()


def _fragile_decode(root_bytes, task, *args):
    if task.rel == b"holiday/dune.webp":
        os._exit(1)  # what an OOM kill or a segfaulting codec looks like from outside
    return _real_decode_task(root_bytes, task, *args)


def test_a_dying_decode_worker_is_recorded_and_the_run_goes_on(collection, encoder, monkeypatch, catalog_url):
    import dinoseek.indexer.pipeline as pipeline

    root, expected = collection
    monkeypatch.setattr(pipeline, "_decode_task", _fragile_decode)
    counts = index(root, encoder, url=catalog_url, workers=2)
    catalog = rows(root, catalog_url)
    assert catalog[b"holiday/dune.webp"].status == "crashed"
    crashed = [p for p, r in catalog.items() if r.status == "crashed"]
    assert len(crashed) <= 8  # only the files in flight with it (window = workers * 4)
    assert counts["embedded"] + len(crashed) == sum(s == "ok" for s in expected.values())
    monkeypatch.undo()
    index(root, encoder, url=catalog_url)  # crashed files are retried on the next run
    assert rows(root, catalog_url)[b"holiday/dune.webp"].status == EMBEDDED
    check_consistent(root, catalog_url)


def test_unlistable_folder_keeps_its_rows_run_after_run(tmp_path, encoder, monkeypatch, catalog_url):
    """Permission denied on a folder (simulated, so it also holds when tests run as root)."""
    import dinoseek.indexer.scan as scan_module

    root = tmp_path / "photos"
    (root / "private").mkdir(parents=True)
    synthetic_photo(80, 60).save(root / "private/a.jpg")
    synthetic_photo(80, 60, seed=1).save(root / "b.jpg")
    index(root, encoder, url=catalog_url)
    real_scandir = os.scandir

    def denied(path):
        if os.fsencode(path).endswith(b"/private"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(scan_module.os, "scandir", denied)
    for _ in range(2):  # the second run sees the folder's row already recorded
        assert index(root, encoder, url=catalog_url)["deleted"] == 0
        catalog = rows(root, catalog_url)
        assert catalog[b"private"].status == "unreadable" and "Permission denied" in catalog[b"private"].reason
        assert catalog[b"private/a.jpg"].status == EMBEDDED


def test_decode_workers_also_run_when_started_by_spawn(tmp_path, tiny_folder, monkeypatch, catalog_url):
    """What macOS uses (fork is unsafe there): the same run, the same rows."""
    from test_retrieval import make_library_photos

    from dinoseek.indexer import pipeline
    from dinoseek.indexer.library import Library
    from dinoseek.model import Encoder

    monkeypatch.setattr(pipeline, "worker_start_method", lambda threads=False: "spawn")
    make_library_photos(tmp_path / "photos")
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32")
    with Library.open(tmp_path / "photos", url=catalog_url, write=True, create=True) as library:
        pipeline.run_index(library, encoder, pipeline.Options(workers=2))
        assert library.info()["counts"] == {"embedded": 11}


def test_threads_of_one_process_cannot_both_take_the_writer_lock(tmp_path):
    """POSIX locks never conflict inside a process: the in-process claim must be atomic."""
    import threading

    from dinoseek.indexer.errors import LibraryLockedError
    from dinoseek.indexer.lock import WriterLock

    start, taken, refused = threading.Barrier(8), [], []

    def take():
        start.wait()
        try:
            taken.append(WriterLock.take(tmp_path))
        except LibraryLockedError:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 1 and len(refused) == 7
    taken[0].release()
    WriterLock.take(tmp_path).release()  # free again once released

"""Indexes bigger than memory: on-disk IVF lists (build, search, add, remove, reopen, integrity),
builds that stream the catalog in blocks, and auto's memory budget. Small N, with the size
thresholds lowered so the large-library paths run."""

from __future__ import annotations

import logging
import os

import faiss
import numpy as np
import pytest
from sqlalchemy import insert

from dinoseek.indexer import budget, build, ondisk, store
from dinoseek.indexer.catalog import EMBEDDED, ImageRow, path_digest
from dinoseek.indexer.catalog_gateway import Catalog
from dinoseek.indexer.errors import InvalidArgumentError
from dinoseek.indexer.library import Library
from dinoseek.indexer.ondisk import MAGIC, TRAILER

N, DIM = 3000, 32
MANIFEST = {"arch": {"synthetic": True}, "weights_sha256": "synthetic", "preprocess": {"mode": "crop", "size": 224},
            "precision": "fp32", "dim": DIM}


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 32, n)] / np.sqrt(DIM) + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def uniform(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def make_library(root, vectors: np.ndarray) -> None:
    with Library.open(root, write=True, create=True) as library:
        library.bind_model(MANIFEST)
        blobs = vectors.astype(np.float16)
        with library.catalog.engine.begin() as connection:
            connection.execute(insert(ImageRow), [
                {"path": b"%d.jpg" % i, "path_sha256": path_digest(b"%d.jpg" % i), "path_text": f"{i}.jpg",
                 "folder": "", "size": 1, "mtime_ns": 0, "sha256": f"{i:064x}", "status": EMBEDDED,
                 "cls": blobs[i].tobytes(), "patch": blobs[i].tobytes()} for i in range(len(vectors))])


@pytest.fixture
def large(monkeypatch):
    """Thresholds lowered: IVF lists go on disk from 1000 vectors, built in shards of 700 from
    blocks of 500, auto's exact fallback is float16 from 1000, so a 3000-row library takes every
    large-library path."""
    monkeypatch.setattr(build, "EXACT_PAIRS_MAX", 1000)
    monkeypatch.setattr(build, "ONDISK_FROM", 1000)
    monkeypatch.setattr(build, "ONDISK_SHARD", 700)
    monkeypatch.setattr(build, "BUILD_BLOCK", 500)
    monkeypatch.setattr(store, "FLAT_LIMIT", 100)


@pytest.fixture
def on_disk_library(tmp_path, large):
    vectors = clustered(N)
    make_library(tmp_path, vectors)
    with Library.open(tmp_path, write=True, index_choice="IVF16,PQ16x8") as library:
        library.load_indexes()
    return tmp_path, vectors


def lists_files(root) -> list[str]:
    return sorted(p.name for p in (root / ".dinoseek").glob("*.ivfdata"))


def self_found(index, vectors: np.ndarray, ids: np.ndarray) -> float:
    """Share of stored vectors found among their own 10 nearest (ids = row ids = position + 1)."""
    index.nprobe = 16
    _, found = index.search(vectors[ids - 1], 10)
    return float(np.mean([i in row for i, row in zip(ids.tolist(), found.tolist())]))


def test_on_disk_index_builds_searches_adds_removes_and_reopens(on_disk_library, capfd):
    root, vectors = on_disk_library
    assert lists_files(root) == ["cls.g000001.ivfdata", "patch.g000001.ivfdata"]
    with Library.open(root) as reader:
        index = reader.load_indexes()["cls"]
        record = reader.index_set.record("cls")
        assert index.lists is not None and index.lists.generation == record.generation == 1
        assert record.lists_bytes == os.path.getsize(index.lists.path) and record.lists_checksum
        assert sorted(index.ids().tolist()) == list(range(1, N + 1))  # row ids are stored in the lists
        assert self_found(index, vectors, np.arange(1, 201)) >= 0.9
    with Library.open(root, write=True) as writer:
        index = writer.load_indexes()["cls"]
        assert index.remove([5, 6, 7, 999_999]) == 3
        assert index.lists.generation == 2 and not index.lists.checkpointed  # a copy is changed, not gen 1
        assert os.path.exists(root / ".dinoseek" / "cls.g000001.ivfdata")
        index.add(np.array([5]), vectors[4:5])
        _, found = index.search(vectors[5:7], 10)
        assert not {6, 7} & set(found.ravel().tolist())  # removed ids are never returned
        writer.index_set.save("cls")
    assert capfd.readouterr().out == ""  # faiss's "resizing ..." printf never reaches stdout
    assert lists_files(root) == ["cls.g000002.ivfdata", "patch.g000001.ivfdata"]  # gen 1 gone once recorded
    with Library.open(root) as reader:
        index = reader.index_set.read("cls", reader.index_set.record("cls"))
        ids = set(index.ids().tolist())
        assert index.count == N - 2 and 5 in ids and not {6, 7} & ids
        assert self_found(index, vectors, np.array([5, 100, 2000])) == 1.0


def test_a_later_run_adds_to_a_list_in_place_within_its_headroom(on_disk_library):
    """A new run (a new process: the index reopened, its lists copied to the next generation) adds
    a few vectors to one list: it stays in its slot and the file does not grow."""
    root, vectors = on_disk_library
    with Library.open(root, write=True) as writer:
        index = writer.load_indexes()["cls"]
        before = ondisk.ondisk_lists(index.inner)  # released with the index the first change replaces
        size, offsets = before.totsize, [before.lists.at(no).offset for no in range(before.nlist)]
        _, assigned = faiss.extract_index_ivf(index.inner).quantizer.search(vectors[:1], 1)
        target = int(assigned[0, 0])
        target_size = before.list_size(target)
        index.add(np.arange(N + 1, N + 4), np.repeat(vectors[:1], 3, axis=0))  # three copies: one list
        after = ondisk.ondisk_lists(index.inner)
        assert index.lists.generation == 2 and after.totsize == size
        assert [after.lists.at(no).offset for no in range(after.nlist)] == offsets
        assert after.list_size(target) == target_size + 3
        writer.index_set.save("cls")
    assert os.path.getsize(root / ".dinoseek" / "cls.g000002.ivfdata") == size + TRAILER.size


def test_a_later_run_reconciles_the_on_disk_index_into_a_new_generation(on_disk_library):
    root, _ = on_disk_library
    with Library.open(root, write=True) as writer:
        writer.catalog.delete_rows([10, 11])
        writer.load_indexes()  # reconciled against the catalog and saved
        assert writer.index_set.record("cls").generation == 2
    with Library.open(root) as reader:
        assert reader.verify() == []


def folder_state(root) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in (root / ".dinoseek").iterdir() if not p.name.startswith("catalog.sqlite")}


def catalogue_rows(library, vectors: np.ndarray, name: str) -> None:
    """Embedded rows for `vectors` (ids N + 1 on) written into the catalog only, as a run's catalog
    side does before its next checkpoint."""
    with library.catalog.engine.begin() as connection:
        connection.execute(insert(ImageRow), [
            {"path": f"{name}{i}.jpg".encode(), "path_sha256": path_digest(f"{name}{i}.jpg".encode()),
             "path_text": f"{name}{i}.jpg", "folder": "", "size": 1, "mtime_ns": 0, "sha256": f"{N + 1 + i:064x}",
             "status": EMBEDDED, "cls": blob, "patch": blob}
            for i, blob in enumerate(vector.astype(np.float16).tobytes() for vector in vectors)])


def test_a_reader_brings_an_on_disk_index_in_line_without_writing_in_the_folder(on_disk_library):
    """A reader that finds the catalog ahead of the on-disk index (a writer's run under way: rows
    added and deleted since its checkpoint) answers as the reconciled index would, and writes
    nothing in the library folder: the next generation's name is the writer's live file."""
    root, vectors = on_disk_library
    more = clustered(300, seed=7)
    new_ids = np.arange(N + 1, N + 1 + len(more))
    with Library.open(root, write=True) as writer:  # the run's catalog side, no checkpoint yet
        catalogue_rows(writer, more, "new")
        writer.catalog.delete_rows([1, 2, 3])
        live = root / ".dinoseek" / "cls.g000002.ivfdata"
        live.write_bytes(b"the writer's next generation")  # what a reader's copy once overwrote
        before = folder_state(root)
        with Library.open(root) as reader:
            index = reader.load_indexes()["cls"]
            assert folder_state(root) == before and live.read_bytes() == b"the writer's next generation"
            expected = np.concatenate([np.arange(4, N + 1), new_ids])
            assert index.count == len(expected) and np.array_equal(np.sort(index.ids()), expected)
            everything = np.concatenate([vectors, more])
            assert self_found(index, everything, new_ids[::10]) >= 0.9
            _, found = index.search(vectors[:3], 10)
            assert not {1, 2, 3} & set(found.ravel().tolist())
            lims, scores, ids = index.range_search(everything[[0, N + 5]], 0.8, nprobe=16)  # PQ: scores approximate
            assert N + 6 in ids[lims[1]:lims[2]].tolist() and 1 not in ids.tolist()
            assert np.all(scores >= 0.8) and lims[0] == 0 and lims[2] == len(ids)
            exact_lims, _, exact_ids = store.build_index("Flat", DIM, np.delete(everything, [0, 1, 2], 0), expected,
                                                         requested="Flat").range_search(everything[[0, N + 5]], 0.95)
            assert set(exact_ids[exact_lims[1]:].tolist()) <= set(ids[lims[1]:].tolist())
            _, found = index.search_subset(more[:2], 3, np.array([2, N + 1, N + 2, 50]))
            assert set(found.ravel().tolist()) <= {N + 1, N + 2, 50}
            assert found[0, 0] == N + 1 and found[1, 0] == N + 2
        assert folder_state(root) == before


def test_a_reader_that_only_sees_added_rows_never_copies_the_stored_ids(on_disk_library):
    """The stored ids (8 bytes a row) are read by a reader's changes only to hide removed rows."""
    root, vectors = on_disk_library
    more = clustered(20, seed=9)
    with Library.open(root, write=True) as writer:
        catalogue_rows(writer, more, "add")
        with Library.open(root) as reader:
            index = reader.load_indexes()["cls"]
            assert index.count == N + len(more) and index._side._stored is None
            assert self_found(index, np.concatenate([vectors, more]), np.arange(N + 1, N + 21)) >= 0.9


def damage_truncate(path, generation):
    os.truncate(path, os.path.getsize(path) - 100)


def damage_grow(path, generation):
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)


def damage_generation(path, generation):
    """Another generation's file in its place: same size, its own trailer."""
    with open(path, "r+b") as f:
        f.seek(-TRAILER.size, os.SEEK_END)
        f.write(TRAILER.pack(MAGIC, generation + 7))


def damage_missing(path, generation):
    path.unlink()


def damage_symlink(path, generation):
    moved = path.with_name("elsewhere")
    path.rename(moved)
    path.symlink_to(moved)


@pytest.mark.parametrize("damage", [damage_truncate, damage_grow, damage_generation, damage_missing, damage_symlink])
def test_damaged_lists_file_is_rebuilt_from_the_catalog(on_disk_library, damage, caplog):
    root, vectors = on_disk_library
    path = root / ".dinoseek" / "cls.g000001.ivfdata"
    damage(path, 1)
    with Library.open(root) as reader:  # never mapped: a truncated mapping would crash the reader (SIGBUS)
        assert reader.index_set.read("cls", reader.index_set.record("cls")) is None
        assert any("cls" in p for p in reader.verify())
    with caplog.at_level(logging.WARNING), Library.open(root, write=True) as writer:
        index = writer.load_indexes()["cls"]
        assert "cls.g000001.ivfdata" in caplog.text and "rebuilding from the catalog" in caplog.text
        assert index.lists.generation == 2 and sorted(index.ids().tolist()) == list(range(1, N + 1))
    with Library.open(root) as reader:
        assert reader.verify() == [] and reader.index_set.record("cls").generation == 2
        assert self_found(reader.load_indexes()["cls"], vectors, np.arange(1, 101)) >= 0.9


def test_altered_lists_contents_fail_verify_by_checksum(on_disk_library):
    root, _ = on_disk_library
    path = root / ".dinoseek" / "cls.g000001.ivfdata"
    with open(path, "r+b") as f:  # same size, same trailer: only the sha256 can tell
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0xFF]))
    with Library.open(root) as reader:
        assert reader.load_indexes()["cls"].lists is not None  # an ordinary open checks size and generation only
        assert any(p.startswith("cls:") and "cls.g000001.ivfdata" in p for p in reader.verify())
    with Library.open(root, write=True) as writer:
        writer.repair()
    with Library.open(root) as reader:
        assert reader.verify() == []


def test_builds_stream_the_catalog_and_never_read_a_whole_kind(tmp_path, large, monkeypatch):
    # Training samples are TRAIN_PER_LIST per list: a quarter of this small library per kind.
    monkeypatch.setattr(store, "TRAIN_PER_LIST", 16)
    make_library(tmp_path, clustered(N))
    blocks_asked, original_vectors, original_blocks = [], Catalog.vectors, Catalog.vector_blocks

    def vectors(self, kind, ids=None):
        # Samples (training, tuning queries, reconcile blocks) are fine; the whole kind is not.
        if ids is None or len(ids) > N // 2:
            raise AssertionError(f"{kind}: {N if ids is None else len(ids)} vectors read at once")
        return original_vectors(self, kind, ids)

    def vector_blocks(self, kind, block):
        blocks_asked.append(block)
        return original_blocks(self, kind, block)

    monkeypatch.setattr(Catalog, "vectors", vectors)
    monkeypatch.setattr(Catalog, "vector_blocks", vector_blocks)
    for choice in ("auto", "IVF16,SQ8", "IVF16,PQ16x8", "Flat"):
        blocks_asked.clear()
        with Library.open(tmp_path, write=True, index_choice=choice) as library:
            index = library.load_indexes()["cls"]
            assert index.count == N and (choice == "auto" or index.factory == choice)
        assert blocks_asked and set(blocks_asked) == {500}, choice


def test_exact_top_k_by_blocks_equals_brute_force():
    vectors, queries = uniform(2000), uniform(30, seed=5)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3
    blocks = ((ids[i:i + 300], vectors[i:i + 300]) for i in range(0, 2000, 300))
    found = build.exact_top_k(queries, blocks, 10)
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    assert all(set(f) == set(t) for f, t in zip(found.tolist(), truth.tolist()))


def test_ivf_indexes_return_the_right_ids_after_removal():
    """IndexIDMap2 over IVF renumbered its id list on removal as if positions shifted: wrong ids."""
    vectors = clustered(4000)
    ids = np.arange(100, 4100, dtype=np.int64)
    index = store.build_index("IVF8,Flat", DIM, vectors, ids, requested="IVF8,Flat")
    index.remove(np.arange(100, 600))
    index.nprobe = 8
    _, found = index.search(vectors[1500:1510], 1)
    assert found[:, 0].tolist() == list(range(1600, 1610))


def test_auto_falls_back_to_exact_only_within_the_memory_budget(tmp_path, large, monkeypatch, caplog):
    monkeypatch.setattr(store, "PQ_FROM", 1000)  # auto's first choice is IVF-PQ
    make_library(tmp_path, uniform(N))  # random vectors: no IVF index reaches the recall auto wants
    monkeypatch.setenv(budget.ENV, "1G")
    with caplog.at_level(logging.WARNING), Library.open(tmp_path, write=True) as library:
        assert library.load_indexes()["cls"].factory == "SQfp16"
    assert ",PQ8x8 reaches recall@10" in caplog.text and "auto tries IVF" in caplog.text  # PQ, then SQ8, then exact
    caplog.clear()
    monkeypatch.setenv(budget.ENV, "100K")  # an exact float16 index of 3000 x 32 needs 336 kB
    with caplog.at_level(logging.WARNING), Library.open(tmp_path, write=True, index_choice="auto") as library:
        library.index_set.loaded.clear()
        for path in (tmp_path / ".dinoseek").glob("*.faiss"):
            path.unlink()  # force a rebuild under the new budget
        index = library.load_indexes()["cls"]
    assert index.factory.startswith("IVF") and "over the 0.0 GB budget" in caplog.text
    assert store.auto_factory(50, DIM) == "Flat"
    monkeypatch.setenv(budget.ENV, "1K")
    assert store.auto_factory(50, DIM) != "Flat"  # not even a small exact index above the budget


def test_budget_is_read_from_the_environment_or_the_machine(monkeypatch):
    monkeypatch.delenv(budget.ENV, raising=False)
    assert 0 < budget.memory_budget() <= budget.available_bytes()
    monkeypatch.setenv(budget.ENV, "1.5G")
    assert budget.memory_budget() == int(1.5 * (1 << 30))
    assert budget.parse_bytes("512M") == 512 << 20 and budget.parse_bytes("1000") == 1000
    monkeypatch.setenv(budget.ENV, "lots")
    with pytest.raises(InvalidArgumentError, match="DINOSEEK_INDEX_MEMORY must be a size like 4G"):
        budget.memory_budget()
    assert budget.exact_index_bytes(5_000_000, 384) / 1e9 == pytest.approx(7.92, abs=0.01)
    assert budget.exact_index_bytes(5_000_000, 384, "SQfp16") / 1e9 == pytest.approx(4.08, abs=0.01)


def test_the_exact_fallback_keeps_the_catalog_values_in_half_the_memory(tmp_path, large, monkeypatch):
    """auto's exact fallback (SQfp16) finds what Flat finds, scores, ties and all, and stores
    every float16 catalog value bit for bit, in half of Flat's bytes; dedup treats it as exact."""
    from dinoseek.retrieval.dedup import FLAT_MARGIN, score_margin

    monkeypatch.setattr(store, "PQ_FROM", 1000)
    vectors = uniform(N)
    make_library(tmp_path, vectors)
    with Library.open(tmp_path, write=True) as library:
        fallback = library.load_indexes()["cls"]
    ids = np.arange(1, N + 1)  # catalog row ids, in insertion order
    flat = store.build_index("Flat", DIM, vectors, ids, requested="Flat")
    assert fallback.factory == "SQfp16" and fallback.is_exact() and fallback.count == N
    assert fallback.inner.code_size * 2 == flat.inner.code_size
    assert np.array_equal(fallback.reconstruct(ids[::7]), vectors[::7])
    queries = uniform(40, seed=9)
    subset = ids[::3]
    for (d1, i1), (d2, i2) in [(flat.search(queries, 10), fallback.search(queries, 10)),
                               (flat.search_subset(queries, 5, subset), fallback.search_subset(queries, 5, subset))]:
        assert np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-6)
    assert score_margin(fallback) == FLAT_MARGIN
    monkeypatch.setattr(build, "EXACT_PAIRS_MAX", N)  # where dedup searches the library's own index: BLAS
    with Library.open(tmp_path, write=True, index_choice="auto") as library:
        library.index_set.loaded.clear()
        for path in (tmp_path / ".dinoseek").glob("*.faiss"):
            path.unlink()
        assert library.load_indexes()["cls"].factory == "Flat"


def test_a_second_ivf_trial_starts_from_the_first_ones_centroids(large):
    """auto's IVF-SQ8 trial after a failed IVF-PQ one reuses its coarse quantizer (same lists, same
    sample: k-means would find the same centroids) instead of training it again."""
    source = build.ArraySource(np.arange(N), clustered(N), DIM)
    centroids = uniform(16, seed=3)  # not what k-means would find: proves they are taken as given
    index, recall = build._trial("IVF16,SQ8", source, requested="auto", lists_for=None, probe=None,
                                 centroids=centroids)
    assert np.array_equal(build._centroids(index), centroids) and index.count == N and recall > 0
    fresh, _ = build._trial("IVF16,SQ8", source, requested="auto", lists_for=None, probe=None)
    assert not np.array_equal(build._centroids(fresh), centroids)


def test_auto_hands_the_pq_trials_centroids_to_its_sq8_trial(large, monkeypatch):
    monkeypatch.setattr(store, "PQ_FROM", 1000)  # auto's first choice is IVF-PQ, which random vectors fail
    trials, real = [], build._trial
    monkeypatch.setattr(build, "_trial", lambda factory, *a, **k: trials.append((factory, k.get("centroids")))
                        or real(factory, *a, **k))
    build.build_streamed("auto", build.ArraySource(np.arange(N), uniform(N), DIM), requested="auto")
    (pq, none), (sq8, handed) = trials
    assert ",PQ" in pq and none is None and sq8.endswith(",SQ8") and handed is not None and len(handed) == 64


def test_a_rebuild_after_changes_never_reuses_the_open_lists_file(on_disk_library):
    root, _ = on_disk_library
    with Library.open(root, write=True, index_choice="IVF16,PQ16x8") as writer:
        index = writer.load_indexes()["cls"]
        index.remove([1])  # now mapped on generation 2, not yet recorded
        assert index.lists.generation == 2
        rebuilt = writer.index_set._build("cls", writer.index_set.record("cls"))
        assert rebuilt.lists.generation == 3 and rebuilt.count == N
        assert index.count == N - 1 and 1 not in set(index.ids().tolist())  # the open one is intact


def test_periodic_checkpoints_leave_on_disk_lists_and_unchanged_indexes_alone(on_disk_library, monkeypatch):
    """The timer's checkpoint during a run skips on-disk indexes (hashing and then copying the lists
    file each minute) and rewrites no unchanged index; the run's last checkpoint saves what changed,
    and a run killed before it is made whole from the catalog on the next open."""
    root, vectors = on_disk_library
    more = clustered(200, seed=4)
    with Library.open(root, write=True) as writer:
        indexes = writer.load_indexes()
        record = writer.index_set.record("cls")
        files = {p.name: p.stat().st_ino for p in (root / ".dinoseek").glob("*.faiss")}
        lists_checkpoints, original = [], store.ondisk.checkpoint
        monkeypatch.setattr(store.ondisk, "checkpoint", lambda *a: lists_checkpoints.append(a) or original(*a))
        with writer.catalog.engine.begin() as connection:  # a batch the run commits...
            connection.execute(insert(ImageRow), [
                {"path": b"new%d.jpg" % i, "path_sha256": path_digest(b"new%d.jpg" % i), "path_text": f"new{i}.jpg",
                 "folder": "", "size": 1, "mtime_ns": 0, "sha256": f"{N + i:064x}", "status": EMBEDDED,
                 "cls": more[i].astype(np.float16).tobytes(), "patch": more[i].astype(np.float16).tobytes()}
                for i in range(len(more))])
        new_ids = np.arange(N + 1, N + 1 + len(more))
        indexes["cls"].add(new_ids, more)  # ...and adds to one kind's index
        writer.index_set.checkpoint(periodic=True)
        after = writer.index_set.record("cls")
        assert not lists_checkpoints and (after.checksum, after.generation) == (record.checksum, record.generation)
        assert {p.name: p.stat().st_ino for p in (root / ".dinoseek").glob("*.faiss")} == files
        # killed here: the recorded generation is intact, the catalog has the new rows
    with Library.open(root, write=True) as writer:
        index = writer.load_indexes()["cls"]
        assert index.count == N + len(more) and index.lists.generation > record.generation
        saved = {p.name: p.stat().st_ino for p in (root / ".dinoseek").glob("*.faiss")}
        writer.index_set.checkpoint()  # both reconciled and saved on load: nothing left to write
        assert {p.name: p.stat().st_ino for p in (root / ".dinoseek").glob("*.faiss")} == saved
        generation = index.lists.generation
        lists_checkpoints.clear()
        index.remove(new_ids[:5])  # a change at the run's end: its checkpoint is not periodic
        writer.index_set.checkpoint()
        assert len(lists_checkpoints) == 1 and writer.index_set.record("cls").generation == generation + 1
    assert self_found(index, np.concatenate([vectors, more]), new_ids) > 0.9


def test_a_built_lists_file_holds_its_lists_with_headroom_and_takes_adds_in_the_same_process(tmp_path, large):
    """Shards appended one after the other left lists in slots up to twice their size plus the slots
    they outgrew (2.5x the codes at 5M): the build compacts the file. FAISS records a new file's
    space as free; an add in the same process must not be written over the lists."""
    from dinoseek.indexer import ondisk

    vectors = clustered(N)
    source = build.ArraySource(np.arange(1, N + 1), vectors, DIM)
    lists = ondisk.ListsFile(tmp_path / "cls.g000001.ivfdata", 1, checkpointed=False)
    index = build.build_streamed("IVF16,SQ8", source, requested="IVF16,SQ8", lists_for=lambda: lists)
    inner = ondisk.ondisk_lists(index.inner)
    capacities = [ondisk._slot_capacity(inner.list_size(no)) for no in range(inner.nlist)]
    assert [inner.lists.at(no).capacity for no in range(inner.nlist)] == capacities  # what FAISS holds
    lists_bytes = sum(capacities) * (index.inner.code_size + 8)
    assert os.path.getsize(lists.path) == lists_bytes + lists_bytes // 8  # and the free tail
    assert sum(capacities) <= N * 1.2
    assert [p.name for p in tmp_path.iterdir()] == ["cls.g000001.ivfdata"]  # no temp file left
    more = clustered(500, seed=3)
    index.add(np.arange(N + 1, N + 501), more)
    assert sorted(index.ids().tolist()) == list(range(1, N + 501))
    assert self_found(index, np.concatenate([vectors, more]), np.arange(1, N + 501, 7)) >= 0.95


def list_contents(lists) -> list[tuple[bytes, bytes]]:
    import faiss

    contents = []
    for no in range(lists.nlist):
        n = lists.list_size(no)
        ids = faiss.rev_swig_ptr(lists.get_ids(no), n).tobytes() if n else b""
        codes = faiss.rev_swig_ptr(lists.get_codes(no), n * lists.code_size).tobytes() if n else b""
        contents.append((ids, codes))
    return contents


def test_compaction_keeps_every_list_byte_for_byte_while_releasing_pages(tmp_path, monkeypatch):
    """Lists appended in shards (moved to bigger slots as they grow) are copied into a file sized to
    them with the same ids and codes in every list, empty lists included, releasing pages as it goes;
    a list then takes a few more entries in place, and an empty one a new slot."""
    import faiss

    from dinoseek.indexer import ondisk

    released = []
    monkeypatch.setattr(ondisk, "RELEASE_EVERY", 4096)
    real_release = ondisk.release_pages
    monkeypatch.setattr(ondisk, "release_pages", lambda lists: (released.append(lists.filename), real_release(lists)))
    rng = np.random.default_rng(0)
    target = faiss.OnDiskInvertedLists(64, 12, str(tmp_path / "l.ivfdata"))
    with ondisk.quiet_stdout():
        target.update_totsize(4096)
        for _ in range(5):  # shards: lists 0, 7, 14, ... stay empty
            shard = faiss.ArrayInvertedLists(64, 12)
            for no in range(64):
                n = 0 if no % 7 == 0 else int(rng.integers(1, 40))
                if n:
                    shard.add_entries(no, n, faiss.swig_ptr(rng.integers(0, 1 << 40, n)),
                                      faiss.swig_ptr(rng.integers(0, 256, n * 12).astype(np.uint8)))
            ondisk._append_shard(shard, target)
        before = list_contents(target)
        compact = ondisk._compacted(target, tmp_path / "l.ivfdata")
    compact_offset_2 = compact.lists.at(2).offset
    assert list_contents(compact) == before
    lists_bytes = sum(ondisk._slot_capacity(len(ids) // 8) for ids, _ in before) * 20
    assert os.path.getsize(tmp_path / "l.ivfdata") == lists_bytes + lists_bytes // 8
    assert sum(".tmp" in name for name in released) > 1  # the copy released its pages on the way
    assert [p.name for p in tmp_path.iterdir()] == ["l.ivfdata"]
    new_ids, new_codes = np.arange(5, dtype=np.int64), np.full(5 * 12, 9, np.uint8)
    with ondisk.quiet_stdout():
        end = compact.totsize
        compact.add_entries(2, 5, faiss.swig_ptr(new_ids), faiss.swig_ptr(new_codes))  # within its headroom
        assert compact.totsize == end and compact.lists.at(2).offset == compact_offset_2
        compact.add_entries(0, 5, faiss.swig_ptr(new_ids), faiss.swig_ptr(new_codes))  # into an empty list...
        assert compact.lists.at(0).offset == lists_bytes and compact.totsize == end  # ...takes the free tail
        compact.resize(1, 0)  # a list emptied
    after = list_contents(compact)
    assert after[0] == (new_ids.tobytes(), new_codes.tobytes()) and after[1] == (b"", b"")
    assert after[2] == (before[2][0] + new_ids.tobytes(), before[2][1] + new_codes.tobytes())
    assert after[3:] == before[3:]


def resident_file_kb() -> int:
    with open("/proc/self/status") as status:
        # a mapped file's pages count as RssFile, or as RssShmem where the file is on tmpfs
        return sum(int(line.split()[1]) for line in status if line.startswith(("RssFile:", "RssShmem:")))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from Linux's /proc")
def test_releasing_pages_of_mapped_lists_drops_them_from_memory_and_keeps_their_contents(tmp_path):
    import faiss

    from dinoseek.indexer import ondisk

    lists = faiss.OnDiskInvertedLists(1, 1024, str(tmp_path / "l.ivfdata"))
    with ondisk.quiet_stdout():
        lists.update_totsize(64 << 20)
    mapped = ondisk._mapped(lists)
    before = resident_file_kb()
    mapped[::4096] = 7  # dirty every page through the mapping
    assert resident_file_kb() - before > 60_000
    ondisk.release_pages(lists)
    assert resident_file_kb() - before < 8_000
    assert (mapped[::4096] == 7).all() and (mapped[1::4096] == 0).all()  # dirty pages kept, not zeroed
    with open(tmp_path / "l.ivfdata", "rb") as f:
        f.seek(12345 * 4096)
        assert f.read(2) == b"\x07\x00"


def test_fastscan_lists_stay_in_memory_and_match_an_index_built_in_one_go(tmp_path, large):
    """IVF-PQ FastScan packs its codes in blocks of 32, which on-disk lists cannot hold: its lists stay
    in memory however large the library, with the results of the same index built without a lists file."""
    import faiss

    from dinoseek.indexer import ondisk

    vectors = clustered(N)
    source = build.ArraySource(np.arange(1, N + 1), vectors, DIM)
    lists = ondisk.ListsFile(tmp_path / "cls.g000001.ivfdata", 1, checkpointed=False)
    index = build.build_streamed("IVF16,PQ8x4fs", source, requested="IVF16,PQ8x4fs", lists_for=lambda: lists)
    assert index.lists is None and not lists.path.exists()
    reference = build.build_streamed("IVF16,PQ8x4fs", source, requested="IVF16,PQ8x4fs")  # the same seeded training
    params = faiss.SearchParametersIVF(nprobe=16)
    assert np.array_equal(index.inner.search(vectors[:200], 10, params=params)[1],
                          reference.inner.search(vectors[:200], 10, params=params)[1])


def test_fastscan_lists_an_earlier_version_put_on_disk_are_rebuilt_in_memory(tmp_path, large, monkeypatch, caplog):
    vectors = clustered(N)
    make_library(tmp_path, vectors)
    monkeypatch.setattr(build, "lists_fit_on_disk", lambda ivf: True)  # as earlier versions built them
    with Library.open(tmp_path, write=True, index_choice="IVF16,PQ8x4fs") as library:
        library.load_indexes()
    assert lists_files(tmp_path) == ["cls.g000001.ivfdata", "patch.g000001.ivfdata"]
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING), Library.open(tmp_path, write=True) as library:
        index = library.load_indexes()["cls"]
        assert index.lists is None and index.count == N and index.factory == "IVF16,PQ8x4fs"
        source = build.ArraySource(np.arange(1, N + 1), vectors, DIM)
        reference = build.build_streamed("IVF16,PQ8x4fs", source, requested="IVF16,PQ8x4fs")
        assert np.array_equal(index.search(vectors[:200], 10)[1], reference.search(vectors[:200], 10)[1])
    assert "FastScan lists on disk" in caplog.text and lists_files(tmp_path) == []


def test_an_index_asked_for_that_cannot_train_yet_says_so_aloud(caplog):
    source = build.ArraySource(np.arange(1, 101), clustered(100), DIM)
    with caplog.at_level(logging.INFO, logger="dinoseek.indexer.build"):
        index = build.build_streamed("IVF16,PQ8", source, requested="IVF16,PQ8")
    assert index.factory == "Flat"
    [record] = [r for r in caplog.records if "using Flat for now" in r.getMessage()]
    assert record.levelno == logging.WARNING and "IVF16,PQ8 needs" in record.getMessage()


def test_info_shows_a_library_whose_manifest_lacks_the_architecture(tmp_path):
    """Libraries made from bare vectors (the benchmarks' synthetic ones) record no ViT shape."""
    from click.testing import CliRunner

    from dinoseek.retrieval.cli import main

    make_library(tmp_path, clustered(50))
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"model: {DIM}-d vectors, fp32" in result.output

"""Search against brute force, duplicates with keep rules, safe actions with undo, reports."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import datetime

import numpy as np
import pytest
from conftest import synthetic_photo
from PIL import Image
from sqlalchemy import delete

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, run_index
from dinoseek.model import Encoder
from dinoseek.retrieval import QueryError
from dinoseek.retrieval.actions import apply, undo
from dinoseek.retrieval.api import Filters, LibrarySearch
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.errors import JournalError
from dinoseek.retrieval.report import to_csv, to_html, to_json

THRESHOLD = 0.98  # random-weight test model: distinct photos stay below ~0.96, edited copies above 0.99


def _jpeg(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_library_photos(root):
    """8 distinct photos plus: an exact copy, a half-size copy, a re-encoded copy (other folder)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    photos = [synthetic_photo(640, 480, seed=i) for i in range(8)]
    for i, photo in enumerate(photos):
        folder = "a" if i < 4 else "b"
        exif = Image.Exif()
        exif[272] = "EOS R5" if i % 2 else "Pixel 7"
        exif.get_ifd(0x8769)[36867] = f"202{i % 4}:05:0{i + 1} 10:00:00"
        photo.save(root / folder / f"p{i}.jpg", quality=92, exif=exif)
    (root / "b" / "p0-copy.jpg").write_bytes((root / "a" / "p0.jpg").read_bytes())
    photos[1].resize((320, 240)).save(root / "b" / "p1-small.jpg", quality=92)
    (root / "b" / "p2-reencoded.jpg").write_bytes(_jpeg(photos[2], quality=60))


def index_with_cli(root, weights, url=None) -> None:
    """`dinoseek index ROOT` with the tiny test weights (and `--url` for a catalog elsewhere), in
    process; the run must succeed."""
    from click.testing import CliRunner
    from conftest import url_args

    from dinoseek.retrieval.cli import main

    result = CliRunner().invoke(main, ["index", str(root), "--weights", str(weights), "--precision", "fp32",
                                       "--workers", "0", *url_args(url)])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


@pytest.fixture
def library_root(tmp_path, encoder, catalog_url):
    """The photos of make_library_photos, indexed, with their catalog on the backend under test
    (the tests using it open it with `url=catalog_url`, the same URL)."""
    root = tmp_path / "photos"
    make_library_photos(root)
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    return root


def brute_force(root, url, vector, kind, keep=lambda row: True):
    with Library.open(root, url=url) as library, library.catalog.session() as s:
        rows = [r for r in s.query(ImageRow).filter(ImageRow.status == EMBEDDED) if keep(r)]
    matrix = np.stack([np.frombuffer(getattr(r, kind), np.float16).astype(np.float32) for r in rows])
    scores = np.clip(matrix @ vector, -1, 1)  # shown scores are cosines: float16 rounding clipped
    order = np.argsort(-scores, kind="stable")
    return [(rows[i].id, float(scores[i])) for i in order]


def assert_same_ranking(hits, expected):
    """Same scores in the same order, and the same ids except for order among exact ties
    (the exact copy p0 / p0-copy has identical vectors)."""
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
    ours = sorted((round(h.score, 4), h.id) for h in hits)
    theirs = sorted((round(s, 4), i) for i, s in expected)
    assert ours == theirs


def test_search_equals_brute_force(library_root, encoder, catalog_url):
    query = synthetic_photo(500, 400, seed=3)
    vector = encoder.embed([query]).cls[0]
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library, encoder) as lib:
        for q in (query, vector, library_root / "a/p3.jpg"):
            hits = lib.search(q, k=5)
            assert_same_ranking(hits, brute_force(library_root, catalog_url, lib.vectors_for(q, "cls")[0], "cls")[:5])
        patch_hits = lib.search(query, k=3, kind="patch")
        expected = brute_force(library_root, catalog_url, encoder.embed([query]).patch[0], "patch")
        assert_same_ranking(patch_hits, expected[:3])
        assert hits[0].metadata["width"] == 640 and hits[0].path.startswith(("a/", "b/"))


@pytest.mark.parametrize("filters,keep", [
    (Filters(folder="b"), lambda r: r.folder == "b"),
    (Filters(camera="eos"), lambda r: r.camera and "EOS" in r.camera),
    (Filters(captured_after="2021-01-01", captured_before="2023-01-01"), lambda r: r.captured_at and "2021" <= r.captured_at < "2023"),
    (Filters(min_pixels=300_000), lambda r: r.width * r.height >= 300_000),
    (Filters(max_bytes=10**9, min_bytes=1), lambda r: True),
])
def test_filtered_search_is_exact_over_the_filtered_set(library_root, encoder, filters, keep, catalog_url):
    vector = encoder.embed([synthetic_photo(300, 300, seed=11)]).cls[0]
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library) as lib:
        hits = lib.search(vector, k=20, filters=filters)
        expected = brute_force(library_root, catalog_url, lib.vectors_for(vector, "cls")[0], "cls", keep)
    assert len(hits) == len(expected) > 0
    assert_same_ranking(hits, expected)


def test_both_kinds_average_the_two_similarities(library_root, encoder, catalog_url):
    query = synthetic_photo(400, 300, seed=5)
    out = encoder.embed([query])
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library, encoder) as lib:
        hits = lib.search(query, k=3, kind="both")
    cls = dict(brute_force(library_root, catalog_url, out.cls[0], "cls"))
    patch = dict(brute_force(library_root, catalog_url, out.patch[0], "patch"))
    both = sorted(((cls[i] + patch[i]) / 2, i) for i in cls)[::-1][:3]
    assert_same_ranking(hits, [(i, s) for s, i in both])


def test_similar_excludes_itself_and_finds_copies(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library) as lib:
        hits = lib.similar(library_root / "a/p0.jpg", k=3)
        assert hits[0].path == "b/p0-copy.jpg" and hits[0].score > 0.999
        assert all(h.path != "a/p0.jpg" for h in hits)
        assert lib.similar("a/p1.jpg", k=1)[0].path == "b/p1-small.jpg"
        with pytest.raises(QueryError, match="not an embedded image"):
            lib.similar("a/missing.jpg")


def test_deleted_rows_never_come_back(library_root, encoder, catalog_url):
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library, encoder) as lib:
        target = lib.similar("a/p0.jpg", k=1)[0]
        with lib.library.catalog.session() as s, s.begin():
            s.execute(delete(ImageRow).where(ImageRow.id == target.id))  # a concurrent run removed it
        assert target.id not in [h.id for h in lib.similar("a/p0.jpg", k=5)]


def test_query_errors(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library) as lib:
        with pytest.raises(QueryError, match="has 3 dimensions"):
            lib.search(np.ones(3, np.float32))
        with pytest.raises(QueryError, match="need the library's model"):
            lib.search(synthetic_photo(50, 50))
        with pytest.raises(QueryError, match="cannot read query image"):
            lib.search(library_root / ".dinoseek" / "lock")


def test_batch_search(library_root, encoder, catalog_url):
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library, encoder) as lib:
        vectors = encoder.embed([synthetic_photo(300, 200, seed=s) for s in (1, 2)]).cls
        batch = lib.search_batch(vectors, k=4)
        assert batch[1] == lib.search(vectors[1], k=4)


def _local_time(ns: int) -> str:
    """How keep reasons show a modification time: local time, to the second."""
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def test_groups_keep_rules_and_no_chaining(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    make_library_photos(root)
    # Byte copies are decided by the earlier modification time (a copy is never older than what it
    # was copied from), not by the path: the longer path is made the older file, so it must win.
    older, newer = 1_600_000_000 * 10**9, 1_600_000_060 * 10**9
    os.utime(root / "b/p0-copy.jpg", ns=(older, older))
    os.utime(root / "a/p0.jpg", ns=(newer, newer))
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    with Library.open(root, url=catalog_url) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        by_keeper = {g.keeper.path: g for g in groups}
        assert sorted(sorted(m.path for m in g.members) for g in groups) == [
            ["a/p0.jpg", "b/p0-copy.jpg"], ["a/p1.jpg", "b/p1-small.jpg"], ["a/p2.jpg", "b/p2-reencoded.jpg"]]
        assert set(by_keeper) == {"b/p0-copy.jpg", "a/p1.jpg", "a/p2.jpg"}
        # Each group: the keeper's reason, and the member that goes with its own reason.
        reasons = {g.keeper.path: (g.reason, [(m.path, g.reason_for(m)) for m in g.others]) for g in groups}
        camera = "Pixel 7, captured 2022-05-03 10:00:00"
        assert reasons == {
            "b/p0-copy.jpg": (f"earliest modification time ({_local_time(older)})",
                              [("a/p0.jpg", (f"identical bytes, modified later ({_local_time(newer)} vs "
                                             f"{_local_time(older)})"))]),
            "a/p1.jpg": ("highest resolution (640x480)", [("b/p1-small.jpg", "lower resolution (320x240 vs 640x480)")]),
            # p2-reencoded has no EXIF: the camera's copy stays, whatever the file sizes
            "a/p2.jpg": (f"camera original ({camera})",
                         [("b/p2-reencoded.jpg", f"no camera metadata (the kept copy has {camera})")]),
        }
        exact = [g for g in groups if g.kind == "exact"]
        assert len(exact) == 1 and exact[0].min_similarity == 1.0
        # Each member's similarity is the exact cosine of its catalog vector with the keeper's.
        ids, vectors = library.catalog.vectors("cls", sorted(m.id for g in groups for m in g.members))
        unit = dict(zip(ids.tolist(), vectors / np.linalg.norm(vectors, axis=1, keepdims=True)))
        for g in groups:
            (other,) = g.others
            expected = 1.0 if g.kind == "exact" else float(unit[other.id] @ unit[g.keeper.id])
            assert g.similarity_to_keeper(other) == pytest.approx(expected, abs=1e-6)
            assert g.similarity_to_keeper(other) >= THRESHOLD and g.similarity_to_keeper(g.keeper) == 1.0
        protected = find_duplicates(library, threshold=THRESHOLD, protected=("b",))
        assert {g.keeper.path for g in protected} == {"b/p0-copy.jpg", "b/p1-small.jpg", "b/p2-reencoded.jpg"}
        assert all(g.reason == "in a protected folder" for g in protected)
        assert {m.path: g.reason_for(m) for g in protected for m in g.others} == {
            "a/p0.jpg": "not in a protected folder", "a/p1.jpg": "not in a protected folder",
            "a/p2.jpg": "not in a protected folder"}
        assert [len(g.members) for g in find_duplicates(library, exact_only=True)] == [2]
        assert len(find_duplicates(library, threshold=THRESHOLD, folder="a")) == 3


def tree_hashes(root):
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.islink(path):
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("action", ["move", "hardlink", "symlink"])
def test_apply_then_undo_restores_byte_identical_files(library_root, action, catalog_url):
    before = tree_hashes(library_root)
    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        result = apply(library, groups, action)
        assert len(result.done) == 3 and not result.skipped
        for step in result.done:
            assert step.dst.exists()
            assert os.path.lexists(step.src) == (action != "move")
            if action != "move":
                assert os.path.samefile(step.src, step.keeper)
        for group in groups:  # one copy always survives, untouched
            assert (library_root / group.keeper.path).read_bytes()
        with LibrarySearch(library) as lib:
            assert "b/p0-copy.jpg" not in [h.path for h in lib.similar("a/p0.jpg", k=5)]
        result_undo = undo(library)
        assert len(result_undo.restored) == 3 and result_undo.not_in_catalog == 0
        with pytest.raises(JournalError, match="already undone"):
            undo(library, result.journal)
    assert tree_hashes(library_root) == before
    assert not any(os.path.islink(library_root / p) for p in before)


def test_changed_file_skips_its_group_only(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        with open(library_root / "b/p1-small.jpg", "ab") as f:
            f.write(b"edited after the plan")
        result = apply(library, groups, "move")
    assert len(result.done) == 2
    assert len(result.skipped) == 1 and "changed size" in result.skipped[0][1]
    assert (library_root / "b/p1-small.jpg").exists()


def test_quarantine_name_collisions_never_overwrite(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        quarantine = library.folder / "quarantine"
        (quarantine / "b").mkdir(parents=True)
        (quarantine / "b/p0-copy.jpg").write_bytes(b"someone else's file")
        result = apply(library, groups, "move")
        assert (quarantine / "b/p0-copy.jpg").read_bytes() == b"someone else's file"
        assert (quarantine / "b/p0-copy~1.jpg").exists()
        undo(library, result.journal)
    assert (library_root / "b/p0-copy.jpg").read_bytes() == (library_root / "a/p0.jpg").read_bytes()


def test_undo_after_a_kill_mid_step(library_root, catalog_url):
    """Kill between the two halves of a move (hard link made, original not yet unlinked), then undo."""
    before = tree_hashes(library_root)
    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        result = apply(library, groups[:1], "move")
        step = result.done[0]
        lines = result.journal.read_text().splitlines()
        # Rewrite the journal and the disk as a kill just after os.link() would have left them.
        result.journal.write_text("\n".join(line for line in lines if '"done"' not in line) + "\n")
        os.link(step.dst, step.src)
        assert undo(library, result.journal).restored == []  # nothing to restore: the original was intact
        assert not step.dst.exists()
    assert tree_hashes(library_root) == before


def test_an_index_run_between_apply_and_undo_keeps_the_moved_files_rows(library_root, encoder, catalog_url):
    """Rows of quarantined files stay until undo or purge: undo needs no re-embedding afterwards."""
    with Library.open(library_root, url=catalog_url, write=True) as library:
        result = apply(library, find_duplicates(library, threshold=THRESHOLD), "move")
        counts = run_index(library, encoder, Options(workers=0))  # the moved files are not at their paths
        assert counts["deleted"] == 0 and library.info()["counts"]["quarantined"] == 3
        restored = undo(library, result.journal)
        assert len(restored.restored) == 3 and restored.not_in_catalog == 0
        counts = run_index(library, encoder, Options(workers=0))
        assert counts["embedded"] == 0 and library.info()["counts"] == {"embedded": 11}


def test_reports(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
    data = json.loads(to_json(groups))
    assert data["files_to_act_on"] == 3 and data["groups"][0]["members"][0]["sha256"]
    rows = to_csv(groups).splitlines()
    assert rows[0].startswith("group,kind,min_similarity,keep,path") and len(rows) == 7
    page = to_html(groups, library_root)
    assert page.count('class="card keep"') == 3 and page.count("data:image/jpeg;base64,") == 6
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # self-contained


@pytest.mark.slow
def test_crops_group_only_with_patch_token_reranking(tmp_path, small_folder, catalog_url):
    """On full-size ViT-S (random weights) a 50% crop has CLS cosine ~0.88 to its source, below
    unrelated pairs (~0.95), while its patch tokens match at ~0.955 (unrelated: <= 0.935)."""
    encoder = Encoder.from_pretrained(small_folder, precision="fp32")
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):
        synthetic_photo(800, 600, seed=20 + i).save(root / f"p{i}.png")
    Image.open(root / "p0.png").crop((100, 100, 500, 400)).save(root / "p0-crop.png")
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        plain = find_duplicates(library, threshold=0.945)
        reranked = find_duplicates(library, threshold=0.945, crop_encoder=encoder, candidate_threshold=0.8)
    crop_pair = ["p0-crop.png", "p0.png"]
    assert crop_pair not in [sorted(m.path for m in g.members) for g in plain]
    crop_groups = [g for g in reranked if "p0-crop.png" in [m.path for m in g.members]]
    assert [sorted(m.path for m in g.members) for g in crop_groups] == [crop_pair]
    assert crop_groups[0].keeper.path == "p0.png" and crop_groups[0].min_similarity >= 0.945


def test_large_exact_libraries_find_pairs_through_a_temporary_ivf(library_root, monkeypatch, catalog_url):
    import dinoseek.retrieval.dedup as dedup

    monkeypatch.setenv("DINOSEEK_TORCH_SEARCH", "off")  # FAISS's path (on CUDA without faiss-gpu torch searches)
    with Library.open(library_root, url=catalog_url) as library:
        exact = find_duplicates(library, threshold=THRESHOLD)
    monkeypatch.setattr(dedup, "EXACT_PAIRS_MAX", 5)
    with Library.open(library_root, url=catalog_url) as library:
        index = dedup.candidate_index(library, "cls")
        assert index.factory.startswith("IVF") and index.count == 11  # not the library's Flat index
        assert library.indexes == {}  # which was never loaded
        approximate = find_duplicates(library, threshold=THRESHOLD)
    assert [[m.id for m in g.members] for g in approximate] == [[m.id for m in g.members] for g in exact]


def test_a_search_closes_only_the_library_it_owns(library_root, monkeypatch, catalog_url):
    from dinoseek.indexer.errors import LibraryLockedError
    from dinoseek.retrieval.api import open_library

    with Library.open(library_root, url=catalog_url, write=True) as library:
        with LibrarySearch(library) as lib:  # handed a library: the caller's to close
            assert lib.similar("a/p0.jpg", k=1)
        with pytest.raises(LibraryLockedError):  # the writer lock is still held...
            Library.open(library_root, url=catalog_url, write=True)
        assert library.manifest() is not None  # ...and the catalog still answers
    closed = []
    real_close = Library.close
    monkeypatch.setattr(Library, "close", lambda self: (closed.append(self), real_close(self)))
    with open_library(library_root, url=catalog_url) as lib:  # opened it: closes it
        assert lib.similar("a/p0.jpg", k=1)
    assert closed == [lib.library]


def test_large_filtered_sets_go_through_a_faiss_id_selector(library_root, encoder, monkeypatch, catalog_url):
    import dinoseek.retrieval.api as api

    vector = encoder.embed([synthetic_photo(300, 300, seed=11)]).cls[0]
    monkeypatch.setattr(api, "EXACT_FILTER_LIMIT", 0)  # force the FAISS path
    with Library.open(library_root, url=catalog_url) as library, LibrarySearch(library) as lib:
        hits = lib.search(vector, k=20, folder="b")
        expected = brute_force(library_root, catalog_url, lib.vectors_for(vector, "cls")[0], "cls",
                               lambda r: r.folder == "b")
    assert len(hits) == len(expected) == 7
    assert_same_ranking(hits, expected)


def test_a_keeper_reached_through_a_swapped_folder_symlink_is_never_moved(library_root, catalog_url):
    """After indexing, b/ is replaced by a symlink to a/: b/p0-copy.jpg would be a/p0.jpg itself."""
    import shutil

    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, exact_only=True)
        (library_root / "a/p0-copy.jpg").write_bytes((library_root / "b/p0-copy.jpg").read_bytes())
        shutil.rmtree(library_root / "b")
        os.symlink(library_root / "a", library_root / "b")
        result = apply(library, groups, "move")
    assert result.done == [] and "symbolic link" in result.skipped[0][1]
    assert (library_root / "a/p0.jpg").exists()


def test_hard_links_to_the_keeper_are_not_duplicates_to_free(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, exact_only=True)
        copy = library_root / "b/p0-copy.jpg"
        copy.unlink()
        os.link(library_root / "a/p0.jpg", copy)  # same bytes, same inode
        result = apply(library, groups, "move")
    assert result.done == [] and "is the kept file itself" in result.skipped[0][1]


def test_failed_link_puts_the_file_back(library_root, monkeypatch, catalog_url):
    import dinoseek.retrieval.actions as actions

    def no_links(*args):
        raise OSError(95, "Operation not supported")

    before = tree_hashes(library_root)
    with Library.open(library_root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        monkeypatch.setattr(actions.os, "symlink", no_links)
        # The CLI adds that `dinoseek undo` restores them.
        with pytest.raises(actions.ActionError, match=r"journal .*\.jsonl records them$"):
            apply(library, groups, "symlink")
    assert tree_hashes(library_root) == before


def test_quarantine_inside_the_photo_folder_is_refused(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url, write=True) as library:
        with pytest.raises(ValueError, match="inside the photo folder"):
            apply(library, find_duplicates(library, threshold=THRESHOLD), "move", str(library_root / "dups"))


def test_undo_keeps_a_quarantined_copy_whose_original_was_replaced(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url, write=True) as library:
        result = apply(library, find_duplicates(library, threshold=THRESHOLD), "move")
        step = result.done[0]
        step.src.write_bytes(b"a new file the user saved at the old name")
        with pytest.raises(JournalError, match="was replaced since the apply"):
            undo(library, result.journal)
        assert step.dst.exists()  # the old bytes are kept, never deleted
        assert "undone" not in result.journal.read_text()


def test_torn_last_journal_line_is_tolerated(library_root, catalog_url):
    before = tree_hashes(library_root)
    with Library.open(library_root, url=catalog_url, write=True) as library:
        result = apply(library, find_duplicates(library, threshold=THRESHOLD), "move")
        with open(result.journal, "a") as f:
            f.write('{"type": "intent", "step": 9, "op": "mo')  # power loss mid-write
        assert len(undo(library, result.journal).restored) == 3
    assert tree_hashes(library_root) == before


def test_odd_byte_names_are_moved_and_restored(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    root.mkdir()
    synthetic_photo(300, 200, seed=1).save(root / "a.jpg")
    odd = os.fsdecode(b"caf\xe9.jpg")
    (root / odd).write_bytes((root / "a.jpg").read_bytes())
    before = tree_hashes(root)
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        result = apply(library, find_duplicates(library, exact_only=True), "move")
        assert len(result.done) == 1
        undo(library, result.journal)
    assert tree_hashes(root) == before


def test_protect_accepts_absolute_and_dotted_paths_and_checks_them(library_root, catalog_url):
    with Library.open(library_root, url=catalog_url) as library:
        for spelling in (str(library_root / "b"), "./b", "b/"):
            groups = find_duplicates(library, threshold=THRESHOLD, protected=(spelling,), order=("resolution",))
            assert {g.keeper.path for g in groups} == {"b/p0-copy.jpg", "b/p1-small.jpg", "b/p2-reencoded.jpg"}
        with pytest.raises(ValueError, match="no such folder"):
            find_duplicates(library, protected=("nope",))
        with pytest.raises(ValueError, match="not inside"):
            find_duplicates(library, protected=("/",))


def test_calibration_does_not_count_the_librarys_own_duplicates_as_false_positives(tmp_path, encoder, catalog_url):
    """Two byte copies in the library: a copy altered from one matches the other exactly as well."""
    from dinoseek.retrieval.calibrate import calibrate

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        synthetic_photo(640, 480, seed=40 + i).save(root / f"p{i}.jpg", quality=92)
    (root / "p0-backup.jpg").write_bytes((root / "p0.jpg").read_bytes())
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        table, _, used = calibrate(library, encoder, sample=4)
    assert used == 4
    top = [row for row in table if row.recall > 0][-1]  # the highest threshold any altered copy reaches
    assert top.precision == 1.0, top

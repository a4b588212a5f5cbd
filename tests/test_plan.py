"""The indexing plan on its own: hand-made catalog states and scans; no files, torch or FAISS."""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED, TRANSIENT
from dinoseek.indexer.errors import LibraryError, SweepRefusedError
from dinoseek.indexer.plan import MASS_DELETE_MIN, Task, make_plan, path_rank, sweep_decision
from dinoseek.indexer.scan import ScanEntry, ScanProblem


@dataclass(frozen=True)
class Row:
    id: int
    size: int = 100
    mtime_ns: int = 1
    status: str = EMBEDDED
    sha256: str | None = None
    usable: bool = True


def state(**rows: Row) -> dict[bytes, Row]:
    """Paths as keyword names: `a_jpg` is b"a.jpg", `d__a_jpg` is b"d/a.jpg"."""
    return {name.replace("__", "/").replace("_", ".").encode(): row for name, row in rows.items()}


def entry(rel: bytes, size: int = 100, mtime_ns: int = 1) -> ScanEntry:
    return ScanEntry(rel, size, mtime_ns)


def plan(catalog, items, *, retry=TRANSIENT, **kwargs):
    return make_plan(catalog, items, retry_statuses=retry, **kwargs)


def test_import_needs_neither_torch_nor_faiss():
    code = "import dinoseek.indexer.plan, sys; assert 'torch' not in sys.modules and 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unchanged_file_is_skipped_and_changed_or_new_ones_are_read():
    catalog = state(a_jpg=Row(1), b_jpg=Row(2))
    p = plan(catalog, [entry(b"a.jpg"), entry(b"b.jpg", size=200), entry(b"c.jpg"), entry(b"d.jpg", mtime_ns=1)])
    assert p.to_read == (Task(b"b.jpg", 200, 1), Task(b"c.jpg", 100, 1), Task(b"d.jpg", 100, 1))
    assert p.scanned == 4 and p.catalogued == 2 and not p.missing and not p.problems


def test_touched_file_is_read_again():
    p = plan(state(a_jpg=Row(1)), [entry(b"a.jpg", mtime_ns=2)])
    assert [t.rel for t in p.to_read] == [b"a.jpg"]


def test_embedded_row_without_usable_vectors_is_read_again():
    p = plan(state(a_jpg=Row(1, usable=False)), [entry(b"a.jpg")])
    assert [t.rel for t in p.to_read] == [b"a.jpg"]


@pytest.mark.parametrize("status", sorted(TRANSIENT))
def test_transient_failures_are_retried(status):
    p = plan(state(a_jpg=Row(1, status=status)), [entry(b"a.jpg")])
    assert [t.rel for t in p.to_read] == [b"a.jpg"]


@pytest.mark.parametrize("status", ["unsupported", "too-large", "corrupt"])
def test_lasting_failures_of_unchanged_files_are_left_alone(status):
    assert plan(state(a_jpg=Row(1, status=status)), [entry(b"a.jpg")]).to_read == ()


def test_needs_plugin_is_retried_only_once_the_plugin_is_available():
    catalog = state(a_heic=Row(1, status="needs-plugin"))
    assert plan(catalog, [entry(b"a.heic")], retry=TRANSIENT).to_read == ()
    with_plugin = plan(catalog, [entry(b"a.heic")], retry=TRANSIENT | {"needs-plugin"})
    assert [t.rel for t in with_plugin.to_read] == [b"a.heic"]


def test_recorded_problem_is_left_alone_and_new_or_changed_ones_recorded():
    catalog = state(a_psd=Row(1, status="unsupported"), b_jpg=Row(2, status="unsupported"))
    items = [ScanProblem(b"a.psd", "unsupported", "PSD files are not supported"),
             ScanProblem(b"b.jpg", "linked", "same file as c.jpg"),
             ScanProblem(b"new.psd", "unsupported", "PSD files are not supported")]
    p = plan(catalog, items)
    assert [(x.rel, x.status) for x in p.problems] == [(b"b.jpg", "linked"), (b"new.psd", "unsupported")]
    assert not p.missing and p.to_read == ()


def test_link_left_at_a_quarantined_path_keeps_the_row_quarantined():
    catalog = state(dup_jpg=Row(1, status=QUARANTINED, sha256="h"))
    p = plan(catalog, [ScanProblem(b"dup.jpg", "linked", "same file as keep.jpg")])
    assert p.problems == () and not p.missing


def test_quarantined_path_that_is_a_file_again_is_rechecked_and_may_return():
    catalog = state(dup_jpg=Row(1, status=QUARANTINED, sha256="h"), old_jpg=Row(2, status=QUARANTINED))
    p = plan(catalog, [entry(b"dup.jpg"), entry(b"old.jpg")])
    assert [t.rel for t in p.to_read] == [b"dup.jpg", b"old.jpg"]
    assert dict(p.returned) == {b"dup.jpg": "h"}  # old.jpg has no hash: it is simply read again
    assert p.known_hashes == {"h"}


def test_moved_file_is_detected_by_hash():
    catalog = state(old__a_jpg=Row(1, sha256="h1"), gone_jpg=Row(2, sha256="h2", usable=False),
                    bad_jpg=Row(3, status="corrupt"))
    p = plan(catalog, [entry(b"new/a.jpg")])
    assert dict(p.moved_from) == {"h1": b"old/a.jpg"}  # only embedded rows with vectors can move
    assert set(p.missing) == {b"old/a.jpg", b"gone.jpg", b"bad.jpg"}
    assert [t.rel for t in p.to_read] == [b"new/a.jpg"] and p.known_hashes == {"h1"}
    assert sorted(sweep_decision(p, moved=[b"old/a.jpg"])) == [2, 3]


def test_missing_under_an_unlisted_folder_is_not_swept():
    catalog = state(locked__a_jpg=Row(1), locked__b__c_jpg=Row(2), lockedx_jpg=Row(3), open__d_jpg=Row(4))
    p = plan(catalog, [ScanProblem(b"locked", "unreadable", "folder: Permission denied"), entry(b"open/d.jpg")])
    assert p.unlisted == (b"locked/",)
    assert set(p.missing) == {b"lockedx.jpg"}  # a sibling with the same prefix is still looked for
    assert [x.rel for x in p.problems] == [b"locked"]


def test_filtered_out_path_is_not_swept():
    catalog = state(a_jpg=Row(1), b_png=Row(2), raw__c_jpg=Row(3))
    p = plan(catalog, [], include=("*.jpg",), exclude=("raw/*",), allow_mass_delete=True)
    assert set(p.missing) == {b"a.jpg"}


def test_empty_root_is_refused_unless_allowed():
    catalog = state(a_jpg=Row(1), b_jpg=Row(2), c_jpg=Row(3))
    with pytest.raises(SweepRefusedError, match="/p is empty but the library knows 3 files"):
        plan(catalog, iter(()), root="/p")
    allowed = plan(catalog, [], allow_mass_delete=True)
    assert sweep_decision(allowed, allow_mass_delete=True) == [1, 2, 3]
    assert plan({}, []).to_read == ()  # a new library may start empty


def test_unreadable_root_is_an_error():
    with pytest.raises(LibraryError, match="cannot read /p: library root: No such file"):
        plan(state(a_jpg=Row(1)), [ScanProblem(b"", "unreadable", "library root: No such file or directory")],
             root="/p")


def _library(kept: int, gone: int, quarantined_gone: int = 0) -> tuple[dict, list]:
    catalog = {f"k{i}.jpg".encode(): Row(i) for i in range(kept)}
    catalog |= {f"g{i}.jpg".encode(): Row(1000 + i) for i in range(gone)}
    catalog |= {f"q{i}.jpg".encode(): Row(2000 + i, status=QUARANTINED) for i in range(quarantined_gone)}
    return catalog, [entry(f"k{i}.jpg".encode()) for i in range(kept)]


def test_mass_delete_guard_refuses_unless_allowed():
    catalog, items = _library(kept=10, gone=MASS_DELETE_MIN)
    p = plan(catalog, items)
    with pytest.raises(SweepRefusedError, match=f"{MASS_DELETE_MIN} of 30 catalogued files are gone from /p"):
        sweep_decision(p, root="/p")
    assert len(sweep_decision(p, allow_mass_delete=True)) == MASS_DELETE_MIN


def test_mass_delete_guard_lets_small_or_partial_losses_through():
    catalog, items = _library(kept=2, gone=MASS_DELETE_MIN - 1)  # most, but a small library
    assert len(sweep_decision(plan(catalog, items))) == MASS_DELETE_MIN - 1
    catalog, items = _library(kept=MASS_DELETE_MIN, gone=MASS_DELETE_MIN)  # half: not more than half
    assert len(sweep_decision(plan(catalog, items))) == MASS_DELETE_MIN


def test_moves_do_not_count_towards_the_guard():
    catalog = {f"old/{i}.jpg".encode(): Row(i, sha256=f"h{i}") for i in range(MASS_DELETE_MIN + 5)}
    items = [entry(f"new/{i}.jpg".encode()) for i in range(MASS_DELETE_MIN + 5)]
    p = plan(catalog, items)
    assert sweep_decision(p, moved=p.moved_from.values()) == []


def test_quarantined_rows_do_not_count_towards_the_guard_and_are_kept():
    # 20 of 60 rows vanished: under half; the 30 quarantined ones gone too would make it 50 of 60
    catalog, items = _library(kept=10, gone=MASS_DELETE_MIN, quarantined_gone=30)
    ids = sweep_decision(plan(catalog, items))
    # no refusal; the quarantined rows stay until undo or purge
    assert len(ids) == MASS_DELETE_MIN and all(catalog_row.status != QUARANTINED for catalog_row in
                                               (row for row in catalog.values() if row.id in ids))


def test_path_rank_prefers_the_embedded_path_and_puts_quarantined_last():
    rank = path_rank(state(a_jpg=Row(1), q_jpg=Row(2, status=QUARANTINED), f_jpg=Row(3, status="corrupt")))
    assert [rank(p) for p in (b"a.jpg", b"new.jpg", b"f.jpg", b"q.jpg")] == [0, 1, 1, 2]


def test_plan_pickles_for_another_process():
    catalog = state(old_jpg=Row(1, sha256="h"), q_jpg=Row(2, status=QUARANTINED, sha256="g"))
    p = plan(catalog, [entry(b"new.jpg"), entry(b"q.jpg", size=5), ScanProblem(b"x.psd", "unsupported", "no")])
    assert pickle.loads(pickle.dumps(p)) == p

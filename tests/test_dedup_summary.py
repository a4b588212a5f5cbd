"""Dry runs and reports say how many files and bytes leave the photo folder, where to, and that space
on the photos' own filesystem comes back only with `dinoseek purge`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos

from dinoseek.indexer.library import Library
from dinoseek.retrieval import report
from dinoseek.retrieval.dedup import find_duplicates
from dinoseek.retrieval.report import human_bytes, plan_summary

SAME_DISK = "(the same filesystem as the photos: no space is freed until `dinoseek purge`)"


def invoke(*args):
    return CliRunner().invoke(main_command(), [str(a) for a in args])


def main_command():
    from dinoseek.retrieval.cli import main

    return main


@pytest.fixture
def root(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    make_library_photos(root)
    (root / "b" / "p1-small.xmp").write_text("<x:xmpmeta>rating 5</x:xmpmeta>")  # travels with its photo
    index_with_cli(root, tiny_folder)
    return root


def leaving(root) -> tuple[int, int]:
    """(files, bytes) of the copies the plan sets aside, straight from the catalog's groups."""
    with Library.open(root) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
    return sum(len(g.others) for g in groups), sum(m.size for g in groups for m in g.others)


def test_dry_run_says_files_and_bytes_that_leave_and_that_purge_frees_them(root):
    files, size = leaving(root)
    sidecar = (root / "b" / "p1-small.xmp").stat().st_size
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move")
    assert result.exit_code == 0, result.output
    quarantine = (root / ".dinoseek" / "quarantine").resolve()
    assert result.output.splitlines()[-1] == (
        f"{files} files ({human_bytes(size)}) and 1 sidecar files ({human_bytes(sidecar)}) would leave the photo "
        f"folder for {quarantine} {SAME_DISK}")
    data = json.loads(invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--json").output)
    assert data["summary"] == {"action": "move", "applied": False, "files": files, "bytes": size, "sidecars": 1,
                               "sidecar_bytes": sidecar, "quarantine": str(quarantine), "same_filesystem": True,
                               "bytes_freed_before_purge": 0}
    assert size == sum(m["bytes"] for g in data["groups"] for m in g["members"] if not m["keep"])


def test_report_only_run_says_what_a_move_would_take(root, tmp_path):
    files, size = leaving(root)
    result = invoke("dedup", root, "--threshold", THRESHOLD)
    assert result.output.splitlines()[-1].startswith(
        f"{files} files ({human_bytes(size)}) and 1 sidecar files")
    assert "would leave the photo folder with --action move --apply, for" in result.output
    page = tmp_path / "dups.html"
    assert invoke("dedup", root, "--threshold", THRESHOLD, "--report", page).exit_code == 0
    assert f"{files} files ({human_bytes(size)})" in page.read_text() and "dinoseek purge" in page.read_text()
    report_json = tmp_path / "dups.json"
    assert invoke("dedup", root, "--threshold", THRESHOLD, "--report", report_json).exit_code == 0
    assert json.loads(report_json.read_text())["summary"]["bytes"] == size


def test_links_leave_their_sidecars_and_say_so(root):
    files, size = leaving(root)
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "hardlink")
    assert result.output.splitlines()[-1] == (
        f"{files} files ({human_bytes(size)}) would leave the photo folder for "
        f"{(root / '.dinoseek' / 'quarantine').resolve()} {SAME_DISK}")


def test_applied_summary_matches_the_bytes_in_the_quarantine(root):
    files, size = leaving(root)
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--apply")
    assert result.exit_code == 0, result.output
    assert f"{files} files ({human_bytes(size)}) and 1 sidecar files" in result.output
    assert "leave the photo folder for" in result.output and "would leave" not in result.output
    quarantined = [p for p in (root / ".dinoseek" / "quarantine").rglob("*") if p.is_file()]
    photos = [p for p in quarantined if p.suffix == ".jpg"]
    assert len(photos) == files and sum(p.stat().st_size for p in photos) == size


def test_quarantine_on_another_filesystem_frees_space_at_once(root, monkeypatch):
    def device(path: Path):  # the quarantine on device 2, the photos on device 1
        return 2 if path.parts[-2:] == (".dinoseek", "quarantine") else 1

    monkeypatch.setattr(report, "_device", device)
    with Library.open(root) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        summary = plan_summary(library, groups, "move")
    assert summary.same_filesystem is False
    total = summary.bytes + summary.sidecar_bytes
    assert summary.to_dict()["bytes_freed_before_purge"] == total
    assert summary.text().endswith(f"(another filesystem: {human_bytes(total)} freed beside the photos, held in the "
                                   f"quarantine until `dinoseek purge`)")


def test_real_other_filesystem_is_told_apart_by_st_dev(root, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(root).st_dev:
        pytest.skip("no writable folder on another filesystem here")
    elsewhere = shm / f"dinoseek-quarantine-{os.getpid()}-{tmp_path.name}"  # not created: dry run
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--quarantine", elsewhere, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["same_filesystem"] is False
    assert not elsewhere.exists()


def test_no_duplicates_no_summary(root):
    result = invoke("dedup", root, "--exact", "--protect", "a", "--protect", "b")
    assert result.output.endswith("0 groups, 0 files duplicated\n")
    assert "summary" not in json.loads(invoke("dedup", root, "--exact", "--protect", "a", "--protect", "b",
                                              "--json").output)


@pytest.mark.parametrize("count,shown", [(0, "0 bytes"), (999, "999 bytes"), (1000, "1.0 kB"),
                                         (2_700_000, "2.7 MB"), (5 * 10**12, "5.0 TB"), (7 * 10**15, "7000.0 TB")])
def test_human_bytes(count, shown):
    assert human_bytes(count) == shown

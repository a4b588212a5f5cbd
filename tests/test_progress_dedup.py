"""Progress of dedup (candidates, grouping, --crops, report thumbnails), apply, undo and purge as
count lines on stderr; --json keeps stdout one JSON document (the planned sidecars and, with
--apply, what was done); Ctrl-C during a dry run, an apply, an undo or a purge says what was done
and how to go on, and leaves a library that verifies, undoes and resumes.

Libraries are built as tests/test_retrieval.py builds them (tiny model, `index` through the CLI);
Ctrl-C is a KeyboardInterrupt raised in a step, or a real SIGINT sent to this process mid-step.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos, tree_hashes

from dinoseek.retrieval import actions, purge
from dinoseek.retrieval.cli import main

# Plain count lines (what a log file or CI gets), one per update: every step leaves its final count.
ENV = {"DINOSEEK_PROGRESS": "lines", "DINOSEEK_PROGRESS_INTERVAL": "0"}
COUNT = re.compile(r"^(?P<what>.+): (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>\w+) \(\d+%\)")
PHOTOS = 13  # make_library_photos' 11 and two more byte copies
DUPLICATES = 5  # p0-copy, p1-small, p2-reencoded, p3-copy, p3-copy2


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env=ENV)


def final_counts(stderr: str) -> dict[str, tuple[int, int, str]]:
    """Each step's last count line: what -> (done, total, unit)."""
    counts = {}
    for line in stderr.splitlines():
        match = COUNT.match(line)
        if match:
            counts[match["what"]] = (int(match["done"].replace(",", "")), int(match["total"].replace(",", "")),
                                     match["unit"])
    return counts


@pytest.fixture()
def root(tmp_path, tiny_folder) -> Path:
    """An indexed library under a root that needs quoting: 5 duplicates in 4 groups, and an XMP
    sidecar beside both byte copies of p0 (whichever is kept, the other takes its own along)."""
    root = tmp_path / "my photos"
    make_library_photos(root)
    for name in ("p3-copy.jpg", "p3-copy2.jpg"):
        shutil.copyfile(root / "a" / "p3.jpg", root / "b" / name)
    (root / "a" / "p0.xmp").write_bytes(b"<x:xmpmeta>rating 5</x:xmpmeta>")
    (root / "b" / "p0-copy.xmp").write_bytes(b"<x:xmpmeta>rating 3</x:xmpmeta>")
    index_with_cli(root, tiny_folder)
    return root


def journal_of(root: Path) -> Path:
    (journal,) = sorted((root / ".dinoseek" / "journals").glob("*.jsonl"))
    return journal


def quoted(path: Path) -> str:
    return shlex.quote(str(path))


def apply_args(root: Path, *extra):
    return ("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--apply", *extra)


# ---- count lines, and stdout that stays JSON --------------------------------------------------------
def test_dedup_with_an_html_report_prints_counts_for_candidates_grouping_and_thumbnails(root, tmp_path):
    report = tmp_path / "dups.html"
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--report", report, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # the whole of stdout is one JSON document
    members = sum(len(g["members"]) for g in plan["groups"])
    counts = final_counts(result.stderr)
    assert counts["dedup: candidates"] == (PHOTOS, PHOTOS, "images"), result.stderr
    done, total, unit = counts["dedup: grouping"]
    assert done == total >= DUPLICATES and unit == "pairs"
    assert counts["report: thumbnails"] == (members, members, "images")
    assert report.read_text().count("<img ") == members
    assert all(COUNT.match(line) for line in result.stderr.splitlines()), result.stderr  # nothing else there


def test_dedup_crops_reports_rereading_and_matching(root, tiny_folder):
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--crops", "--weights", tiny_folder,
                    "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["groups"]
    counts = final_counts(result.stderr)
    done, total, unit = counts["dedup: crops"]
    assert done == total > 0 and unit == "images", result.stderr
    done, total, unit = counts["dedup: crop matching"]
    assert done == total > 0 and unit == "pairs"
    assert counts["dedup: candidates"][:2] == (PHOTOS, PHOTOS)


def test_dry_run_json_lists_the_sidecars_each_moved_duplicate_takes(root):
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    listed = {m["path"]: m.get("sidecars") for g in plan["groups"] for m in g["members"]}
    p0_group = next(g for g in plan["groups"] if "a/p0.jpg" in {m["path"] for m in g["members"]})
    (going,) = [m["path"] for m in p0_group["members"] if not m["keep"]]
    assert listed[going] == [going.rsplit(".", 1)[0] + ".xmp"]
    kept = [m["path"] for g in plan["groups"] for m in g["members"] if m["keep"]]
    assert all(listed[path] is None for path in kept)  # a kept copy takes nothing anywhere
    assert sorted(path for path, sidecars in listed.items() if sidecars == []) == sorted(
        m["path"] for g in plan["groups"] for m in g["members"] if not m["keep"] and m["path"] != going)
    # a link leaves its sidecars where they are: nothing listed
    linked = json.loads(invoke("dedup", root, "--threshold", THRESHOLD, "--action", "hardlink", "--json").stdout)
    assert all("sidecars" not in m for g in linked["groups"] for m in g["members"])


def test_apply_and_undo_print_counts_and_apply_json_is_one_document(root):
    before = tree_hashes(root)
    result = invoke(*apply_args(root, "--json"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the plan and what was done, nothing else
    applied = data["applied"]
    assert len(applied["files"]) == DUPLICATES and len(applied["sidecars"]) == 1 and not applied["skipped"]
    assert applied["journal"] == str(journal_of(root))
    assert {f["path"] for f in applied["files"]} == {m["path"] for g in data["groups"] for m in g["members"]
                                                     if not m["keep"]}
    assert final_counts(result.stderr)["apply"] == (DUPLICATES, DUPLICATES, "files"), result.stderr

    undone = invoke("undo", root)
    assert undone.exit_code == 0, undone.output
    assert final_counts(undone.stderr)["undo"] == (DUPLICATES + 1, DUPLICATES + 1, "files"), undone.stderr
    assert undone.stdout.startswith(f"restored {DUPLICATES} files")
    assert tree_hashes(root) == before


def test_purge_prints_counts_of_the_copies_it_checks(root):
    assert invoke(*apply_args(root)).exit_code == 0
    result = invoke("purge", root, "--apply")
    assert result.exit_code == 0, result.output
    assert final_counts(result.stderr)["purge"] == (DUPLICATES + 1, DUPLICATES + 1, "copies"), result.stderr


# ---- Ctrl-C -----------------------------------------------------------------------------------------
def interrupt_on_call(monkeypatch, module, name: str, call: int, when=lambda *args: True) -> None:
    """`module.name` raises KeyboardInterrupt on its `call`-th call that `when(*args)` accepts."""
    original = getattr(module, name)
    calls = 0

    def interrupted(*args, **kwargs):
        nonlocal calls
        if when(*args):
            calls += 1
            if calls == call:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_ctrl_c_during_a_dry_run_says_nothing_was_changed(root, monkeypatch):
    from dinoseek.retrieval import dedup

    before = tree_hashes(root)
    interrupt_on_call(monkeypatch, dedup, "linked_groups", 1)
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--json")
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "interrupted: nothing was changed"
    assert tree_hashes(root) == before


def test_ctrl_c_during_apply_names_what_was_moved_and_undo_restores_exactly_those(root, monkeypatch):
    before = tree_hashes(root)
    interrupt_on_call(monkeypatch, actions, "_move_journaled", 3)  # two files set aside, then Ctrl-C
    result = invoke(*apply_args(root))
    assert result.exit_code == 130, result.output
    moved = sorted(set(before) - set(tree_hashes(root)))
    photos = [p for p in moved if p.endswith(".jpg")]
    assert len(photos) == 2
    with_sidecars = f" (with {len(moved) - 2} sidecars)" if len(moved) > 2 else ""
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: 2 of {DUPLICATES} files moved{with_sidecars}, journal {journal_of(root).name}; "
        f"`dinoseek undo {quoted(root)}` puts them back, or run the same command again to go on")
    assert "Traceback" not in result.output

    verified = invoke("verify", root)
    assert verified.exit_code == 0, verified.output
    undone = invoke("undo", root)
    assert undone.exit_code == 0, undone.output
    assert undone.stdout.startswith("restored 2 files")
    assert tree_hashes(root) == before


def test_ctrl_c_mid_step_lets_that_step_finish_and_a_rerun_goes_on(root, monkeypatch):
    """A real SIGINT while a photo is being moved: the move, its catalog row and its sidecars are
    finished first, the apply stops before the next; the same command again moves the rest."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    before = tree_hashes(root)
    place = actions.place
    photos_placed = 0

    def place_with_ctrl_c(src, target, *args, **kwargs):
        nonlocal photos_placed
        if str(src).endswith(".jpg"):
            photos_placed += 1
            if photos_placed == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered while this step runs
        return place(src, target, *args, **kwargs)

    monkeypatch.setattr(actions, "place", place_with_ctrl_c)
    result = invoke(*apply_args(root))
    assert result.exit_code == 130, result.output
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    assert re.match(rf"interrupted: 2 of {DUPLICATES} files moved", result.stderr.splitlines()[-1]), result.stderr
    records = [json.loads(line) for line in journal_of(root).read_text().splitlines()]
    started = {r["step"] for r in records if r["type"] == "intent"}
    assert started == {r["step"] for r in records if r["type"] == "done"}  # no step left half done
    assert invoke("verify", root).exit_code == 0

    monkeypatch.setattr(actions, "place", place)
    again = invoke(*apply_args(root))
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1].startswith(f"{DUPLICATES - 2} files moved")
    assert invoke("undo", root).stdout.startswith(f"restored {DUPLICATES - 2} files")
    assert invoke("undo", root).stdout.startswith("restored 2 files")
    assert tree_hashes(root) == before


def test_ctrl_c_during_undo_says_what_was_restored_and_undo_again_finishes(root, monkeypatch):
    before = tree_hashes(root)
    assert invoke(*apply_args(root)).exit_code == 0
    interrupt_on_call(monkeypatch, actions, "_restore", 4)  # three steps back (sidecar or photo), then Ctrl-C
    result = invoke("undo", root)
    assert result.exit_code == 130, result.output
    back = [p for p in before if p.endswith(".jpg") and (root / p).exists()]
    restored = len(back) - (PHOTOS - DUPLICATES)  # the kept copies never left
    assert 1 <= restored <= 3
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: {restored} of {DUPLICATES} files restored; run `dinoseek undo {quoted(root)}` again to finish")
    assert invoke("verify", root).exit_code == 0

    monkeypatch.undo()
    finished = invoke("undo", root)
    assert finished.exit_code == 0, finished.output
    assert finished.stdout.startswith(f"restored {DUPLICATES - restored} files")
    assert tree_hashes(root) == before
    assert invoke("undo", root, "--list").stdout == "no journal to undo\n"


def test_ctrl_c_during_purge_purges_each_journal_whole_or_not_at_all(root, monkeypatch):
    """Two journals (an apply interrupted, then run again); Ctrl-C while the second one's copies are
    checked: the first is purged, the second left whole (still undoable), and purge again finishes."""
    before = tree_hashes(root)
    sizes = {path: (root / path).stat().st_size for path in before}
    interrupt_on_call(monkeypatch, actions, "_move_journaled", 3)
    assert invoke(*apply_args(root)).exit_code == 130
    first = set(before) - set(tree_hashes(root))  # two photos, and a sidecar if one went with them
    monkeypatch.undo()
    assert invoke(*apply_args(root)).exit_code == 0
    quarantine = root / ".dinoseek" / "quarantine"
    assert len([p for p in quarantine.rglob("*") if p.is_file()]) == DUPLICATES + 1

    interrupt_on_call(monkeypatch, purge, "_still_ours", len(first) + 2)  # the second journal's second copy
    result = invoke("purge", root, "--older-than", 0, "--apply")
    assert result.exit_code == 130, result.output
    line = result.stderr.splitlines()[-1]
    match = re.fullmatch(rf"interrupted: 1 of 2 journals purged \({len(first)} files, (\d+) bytes deleted\), the "
                         rf"others left as they were; run `dinoseek purge {re.escape(quoted(root))} --older-than 0 "
                         rf"--apply` again to go on", line)
    assert match, line
    assert int(match[1]) == sum(sizes[path] for path in first)
    left = sorted(p.relative_to(quarantine).as_posix() for p in quarantine.rglob("*") if p.is_file())
    assert left == sorted(set(before) - set(tree_hashes(root)) - first)  # the second journal's copies, all there
    assert invoke("verify", root).exit_code == 0

    monkeypatch.undo()
    again = invoke("purge", root, "--older-than", 0, "--apply")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1].startswith(f"deleted {len(left)} files")
    assert final_counts(again.stderr)["purge"] == (len(left), len(left), "copies"), again.stderr
    assert invoke("verify", root).exit_code == 0

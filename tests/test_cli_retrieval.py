"""search | similar | dedup | undo | calibrate through CliRunner, and one end-to-end subprocess run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_retrieval import THRESHOLD, index_with_cli, make_library_photos, tree_hashes

from dinoseek.retrieval.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def root(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    make_library_photos(root)
    index_with_cli(root, tiny_folder)
    return root


def test_search_and_similar(root, tiny_folder):
    result = invoke("search", root / "a/p0.jpg", "--root", root, "--weights", tiny_folder, "--precision", "fp32",
                    "-k", 3, "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert {h["path"] for h in hits[:2]} == {"a/p0.jpg", "b/p0-copy.jpg"} and hits[0]["score"] > 0.999
    assert set(hits[0]) >= {"id", "path", "score", "width", "height", "bytes", "captured_at", "camera"}
    result = invoke("similar", root / "a/p1.jpg", "--root", root, "-k", 2, "--folder", "b")
    assert result.exit_code == 0 and result.output.splitlines()[0].endswith("b/p1-small.jpg")
    result = invoke("similar", "a/nope.jpg", "--root", root)
    assert result.exit_code == 1 and result.output == "Error: a/nope.jpg is not an embedded image of this library\n"


def test_search_in_a_library_that_does_not_record_its_weights_asks_for_them(root, tmp_path, monkeypatch):
    """Libraries made before the weights' place was recorded: the default preset is tried, then --weights asked for."""
    import huggingface_hub.constants

    from dinoseek.indexer.library import Library
    from dinoseek.model.encoder import WEIGHTS_SOURCE

    with Library.open(root, write=True) as library:
        library.catalog.replace_manifest({k: v for k, v in library.manifest().items() if k != WEIGHTS_SOURCE})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("search", root / "a/p0.jpg", "--root", root)
    assert result.exit_code == 1 and "--weights PATH" in result.output


def test_dedup_dry_run_changes_nothing(root):
    before = tree_hashes(root)
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move")
    assert result.exit_code == 0, result.output
    assert "3 groups, 3 files to act on (dry run: add --apply)" in result.output
    assert "keep a/p1.jpg — highest resolution (640x480)" in result.output
    assert tree_hashes(root) == before
    data = json.loads(invoke("dedup", root, "--threshold", THRESHOLD, "--json").output)
    assert data["files_to_act_on"] == 3


def test_dedup_reports(root, tmp_path):
    for ext in ("json", "csv", "html"):
        out = tmp_path / f"dups.{ext}"
        assert invoke("dedup", root, "--threshold", THRESHOLD, "--report", out).exit_code == 0
        assert out.stat().st_size > 100
    result = invoke("dedup", root, "--report", tmp_path / "dups.txt")  # a usage error, before any work
    assert result.exit_code == 2 and "must end in .json, .csv or .html" in result.output
    assert "group 1" not in result.output and not (tmp_path / "dups.txt").exists()
    result = invoke("dedup", root, "--keep", "resolution,biggest")
    assert result.exit_code == 2 and "unknown rule 'biggest'" in result.output and "group 1" not in result.output


def test_apply_and_undo(root):
    before = tree_hashes(root)
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--apply", "--protect", "b")
    assert result.exit_code == 0, result.output
    assert "3 files moved; journal" in result.output
    assert not (root / "a/p0.jpg").exists() and (root / "b/p0-copy.jpg").exists()
    result = invoke("undo", root)
    assert result.exit_code == 0 and "restored 3 files" in result.output
    assert tree_hashes(root) == before
    result = invoke("undo", root)
    assert result.exit_code == 1 and "already undone" in result.output
    result = invoke("dedup", root, "--apply")  # a usage error: said before the plan, not after it
    assert result.exit_code == 2 and "--apply needs --action move, hardlink or symlink" in result.output
    assert "group 1" not in result.output


def test_calibrate(root, tiny_folder):
    result = invoke("calibrate", root, "--weights", tiny_folder, "--precision", "fp32", "--sample", 5, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["photos"] == 5 and len(data["rows"]) > 10
    first, last = data["rows"][0], data["rows"][-1]
    assert first["recall"] >= last["recall"]  # recall falls as the threshold rises
    assert set(first["recall_by_edit"]) == {"resize-50%", "jpeg-q60", "crop-80%", "rotate-90", "colour-shift"}
    text = invoke("calibrate", root, "--weights", tiny_folder, "--precision", "fp32", "--sample", 5).output
    assert "threshold precision  recall" in text


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and f"dinoseek {command} " in result.output.split("Example:")[1]


@pytest.mark.slow
def test_end_to_end_subprocess(tmp_path, tiny_folder):
    """index -> search -> dedup -> apply move -> undo, as a user would run it; every file's sha256
    is the same at the end as at the start."""
    root = tmp_path / "photos"
    make_library_photos(root)
    before = tree_hashes(root)

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "dinoseek.retrieval.cli", *map(str, args)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    model = ["--weights", tiny_folder, "--precision", "fp32"]
    assert "11 embedded" in run("index", root, *model)
    hits = json.loads(run("search", root / "a/p2.jpg", "--root", root, *model, "--json"))
    assert {h["path"] for h in hits[:2]} == {"a/p2.jpg", "b/p2-reencoded.jpg"}
    plan = json.loads(run("dedup", root, "--threshold", THRESHOLD, "--json"))
    assert plan["files_to_act_on"] == 3
    assert "3 files moved" in run("dedup", root, "--threshold", THRESHOLD, "--action", "move", "--apply")
    assert tree_hashes(root) != before
    assert "ok" in run("verify", root)  # the set-aside copies left the indexes with the catalog
    assert "restored 3 files" in run("undo", root)
    assert tree_hashes(root) == before
    assert "ok" in run("verify", root)


@pytest.mark.slow
def test_sigkill_during_apply_then_undo_restores_every_byte(tmp_path, tiny_folder, catalog_url):
    """A real `dinoseek dedup --apply` killed at random moments; `undo` must bring every file back."""
    import os
    import signal
    import time

    import numpy as np
    from conftest import synthetic_photo

    root = tmp_path / "photos"
    (root / "orig").mkdir(parents=True)
    for i in range(6):
        synthetic_photo(200, 150, seed=i).save(root / "orig" / f"p{i}.png")
    for copy in range(1, 40):  # 39 copies of each: many steps to interrupt
        folder = root / f"copies{copy:02d}"
        folder.mkdir()
        for i in range(6):
            (folder / f"p{i}.png").write_bytes((root / "orig" / f"p{i}.png").read_bytes())
    before = tree_hashes(root)
    from conftest import url_args

    cli = [sys.executable, "-m", "dinoseek.retrieval.cli"]
    url = url_args(catalog_url)
    subprocess.run([*cli, "index", str(root), "--weights", str(tiny_folder), "--precision", "fp32", *url], check=True,
                   capture_output=True, timeout=300)
    rng = np.random.default_rng(3)
    journals = root / ".dinoseek" / "journals"
    for steps in rng.integers(5, 200, 3):  # kill once the journal holds this many records
        known = set(journals.glob("*.jsonl")) if journals.exists() else set()
        process = subprocess.Popen([*cli, "dedup", str(root), "--exact", "--protect", "orig", "--action", "move",
                                    "--apply", *url],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            new = [j for j in journals.glob("*.jsonl") if j not in known] if journals.exists() else []
            if new and new[0].read_text().count("\n") >= steps:
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        result = subprocess.run([*cli, "undo", str(root), *url], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        restored = int(result.stdout.split("restored ")[1].split()[0])
        assert 0 < restored < 6 * 39  # the kill landed mid-apply
        assert tree_hashes(root) == before
        for folder in root.iterdir():
            assert not any(name.startswith(".dsk-") for name in os.listdir(folder))  # no temp copies left

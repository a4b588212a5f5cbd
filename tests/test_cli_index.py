"""`dinoseek index | info | verify` through CliRunner, and real SIGKILLs of `dinoseek index`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from collection import make_collection
from conftest import synthetic_photo, url_args

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def indexed(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    root.mkdir()
    expected = make_collection(root)
    result = invoke("index", root, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    return root, expected, result.output


def test_index_info_verify(indexed):
    root, expected, output = indexed
    ok = sum(s == "ok" for s in expected.values())
    assert f"{ok} embedded, 0 moved, 5 failed, 0 removed" in output
    assert "` lists the files not embedded, with the reason for each" in output
    data = json.loads(invoke("info", root, "--json").output)
    assert data["counts"][EMBEDDED] == ok and data["counts"]["truncated"] == 1
    with Library.open(root) as library:
        size = library.index_set.file("cls").stat().st_size
    assert data["indexes"]["cls"] == {"factory": "Flat", "requested": "auto", "vectors": ok, "nprobe": None, "bytes": size}
    assert {"path": "broken/bomb.png", "status": "too-large"}.items() <= next(
        e for e in data["errors"] if e["path"] == "broken/bomb.png").items()
    assert data["model"]["dim"] == 128 and data["last_run"]["status"] == "finished"
    text = invoke("info", root).output
    assert "embedded     " in text and "truncated: broken/truncated.jpg: decoding failed" in text
    result = invoke("verify", root)
    assert result.exit_code == 0 and "ok: catalog and indexes agree" in result.output


def test_verify_fails_then_repairs(indexed):
    root, _, _ = indexed
    with Library.open(root) as library:
        patch_file = library.index_set.file("patch")
    patch_file.write_bytes(b"garbage")
    result = invoke("verify", root)
    assert result.exit_code == 1
    assert f"patch: {patch_file.name} is missing or fails its checksum" in result.output
    assert result.output.rstrip().endswith(f"Error: 1 problem(s); run `dinoseek verify {root} --repair`")
    assert json.loads(invoke("verify", root, "--json").output.splitlines()[0])["ok"] is False
    result = invoke("verify", root, "--repair")
    assert result.exit_code == 0, result.output
    assert json.loads(invoke("verify", root, "--json").output) == {"ok": True, "problems": []}


def test_cli_errors_are_one_line(tmp_path, indexed, tiny_folder):
    root, _, _ = indexed
    result = invoke("info", tmp_path / "elsewhere")
    assert result.exit_code == 1
    assert result.output.startswith("Error: no library at") and "dinoseek index" in result.output
    with Library.open(root, write=True):
        result = invoke("index", root, "--weights", tiny_folder, "--workers", 0)
    assert result.exit_code == 1 and "is being written by pid" in result.output
    result = invoke("index", root, "--weights", tiny_folder, "--workers", 0, "--index", "IVF-nonsense")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, tiny_folder, catalog_url):
    """Kill real `dinoseek index` runs (checkpointing after every batch, so some kills land in index
    writes); every time the library must open, repair to a verified state, and finish on re-run.
    On PostgreSQL the kill also drops the writer's connections mid-transaction: the server rolls
    them back and releases the advisory lock."""
    root = tmp_path / "photos"
    root.mkdir()
    expected = make_collection(root)
    for i in range(160):
        synthetic_photo(360, 270, seed=1000 + i).save(root / "bulk" / f"{i:03d}.jpg" if (root / "bulk").exists()
                                                      else _mkdir(root / "bulk") / f"{i:03d}.jpg", quality=85)
    command = [sys.executable, "-m", "dinoseek.retrieval.cli", "index", str(root), "--weights", str(tiny_folder),
               "--precision", "fp32", "--batch-size", "4", "--workers", "1", "--checkpoint-seconds", "0",
               *url_args(catalog_url)]
    rng = np.random.default_rng(7)
    for number, delay in enumerate(sorted(rng.uniform(0.0, 4.0, 5))):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Time the kill from the moment this run began (its row in `runs`): starting Python and torch
        # takes 1 to 5 s on a loaded machine, and a kill before that would test nothing.
        deadline = time.monotonic() + 120
        while _runs(root, catalog_url) <= number and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        with Library.open(root, url=catalog_url, write=True) as library:  # opens; repairs what the kill left
            library.load_indexes()
            assert library.verify() == []
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with Library.open(root, url=catalog_url) as library, library.catalog.session() as s:
        catalog = s.query(ImageRow).all()
        paths = [r.path for r in catalog]
        assert len(paths) == len(set(paths))
        embedded = {r.path for r in catalog if r.status == EMBEDDED}
        decodable = {os.fsencode(p) for p, st in expected.items() if st == "ok"} | {
            os.fsencode(f"bulk/{i:03d}.jpg") for i in range(160)}
        assert embedded == decodable
        assert library.verify() == []
        assert len(library.load_indexes()["cls"].ids()) == len(decodable)


def _runs(root, url=None) -> int:
    """Index runs the catalog has seen so far (0 before it exists)."""
    import sqlite3

    if url is not None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import DBAPIError

        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                return connection.execute(text("SELECT count(*) FROM runs")).scalar()
        except DBAPIError:  # no tables yet
            return 0
        finally:
            engine.dispose()
    catalog = root / ".dinoseek" / "catalog.sqlite"
    try:
        with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("select count(*) from runs").fetchone()[0]
    except sqlite3.Error:
        return 0


def _mkdir(path):
    path.mkdir(exist_ok=True)
    return path
